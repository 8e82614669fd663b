"""`sitegen serve` under load and towards read tokens (issue 20 findings 10, 11, 12 and the flood test).

The app runs in-process on a free loopback port with real PostgreSQL and Redis, as in test_api.py,
whose helpers (the SSE reader, progress rows written the worker's way) these tests share.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from arq import ArqRedis

from tests.helpers import WorkerFactory
from tests.helpers import wait_until as poll_until
from tests.integration.test_api import (
    READ,
    WRITE,
    Event,
    Running,
    _start,
    auth,
    insert_log,
    new_generation,
    sse,
    wait_until,
)
from worker.api.auth import Tokens
from worker.api.context import API
from worker.api.routes import STREAMS
from worker.errors import AIUnavailable, describe
from worker.main import health_check_key
from worker.settings import Settings
from worker.store import QUERIES

PUBLIC_ERROR_KEYS = {"type", "message", "phase", "retryable"}


@pytest.fixture
def tokens() -> Tokens:
    return Tokens(read=(READ,), write=(WRITE,))


def with_api(settings: Settings, **api: Any) -> Settings:
    return settings.model_copy(update={"api": settings.api.model_copy(update=api)})


@pytest.fixture
async def capped(settings: Settings, tokens: Tokens, db: asyncpg.Connection, redis: ArqRedis) -> AsyncIterator[Running]:
    """The API with small stream caps and a short pool acquire timeout."""
    limited = with_api(
        settings,
        max_streams=5,
        max_streams_per_token=2,
        max_streams_per_client=3,
        pool_acquire_timeout_s=0.3,
        overview_cache_s=60,
    )
    async for running in _start(limited, tokens):
        yield running


async def open_stream(http: aiohttp.ClientSession, url: str, **kw: Any) -> aiohttp.ClientResponse:
    response = await http.get(url, **kw)
    if response.status == 200:
        # The headers are out once the first bytes (`retry:`) are: the stream is registered.
        await response.content.readline()
    return response


# --------------------------------------------------------------------------- finding 10: streams and the pool


async def test_streams_are_capped_per_token_per_client_and_per_process(capped: Running, db: asyncpg.Connection) -> None:
    """Regression: issue 20 finding 10: any number of SSE streams was accepted from one token; now the
    per-token, per-client-address and per-process caps answer 429 with Retry-After."""
    for order_id in (1, 2, 3):
        await new_generation(db, order_id)
    first, _ = capped.tokens.stream_token(1, 600, capped.tokens.bearer_grant(READ))
    second, _ = capped.tokens.stream_token(2, 600, capped.tokens.bearer_grant(READ))
    url = f"{capped.url}/v1/orders/{{}}/events"
    held: list[aiohttp.ClientResponse] = []
    try:
        for _ in range(2):
            held.append(await open_stream(capped.http, url.format(1), params={"token": first}))
        assert [r.status for r in held] == [200, 200]
        refused = await open_stream(capped.http, url.format(1), params={"token": first})
        held.append(refused)
        assert refused.status == 429, "a third stream with the same token is over api.max_streams_per_token"
        assert int(refused.headers["Retry-After"]) >= 1
        body = await refused.json()
        assert body["error"]["type"] == "too_many_streams" and "max_streams_per_token" in body["error"]["message"]

        held.append(await open_stream(capped.http, url.format(2), params={"token": second}))
        assert held[-1].status == 200, "another token from the same address still gets a stream"
        held.append(await open_stream(capped.http, url.format(3), headers=auth(READ)))
        assert held[-1].status == 429, "a fourth stream from one address is over api.max_streams_per_client"
        assert "max_streams_per_client" in (await held[-1].json())["error"]["message"]
        assert "Retry-After" in held[-1].headers

        # Another loopback address is another client; the process still holds 3 streams, 5 at most.
        other = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0)))
        try:
            statuses = []
            for _ in range(3):
                response = await open_stream(other, url.format(3), headers=auth(WRITE))
                held.append(response)
                statuses.append(response.status)
            assert statuses == [200, 200, 429], "the sixth stream of the process is over api.max_streams"
            assert "max_streams " in (await held[-1].json())["error"]["message"] + " "
        finally:
            for response in held:
                response.close()
            await other.close()
        # Closed streams give their places back (at their next write, a keep-alive at the latest), and
        # so do opens that fail (an unknown order, 404).
        caps = capped.app[STREAMS]
        await wait_until(lambda: caps.total == 0)
        for _ in range(4):
            async with capped.http.get(url.format(999), headers=auth(READ)) as response:
                assert response.status == 404
        again = await open_stream(capped.http, url.format(1), params={"token": first})
        assert again.status == 200
        again.close()
    finally:
        for response in held:
            response.close()


async def test_a_pool_acquire_times_out_as_503_and_healthz_does_not_wait_behind_clients(
    capped: Running, db: asyncpg.Connection
) -> None:
    """Regression: issue 20 finding 10: a pool acquire waited for ever, and /healthz shared the pool with
    client traffic; now a busy pool answers 503 after api.pool_acquire_timeout_s and /healthz answers 200."""
    await new_generation(db, 5)
    pool = capped.app[API].pool
    assert pool is not None
    hogs = [await pool.acquire() for _ in range(pool.get_max_size())]
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
            async with http.get(f"{capped.url}/v1/orders/5", headers=auth(READ)) as response:
                assert response.status == 503
                assert (await response.json())["error"]["type"] == "unavailable"
            async with http.get(f"{capped.url}/healthz") as response:
                assert response.status == 200, await response.text()
                assert (await response.json())["postgresql"] is True
    finally:
        for conn in hogs:
            await pool.release(conn)


async def test_a_stream_closes_at_its_stream_tokens_expiry(capped: Running, db: asyncpg.Connection) -> None:
    """Regression: issue 20 finding 10: an open stream outlived its stream token; now it ends with an
    `expired` event when the token expires."""
    generation_id = await new_generation(db, 6)
    await insert_log(db, 6, generation_id, "generation started", "generation.started")
    token, expires_at = capped.tokens.stream_token(6, 1.5, capped.tokens.bearer_grant(READ))
    got: list[Event] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        async with http.get(f"{capped.url}/v1/orders/6/events", params={"token": token}) as response:
            assert response.status == 200
            async for event in sse(response):
                if event.kind != "comment":
                    got.append(event)
    assert [e.kind for e in got] == ["progress", "expired"]
    assert got[-1].data == {"expires_at": expires_at}


# --------------------------------------------------------------------------- the flood


@pytest.fixture
async def defaults(
    settings: Settings, tokens: Tokens, db: asyncpg.Connection, redis: ArqRedis
) -> AsyncIterator[Running]:
    """The API with the default caps. Its pool waits longer for a connection than the default 5 s: the 100
    streams the cap admits replay at once, and on a loaded 2-core CI machine a replay that timed out ended its
    stream, gave its slot back and let one more open in (seen in CI: 168 opens not refused, not 100)."""
    patient = settings.model_copy(update={"api": settings.api.model_copy(update={"pool_acquire_timeout_s": 120})})
    async for running in _start(patient, tokens):
        yield running


async def test_a_flood_of_stream_opens_with_one_token_is_capped_while_health_and_others_go_on(
    defaults: Running, db: asyncpg.Connection
) -> None:
    """Issue 20 section C (flood): 2,000 stream opens with one stream token get 429 beyond the per-token
    cap (the default settings), while /healthz stays 200 and another order's stream gets its events."""
    api, flooded, other, opens = defaults, 11, 12, 2000
    await new_generation(db, flooded)
    other_generation = await new_generation(db, other)
    cap = api.app[API].settings.api.max_streams_per_token
    token, _ = api.tokens.stream_token(flooded, 600, api.tokens.bearer_grant(READ))
    other_token, _ = api.tokens.stream_token(other, 600, api.tokens.bearer_grant(READ))
    url = f"{api.url}/v1/orders/{flooded}/events"
    held: list[aiohttp.ClientResponse] = []
    statuses: list[int] = []
    health: list[int] = []

    async def one_open(http: aiohttp.ClientSession) -> None:
        response = await open_stream(http, url, params={"token": token})
        statuses.append(response.status)
        if response.status == 200:
            held.append(response)  # kept open: the cap counts open streams
        else:
            response.close()

    async def probe_health() -> None:
        while len(statuses) < opens:
            async with api.http.get(f"{api.url}/healthz") as response:
                health.append(response.status)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as flood_http:
        try:
            params = {"token": other_token}
            async with api.http.get(f"{api.url}/v1/orders/{other}/events", params=params) as watch:
                assert watch.status == 200
                prober = asyncio.create_task(probe_health())
                await asyncio.gather(*(one_open(flood_http) for _ in range(opens)))
                await prober
                row_id = await insert_log(db, other, other_generation, "still followed", "phase.done", "plan")
                async for event in sse(watch):
                    if event.kind == "progress":
                        assert event.id == row_id and event.data["message"] == "still followed"
                        break
        finally:
            for response in held:
                response.close()
    assert statuses.count(200) == cap and statuses.count(429) == opens - cap, Counter(statuses)
    assert health and set(health) == {200}


# --------------------------------------------------------------------------- finding 11: the overview


async def _signed_in(api: Running, token: str) -> aiohttp.ClientSession:
    browser = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    async with browser.post(
        f"{api.url}/session", data={"token": token}, headers={"Origin": api.url}, allow_redirects=False
    ) as response:
        assert response.status == 303
    return browser


async def scans(redis: ArqRedis) -> int:
    stats = await redis.info("commandstats")
    return int((stats.get("cmdstat_scan") or {}).get("calls", 0))


async def test_the_overview_reads_replica_health_by_known_keys_and_is_cached(
    capped: Running, settings: Settings, db: asyncpg.Connection, redis: ArqRedis, start_worker: WorkerFactory
) -> None:
    """Regression: issue 20 finding 11: each overview render SCANned the whole Redis keyspace and ran its
    aggregates again; now replicas come from a set of known health keys, and renders are cached per role."""
    await start_worker()
    replicas_key = f"{settings.worker.queue_name}:replicas"

    async def recorded() -> bool:
        return await redis.zscore(replicas_key, "test-replica") is not None

    await poll_until(recorded, timeout=30, interval=0.05, what="the worker recording itself in the replica set")
    assert await redis.exists(health_check_key(settings))
    # A replica that stopped long ago, and one whose health key is gone, are not alive.
    await redis.zadd(replicas_key, {"long-gone": 1.0, "no-key": 4_000_000_000.0})
    await redis.mset({f"unrelated:{i}": "x" for i in range(500)})

    before = await scans(redis)
    writer = await _signed_in(capped, WRITE)
    reader = await _signed_in(capped, READ)
    try:
        async with writer.get(f"{capped.url}/dashboard/overview") as response:
            first = await response.text()
        assert "test-replica" in first and "long-gone" not in first and "no-key" not in first
        assert 'id="replica-count">1<' in first
        assert await redis.zscore(replicas_key, "long-gone") is None, "old members are pruned"
        assert await scans(redis) == before, "the overview no longer SCANs the keyspace"

        await db.execute(
            "INSERT INTO site_orders (id) VALUES (90);"
            " INSERT INTO site_generations (order_id, status, error, finished_at)"
            ' VALUES (90, \'failed\', \'{"type": "FreshFailure", "message": "x"}\', now())'
        )
        async with writer.get(f"{capped.url}/dashboard/overview") as response:
            assert await response.text() == first, "within api.overview_cache_s the render is reused"
        async with reader.get(f"{capped.url}/dashboard/overview") as response:
            as_reader = await response.text()
        assert 'id="enqueue"' in first and 'id="enqueue"' not in as_reader, "cached per role"
    finally:
        await writer.close()
        await reader.close()


async def test_the_dashboard_aggregates_use_indexes(db: asyncpg.Connection) -> None:
    """Regression: issue 20 finding 11: the overview's aggregates scanned whole tables
    (`site_generations.finished_at`, `site_generation_phases.completed_at` had no index)."""
    await db.execute(
        """
        INSERT INTO site_orders (id) SELECT i FROM generate_series(1, 20000) AS i;
        INSERT INTO site_generations (order_id, status, finished_at, error)
        SELECT i, CASE WHEN i % 2 = 0 THEN 'failed' ELSE 'succeeded' END,
               now() - interval '30 days' - i * interval '1 minute', '{"type": "Old"}'
        FROM generate_series(1, 20000) AS i;
        INSERT INTO site_generation_phases (generation_id, phase, output, usage, duration_ms, completed_at)
        SELECT g.id, p.phase, '{}', '{"input_tokens": 1}', 1, g.finished_at
        FROM site_generations g, (VALUES ('plan'), ('content'), ('code')) AS p (phase);
        ANALYZE site_generations; ANALYZE site_generation_phases;
        """
    )
    uses = {
        "dashboard_failures": "site_generations_failed_by_finished_at",
        "dashboard_usage": "site_generation_phases_by_completed_at",
        "dashboard_active": "site_generations",
    }
    for name, index in uses.items():
        plan = "\n".join(r[0] for r in await db.fetch("EXPLAIN " + QUERIES[name]))
        assert "Seq Scan" not in plan and f"using {index}" in plan, f"{name}:\n{plan}"


# --------------------------------------------------------------------------- finding 12: errors by role


def stored_error() -> dict[str, Any]:
    """An error as the runner stores it for a provider outage: body excerpt, request id, traceback."""
    try:
        raise AIUnavailable(
            "openai (openai, model gpt-x): HTTP 503: provider unavailable: <html>upstream db-7.internal:5432</html>",
            provider="openai",
            task="coding",
            model="gpt-x",
            status=503,
            request_id="req_internal_42",
            body="<html>upstream db-7.internal:5432</html>",
        )
    except AIUnavailable as exc:
        return describe(exc, phase="code")


INTERNAL = ("db-7.internal", "req_internal_42", "Traceback", "gpt-x")


async def test_read_tokens_get_the_short_error_and_write_tokens_the_whole_one(
    capped: Running, db: asyncpg.Connection
) -> None:
    """Regression: issue 20 finding 12: `GET /v1/orders/{id}` gave read tokens the stored error whole
    (traceback, provider request id, body excerpt); read tokens now get {type, message, phase, retryable}
    (orders, generations, the dashboard's read session, SSE rows), write tokens the whole error."""
    error = stored_error()
    generation_id = await new_generation(db, 30, "running")
    await db.execute(
        "UPDATE site_generations SET status = 'failed', error = $2::jsonb, finished_at = now() WHERE id = $1",
        generation_id,
        json.dumps(error),
    )
    short = {k: v for k, v in error.items() if k != "traceback"}
    row_id = await insert_log(db, 30, generation_id, f"generation failed: {error['type']}: {error['message']}")
    await db.execute(
        "UPDATE site_generation_logs SET details = $2::jsonb WHERE id = $1",
        row_id,
        json.dumps({"event": "generation.failed", "error": short}),
    )

    async def get(path: str, token: str) -> Any:
        async with capped.http.get(f"{capped.url}{path}", headers=auth(token)) as response:
            assert response.status == 200, await response.text()
            return await response.json()

    for token, whole in ((READ, False), (WRITE, True)):
        latest = (await get("/v1/orders/30", token))["generation"]["error"]
        listed = (await get("/v1/orders/30/generations", token))["generations"][0]["error"]
        for got in (latest, listed):
            if whole:
                assert got == error
            else:
                assert set(got) == PUBLIC_ERROR_KEYS
                assert got["type"] == "AIUnavailable" and got["phase"] == "code" and got["retryable"] is True
                assert got["message"] and not any(word in json.dumps(got) for word in INTERNAL), got

    stream, _ = capped.tokens.stream_token(30, 600, capped.tokens.bearer_grant(READ))
    callers: list[tuple[dict[str, str], dict[str, str], bool]] = [
        (auth(READ), {}, False),
        ({}, {"token": stream}, False),
        (auth(WRITE), {}, True),
    ]
    for headers, params, whole in callers:
        url = f"{capped.url}/v1/orders/30/events"
        async with capped.http.get(url, params={"after": "0", **params}, headers=headers) as response:
            assert response.status == 200
            progress = [e async for e in sse(response) if e.kind == "progress"]
        (row,) = progress
        if whole:
            assert row.data["details"]["error"] == short and "db-7.internal" in row.data["message"]
        else:
            assert set(row.data["details"]["error"]) == PUBLIC_ERROR_KEYS
            assert not any(word in json.dumps(row.data) for word in INTERNAL), row.data
            assert row.data["message"].startswith("generation failed: AIUnavailable: ")

    for token, whole in ((READ, False), (WRITE, True)):
        browser = await _signed_in(capped, token)
        try:
            async with browser.get(f"{capped.url}/dashboard/orders/30") as response:
                page = await response.text()
        finally:
            await browser.close()
        assert ("Traceback" in page and "db-7.internal" in page) is whole
        if not whole:
            assert not any(word in page for word in INTERNAL) and "AIUnavailable" in page


async def test_the_overview_counts_running_jobs_apart_from_deferred_ones(
    capped: Running, settings: Settings, redis: ArqRedis
) -> None:
    """Regression: issue 21 defect 9: the dashboard's "deferred" count included every running job, because a
    running job is scored in the queue at the end of its lease (worker/polling.py). Here one job is deferred
    (due in a minute) and two run (their queue score and their lease end, the same future instant)."""
    queue = settings.worker.queue_name
    seconds, micros = await redis.time()
    now_ms = seconds * 1000 + micros // 1000
    lease_end = now_ms + 8000
    await redis.zadd(
        queue, {"generate_site:1": now_ms + 60_000, "generate_site:2": lease_end, "generate_site:3": lease_end}
    )
    await redis.zadd(f"{queue}:leases", {"generate_site:2": lease_end, "generate_site:3": lease_end})
    writer = await _signed_in(capped, WRITE)
    try:
        async with writer.get(f"{capped.url}/dashboard/overview") as response:
            page = await response.text()
    finally:
        await writer.close()
    assert '<span class="stat-value">1</span> deferred' in page, page
