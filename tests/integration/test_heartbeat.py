"""The heartbeat renews PostgreSQL leases and Redis in-progress keys independently, and a lost claim stops
its generation at the next model call.

Regression: issue 14 defect 6. Before the fix one beat did Redis, then PostgreSQL: a Redis error skipped
the lease renewal (a live replica lost its claims after `lease_s`), a hung PostgreSQL call held up the
in-progress keys (another replica could start the same job), and a generation whose claim was taken
over only noticed at its next commit, after making more model calls.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import pytest
from arq import ArqRedis
from arq.worker import Worker

from tests.helpers import WorkerFactory, remote, wait_for_result, wait_until, with_ai
from worker import client
from worker.local.fake_server import FakeProviderServer
from worker.local.services import free_port
from worker.pipeline.runner import Runtime
from worker.settings import Settings

SAMPLE_BRIEF = {
    "business_name": "Heartbeat Bakery",
    "description": "A bakery whose plan call takes longer than its lease.",
    "services": ["Bread", "Cakes"],
}
LEASE_S = 2.0
pytestmark = pytest.mark.usefixtures("provider_key")


def _custom(settings: Settings, fake: FakeProviderServer) -> Settings:
    custom = with_ai(settings, {"remote": remote("openai", fake.url, read_timeout_s=30)})
    return custom.model_copy(update={"worker": custom.worker.model_copy(update={"lease_s": LEASE_S})})


async def _lease(db: asyncpg.Connection, order_id: int) -> float:
    expires = await db.fetchval(
        "SELECT EXTRACT(EPOCH FROM lease_expires_at)::float8 FROM site_generations WHERE order_id = $1", order_id
    )
    assert expires is not None, "the generation is claimed"
    return float(expires)


async def test_a_redis_outage_does_not_stop_the_postgresql_lease_renewal(
    fake: FakeProviderServer, settings: Settings, start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    fake.script("hang")
    worker: Worker = await start_worker(_custom(settings, fake))
    await client.enqueue_generation(redis, 61, SAMPLE_BRIEF)
    await asyncio.to_thread(fake.wait_for_requests, 1)
    rt: Runtime = worker.ctx["runtime"]
    # The heartbeat's Redis now refuses every connection, as an unreachable Redis does.
    rt.redis = ArqRedis(host="127.0.0.1", port=free_port())
    first = await _lease(db, 61)

    async def renewed_twice() -> bool:
        return await _lease(db, 61) > first + LEASE_S / 2

    await wait_until(renewed_twice, 3 * LEASE_S, 0.05, "the PostgreSQL lease to be renewed while Redis is unreachable")


async def test_a_hung_postgresql_renewal_does_not_let_the_job_marker_expire(
    fake: FakeProviderServer, settings: Settings, start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    fake.script("hang")
    await start_worker(_custom(settings, fake))
    await client.enqueue_generation(redis, 62, SAMPLE_BRIEF)
    await asyncio.to_thread(fake.wait_for_requests, 1)
    marker = f"arq:in-progress:{client.job_id(62)}"
    # The heartbeat's UPDATE of this generation now waits on a row lock: a PostgreSQL call that hangs.
    watcher = await asyncpg.connect(settings.database.url)
    try:
        async with db.transaction():
            await db.execute("SELECT 1 FROM site_generations WHERE order_id = 62 FOR UPDATE")
            await wait_until(
                lambda: _renewal_waits_on_lock(watcher),
                3 * LEASE_S,
                0.05,
                "the heartbeat's lease renewal to wait on the row lock",
            )
            # Watch the marker for two leases: without its own renewal it would expire within one.
            deadline = time.monotonic() + 2 * LEASE_S
            while time.monotonic() < deadline:
                assert await redis.exists(marker), "the job's in-progress key expired while PostgreSQL hung"
                await asyncio.sleep(0.1)
    finally:
        await watcher.close()


async def _renewal_waits_on_lock(db: asyncpg.Connection) -> bool:
    return bool(
        await db.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%claim_token = ANY%')"
        )
    )


async def test_a_lost_claim_stops_the_generation_before_its_next_model_call(
    fake: FakeProviderServer, settings: Settings, start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    # The plan's first answer is unusable, so the phase would re-ask the model; the answer takes long
    # enough for the heartbeat to see the claim taken over while the call is in flight.
    fake.configure(latency_s=1.5)
    fake.script("malformed-hard")
    await start_worker(_custom(settings, fake))
    await client.enqueue_generation(redis, 63, SAMPLE_BRIEF)
    await asyncio.to_thread(fake.wait_for_requests, 1)
    # Another replica takes the claim over (as after a lapsed lease).
    await db.execute("UPDATE site_generations SET claim_token = $1 WHERE order_id = 63", uuid.uuid4())

    result = await wait_for_result(redis, 63)

    assert result["status"] == "superseded"
    assert len(fake.requests) == 1, "no model call may be made for a claim the heartbeat found lost"
