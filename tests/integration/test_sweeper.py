"""The sweeper: every active generation whose job was lost gets a job again, however many there are."""

from __future__ import annotations

import asyncio
import time

import asyncpg
from arq import ArqRedis
from arq.constants import in_progress_key_prefix

from tests.helpers import WorkerFactory, wait_until
from worker.ai import build_router
from worker.client import QUEUE_NAME
from worker.pipeline.runner import Runtime
from worker.progress import ProgressLog
from worker.settings import Settings
from worker.store import Store, create_pool
from worker.sweeper import sweep


async def test_the_sweeper_reenqueues_every_lost_generation_past_one_page(
    settings: Settings, db: asyncpg.Connection, redis: ArqRedis
) -> None:
    """Regression: issue 14 defect 13. A backlog larger than a page (500) is swept in one pass; generations
    waiting for a deferred retry are not lost and do not take up the pass."""
    # 600 handed back with a retry due in an hour (not lost), then 600 whose job left Redis an hour ago.
    await db.execute("INSERT INTO site_orders (id) SELECT generate_series(1, 1200)")
    await db.execute(
        "INSERT INTO site_generations (order_id, status, current_phase, created_at, heartbeat_at, retry_at)"
        " SELECT o, 'queued', 'content', now() - interval '1 hour', now() - interval '1 hour',"
        "        CASE WHEN o <= 600 THEN now() + interval '1 hour' END"
        " FROM generate_series(1, 1200) AS o"
    )
    pool = await create_pool(settings.database, max_size=2, name="sweeper")
    rt = Runtime(
        settings=settings,
        store=Store(pool, replica_id="sweeper", lease_s=settings.worker.lease_s),
        progress=ProgressLog(pool, replica_id="sweeper"),
        ai=build_router(settings.ai),
    )
    try:
        assert await sweep({"runtime": rt, "redis": redis}) == 600
    finally:
        await rt.ai.aclose()
        await pool.close()
    queued = {int(job_id.decode().rsplit(":", 1)[1]) for job_id in await redis.zrange(QUEUE_NAME, 0, -1)}
    assert queued == set(range(601, 1201))


async def test_a_sweep_longer_than_a_lease_keeps_its_job(
    settings: Settings, start_worker: WorkerFactory, db: asyncpg.Connection, redis: ArqRedis
) -> None:
    """Regression: issue 21 defect 9: the cron sweep's lease in Redis was never renewed, so a sweep longer than
    `lease_s` lost its in-progress key and another replica's poll claimed it and ran it a second time."""
    lease_s = 2.0
    async with db.transaction():
        # The sweep's query waits on this lock: the sweep lasts as long as the test holds it.
        await db.execute("LOCK TABLE site_generations IN ACCESS EXCLUSIVE MODE")
        await start_worker(
            settings.model_copy(update={"worker": settings.worker.model_copy(update={"lease_s": lease_s})})
        )

        async def sweep_claimed() -> bool:
            return bool(await redis.keys(f"{in_progress_key_prefix}sweep:*"))

        await wait_until(sweep_claimed, 10, 0.02, "the startup sweep to be claimed")
        (key,) = await redis.keys(f"{in_progress_key_prefix}sweep:*")
        deadline = time.monotonic() + 3 * lease_s
        while time.monotonic() < deadline:
            assert await redis.exists(key), "the running sweep's in-progress key lapsed"
            await asyncio.sleep(0.05)
