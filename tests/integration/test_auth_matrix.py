"""The auth matrix: every route of the real app (read from its route table) x every kind of credential ->
the expected status, in token mode and in open mode (issue 20, section C).

A route added without a row here fails `test_every_route_has_a_row`. One app per mode, one real server
with real PostgreSQL and Redis, every request of a mode sent concurrently.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from arq import ArqRedis
from yarl import URL

from tests.helpers import SAMPLE_BRIEF
from tests.integration.test_api import FAST, READ, WRITE, Running, _start, new_generation
from worker.api.app import create_app
from worker.api.auth import Grant, Tokens
from worker.settings import Settings

REMOVED = "a-token-removed-from-the-config-0123456789"
ORDER, OTHER, NEW = 1, 2, 3
PAGE, SIGN_IN = "page", "sign-in"  # 200 and the dashboard signed in / 200 and the sign-in form

#: Where each route of the table is called (its {order_id} and {path} filled in).
PATHS = {
    "/healthz": "/healthz",
    "/metrics": "/metrics",
    "/v1/openapi.json": "/v1/openapi.json",
    "/v1/orders/{order_id}": f"/v1/orders/{ORDER}",
    "/v1/orders/{order_id}/generations": f"/v1/orders/{ORDER}/generations",
    "/v1/orders/{order_id}/events": f"/v1/orders/{ORDER}/events",
    "/v1/orders/{order_id}/generate": f"/v1/orders/{NEW}/generate",
    "/v1/orders/{order_id}/cancel": f"/v1/orders/{ORDER}/cancel",
    "/v1/orders/{order_id}/retry": f"/v1/orders/{ORDER}/retry",
    "/v1/orders/{order_id}/stream-token": f"/v1/orders/{ORDER}/stream-token",
    "/v1/orders/{order_id}/site.zip": f"/v1/orders/{ORDER}/site.zip",
    "/v1/orders/{order_id}/site/{path}": f"/v1/orders/{ORDER}/site/index.html",
    "/v1/orders/{order_id}/versions": f"/v1/orders/{ORDER}/versions",
    "/v1/orders/{order_id}/versions/{n}": f"/v1/orders/{ORDER}/versions/1",
    "/v1/orders/{order_id}/versions/{n}/diff": f"/v1/orders/{ORDER}/versions/1/diff",
    "/v1/orders/{order_id}/versions/{n}/site/{path}": f"/v1/orders/{ORDER}/versions/1/site/index.html",
    "/v1/orders/{order_id}/edits": f"/v1/orders/{ORDER}/edits",
    "/v1/orders/{order_id}/rollback": f"/v1/orders/{ORDER}/rollback",
    "/": "/",
    "/orders/{order_id}": f"/orders/{ORDER}",
    "/session": "/session",
    "/session/end": "/session/end",
    "/dashboard/overview": "/dashboard/overview",
    "/dashboard/orders/{order_id}": f"/dashboard/orders/{ORDER}",
    "/static": "/static/dashboard.css",
}

# --------------------------------------------------------------------------- token mode

#: Kinds of credential in token mode. Sessions are sent as the dashboard sends them (cookie + its header).
TOKEN_KINDS = (
    "none",
    "read",  # bearer
    "write",  # bearer
    "session_read",
    "session_write",
    "stream",  # a stream token of this order, ?token=
    "stream_other",  # of another order
    "stream_expired",
    "forged_old",  # a write session signed with the key today's main derives from the tokens
    "forged_kid",  # the same claims in the new format, under the real key id, signed with that derived key
    "removed",  # a session whose token was removed from the configuration
    "signed_out",
)


def _row(kinds: tuple[str, ...], default: int | str, **special: int | str) -> dict[str, int | str]:
    unknown = set(special) - set(kinds)
    assert not unknown, unknown
    return {kind: special.get(kind, default) for kind in kinds}


def _token(default: int | str, **special: int | str) -> dict[str, int | str]:
    return _row(TOKEN_KINDS, default, **special)


READS = _token(401, read=200, write=200, session_read=200, session_write=200)
STREAMS = {**READS, "stream": 200, "stream_other": 403}
PAGES = _token(SIGN_IN, session_read=PAGE, session_write=PAGE)
FRAGMENTS = _token(303, session_read=200, session_write=200)


def _writes(ok: int) -> dict[str, int | str]:
    return _token(401, read=403, session_read=403, write=ok, session_write=ok)


TOKEN_MATRIX: dict[tuple[str, str], dict[str, int | str]] = {
    ("GET", "/healthz"): _token(200),
    ("GET", "/metrics"): READS,
    ("GET", "/v1/openapi.json"): READS,
    ("GET", "/v1/orders/{order_id}"): READS,
    ("GET", "/v1/orders/{order_id}/generations"): READS,
    ("GET", "/v1/orders/{order_id}/events"): STREAMS,
    ("POST", "/v1/orders/{order_id}/generate"): _writes(202),
    ("POST", "/v1/orders/{order_id}/cancel"): _writes(409),  # nothing to cancel: let in, then refused
    ("POST", "/v1/orders/{order_id}/retry"): _writes(409),  # the order succeeded
    ("POST", "/v1/orders/{order_id}/stream-token"): READS,
    ("GET", "/v1/orders/{order_id}/site.zip"): STREAMS,
    ("GET", "/v1/orders/{order_id}/site/{path}"): STREAMS,
    ("GET", "/v1/orders/{order_id}/versions"): READS,
    ("GET", "/v1/orders/{order_id}/versions/{n}"): READS,
    ("GET", "/v1/orders/{order_id}/versions/{n}/diff"): READS,
    ("GET", "/v1/orders/{order_id}/versions/{n}/site/{path}"): STREAMS,
    ("POST", "/v1/orders/{order_id}/edits"): _writes(202),
    ("POST", "/v1/orders/{order_id}/rollback"): _writes(202),
    ("GET", "/"): PAGES,
    ("GET", "/orders/{order_id}"): PAGES,
    # The credential goes in the form's token field: only an API token signs in.
    ("POST", "/session"): _token(401, read=303, write=303),
    ("POST", "/session/end"): _token(303),
    ("GET", "/dashboard/overview"): FRAGMENTS,
    ("GET", "/dashboard/orders/{order_id}"): FRAGMENTS,
    ("GET", "/static"): _token(200),
}

# --------------------------------------------------------------------------- open mode (no token configured)

OPEN_KINDS = (
    "none",
    "foreign_host",  # Host: a name that is not loopback (DNS rebinding, or a reverse proxy)
    "bearer",  # any bearer token: none is configured
    "stream",
    "stream_other",
    "stream_expired",
    "stream_of_token_mode",  # made by a token-mode process (bound to a token this one does not have)
    "forged_old",
)


def _open(default: int | str, **special: int | str) -> dict[str, int | str]:
    return _row(OPEN_KINDS, default, foreign_host=403, **special)


OPEN_READS = _open(200, bearer=401)
OPEN_STREAMS = _open(200, bearer=401, stream_other=403, stream_expired=401, stream_of_token_mode=401)

OPEN_MATRIX: dict[tuple[str, str], dict[str, int | str]] = {
    ("GET", "/healthz"): _row(OPEN_KINDS, 200),
    ("GET", "/metrics"): OPEN_READS,
    ("GET", "/v1/openapi.json"): OPEN_READS,
    ("GET", "/v1/orders/{order_id}"): OPEN_READS,
    ("GET", "/v1/orders/{order_id}/generations"): OPEN_READS,
    ("GET", "/v1/orders/{order_id}/events"): OPEN_STREAMS,
    ("POST", "/v1/orders/{order_id}/generate"): _open(403, bearer=401),  # read-only
    ("POST", "/v1/orders/{order_id}/cancel"): _open(403, bearer=401),
    ("POST", "/v1/orders/{order_id}/retry"): _open(403, bearer=401),
    ("POST", "/v1/orders/{order_id}/stream-token"): OPEN_READS,
    ("GET", "/v1/orders/{order_id}/site.zip"): OPEN_STREAMS,
    ("GET", "/v1/orders/{order_id}/site/{path}"): OPEN_STREAMS,
    ("GET", "/v1/orders/{order_id}/versions"): OPEN_READS,
    ("GET", "/v1/orders/{order_id}/versions/{n}"): OPEN_READS,
    ("GET", "/v1/orders/{order_id}/versions/{n}/diff"): OPEN_READS,
    ("GET", "/v1/orders/{order_id}/versions/{n}/site/{path}"): OPEN_STREAMS,
    ("POST", "/v1/orders/{order_id}/edits"): _open(403, bearer=401),
    ("POST", "/v1/orders/{order_id}/rollback"): _open(403, bearer=401),
    ("GET", "/"): _open(PAGE),  # read access; the dashboard reads no bearer token
    ("GET", "/orders/{order_id}"): _open(PAGE),
    ("POST", "/session"): _open(401),  # no token to sign in with
    ("POST", "/session/end"): _open(303),
    ("GET", "/dashboard/overview"): _open(200),
    ("GET", "/dashboard/orders/{order_id}"): _open(200),
    ("GET", "/static"): _open(200),
}


def route_table(settings: Settings, tokens: Tokens) -> set[tuple[str, str]]:
    """(method, canonical path) of every route of the real app; HEAD routes (added by add_get) count as GET."""
    app = create_app(settings, tokens)
    found = set()
    for route in app.router.routes():
        assert route.resource is not None
        found.add(("GET" if route.method == "HEAD" else route.method, route.resource.canonical))
    return found


def test_every_route_has_a_row(settings: Settings) -> None:
    """A route without a row in both matrices fails here: decide who may call it before shipping it."""
    routes = route_table(settings, Tokens(read=(READ,)))
    for name, matrix in (("TOKEN_MATRIX", TOKEN_MATRIX), ("OPEN_MATRIX", OPEN_MATRIX)):
        assert routes - set(matrix) == set(), f"routes without a row in {name}"
        assert set(matrix) - routes == set(), f"rows of {name} without a route"
    assert {canonical for _, canonical in routes} == set(PATHS), "every route needs a concrete path in PATHS"


# --------------------------------------------------------------------------- running a matrix


@dataclass
class Call:
    headers: dict[str, str]
    params: dict[str, str]
    form_token: str  # what a sign-in posts


def old_format(key: bytes, claims: dict[str, object]) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    body = b64(orjson.dumps(claims))
    return f"{body}.{b64(hmac.new(key, body.encode(), hashlib.sha256).digest())}"


def derived_key(*tokens: str) -> bytes:
    """The key today's `main` signs with when SITEGEN_API_SIGNING_KEY is unset."""
    material = b"\n".join(sorted(t.encode() for t in tokens))
    return hmac.new(b"sitegen-api signing key v1", material, hashlib.sha256).digest()


def _session(value: str) -> Call:
    return Call({"Cookie": f"sitegen_session={value}", "X-Sitegen-Dashboard": "1"}, {}, value)


def _stream(value: str) -> Call:
    return Call({}, {"token": value}, value)


async def run_matrix(
    api: Running, matrix: dict[tuple[str, str], dict[str, int | str]], credential: Callable[[str], Call]
) -> list[str]:
    """Every (route, kind) of `matrix`, HEAD too for GET routes; the mismatches, as lines."""
    limit = asyncio.Semaphore(16)
    problems: list[str] = []

    async def one(method: str, canonical: str, kind: str, expected: int | str) -> None:
        call = credential(kind)
        headers = {"Origin": api.url, **call.headers}
        kw: dict[str, Any] = {"headers": headers, "params": call.params, "allow_redirects": False}
        if canonical == "/session":
            kw["data"] = {"token": call.form_token}
        elif method == "POST" and canonical.endswith("/generate"):
            kw["json"] = {"brief": SAMPLE_BRIEF}
        elif method == "POST" and canonical.endswith("/edits"):
            kw["json"] = {"instruction": "make the header blue"}
        elif method == "POST" and canonical.endswith("/rollback"):
            kw["json"] = {"version": 1}
        async with limit, aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
            async with http.request(method, f"{api.url}{PATHS[canonical]}", **kw) as response:
                status = response.status
                body = b"" if method == "HEAD" or canonical.endswith("/events") else await response.read()
                response.close()  # an event stream is left open otherwise
        got: int | str = status
        if status == 200 and canonical in ("/", "/orders/{order_id}") and method == "GET":
            got = SIGN_IN if b'data-page="sign-in"' in body else PAGE
        want = expected if method == "GET" or not isinstance(expected, str) else 200
        if method == "HEAD" and isinstance(expected, str):
            want = 200
        if got != want:
            problems.append(f"{method} {canonical} with {kind}: {got}, expected {want}")

    jobs = []
    for (method, canonical), row in matrix.items():
        for kind, expected in row.items():
            jobs.append(one(method, canonical, kind, expected))
            # HEAD of the event stream writes the stream's body anyway (a quirk of its handler): GET only.
            if method == "GET" and not canonical.endswith("/events"):
                jobs.append(one("HEAD", canonical, kind, expected))
    await asyncio.gather(*jobs)
    return sorted(problems)


@pytest.fixture
async def orders(db: asyncpg.Connection) -> None:
    """Order 1 succeeded with a site, its version 1 live; order 2 exists; order 3 is generated by the matrix."""
    generation = await new_generation(db, ORDER, "succeeded")
    await db.execute("UPDATE site_generations SET finished_at = now() WHERE id = $1", generation)
    await db.execute(
        "INSERT INTO site_files (generation_id, path, content, sha256, bytes, media_type)"
        " VALUES ($1, 'index.html', '<p>hi</p>', 'x', 9, 'text/html')",
        generation,
    )
    await db.execute("INSERT INTO site_blobs (sha256, content, bytes) VALUES ('x', '<p>hi</p>', 9)")
    await db.execute(
        "INSERT INTO site_versions (order_id, number, kind, generation_id) VALUES ($1, 1, 'generation', $2)",
        ORDER,
        generation,
    )
    await db.execute(
        "INSERT INTO site_version_files (order_id, number, path, sha256, bytes, media_type)"
        " VALUES ($1, 1, 'index.html', 'x', 9, 'text/html')",
        ORDER,
    )
    await db.execute("UPDATE site_orders SET live_version = 1 WHERE id = $1", ORDER)
    await new_generation(db, OTHER, "succeeded")


def matrix_settings(settings: Settings) -> Settings:
    # Thousands of 401s from one address by design: the throttle has its own test.
    return settings.model_copy(update={"api": settings.api.model_copy(update={"auth_failures_per_minute": 100_000})})


@pytest.fixture
async def token_mode(settings: Settings, orders: None, redis: ArqRedis) -> AsyncIterator[Running]:
    async for running in _start(matrix_settings(settings), Tokens(read=(READ,), write=(WRITE,)), FAST):
        yield running


@pytest.mark.timeout(120)
async def test_auth_matrix_in_token_mode(token_mode: Running, db: asyncpg.Connection) -> None:
    """Every route x {no token, read, write, sessions, this order's / another order's / an expired stream
    token, a session forged with a key derived from the tokens, a session of a removed token, a signed-out
    session} -> the expected status."""
    api = token_mode
    tokens = api.tokens
    keys = [bytes(r["key"]) for r in await db.fetch("SELECT key FROM api_signing_keys ORDER BY created_at DESC")]
    before_removal = Tokens(read=(READ,), write=(WRITE, REMOVED), signing_keys=keys)
    removed = before_removal.session(REMOVED, 3600)
    read = tokens.bearer_grant(READ)
    assert read is not None and removed is not None
    exp = int(time.time()) + 3600
    forged_old = old_format(derived_key(READ, WRITE), {"p": "session", "r": "write", "exp": exp, "n": "00"})
    genuine = tokens.session(WRITE, 3600)
    assert genuine is not None
    attacker = Tokens(read=(READ,), write=(WRITE,), signing_keys=[derived_key(READ, WRITE)]).session(WRITE, 3600)
    assert attacker is not None
    forged_kid = ".".join([*attacker.split(".")[:1], genuine.split(".")[1], *attacker.split(".")[2:]])
    signed_out = tokens.session(WRITE, 3600)
    assert signed_out is not None
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.post(
            f"{api.url}/session/end", headers={"Origin": api.url, **_session(signed_out).headers}
        ) as response:
            assert response.status == 200  # the redirect to the sign-in page, followed

    def credential(kind: str) -> Call:
        if kind == "none":
            return Call({}, {}, "")
        if kind in ("read", "write"):
            token = READ if kind == "read" else WRITE
            return Call({"Authorization": f"Bearer {token}"}, {}, token)
        if kind in ("session_read", "session_write"):
            value = tokens.session(READ if kind == "session_read" else WRITE, 3600)  # fresh: sign-out ends one
            assert value is not None
            return _session(value)
        if kind == "stream":
            return _stream(tokens.stream_token(ORDER, 600, read)[0])
        if kind == "stream_other":
            return _stream(tokens.stream_token(OTHER, 600, read)[0])
        if kind == "stream_expired":
            return _stream(tokens.stream_token(ORDER, -1, read)[0])
        value = {"forged_old": forged_old, "forged_kid": forged_kid, "removed": removed, "signed_out": signed_out}
        return _session(value[kind])

    assert await run_matrix(api, TOKEN_MATRIX, credential) == []


@pytest.fixture
async def open_mode(settings: Settings, orders: None, redis: ArqRedis) -> AsyncIterator[Running]:
    async for running in _start(matrix_settings(settings), Tokens(), FAST):
        yield running


@pytest.mark.timeout(120)
async def test_auth_matrix_in_open_mode(open_mode: Running, db: asyncpg.Connection) -> None:
    """The same routes with no token configured: reads from loopback Host names only, no writes at all."""
    api = open_mode
    keys = [bytes(r["key"]) for r in await db.fetch("SELECT key FROM api_signing_keys ORDER BY created_at DESC")]
    token_mode = Tokens(read=(READ,), signing_keys=keys)
    of_token_mode = token_mode.stream_token(ORDER, 600, token_mode.bearer_grant(READ))[0]
    anyone = Grant("read", None)
    forged_old = old_format(derived_key(READ), {"p": "session", "r": "write", "exp": int(time.time()) + 60})
    host = URL(api.url).host

    def credential(kind: str) -> Call:
        streams = {
            "stream": api.tokens.stream_token(ORDER, 600, anyone)[0],
            "stream_other": api.tokens.stream_token(OTHER, 600, anyone)[0],
            "stream_expired": api.tokens.stream_token(ORDER, -1, anyone)[0],
            "stream_of_token_mode": of_token_mode,
        }
        if kind == "none":
            return Call({"Host": f"{host}:{URL(api.url).port}"}, {}, "")
        if kind == "foreign_host":
            return Call({"Host": "sitegen.example.com"}, {}, "")
        if kind == "bearer":
            return Call({"Authorization": f"Bearer {WRITE}"}, {}, WRITE)
        if kind == "forged_old":
            return _session(forged_old)
        return _stream(streams[kind])

    assert await run_matrix(api, OPEN_MATRIX, credential) == []
