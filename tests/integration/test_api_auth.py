"""Who may do what on `sitegen serve`, against real PostgreSQL and Redis: the regressions of issue 20
section B (findings 4 to 9). The whole route table is covered by tests/integration/test_auth_matrix.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from arq import ArqRedis

from tests.helpers import SAMPLE_BRIEF, cli_env
from tests.integration.test_api import FAST, READ, ROOT, WRITE, Running, _start, auth, new_generation
from worker.api.auth import Tokens, key_id
from worker.local.services import LocalServices, free_port
from worker.settings import Settings

KEY = "signing-key-for-tests-0123456789abcdef"
OLD = "a-leaked-write-token-0123456789abcdef"


def api_settings(settings: Settings, **api: Any) -> Settings:
    return settings.model_copy(update={"api": settings.api.model_copy(update=api)})


def old_derived_key(*tokens: str) -> bytes:
    """The signing key today's `main` derives when SITEGEN_API_SIGNING_KEY is unset."""
    material = b"\n".join(sorted(t.encode() for t in tokens))
    return hmac.new(b"sitegen-api signing key v1", material, hashlib.sha256).digest()


def old_format(key: bytes, claims: dict[str, object]) -> str:
    """A value signed the way today's `main` signs sessions and stream tokens."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    body = b64(orjson.dumps(claims))
    return f"{body}.{b64(hmac.new(key, body.encode(), hashlib.sha256).digest())}"


def session_cookie(value: str) -> dict[str, str]:
    return {"Cookie": f"sitegen_session={value}", "X-Sitegen-Dashboard": "1"}


async def sign_in(api: Running, token: str, **headers: str) -> tuple[int, str | None]:
    """POST /session as the dashboard's form does; the status and the session cookie's value, if any."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as browser:
        async with browser.post(
            f"{api.url}/session",
            data={"token": token},
            headers={"Origin": api.url, **headers},
            allow_redirects=False,
        ) as response:
            cookies = {name: morsel.value for name, morsel in response.cookies.items()}
            return response.status, cookies.get("sitegen_session") or cookies.get("__Host-sitegen_session")


async def status_of(api: Running, method: str, path: str, **kw: Any) -> int:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.request(method, f"{api.url}{path}", allow_redirects=False, **kw) as response:
            await response.read()
            return response.status


@pytest.fixture
async def served(settings: Settings, db: asyncpg.Connection, redis: ArqRedis) -> AsyncIterator[Running]:
    """A deployment with a read and a write token."""
    async for running in _start(settings, Tokens(read=(READ,), write=(WRITE,))):
        yield running


@pytest.fixture
async def read_only(settings: Settings, db: asyncpg.Connection, redis: ArqRedis) -> AsyncIterator[Running]:
    """A deployment with read tokens only, which the docs allow (frontends hold them)."""
    async for running in _start(settings, Tokens(read=(READ,))):
        yield running


# --------------------------------------------------------------------------- finding 4


async def test_a_read_token_cannot_forge_a_write_session_or_a_stream_token(
    read_only: Running, db: asyncpg.Connection
) -> None:
    """Regression: issue 20 finding 4: with only read tokens configured, the signing key was an HMAC of
    them, so a read-token holder could mint a session with `r: "write"` and cancel any order."""
    await new_generation(db, 5, "running")
    derived = old_derived_key(READ)
    exp = int(time.time()) + 3600
    forged = old_format(derived, {"p": "session", "r": "write", "exp": exp, "n": "0011223344556677"})
    assert await status_of(read_only, "POST", "/v1/orders/5/cancel", headers=session_cookie(forged)) == 401
    stream = old_format(derived, {"p": "stream", "o": 5, "exp": exp})
    assert await status_of(read_only, "GET", "/v1/orders/5/site.zip", params={"token": stream}) == 401
    # The same claims in today's format, signed with that derived key under any key id, are refused too.
    attacker = Tokens(read=(READ,), signing_keys=[derived])
    minted = attacker.session(READ, 3600)
    assert minted is not None
    assert await status_of(read_only, "GET", "/v1/orders/5", headers=session_cookie(minted)) == 401
    kid = read_only.tokens.stream_token(5, 60)[0].split(".")[1]  # the real key id, with the wrong key
    swapped = minted.split(".")
    swapped[1] = kid
    assert await status_of(read_only, "GET", "/v1/orders/5", headers=session_cookie(".".join(swapped))) == 401
    # The genuine path still works: a read session reads and cannot write.
    status, cookie = await sign_in(read_only, READ)
    assert status == 303 and cookie
    assert await status_of(read_only, "GET", "/v1/orders/5", headers=session_cookie(cookie)) == 200
    assert await status_of(read_only, "POST", "/v1/orders/5/cancel", headers=session_cookie(cookie)) == 403


async def test_the_signing_key_is_random_shared_by_serve_processes_and_never_in_a_token(
    settings: Settings, db: asyncpg.Connection, redis: ArqRedis
) -> None:
    """Regression: issue 20 finding 4: the key is created once in PostgreSQL (not derived from tokens), so
    a second process with other tokens accepts what the first signed, and changing tokens changes no key."""
    key = await db.fetchval("SELECT key FROM api_signing_keys ORDER BY created_at DESC LIMIT 1")
    async for first in _start(settings, Tokens(read=(READ,), write=(WRITE,))):
        token, _ = first.tokens.stream_token(5, 60, first.tokens.bearer_grant(WRITE))
        async for second in _start(settings, Tokens(write=(WRITE,))):
            await new_generation(db, 5, "succeeded")
            # 404: let in (the order has no site); a token it cannot verify is 401
            assert await status_of(second, "GET", "/v1/orders/5/site.zip", params={"token": token}) == 404
    stored = await db.fetch("SELECT kid, key FROM api_signing_keys")
    assert len(stored) == 1 and len(stored[0]["key"]) >= 32
    assert key is None or key == stored[0]["key"], "created once, then kept"
    assert stored[0]["key"] not in (old_derived_key(READ, WRITE), old_derived_key(WRITE))


# --------------------------------------------------------------------------- finding 5


async def test_removing_a_token_ends_its_sessions_and_stream_tokens(
    settings: Settings, db: asyncpg.Connection, redis: ArqRedis
) -> None:
    """Regression: issue 20 finding 5: a session carried only its role, so removing a leaked token from
    the configuration (with a fixed SITEGEN_API_SIGNING_KEY) left every session it had made valid."""
    await new_generation(db, 6, "succeeded")
    before = Tokens.from_env({"SITEGEN_API_WRITE_TOKENS": f"{WRITE},{OLD}", "SITEGEN_API_SIGNING_KEY": KEY})
    async for api in _start(settings, before):
        status, leaked_session = await sign_in(api, OLD)
        assert status == 303 and leaked_session
        status, kept_session = await sign_in(api, WRITE)
        assert status == 303 and kept_session
        async with api.http.post(f"{api.url}/v1/orders/6/stream-token", headers=auth(OLD)) as response:
            leaked_stream = (await response.json())["token"]
        assert await status_of(api, "GET", "/v1/orders/6", headers=session_cookie(leaked_session)) == 200
    after = Tokens.from_env({"SITEGEN_API_WRITE_TOKENS": WRITE, "SITEGEN_API_SIGNING_KEY": KEY})
    async for api in _start(settings, after):
        assert await status_of(api, "GET", "/v1/orders/6", headers=session_cookie(leaked_session)) == 401
        assert await status_of(api, "GET", "/v1/orders/6/site.zip", params={"token": leaked_stream}) == 401
        assert await status_of(api, "GET", "/v1/orders/6", headers=session_cookie(kept_session)) == 200


async def test_sign_out_ends_the_session_on_the_server(served: Running, db: asyncpg.Connection) -> None:
    """Regression: issue 20 finding 5: sign-out only deleted the cookie in the browser; a copy of it stayed
    valid for the session's 12 hours. Stream tokens made through that session end with it."""
    await new_generation(db, 8, "succeeded")
    status, cookie = await sign_in(served, WRITE)
    assert status == 303 and cookie
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.post(f"{served.url}/v1/orders/8/stream-token", headers=session_cookie(cookie)) as response:
            assert response.status == 200
            stream = (await response.json())["token"]
    # 404: let in, and the order has no site (a refused token is 401)
    assert await status_of(served, "GET", "/v1/orders/8/site.zip", params={"token": stream}) == 404
    ended = await status_of(served, "POST", "/session/end", headers={**session_cookie(cookie), "Origin": served.url})
    assert ended == 303
    assert await status_of(served, "GET", "/v1/orders/8", headers=session_cookie(cookie)) == 401
    assert await status_of(served, "GET", "/dashboard/overview", headers=session_cookie(cookie)) == 303
    assert await status_of(served, "GET", "/v1/orders/8/site.zip", params={"token": stream}) == 401


# --------------------------------------------------------------------------- finding 6


async def test_weak_tokens_and_keys_are_refused_by_sitegen_serve_naming_the_variable(
    services: LocalServices,
) -> None:
    """Regression: issue 20 finding 6: a write token "a" and a signing key "x" were accepted."""
    cases = {
        "SITEGEN_API_WRITE_TOKENS": {"SITEGEN_API_WRITE_TOKENS": "a"},
        "SITEGEN_API_READ_TOKENS": {"SITEGEN_API_WRITE_TOKENS": WRITE, "SITEGEN_API_READ_TOKENS": f"{READ},short"},
        "SITEGEN_API_SIGNING_KEY": {"SITEGEN_API_WRITE_TOKENS": WRITE, "SITEGEN_API_SIGNING_KEY": "x"},
    }

    async def serve(env: dict[str, str]) -> tuple[int | None, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker.cli", "serve", "--port", str(free_port()),
            cwd=ROOT, env=cli_env(services, **env), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            out, _ = await asyncio.wait_for(process.communicate(), 60)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        return process.returncode, out.decode()

    # No SITEGEN_API_SIGNING_KEY and a database without migration 0007: one line saying what to run.
    bare = services.database_url.rsplit("/", 1)[0] + "/sitegen_unmigrated"
    conn = await asyncpg.connect(services.database_url)
    try:
        await conn.execute("DROP DATABASE IF EXISTS sitegen_unmigrated")
        await conn.execute("CREATE DATABASE sitegen_unmigrated")
    finally:
        await conn.close()
    cases["sitegen migrate"] = {"SITEGEN_API_WRITE_TOKENS": WRITE, "DATABASE_URL": bare}
    results = await asyncio.gather(*(serve(env) for env in cases.values()))
    for variable, (code, out) in zip(cases, results, strict=True):
        assert code == 2, f"{variable}: {out}"
        assert variable in out and "Traceback" not in out, out
        assert "short" not in out and "'a'" not in out and "'x'" not in out, "the weak value is not echoed"
        if variable.startswith("SITEGEN_"):
            assert "32" in out, out


async def test_failed_sign_ins_and_401s_are_throttled_per_client_address(
    settings: Settings, db: asyncpg.Connection, redis: ArqRedis
) -> None:
    """Regression: issue 20 finding 6: sign-in took unlimited guesses. Failures per client address (as seen
    through a trusted proxy) get 429 with Retry-After past api.auth_failures_per_minute; others go on."""
    throttled = api_settings(settings, auth_failures_per_minute=5, trusted_proxies=["127.0.0.1"])
    async for api in _start(throttled, Tokens(read=(READ,), write=(WRITE,)), FAST):
        guesser = {"X-Forwarded-For": "203.0.113.7"}
        statuses = [(await sign_in(api, secrets.token_hex(16), **guesser))[0] for _ in range(5)]
        assert statuses == [401] * 5
        async with api.http.post(
            f"{api.url}/session", data={"token": WRITE}, headers={"Origin": api.url, **guesser}, allow_redirects=False
        ) as response:
            assert response.status == 429, "even the right token waits: the address is throttled"
            assert 1 <= int(response.headers["Retry-After"]) <= 60
        bearer = await status_of(api, "GET", "/v1/orders/1", headers={**auth(WRITE), **guesser})
        assert bearer == 429
        assert await status_of(api, "GET", "/healthz", headers=guesser) == 200, "health is never throttled"
        # Bad bearer tokens count the same, from another address; a third address is unaffected.
        other = {"X-Forwarded-For": "198.51.100.4"}
        bad = [await status_of(api, "GET", "/v1/orders/1", headers={**auth("x" * 40), **other}) for _ in range(6)]
        assert bad == [401] * 5 + [429]
        fine = {"X-Forwarded-For": "192.0.2.1"}
        assert await status_of(api, "GET", "/v1/orders/1", headers={**auth(READ), **fine}) == 404
        assert (await sign_in(api, READ, **fine))[0] == 303
        # The same address through no trusted proxy is the proxy's own: its own budget.
        assert await status_of(api, "GET", "/v1/orders/1", headers=auth(READ)) == 404


# --------------------------------------------------------------------------- finding 7


@pytest.fixture
async def open_api(settings: Settings, db: asyncpg.Connection, redis: ArqRedis) -> AsyncIterator[Running]:
    async for running in _start(settings, Tokens()):
        yield running


async def test_open_mode_is_read_only_and_answers_loopback_host_names_only(
    open_api: Running, db: asyncpg.Connection
) -> None:
    """Regression: issue 20 finding 7: with no token set every request could write, from a cross-site
    no-cors text/plain post or through DNS rebinding (a Host that resolves to 127.0.0.1)."""
    await new_generation(db, 9, "running")
    plain = {"Content-Type": "text/plain"}
    body = orjson.dumps({"brief": SAMPLE_BRIEF})
    assert await status_of(open_api, "POST", "/v1/orders/9/generate", data=body, headers=plain) == 403
    assert await status_of(open_api, "POST", "/v1/orders/9/cancel") == 403
    assert await status_of(open_api, "POST", "/v1/orders/9/retry", json={}) == 403
    assert await status_of(open_api, "GET", "/v1/orders/9") == 200, "reads stay open on loopback"
    assert await status_of(open_api, "GET", "/v1/orders/9", headers={"Host": "localhost:8000"}) == 200
    assert await status_of(open_api, "GET", "/v1/orders/9", headers={"Host": "[::1]:8000"}) == 200
    for host in ("rebind.evil.example:8000", "127.0.0.1.evil.example", "sitegen.example.com"):
        assert await status_of(open_api, "GET", "/v1/orders/9", headers={"Host": host}) == 403, host
        assert await status_of(open_api, "GET", "/", headers={"Host": host}) == 403, host
    assert await status_of(open_api, "GET", "/healthz", headers={"Host": "sitegen.example.com"}) == 200
    # A bearer token means nothing when none is configured: refused, not promoted to write.
    assert await status_of(open_api, "POST", "/v1/orders/9/cancel", headers=auth(WRITE)) == 401
    async with open_api.http.get(f"{open_api.url}/") as response:
        page = await response.text()
    assert 'id="enqueue"' not in page and "read access" in page


async def test_json_bodies_need_the_json_content_type(served: Running, db: asyncpg.Connection) -> None:
    """Regression: issue 20 finding 7: `_body()` parsed JSON from any content type, so a cross-site
    `fetch(..., {mode: "no-cors"})` with a text/plain body reached the commands."""
    body = orjson.dumps({"brief": SAMPLE_BRIEF})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        headers = {**auth(WRITE), "Content-Type": content_type}
        assert await status_of(served, "POST", "/v1/orders/10/generate", data=body, headers=headers) == 415
    headers = {**auth(WRITE), "Content-Type": "application/json; charset=utf-8"}
    assert await status_of(served, "POST", "/v1/orders/10/generate", data=body, headers=headers) == 202
    # No body, no type needed: past the check (409: the job is queued in Redis, no generation row yet).
    assert await status_of(served, "POST", "/v1/orders/10/cancel", headers=auth(WRITE)) == 409


# --------------------------------------------------------------------------- finding 8


async def test_sign_in_and_sign_out_refuse_cross_site_posts(served: Running) -> None:
    """Regression: issue 20 finding 8: POST /session and /session/end took cross-site form posts, so another
    site could sign the operator out, or swap their write session for the attacker's read session."""
    cross = [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site", "Origin": served.url},
        {"Sec-Fetch-Site": "same-site"},
        {},
    ]
    for headers in cross:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
            async with http.post(
                f"{served.url}/session", data={"token": READ}, headers=headers, allow_redirects=False
            ) as response:
                assert response.status == 403, headers
                assert "Set-Cookie" not in response.headers, headers
    status, cookie = await sign_in(served, WRITE)
    assert status == 303 and cookie
    for headers in cross:
        ended = await status_of(served, "POST", "/session/end", headers={**session_cookie(cookie), **headers})
        assert ended == 403, headers
    assert await status_of(served, "GET", "/dashboard/overview", headers=session_cookie(cookie)) == 200
    same = {"Sec-Fetch-Site": "same-origin", "Origin": "https://evil.example"}  # the browser's word wins
    assert (await sign_in(served, READ, **same))[0] == 303


# --------------------------------------------------------------------------- finding 9


async def test_cookies_are_secure_host_prefixed_behind_a_trusted_tls_proxy_only(
    settings: Settings, db: asyncpg.Connection, redis: ArqRedis
) -> None:
    """Regression: issue 20 finding 9: aiohttp ignores X-Forwarded-Proto, so behind the runbook's TLS proxy
    the session cookie was never `Secure`. Forwarded headers count only from api.trusted_proxies."""
    proxied = {"X-Forwarded-For": "203.0.113.20", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "sitegen.example"}
    origin = "https://sitegen.example"
    await new_generation(db, 11, "succeeded")
    async for api in _start(api_settings(settings, trusted_proxies=["127.0.0.0/8"]), Tokens(write=(WRITE,))):
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
            async with http.post(
                f"{api.url}/session",
                data={"token": WRITE},
                headers={**proxied, "Origin": origin},
                allow_redirects=False,
            ) as response:
                assert response.status == 303
                set_cookie = response.headers["Set-Cookie"]
            assert set_cookie.startswith("__Host-sitegen_session="), set_cookie
            for attribute in ("Secure", "HttpOnly", "SameSite=Strict", "Path=/"):
                assert attribute in set_cookie, set_cookie
            assert "Domain" not in set_cookie
            value = set_cookie.split(";")[0].split("=", 1)[1]
            secure_cookie = {"Cookie": f"__Host-sitegen_session={value}"}
            async with http.get(f"{api.url}/dashboard/overview", headers={**proxied, **secure_cookie}) as response:
                assert response.status == 200
            # The Origin is compared with the forwarded scheme and host, not the proxy's hop.
            async with http.post(
                f"{api.url}/session", data={"token": WRITE}, headers={**proxied, "Origin": api.url}
            ) as response:
                assert response.status == 403
            # Over https, a cookie without the prefix (which a sibling subdomain could have set) is ignored.
            plain_name = {"Cookie": f"sitegen_session={value}"}
            async with http.get(
                f"{api.url}/dashboard/overview", headers={**proxied, **plain_name}, allow_redirects=False
            ) as response:
                assert response.status == 303
    # No trusted proxy: the same headers from the same client are the client's own, and ignored.
    async for api in _start(settings, Tokens(write=(WRITE,))):
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
            async with http.post(
                f"{api.url}/session",
                data={"token": WRITE},
                headers={**proxied, "Origin": api.url},
                allow_redirects=False,
            ) as response:
                assert response.status == 303
                set_cookie = response.headers["Set-Cookie"]
        assert set_cookie.startswith("sitegen_session=") and "Secure" not in set_cookie, set_cookie


async def test_a_new_key_in_postgresql_is_picked_up_without_a_restart(
    settings: Settings, db: asyncpg.Connection, redis: ArqRedis
) -> None:
    """Regression: issue 20 finding 4: rotation without a flag day. A key added to api_signing_keys (by an
    operator, then used by a restarted process) is learnt by a running process the first time it sees
    its key id, and then signs; the previous key still verifies until its row is deleted."""
    await new_generation(db, 12, "succeeded")
    async for api in _start(settings, Tokens(read=(READ,), write=(WRITE,))):
        grant = api.tokens.bearer_grant(READ)
        old_token, _ = api.tokens.stream_token(12, 600, grant)
        old = [bytes(r["key"]) for r in await db.fetch("SELECT key FROM api_signing_keys")]
        new = secrets.token_bytes(32)
        await db.execute(
            "INSERT INTO api_signing_keys (kid, key, created_at) VALUES ($1, $2, now() + interval '1 second')",
            key_id(new),
            new,
        )
        restarted = Tokens(read=(READ,), write=(WRITE,), signing_keys=[new, *old])
        session = restarted.session(WRITE, 600)
        assert session is not None
        assert await status_of(api, "GET", "/v1/orders/12", headers=session_cookie(session)) == 200
        async with api.http.post(f"{api.url}/v1/orders/12/stream-token", headers=auth(READ)) as response:
            signed_now = (await response.json())["token"]
        assert signed_now.split(".")[1] == key_id(new), "the newest key signs"
        for token in (old_token, signed_now):
            assert await status_of(api, "GET", "/v1/orders/12/site.zip", params={"token": token}) == 404
        unknown = Tokens(read=(READ,), signing_keys=[secrets.token_bytes(32)]).session(READ, 600)
        assert unknown is not None
        assert await status_of(api, "GET", "/v1/orders/12", headers=session_cookie(unknown)) == 401
    await db.execute("DELETE FROM api_signing_keys WHERE kid = $1", key_id(new))


async def test_forwarded_headers_from_an_untrusted_peer_neither_evade_the_throttle_nor_fake_https(
    settings: Settings, db: asyncpg.Connection, redis: ArqRedis
) -> None:
    """Regression: issue 20 findings 6 and 9: the client address and scheme come from X-Forwarded-* only when
    the peer is a trusted proxy; a guesser sending a new X-Forwarded-For each time is still one address."""
    elsewhere = api_settings(settings, auth_failures_per_minute=3, trusted_proxies=["192.0.2.1", "10.9.0.0/16"])
    async for api in _start(elsewhere, Tokens(write=(WRITE,)), FAST):
        statuses = [
            await status_of(
                api, "GET", "/v1/orders/1", headers={**auth("y" * 40), "X-Forwarded-For": f"198.51.100.{n}"}
            )
            for n in range(4)
        ]
        assert statuses == [401, 401, 401, 429]
    async for api in _start(api_settings(settings, trusted_proxies=["127.0.0.1"]), Tokens(write=(WRITE,)), FAST):
        # A proxy that appends to the client's header instead of replacing it: refused, not guessed at.
        two_hops = {"X-Forwarded-For": "6.6.6.6, 203.0.113.9", "X-Forwarded-Proto": "https"}
        assert await status_of(api, "GET", "/v1/orders/1", headers={**auth(WRITE), **two_hops}) == 400
        assert await status_of(api, "GET", "/healthz", headers={"X-Forwarded-For": "not an address"}) == 400
        # Without X-Forwarded-For the proxy's host itself is a plain client (a local curl, a health check).
        assert await status_of(api, "GET", "/v1/orders/1", headers=auth(WRITE)) == 404
