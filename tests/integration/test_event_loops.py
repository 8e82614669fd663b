"""The "Future attached to a different loop" failure cannot happen: every pool and client belongs to
the worker that created it on its own loop, so workers on successive loops in one process both work."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from tests.helpers import SAMPLE_BRIEF, close_worker, wait_for_result
from worker import client
from worker.main import create_worker
from worker.settings import Settings


async def _one_worker_on_this_loop(settings: Settings, order_id: int) -> dict[str, Any]:
    worker = create_worker(settings, handle_signals=False)
    task = asyncio.create_task(worker.async_run())
    redis = await client.connect(settings.redis.url)
    try:
        await client.enqueue_generation(redis, order_id, SAMPLE_BRIEF)
        result: dict[str, Any] = await wait_for_result(redis, order_id)
        runtime = worker.ctx["runtime"]
        assert runtime.store.pool._loop is asyncio.get_running_loop()  # created on this loop, not at import
        return result
    finally:
        await redis.aclose()
        await close_worker(worker)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _reset(settings: Settings) -> None:
    conn = await asyncpg.connect(settings.database.url)
    try:
        await conn.execute(
            "TRUNCATE site_version_files, site_versions, site_blobs, site_files, site_generation_phases,"
            " site_generation_logs, site_generations, site_orders"
        )
    finally:
        await conn.close()
    redis = await client.connect(settings.redis.url)
    await redis.flushdb()
    await redis.aclose()


def test_two_workers_one_after_another_on_new_event_loops_both_work(settings: Settings, migrated: None) -> None:
    asyncio.run(_reset(settings))
    first = asyncio.run(_one_worker_on_this_loop(settings, 41))
    second = asyncio.run(_one_worker_on_this_loop(settings, 42))
    assert first["status"] == second["status"] == "succeeded"
    assert (first["order_id"], second["order_id"]) == (41, 42)
