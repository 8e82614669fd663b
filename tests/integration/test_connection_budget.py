"""A replica never holds more PostgreSQL connections than its two pools allow, whatever max_jobs is,
and holds none across a model call."""

from __future__ import annotations

import asyncio

import asyncpg
from arq import ArqRedis

from tests.helpers import SAMPLE_BRIEF, WorkerFactory, remote, wait_for_result, with_ai
from worker import client
from worker.local.fake_server import FakeProviderServer
from worker.settings import Settings

SAMPLE = """
SELECT count(*) FILTER (WHERE application_name LIKE 'sitegen-worker:%') AS connections,
       (SELECT count(*) FROM site_generations WHERE status = 'running') AS running
FROM pg_stat_activity
"""


async def test_fifty_concurrent_jobs_stay_within_the_pools_connection_budget(
    fake: FakeProviderServer,
    settings: Settings,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
    provider_key: None,
) -> None:
    fake.configure(latency_s=0.3)
    custom = with_ai(settings, {"remote": remote("openai", fake.url, max_concurrency=50)})
    custom = custom.model_copy(
        update={
            "worker": custom.worker.model_copy(update={"max_jobs": 50}),
            "database": custom.database.model_copy(update={"pool_max_size": 3, "progress_pool_max_size": 2}),
        }
    )
    await start_worker(custom)
    orders = list(range(200, 230))
    for order_id in orders:
        await client.enqueue_generation(redis, order_id, SAMPLE_BRIEF)

    peak_connections = peak_running = 0
    results = asyncio.gather(*(wait_for_result(redis, order_id) for order_id in orders))
    while not results.done():
        sample = await db.fetchrow(SAMPLE)
        peak_connections = max(peak_connections, sample["connections"])
        peak_running = max(peak_running, sample["running"])
        await asyncio.wait([results], timeout=0.05)

    assert all(r["status"] == "succeeded" for r in await results)
    print(f"\npeak: {peak_running} generations running on {peak_connections} PostgreSQL connections")
    assert peak_running >= 10, "the jobs really ran concurrently"
    assert peak_connections <= 3 + 2, "never more connections than the two pools' maximum"
