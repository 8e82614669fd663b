"""A job's in-progress key names the run that owns it: only that run renews its lease or records its end.

Regression tests of issue 21 defect 4 (a run that no longer owns its job still finished it in Redis),
defect 8 (an abort from a host whose clock runs fast) and defect 9 (a failed job's lease records).
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from arq import ArqRedis
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix

from tests.helpers import SAMPLE_BRIEF, WorkerFactory, progress_messages, remote, wait_until, with_ai
from worker import client, polling
from worker.local.fake_server import FakeProviderServer
from worker.settings import Settings

pytestmark = pytest.mark.usefixtures("provider_key")

LEASE_S = 2.0


def _replica(settings: Settings, name: str, **worker: object) -> Settings:
    update = {"replica_id": name, "lease_s": LEASE_S, **worker}
    return settings.model_copy(update={"worker": settings.worker.model_copy(update=update)})


async def _watch(redis: ArqRedis, key: str, seconds: float, what: str) -> None:
    """Check for `seconds` (a few leases) that `key` keeps existing; fail with `what` the moment it does not."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert await redis.exists(key), what
        await asyncio.sleep(0.05)


async def test_a_claim_waiting_on_the_orders_lock_keeps_its_job_and_no_other_run_takes_it(
    fake: FakeProviderServer, settings: Settings, start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    """Regression: issue 21 defect 4: a run's lease in Redis was renewed only once its PostgreSQL claim was
    made. A claim waiting on the order's row lock for longer than a lease let its in-progress key lapse; a
    second run claimed the job, one of them found the order busy, and its end deleted the in-progress key of
    the run that owns the generation: the job then came due every few seconds with a new "waiting" row."""
    fake.script("hang")  # the generation's plan call: it runs for the rest of the test
    custom = with_ai(settings, {"remote": remote("openai", fake.url, read_timeout_s=60)})
    job_id = client.job_id(310)
    key = in_progress_key_prefix + job_id
    async with asyncio.timeout(60), redis.monitor() as monitor:
        async with db.transaction():
            await db.execute("SELECT pg_advisory_xact_lock(310)")  # the claim's lock of the order
            await start_worker(_replica(custom, "own-a"))
            await start_worker(_replica(custom, "own-b"))
            await client.enqueue_generation(redis, 310, SAMPLE_BRIEF)
            await wait_until(lambda: redis.exists(key), 10, 0.02, "a replica to claim the job")
            holder = await redis.get(key)
            await _watch(redis, key, 3 * LEASE_S, "the in-progress key of a run waiting for its claim lapsed")
        await redis.echo("end of the test's commands")
        commands = []
        while (command := (await monitor.next_command())["command"]) != "ECHO end of the test's commands":
            commands.append(command)
    claims = [c for c in commands if c.startswith(f"PSETEX {key} ")]
    assert len(claims) == 1, f"the job was claimed once while its first claim waited, not {len(claims)} times"
    assert await redis.get(key) == holder
    await asyncio.to_thread(fake.wait_for_requests, 1)

    await _watch(redis, key, 3 * LEASE_S, "the running generation's in-progress key went")
    assert await redis.get(key) == holder
    assert len(fake.requests) == 1
    assert await db.fetchval("SELECT count(*) FROM site_generations WHERE order_id = 310") == 1
    waiting = [m for m in await progress_messages(db, 310) if m.startswith("waiting:")]
    assert waiting == [], "no second run of the job found the order busy"


async def test_a_run_taken_over_does_not_finish_the_job_of_its_new_owner(
    fake: FakeProviderServer, settings: Settings, start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    """Regression: issue 21 defect 4: a run whose job was taken over in Redis (its lease lapsed, another
    replica claimed it) deleted the job key, the queue entry and the new owner's in-progress key when it
    ended, while the new owner still worked: a re-send was then accepted instead of dropped."""
    fake.configure(latency_s=0.5)
    worker = await start_worker(with_ai(settings, {"remote": remote("openai", fake.url)}))
    await client.enqueue_generation(redis, 311, SAMPLE_BRIEF)
    job_id = client.job_id(311)
    key = in_progress_key_prefix + job_id
    await wait_until(lambda: _started(worker, job_id), 10, 0.02, "the job to start")
    run = worker.tasks[job_id]
    await asyncio.to_thread(fake.wait_for_requests, 1)
    # Another replica's claim after this run's lease lapsed, as its poll writes it.
    await redis.set(key, b"other-replica:0123456789abcdef", px=60_000)

    await asyncio.wait_for(asyncio.shield(run), 30)  # this run ends (its generation succeeds in PostgreSQL)

    assert await redis.get(key) == b"other-replica:0123456789abcdef", "the new owner's claim stays"
    assert await redis.exists(job_key_prefix + job_id), "the job stays, for its owner to finish"
    assert await redis.zscore(client.QUEUE_NAME, job_id) is not None
    assert await client.enqueue_generation(redis, 311, regenerate=True) is None, "a re-send is dropped"


async def _started(worker: object, job_id: str) -> bool:
    return job_id in getattr(worker, "tasks", {})


async def test_a_job_that_fails_before_it_starts_leaves_no_lease_records(
    settings: Settings, start_worker: WorkerFactory, redis: ArqRedis
) -> None:
    """Regression: issue 21 defect 9: arq's `finish_failed_job` (job expired, not JSON, aborted before its
    start, unknown function) left the job's lease records; once the lease ended, a re-sent job with the same
    id and `_defer_by` got the old score back and ran at once."""
    job_id = client.job_id(312)
    await redis.set(job_key_prefix + job_id, b"\x80\x04not json", px=60_000)  # a pickled payload
    await redis.zadd(client.QUEUE_NAME, {job_id: time.time() * 1000})
    await start_worker(settings.model_copy(update={"worker": settings.worker.model_copy(update={"lease_s": 30})}))

    async def failed() -> bool:
        return bool(await redis.exists(f"arq:result:{job_id}"))

    await wait_until(failed, 10, 0.02, "the job to fail")
    assert await redis.zscore(client.QUEUE_NAME, job_id) is None
    assert await redis.zscore(polling.leases_key(client.QUEUE_NAME), job_id) is None, "its lease is gone"
    assert await redis.hget(polling.original_scores_key(client.QUEUE_NAME), job_id) is None
    assert not await redis.exists(in_progress_key_prefix + job_id)


async def test_an_abort_scored_by_a_host_whose_clock_runs_fast_reaches_the_jobs_replica(
    fake: FakeProviderServer, settings: Settings, start_worker: WorkerFactory, redis: ArqRedis
) -> None:
    """Regression: issue 21 defect 8: arq's poll deletes abort requests scored after its own clock's now
    (plus 60 ms). A `sitegen cancel` from a host 30 s ahead was deleted by the first replica that polled, so
    the replica running the job never interrupted it."""
    fake.script("hang")
    custom = with_ai(settings, {"remote": remote("openai", fake.url, read_timeout_s=60)})
    owner = await start_worker(_replica(custom, "abort-a"), poll_delay=1.0)
    job_id = client.job_id(313)
    await client.enqueue_generation(redis, 313, SAMPLE_BRIEF)
    await asyncio.to_thread(fake.wait_for_requests, 1)
    await start_worker(_replica(custom, "abort-b"), poll_delay=0.01)  # polls first, and often
    running = owner.job_tasks[job_id]

    await redis.zadd(abort_jobs_ss, {job_id: time.time() * 1000 + 30_000})

    async def interrupted() -> bool:
        return running.done()

    await wait_until(interrupted, 10, 0.05, "the job's replica to interrupt it")
