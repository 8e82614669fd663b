"""`sitegen serve`: the progress API against real PostgreSQL, Redis and in-process workers.

The app runs in-process on a free loopback port (aiohttp's TestServer), with short keep-alive and
end waits; one test starts the real `sitegen serve` command.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import signal
import socket
import sys
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from arq import ArqRedis

from tests.helpers import SAMPLE_BRIEF, WorkerFactory, cli_env, remote, with_ai
from tests.helpers import wait_until as wait_for_query
from worker.api.app import BindRefused, check_bind, close_resources, create_app
from worker.api.auth import Tokens
from worker.api.context import API, ApiOptions
from worker.api.openapi import openapi_document
from worker.local.fake_server import FakeProviderServer
from worker.local.services import LocalServices, free_port
from worker.migrate import migrate
from worker.settings import Settings, SettingsError, load_settings
from worker.store import QUERIES

ROOT = Path(__file__).resolve().parents[2]
READ = "read-token-for-tests-0123456789abcdef"
WRITE = "write-token-for-tests-0123456789abcdef"
ORIGIN = "https://app.example.com"
FAST = ApiOptions(keepalive_s=0.5, end_wait_s=1.0, poll_s=0.2, hole_grace_s=0.3)


def auth(token: str = READ) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Running:
    url: str
    http: aiohttp.ClientSession
    tokens: Tokens
    app: web.Application


@pytest.fixture
def tokens() -> Tokens:
    return Tokens(read=(READ,), write=(WRITE,))


async def _start(settings: Settings, tokens: Tokens, options: ApiOptions = FAST) -> AsyncIterator[Running]:
    app = create_app(settings, tokens, options)
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        yield Running(url, http, tokens, app)
    await server.close()


@pytest.fixture
async def api(settings: Settings, tokens: Tokens, db: asyncpg.Connection, redis: ArqRedis) -> AsyncIterator[Running]:
    api_settings = settings.model_copy(update={"api": settings.api.model_copy(update={"cors_origins": [ORIGIN]})})
    async for running in _start(api_settings, tokens):
        yield running


async def insert_log(
    conn: asyncpg.Connection,
    order_id: int,
    generation_id: int | None,
    message: str,
    event: str | None = None,
    phase: str | None = None,
) -> int:
    """A progress row written and announced the way the worker's progress log does; returns its id."""
    await conn.execute(
        QUERIES["insert_logs"],
        [order_id],
        [generation_id],
        [None if phase is None else json.dumps(phase)],
        [json.dumps("info")],
        [json.dumps(message)],
        [None if event is None else json.dumps({"event": event})],
        [datetime.now(UTC)],
        "test",
    )
    return int(await conn.fetchval("SELECT max(id) FROM site_generation_logs WHERE order_id = $1", order_id))


async def new_generation(conn: asyncpg.Connection, order_id: int, status: str = "running") -> int:
    await conn.execute("INSERT INTO site_orders (id, brief) VALUES ($1, '{}') ON CONFLICT DO NOTHING", order_id)
    return int(
        await conn.fetchval(
            "INSERT INTO site_generations (order_id, status, started_at) VALUES ($1, $2, now()) RETURNING id",
            order_id,
            status,
        )
    )


@dataclass
class Event:
    kind: str  # progress, end, or comment
    id: int | None
    data: Any


async def sse(response: aiohttp.ClientResponse) -> AsyncIterator[Event]:
    """The events of a text/event-stream response, comments included, until the server closes it."""
    fields: dict[str, str] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith(":"):
            yield Event("comment", None, line[1:].strip())
        elif line == "":
            if "event" in fields or "data" in fields:
                data = json.loads(fields["data"]) if "data" in fields else None
                yield Event(fields.get("event", "message"), int(fields["id"]) if "id" in fields else None, data)
            fields = {}
        else:
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value


async def follow(
    api: Running,
    order_id: int,
    *,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    until_end: bool = True,
    count: int | None = None,
) -> list[Event]:
    """Open the order's events and read them to `end` (or `count` progress events); comments are skipped."""
    got: list[Event] = []
    async with api.http.get(
        f"{api.url}/v1/orders/{order_id}/events", headers=headers or auth(), params=params
    ) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        async for event in sse(response):
            if event.kind == "comment":
                continue
            got.append(event)
            if event.kind == "end" or (count is not None and len(got) >= count):
                break
    if until_end and count is None:
        assert got and got[-1].kind == "end", f"the stream closed without `end`: {got}"
    return got


async def table_rows(db: asyncpg.Connection, order_id: int, after: int = 0) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT id, generation_id, phase, level, message, details FROM site_generation_logs"
        " WHERE order_id = $1 AND id > $2 ORDER BY id",
        order_id,
        after,
    )
    return [dict(r) for r in rows]


async def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    """Until `condition` holds: the server's state, polled (nothing in it can be awaited from a test)."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - state of the server under test, not an event of ours
            await asyncio.sleep(0.01)


def kinds(events: list[Event]) -> list[str | None]:
    return [(e.data.get("details") or {}).get("event") for e in events if e.kind == "progress"]


# --------------------------------------------------------------------------- auth, errors, health


async def test_healthz_needs_no_token_and_reports_postgresql_and_listen(api: Running) -> None:
    async with api.http.get(f"{api.url}/healthz") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok", "listen": True, "postgresql": True}


async def test_errors_are_json_with_the_right_status(api: Running, db: asyncpg.Connection) -> None:
    await new_generation(db, 7, "succeeded")

    async def call(method: str, path: str, headers: dict[str, str] | None = None, **kw: Any) -> tuple[int, Any]:
        async with api.http.request(method, f"{api.url}{path}", headers=headers or {}, **kw) as response:
            assert response.headers["Content-Type"].startswith("application/json"), path
            return response.status, await response.json()

    status, body = await call("GET", "/v1/orders/7")
    assert status == 401 and body["error"]["type"] == "unauthorized" and body["error"]["message"]
    assert (await call("GET", "/v1/orders/7", {"Authorization": "Bearer nope"}))[0] == 401
    assert (await call("GET", "/v1/orders/7", {"Authorization": "Basic abc"}))[0] == 401
    for path in ("/v1/orders/7/generate", "/v1/orders/7/cancel", "/v1/orders/7/retry"):
        status, body = await call("POST", path, auth(READ))
        assert status == 403 and body["error"]["type"] == "forbidden", path
    status, body = await call("GET", "/v1/orders/999", auth())
    assert status == 404 and body["error"]["type"] == "not_found"
    for path in (
        "/v1/orders/999/generations",
        "/v1/orders/999/events",
        "/v1/orders/999/site/",
        "/v1/orders/999/site.zip",
    ):
        assert (await call("GET", path, auth()))[0] == 404, path
    for path in ("/v1/orders/999/cancel", "/v1/orders/999/retry", "/v1/orders/999/stream-token"):
        assert (await call("POST", path, auth(WRITE)))[0] == 404, path
    assert (await call("POST", "/v1/orders/999/generate", auth(WRITE)))[0] == 404  # no brief for an unknown order
    assert (await call("GET", "/v1/orders/abc", auth()))[0] == 400
    assert (await call("GET", "/v1/orders/0", auth()))[0] == 400
    assert (await call("GET", "/v1/orders/7/events", auth(), params={"after": "x"}))[0] == 400
    assert (await call("GET", "/v1/orders/7/events", {**auth(), "Last-Event-ID": "-1"}))[0] == 400
    assert (await call("GET", "/v1/orders/7/generations", auth(), params={"limit": "0"}))[0] == 400
    assert (await call("GET", "/v1/nothing-here", auth()))[0] == 404
    assert (await call("DELETE", "/v1/orders/7", auth(WRITE)))[0] == 405
    json_type = {**auth(WRITE), "Content-Type": "application/json"}
    status, body = await call("POST", "/v1/orders/7/generate", json_type, data=b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    status, body = await call("POST", "/v1/orders/7/generate", auth(WRITE), json={"brief": {"business_name": "X"}})
    assert status == 400 and body["error"]["type"] == "invalid_brief"
    assert "brief.description" in body["error"]["message"], "a bad brief names the field"
    status, body = await call("POST", "/v1/orders/7/generate", auth(WRITE), json={"regenerate": "yes"})
    assert status == 400 and "regenerate" in body["error"]["message"]
    status, body = await call("POST", "/v1/orders/7/cancel", auth(WRITE))
    assert status == 409, "nothing active to cancel"
    status, body = await call("POST", "/v1/orders/7/retry", auth(WRITE))
    assert status == 409 and "succeeded" in body["error"]["message"]


async def test_no_token_configured_refuses_a_non_loopback_address(services: LocalServices) -> None:
    with pytest.raises(BindRefused):
        check_bind("0.0.0.0", Tokens())
    check_bind("127.0.0.1", Tokens())
    check_bind("0.0.0.0", Tokens(read=(READ,)))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.cli",
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        str(free_port()),
        cwd=ROOT,
        env=cli_env(services),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2 and b"SITEGEN_API_READ_TOKENS" in out, out.decode()


async def test_sitegen_serve_answers_and_never_logs_its_tokens(services: LocalServices, migrated: None) -> None:
    port = free_port()
    env = cli_env(services, SITEGEN_API_WRITE_TOKENS=WRITE, SITEGEN_API__PORT=str(port), SITEGEN_LOG__LEVEL="DEBUG")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.cli",
        "serve",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(60):
            while b"serving on" not in (line := await process.stdout.readline()):
                assert line, "sitegen serve exited"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 200
            async with http.get(f"http://127.0.0.1:{port}/v1/orders/1", headers=auth(WRITE)) as response:
                assert response.status == 404
            async with http.get(f"http://127.0.0.1:{port}/v1/orders/1", headers=auth("wrong")) as response:
                assert response.status == 401
    finally:
        process.terminate()
        out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert WRITE not in out.decode() and "wrong" not in out.decode()
    assert process.returncode == 0, out.decode()


async def test_cors_preflight_for_an_allowed_and_a_refused_origin(api: Running) -> None:
    preflight = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"}
    path = f"{api.url}/v1/orders/1/events"
    async with api.http.options(path, headers={"Origin": ORIGIN, **preflight}) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
        assert "GET" in response.headers["Access-Control-Allow-Methods"]
    async with api.http.options(path, headers={"Origin": "https://evil.example", **preflight}) as response:
        assert response.status == 403
        assert "Access-Control-Allow-Origin" not in response.headers
    async with api.http.get(f"{api.url}/v1/orders/1", headers={"Origin": ORIGIN, **auth()}) as response:
        assert response.status == 404 and response.headers["Access-Control-Allow-Origin"] == ORIGIN
    async with api.http.get(f"{api.url}/v1/orders/1", headers={"Origin": "https://evil.example", **auth()}) as r:
        assert "Access-Control-Allow-Origin" not in r.headers


async def test_openapi_document_matches_the_routes(api: Running) -> None:
    async with api.http.get(f"{api.url}/v1/openapi.json", headers=auth()) as response:
        assert response.status == 200
        document = await response.json()
    assert document == json.loads(json.dumps(openapi_document()))
    assert document["openapi"].startswith("3.1")
    documented = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    served = set()
    for route in api.app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter", "")
        if route.method in ("HEAD", "*") or not (path.startswith("/v1/") or path in ("/healthz", "/metrics")):
            continue
        served.add((route.method, path.replace("{path:.*}", "{path}")))
    assert served == documented


def test_openapi_document_names_the_statuses_and_credentials_the_boundary_enforces() -> None:
    """Every authenticated operation can answer 429 (throttled failures, issue 20 finding 6) and accepts the
    dashboard's session cookie; every operation with a body can answer 415 (a body that is not JSON, finding 7);
    the events stream can answer 429 for its caps (finding 10)."""
    document = openapi_document()
    assert document["components"]["securitySchemes"]["session"] == {
        "type": "apiKey",
        "in": "cookie",
        "name": "__Host-sitegen_session",
        "description": "the dashboard's session (`sitegen_session` over http on loopback); docs/api.md",
    }
    for path, item in document["paths"].items():
        for method, op in item.items():
            where = f"{method.upper()} {path}"
            if op["security"]:
                assert "429" in op["responses"], where
                assert {"session": []} in op["security"], where
            if "requestBody" in op:
                assert "415" in op["responses"], where


# --------------------------------------------------------------------------- a real generation, followed live


async def test_generate_then_follow_live_to_end_then_read_order_site_and_metrics(
    api: Running, settings: Settings, start_worker: WorkerFactory, db: asyncpg.Connection
) -> None:
    slow = settings.model_copy(deep=True)
    slow.ai.providers["offline"].latency_s = 0.2  # long enough to connect while it runs
    await start_worker(slow)
    async with api.http.post(
        f"{api.url}/v1/orders/41/generate", headers=auth(WRITE), json={"brief": SAMPLE_BRIEF}
    ) as response:
        assert response.status == 202
        assert await response.json() == {"job_id": "generate_site:41", "queued": True}

    events = await follow(api, 41)
    progress = [e for e in events if e.kind == "progress"]
    assert events[-1].data["status"] == "succeeded"
    generation_id = events[-1].data["generation_id"]
    rows = await table_rows(db, 41)
    assert [e.id for e in progress] == [r["id"] for r in rows], "every row, in order, once"
    assert [e.data["message"] for e in progress] == [r["message"] for r in rows]
    assert all(e.data["generation_id"] == generation_id and e.data["order_id"] == 41 for e in progress)
    assert kinds(events)[0] == "generation.started" and kinds(events)[-1] == "generation.succeeded"
    assert kinds(events).count("phase.done") == 4

    async with api.http.get(f"{api.url}/v1/orders/41", headers=auth()) as response:
        order = await response.json()
    generation = order["generation"]
    assert generation["generation_id"] == generation_id and generation["status"] == "succeeded"
    assert generation["attempt"] == 1 and generation["error"] is None and "index.html" in generation["pages"]
    assert generation["usage"]["calls"] == 3 and "cost_usd" in generation
    assert [p["phase"] for p in generation["phases"]] == ["plan", "content", "code", "assemble"]
    assert all(p["duration_ms"] is not None and p["completed_at"] for p in generation["phases"])
    assert generation["started_at"] and generation["finished_at"]

    async with api.http.post(f"{api.url}/v1/orders/41/generate", headers=auth(WRITE), json={"regenerate": True}) as r:
        assert r.status == 202
    second = await follow(api, 41)
    assert second[-1].data["status"] == "succeeded" and second[-1].data["generation_id"] != generation_id
    # Connected before a replica claimed the job: the previous generation's rows, then the new one's, to its end.
    new_rows = [r["id"] for r in await table_rows(db, 41) if r["generation_id"] == second[-1].data["generation_id"]]
    assert [e.id for e in second if e.kind == "progress"][-len(new_rows) :] == new_rows
    async with api.http.get(f"{api.url}/v1/orders/41/generations", headers=auth()) as response:
        history = (await response.json())["generations"]
    assert [g["generation_id"] for g in history] == [second[-1].data["generation_id"], generation_id]

    async with api.http.get(f"{api.url}/v1/orders/41/site/", headers=auth()) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/html")
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'none'" in csp and "frame-ancestors 'self'" in csp
        index = await response.read()
    stored = await db.fetchval(
        "SELECT content FROM site_files WHERE path = 'index.html' AND generation_id = $1",
        second[-1].data["generation_id"],
    )
    assert index == stored
    async with api.http.get(f"{api.url}/v1/orders/41/site/assets/style.css", headers=auth()) as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/css")
    async with api.http.get(f"{api.url}/v1/orders/41/site.zip", headers=auth()) as response:
        assert response.status == 200
        archive = zipfile.ZipFile(io.BytesIO(await response.read()))
    assert "order-41/index.html" in archive.namelist() and archive.read("order-41/index.html") == stored

    async with api.http.get(f"{api.url}/metrics", headers=auth()) as response:
        text = await response.text()
    assert "sitegen_api_sse_events_sent_total" in text and "sitegen_api_sse_event_delay_seconds_bucket" in text
    assert "sitegen_api_listen_connected 1.0" in text
    assert 'sitegen_api_requests_total{method="GET",route="/v1/orders/{order_id}/events",status="200"} 2.0' in text


async def test_site_traversal_attempts_get_404(api: Running, settings: Settings, start_worker: WorkerFactory) -> None:
    await start_worker()
    async with api.http.post(f"{api.url}/v1/orders/42/generate", headers=auth(WRITE), json={"brief": SAMPLE_BRIEF}):
        pass
    await follow(api, 42)
    attempts = [
        "../../../../etc/passwd",
        "..%2f..%2fetc%2fpasswd",
        "%2e%2e/%2e%2e/etc/passwd",
        "%2E%2E%2Findex.html",
        "..\\..\\windows\\win.ini",
        "%5c..%5cindex.html",
        "/etc/passwd",
        "%2fetc%2fpasswd",
        "./index.html",
        "about/../index.html",
        "index.html%00.css",
        "no-such-page.html",
    ]
    port = int(api.url.rsplit(":", 1)[1])
    for attempt in attempts:  # sent as written: an HTTP client would normalise some of them away
        status, body = await raw_get(port, f"/v1/orders/42/site/{attempt}")
        assert status == 404, attempt
        assert json.loads(body)["error"]["type"] == "not_found", attempt
    assert (await raw_get(port, "/v1/orders/42/site/index.html"))[0] == 200


async def raw_get(port: int, target: str) -> tuple[int, bytes]:
    """GET `target` exactly as written (no client-side normalisation); (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {READ}\r\nConnection: close\r\n\r\n"
    writer.write(request.encode())
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


# --------------------------------------------------------------------------- replay, resume, end


async def test_replay_and_resume_with_last_event_id_have_no_gap_or_duplicate(
    api: Running, settings: Settings, start_worker: WorkerFactory, db: asyncpg.Connection
) -> None:
    slow = settings.model_copy(deep=True)
    slow.ai.providers["offline"].latency_s = 0.3
    await start_worker(slow)
    async with api.http.post(f"{api.url}/v1/orders/43/generate", headers=auth(WRITE), json={"brief": SAMPLE_BRIEF}):
        pass
    # Live: read a few events, drop the connection mid-generation, resume with Last-Event-ID.
    first = await follow(api, 43, count=3)
    assert all(e.kind == "progress" for e in first)
    rest = await follow(api, 43, headers={**auth(), "Last-Event-ID": str(first[-1].id)})
    assert rest[-1].kind == "end"
    seen = [e.id for e in first + rest if e.kind == "progress"]
    rows = await table_rows(db, 43)
    assert seen == [r["id"] for r in rows], "no gap, no duplicate across the reconnect"

    # Replay after the end: everything, or from any point with ?after= / Last-Event-ID, then `end` again.
    everything = await follow(api, 43)
    assert [e.id for e in everything if e.kind == "progress"] == [r["id"] for r in rows]
    middle = rows[len(rows) // 2]["id"]
    for how in ({"params": {"after": str(middle)}}, {"headers": {**auth(), "Last-Event-ID": str(middle)}}):
        tail = await follow(api, 43, **how)  # type: ignore[arg-type]
        assert [e.id for e in tail if e.kind == "progress"] == [r["id"] for r in rows if r["id"] > middle]
        assert tail[-1].data["status"] == "succeeded"


async def test_end_comes_after_the_row_announcing_it_even_when_written_after_the_status(
    api: Running, db: asyncpg.Connection
) -> None:
    generation_id = await new_generation(db, 44)
    started = await insert_log(db, 44, generation_id, "generation started (attempt 1)", "generation.started")
    # The status is terminal, but the buffered writer has not committed the row that says so yet.
    await db.execute(
        "UPDATE site_generations SET status = 'succeeded', finished_at = now() WHERE id = $1", generation_id
    )
    async with api.http.get(f"{api.url}/v1/orders/44/events", headers=auth()) as response:
        stream = sse(response)
        event = await anext(stream)
        while event.kind == "comment":
            event = await anext(stream)
        assert event.id == started
        last = await insert_log(db, 44, generation_id, "generation succeeded", "generation.succeeded")
        rest = [e async for e in stream if e.kind != "comment"]
    assert [e.kind for e in rest] == ["progress", "end"] and rest[0].id == last
    assert rest[1].data == {"status": "succeeded", "generation_id": generation_id}

    # A generation that ended with no row saying so (nobody will write one) still ends, after a bounded wait.
    other = await new_generation(db, 45, "failed")
    await db.execute("UPDATE site_generations SET finished_at = now() WHERE id = $1", other)
    events = await follow(api, 45)
    assert events == [Event("end", None, {"status": "failed", "generation_id": other})]


async def test_streams_ending_while_the_pool_holds_dead_connections_still_end_cleanly(
    api: Running, db: asyncpg.Connection
) -> None:
    """After a PostgreSQL restart the API's pool holds connections the server ended. Streams that get the end
    row ask at once, side by side, whether the generation ended: none may be handed a dead connection and
    dropped mid-response. Here every connection of the API's pool is ended by the server (as a restart
    does) while four streams wait for the end. (Written while chasing a CI failure of
    `test_a_postgres_restart_mid_stream_loses_and_repeats_nothing`, "Connection closed" in the client, that
    did not come back in six runs under load: this one passes on the code as it is.)"""
    generation_id = await new_generation(db, 47)
    started = await insert_log(db, 47, generation_id, "generation started (attempt 1)", "generation.started")
    async with contextlib.AsyncExitStack() as stack:
        responses = [
            await stack.enter_async_context(api.http.get(f"{api.url}/v1/orders/47/events", headers=auth()))
            for _ in range(4)
        ]
        streams = [sse(r) for r in responses]
        for stream in streams:
            event = await anext(stream)
            while event.kind == "comment":
                event = await anext(stream)
            assert event.id == started
        ended = await db.fetchval(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = 'sitegen-worker:api'"
        )
        assert ended >= 2, "the pool held connections to end"
        await db.execute(
            "UPDATE site_generations SET status = 'succeeded', finished_at = now() WHERE id = $1", generation_id
        )
        last = await insert_log(db, 47, generation_id, "generation succeeded", "generation.succeeded")
        for stream in streams:
            rest = [e async for e in stream if e.kind != "comment"]
            assert [e.kind for e in rest] == ["progress", "end"] and rest[0].id == last
            assert rest[1].data == {"status": "succeeded", "generation_id": generation_id}


async def test_idle_stream_gets_comments_and_sees_a_queued_cancel_end_it(api: Running, db: asyncpg.Connection) -> None:
    generation_id = await new_generation(db, 46, "queued")
    async with api.http.get(f"{api.url}/v1/orders/46/events", headers=auth()) as response:
        stream = sse(response)
        assert (await anext(stream)).kind == "comment"  # idle: keep-alive
        async with api.http.post(f"{api.url}/v1/orders/46/cancel", headers=auth(WRITE)) as cancelled:
            assert cancelled.status == 202
            assert await cancelled.json() == {"order_id": 46, "generation_id": generation_id, "status": "cancelled"}
        rest = [e async for e in stream if e.kind != "comment"]
    assert [e.kind for e in rest] == ["progress", "end"]
    assert rest[0].data["details"]["event"] == "generation.cancelled"
    assert rest[1].data == {"status": "cancelled", "generation_id": generation_id}


async def test_cancel_a_running_generation_then_retry_it(
    api: Running,
    settings: Settings,
    start_worker: WorkerFactory,
    fake: FakeProviderServer,
    db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.helpers import KEY, KEY_ENV

    monkeypatch.setenv(KEY_ENV, KEY)
    fake.script("ok", "ok", "hang")  # the coding call hangs until the generation is cancelled
    await start_worker(with_ai(settings, {"remote": remote("openai", fake.url, read_timeout_s=30)}))
    async with api.http.post(f"{api.url}/v1/orders/47/generate", headers=auth(WRITE), json={"brief": SAMPLE_BRIEF}):
        pass
    await asyncio.to_thread(fake.wait_for_requests, 3)
    async with api.http.post(f"{api.url}/v1/orders/47/cancel", headers=auth(WRITE)) as response:
        assert response.status == 202 and (await response.json())["status"] == "cancel_requested"
    events = await follow(api, 47)
    assert events[-1].data["status"] == "cancelled" and kinds(events)[-1] == "generation.cancelled"

    async with api.http.post(f"{api.url}/v1/orders/47/retry", headers=auth(WRITE)) as response:
        assert response.status == 202
        body = await response.json()
    assert body["queued"] and body["previous_status"] == "cancelled"
    events = await follow(api, 47)
    assert (
        events[-1].data["status"] == "succeeded" and events[-1].data["generation_id"] != body["previous_generation_id"]
    )


# --------------------------------------------------------------------------- stream tokens


async def test_stream_token_is_scoped_to_one_order_and_expires(api: Running, db: asyncpg.Connection) -> None:
    for order_id in (48, 49):
        generation_id = await new_generation(db, order_id, "succeeded")
        await insert_log(db, order_id, generation_id, "generation succeeded", "generation.succeeded")
        await db.execute(
            "INSERT INTO site_files (generation_id, path, content, sha256, bytes, media_type)"
            " VALUES ($1, 'index.html', '<p>hi</p>', 'x', 9, 'text/html; charset=utf-8')",
            generation_id,
        )
    async with api.http.post(f"{api.url}/v1/orders/48/stream-token", headers=auth(READ)) as response:
        assert response.status == 200
        grant = await response.json()
    assert grant["expires_at"] > datetime.now(UTC).timestamp() + 800
    token = {"token": grant["token"]}
    events = await follow(api, 48, headers={}, params=token)
    assert events[-1].kind == "end"
    async with api.http.get(f"{api.url}/v1/orders/48/site/index.html", params=token) as response:
        assert response.status == 200 and await response.text() == "<p>hi</p>"
        assert "sitegen_site_48" in response.cookies  # the page's relative assets need no ?token=
    async with api.http.get(f"{api.url}/v1/orders/48/site.zip", params=token) as response:
        assert response.status == 200

    async def status(path: str, params: dict[str, str]) -> int:
        async with aiohttp.ClientSession() as fresh:  # no cookie from above
            async with fresh.get(f"{api.url}{path}", params=params) as response:
                return response.status

    assert await status("/v1/orders/49/events", token) == 403, "a token for one order is refused for another"
    assert await status("/v1/orders/49/site/index.html", token) == 403
    assert await status("/v1/orders/48", token) == 401, "only events and site take a stream token"
    assert await status("/v1/orders/48/generations", token) == 401
    expired, _ = api.tokens.stream_token(48, -1, api.tokens.bearer_grant(READ))
    assert await status("/v1/orders/48/events", {"token": expired}) == 401
    forged = grant["token"][:-4] + ("AAAA" if not grant["token"].endswith("AAAA") else "BBBB")
    assert await status("/v1/orders/48/events", {"token": forged}) == 401
    other_key = Tokens(read=(READ,), signing_keys=[b"another deployment's key, 32 bytes"]).stream_token(48, 600)[0]
    assert await status("/v1/orders/48/events", {"token": other_key}) == 401


# --------------------------------------------------------------------------- slow clients


async def follow_into(api: Running, order_id: int, received: list[Event]) -> list[Event]:
    """`follow`, with each event put in `received` as it comes (for a test that paces itself by it)."""
    async with api.http.get(f"{api.url}/v1/orders/{order_id}/events", headers=auth()) as response:
        async for event in sse(response):
            if event.kind != "comment":
                received.append(event)
            if event.kind == "end":
                break
    return received


async def test_a_slow_client_is_disconnected_and_never_slows_the_others(
    settings: Settings, tokens: Tokens, db: asyncpg.Connection, redis: ArqRedis
) -> None:
    options = ApiOptions(keepalive_s=0.5, end_wait_s=1.0, poll_s=0.2, hole_grace_s=0.3, client_queue=4)
    async for api in _start(settings, tokens, options):
        generation_id = await new_generation(db, 50)
        port = int(api.url.rsplit(":", 1)[1])
        # The slow client: asks for the stream and never reads what comes.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.transport.set_write_buffer_limits(0)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        writer.write(f"GET /v1/orders/50/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {READ}\r\n\r\n".encode())
        await writer.drain()
        await reader.readuntil(b"retry: 2000\n\n")
        received: list[Event] = []
        fast = asyncio.create_task(follow_into(api, 50, received))
        fanout = api.app[API].fanout
        assert fanout is not None
        await wait_until(lambda fanout=fanout: fanout.clients == 2)
        big = "x" * 200_000
        for n in range(30):
            await insert_log(db, 50, generation_id, f"row {n} {big}")
            # Paced by the fast client (on a loaded CI machine it once fell 4 rows behind and was cut off too):
            # the slow one, which reads nothing, still overflows its queue of 4 long before the 30th row.
            await wait_until(lambda n=n, got=received, task=fast: len(got) > n or task.done())
        await db.execute(
            "UPDATE site_generations SET status = 'succeeded', finished_at = now() WHERE id = $1", generation_id
        )
        await insert_log(db, 50, generation_id, "generation succeeded", "generation.succeeded")
        events = await asyncio.wait_for(fast, 60)
        assert len([e for e in events if e.kind == "progress"]) == 31 and events[-1].kind == "end"
        assert fanout.dropped_clients == 1 and fanout.clients == 0
        writer.close()


# --------------------------------------------------------------------------- PostgreSQL restarting mid-stream


@pytest.fixture
def own_services() -> Iterator[LocalServices]:
    """PostgreSQL and Redis of this test alone: it restarts them."""
    with LocalServices() as running:
        yield running


async def test_a_postgres_restart_mid_stream_loses_and_repeats_nothing(
    own_services: LocalServices, tokens: Tokens, tmp_path: Path
) -> None:
    await migrate(own_services.database_url, ROOT / "migrations")
    settings = load_settings(
        database={"url": own_services.database_url, "pool_max_size": 4},
        redis={"url": own_services.redis_url},
        output={"dir": tmp_path / "sites"},
    )

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(own_services.database_url)

    conn = await connect()
    generation_id = await new_generation(conn, 60)
    first = await insert_log(conn, 60, generation_id, "generation started (attempt 1)", "generation.started")
    await conn.close()
    async for api in _start(settings, tokens):
        fanout = api.app[API].fanout
        assert fanout is not None
        async with (
            api.http.get(f"{api.url}/v1/orders/60/events", headers=auth()) as one,
            api.http.get(f"{api.url}/v1/orders/60/events", headers=auth()) as two,
        ):
            streams = [sse(one), sse(two)]

            async def next_progress(stream: AsyncIterator[Event]) -> Event:
                async for event in stream:
                    if event.kind != "comment":
                        return event
                raise AssertionError("the stream closed")

            assert [(await next_progress(s)).id for s in streams] == [first, first]
            conn = await connect()
            listeners = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'sitegen-api:listen'"
            )
            await conn.close()
            assert listeners == 1, "one LISTEN connection for every client of the process"

            await asyncio.to_thread(own_services.postgres.stop)
            async with api.http.get(f"{api.url}/healthz") as response:
                assert response.status == 503
            await asyncio.to_thread(own_services.postgres.start)

            conn = await connect()
            try:
                written = [
                    await insert_log(conn, 60, generation_id, f"phase {p} done", "phase.done", p)
                    for p in ("plan", "content")
                ]
                await conn.execute(
                    "UPDATE site_generations SET status = 'succeeded', finished_at = now() WHERE id = $1",
                    generation_id,
                )
                written.append(
                    await insert_log(conn, 60, generation_id, "generation succeeded", "generation.succeeded")
                )
            finally:
                await conn.close()
            for stream in streams:
                rest = [e async for e in stream if e.kind != "comment"]
                assert [e.id for e in rest[:-1]] == written, "after the restart: every row once, in order"
                assert rest[-1].kind == "end" and rest[-1].data["status"] == "succeeded"
        await wait_until(lambda fanout=fanout: fanout.listening)
        async with api.http.get(f"{api.url}/healthz") as response:
            assert response.status == 200
        assert fanout.reconnects >= 1

        # Redis away: a command answers 503 with a JSON error, never a bare 500 page.
        await asyncio.to_thread(own_services.redis.stop)
        async with api.http.post(
            f"{api.url}/v1/orders/61/generate", headers=auth(WRITE), json={"brief": SAMPLE_BRIEF}
        ) as response:
            assert response.status == 503
            assert (await response.json())["error"]["type"] == "unavailable"


def test_api_settings_take_cors_origins_as_a_list_or_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SITEGEN_API__CORS_ORIGINS", "https://App.example.com, http://127.0.0.1:5173")
    assert load_settings().api.cors_origins == ["https://app.example.com", "http://127.0.0.1:5173"]
    monkeypatch.setenv("SITEGEN_API__CORS_ORIGINS", '["https://app.example.com"]')
    assert load_settings().api.cors_origins == ["https://app.example.com"]
    monkeypatch.setenv("SITEGEN_API__CORS_ORIGINS", "app.example.com/path")
    with pytest.raises(SettingsError, match=r"api\.cors_origins"):
        load_settings()


# --------------------------------------------------------------------------- the dashboard, without a browser


async def test_dashboard_sign_in_gives_a_strict_http_only_session_that_posts_only_from_the_dashboard(
    api: Running, db: asyncpg.Connection
) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        async with browser.get(f"{api.url}/") as response:
            assert response.status == 200 and "Sign in" in await response.text()
            assert "script-src 'self'" in response.headers["Content-Security-Policy"]
        async with browser.post(f"{api.url}/session", data={"token": "wrong"}, headers={"Origin": api.url}) as response:
            assert response.status == 401
        async with browser.post(
            f"{api.url}/session", data={"token": WRITE}, headers={"Origin": api.url}, allow_redirects=False
        ) as response:
            assert response.status == 303
            cookie = response.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and WRITE not in cookie
        async with browser.get(f"{api.url}/") as response:
            page = await response.text()
        assert "<h1>Overview</h1>" in page and 'id="enqueue"' in page, "a write session can enqueue"
        brief = {"brief": SAMPLE_BRIEF}
        async with browser.post(f"{api.url}/v1/orders/70/generate", json=brief) as response:
            assert response.status == 403, "a session posts only with the dashboard's header"
        headers = {"X-Sitegen-Dashboard": "1"}
        async with browser.post(f"{api.url}/v1/orders/70/generate", json=brief, headers=headers) as response:
            assert response.status == 202
        async with browser.get(f"{api.url}/orders/70") as response:
            assert response.status == 200 and "Order 70" in await response.text()
        async with browser.get(f"{api.url}/static/dashboard.js") as response:
            assert response.status == 200
        async with browser.post(
            f"{api.url}/session/end", headers={"Origin": api.url}, allow_redirects=False
        ) as response:
            assert response.status == 303
        async with browser.get(f"{api.url}/v1/orders/70") as response:
            assert response.status == 401
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as reader:
        async with reader.post(f"{api.url}/session", data={"token": READ}, headers={"Origin": api.url}) as response:
            page = await response.text()
        assert "<h1>Overview</h1>" in page and 'id="enqueue"' not in page, "a read session cannot enqueue"
        async with reader.post(f"{api.url}/v1/orders/70/cancel", headers={"X-Sitegen-Dashboard": "1"}) as response:
            assert response.status == 403


async def test_demo_serve_keeps_the_dashboard_running_until_ctrl_c(services: LocalServices, migrated: None) -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker.cli", "demo", "--serve", "--port", str(port), "--latency", "0",
        "--order-id", "1090",
        cwd=ROOT, env=cli_env(services), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    printed: list[str] = []
    try:
        assert process.stdout is not None
        async with asyncio.timeout(120):
            while not any(line.startswith("demo token (write):") for line in printed):
                line = (await process.stdout.readline()).decode()
                assert line, "sitegen demo --serve exited:\n" + "".join(printed)
                printed.append(line)
        token = next(line for line in printed if line.startswith("demo token (write):")).split()[-1]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/v1/orders/1090", headers=auth(token)) as response:
                assert response.status == 200
                assert (await response.json())["generation"]["status"] == "succeeded"
            # The version history it serves: the generation, then the demo's edit (issue 22).
            async with http.get(f"http://127.0.0.1:{port}/v1/orders/1090/versions", headers=auth(token)) as response:
                history = await response.json()
            assert history["live_version"] == 2
            assert [(v["number"], v["kind"]) for v in history["versions"]] == [(2, "edit"), (1, "generation")]
            async with http.get(f"http://127.0.0.1:{port}/") as response:
                assert response.status == 200 and "Sign in" in await response.text()
        process.send_signal(signal.SIGINT)
        out, _ = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, "".join(printed) + out.decode()


@pytest.mark.timeout(180)
def test_the_sse_bench_runs_and_reports(tmp_path: Path) -> None:
    """`make bench-sse` keeps working (a few clients; its figures are for a quiet machine, never asserted)."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SITEGEN_", "DATABASE_URL", "REDIS_URL"))}
    args = ["--clients", "12", "--generations", "3", "--latency-ms", "20", "--out", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "bench.sse", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=170
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "sse.json").read_text())
    assert result["events"] == 30 and result["clients_with_wrong_rows"] == [] and result["listen_connections"] == [1]
    assert "SSE: 12 clients" in (tmp_path / "SSE.md").read_text()


async def test_rows_committed_out_of_id_order_by_several_writers_arrive_in_order_without_a_gap(
    api: Running, db: asyncpg.Connection, services: LocalServices
) -> None:
    """A replica whose batch took an id but commits late holds the rows behind it back, however long."""
    generation_id = await new_generation(db, 61)
    first = await insert_log(db, 61, generation_id, "generation started (attempt 1)", "generation.started")
    fanout = api.app[API].fanout
    assert fanout is not None
    slow = await asyncpg.connect(services.database_url)
    try:
        async with api.http.get(f"{api.url}/v1/orders/61/events", headers=auth()) as response:
            stream = sse(response)

            async def next_progress() -> Event:
                async for event in stream:
                    if event.kind != "comment":
                        return event
                raise AssertionError("the stream closed")

            assert (await next_progress()).id == first
            late = slow.transaction()
            await late.start()  # this replica's row takes its id now and commits last
            held = await insert_log(slow, 61, generation_id, "phase plan started", "phase.started", "plan")
            after = await insert_log(db, 61, generation_id, "a row of another replica")
            # The fan-out sees the hole, waits its grace, probes it and finds it held: it must wait on.
            await wait_until(lambda fanout=fanout: fanout.holes_held >= 2)
            assert fanout.delivered < held
            await late.commit()
            got = [await next_progress(), await next_progress()]
            assert [e.id for e in got] == [held, after], "in id order, none lost"
            # A hole nobody holds (a batch rolled back) is passed after its grace.
            rolled_back = slow.transaction()
            await rolled_back.start()
            await insert_log(slow, 61, generation_id, "never committed")
            await rolled_back.rollback()
            last = await insert_log(db, 61, generation_id, "after the rolled-back batch")
            assert (await next_progress()).id == last
    finally:
        await slow.close()


async def test_a_head_of_the_events_stream_answers_its_headers_and_ends(api: Running, db: asyncpg.Connection) -> None:
    """A HEAD of the events endpoint (a monitor, a link checker) gets the stream's status and headers, no body,
    and the connection is not held as an open stream (it counts against no stream cap, and ends at once)."""
    await new_generation(db, 77)
    async with api.http.head(f"{api.url}/v1/orders/77/events", headers=auth()) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert await response.read() == b""
    fanout = api.app[API].fanout
    assert fanout is not None and fanout.clients == 0


async def test_the_servers_cleanup_ends_even_when_a_fanout_task_swallows_its_cancel(
    settings: Settings, tokens: Tokens, db: asyncpg.Connection, redis: ArqRedis
) -> None:
    """Regression: stop 24's CI, `sitegen serve` hung on shutdown. `ProgressFanout.close` cancelled its tasks once
    and waited for them without a bound; a task that swallows one cancel (asyncio.wait_for on Python 3.11 can,
    when the awaited call finishes as the cancel comes: asyncpg's acquire uses it) never ends, and neither did
    the cleanup. Now the fan-out cancels again until its tasks end."""
    async for api in _start(settings, tokens):
        fanout = api.app[API].fanout
        assert fanout is not None
        swallowed = asyncio.Event()

        async def stubborn(swallowed: asyncio.Event = swallowed) -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                swallowed.set()  # and goes on, as a task whose cancel was lost does
            await asyncio.Event().wait()

        fanout._tasks.append(asyncio.create_task(stubborn()))
        await asyncio.sleep(0)  # let it start waiting
        async with asyncio.timeout(15):
            await fanout.close()
        assert swallowed.is_set() and not fanout._tasks


async def test_the_servers_cleanup_ends_while_a_handler_still_holds_a_database_connection(
    settings: Settings, tokens: Tokens, db: asyncpg.Connection, redis: ArqRedis
) -> None:
    """Regression: stop 24's CI, a shutdown hung. asyncpg's `Pool.close` waits for every connection to come back,
    so a handler stuck holding one (a statement PostgreSQL never answers) held the cleanup forever. The
    cleanup now gives the pools `POOL_CLOSE_S` and then terminates them."""
    async for api in _start(settings, tokens):
        state = api.app[API]
        assert state.pool is not None
        await state.pool.acquire()  # never released: the stuck handler
        async with asyncio.timeout(15):
            await close_resources(api.app)

        async def gone() -> bool:
            query = "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'sitegen-worker:api%'"
            return await db.fetchval(query) == 0

        await wait_for_query(gone, 10, what="the API's connections, the held one too, to be gone")
        assert state.pool is None and state.fanout is None, "closed once: the server's own cleanup finds nothing left"
