"""A job Redis still holds after its generation ended is a no-op; a generation's own deferred job resumes it.

Regression: issue 14 defect 1 ("a job left in the queue for a finished order is a no-op"). When Redis is
unreachable as a job ends, arq cannot record its result (worker/redis_outage.py leaves the job as Redis
has it), so the job runs again once Redis is back. Before, a leftover job of a failed generation started a
fresh generation and called the model again. Also (found with defect 4): a `regenerate=true` job whose
generation was handed back superseded its own generation when its deferred retry came due, starting
over from `plan`.
"""

from __future__ import annotations

import time

import asyncpg
import pytest
from arq import ArqRedis
from arq.constants import job_key_prefix
from arq.jobs import SerializationError

from tests.helpers import (
    SAMPLE_BRIEF,
    WorkerFactory,
    order_job,
    progress_messages,
    remote,
    wait_for_result,
    wait_until,
    with_ai,
)
from worker import client
from worker.ai import limits
from worker.local.fake_server import FakeProviderServer
from worker.settings import Settings

pytestmark = pytest.mark.usefixtures("provider_key")


async def test_the_leftover_job_of_a_failed_generation_does_no_work(
    fake: FakeProviderServer, settings: Settings, start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    fake.script("status:401")  # the plan call is refused: the generation fails for good
    await client.enqueue_generation(redis, 91, SAMPLE_BRIEF)
    job_id = client.job_id(91)
    job_bytes = await redis.get(job_key_prefix + job_id)  # what Redis holds until arq records the end
    score = await redis.zscore(client.QUEUE_NAME, job_id)
    await start_worker(with_ai(settings, {"remote": remote("openai", fake.url)}))
    with pytest.raises(SerializationError):
        await order_job(redis, 91).result(timeout=30, poll_delay=0.05)
    assert await db.fetchval("SELECT status FROM site_generations WHERE order_id = 91") == "failed"

    # Redis as arq leaves it when it cannot record the job's end: the job still queued, no result.
    await redis.delete(f"arq:result:{job_id}")
    await redis.set(job_key_prefix + job_id, job_bytes)
    await redis.zadd(client.QUEUE_NAME, {job_id: score})
    result = await wait_for_result(redis, 91)

    assert result["status"] == "failed" and result["generation_id"] == 1
    assert len(fake.requests) == 1, "the leftover job calls no model"
    rows = await db.fetch("SELECT id, status FROM site_generations WHERE order_id = 91 ORDER BY id")
    assert [tuple(r) for r in rows] == [(1, "failed")]
    assert "generation 1 already ended failed: this job has nothing left to do" in await progress_messages(db, 91)


async def test_a_regenerate_jobs_deferred_retry_resumes_its_own_generation(
    fake: FakeProviderServer, settings: Settings, start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    await start_worker(with_ai(settings, {"remote": remote("openai", fake.url, max_retry_wait_s=1)}))
    await client.enqueue_generation(redis, 92, SAMPLE_BRIEF)
    assert (await wait_for_result(redis, 92))["status"] == "succeeded"
    fake.script("ok", "429:3600")  # the new plan commits; content is rate limited past the in-call wait

    await client.enqueue_generation(redis, 92, regenerate=True)

    async def handed_back() -> bool:
        return await db.fetchval("SELECT status FROM site_generations WHERE order_id = 92 AND id = 2") == "queued"

    await wait_until(handed_back, 30, 0.05, "the regenerated generation to be handed back")
    # The clock: its deferred retry (an hour away) is due now.
    assert await redis.zadd(client.QUEUE_NAME, {client.job_id(92): time.time() * 1000}, xx=True, ch=True) == 1
    await redis.delete(limits.keys("remote")["pause"])  # and the provider's pause after its 429 is over
    result = await wait_for_result(redis, 92)

    assert result["status"] == "succeeded" and result["generation_id"] == 2
    rows = await db.fetch("SELECT id, status FROM site_generations WHERE order_id = 92 ORDER BY id")
    assert [tuple(r) for r in rows] == [(1, "succeeded"), (2, "succeeded")]
    assert "generation resumed at phase content (attempt 2)" in await progress_messages(db, 92)
    # The first site's 3 calls; the new plan and the rate-limited content; the retry's content and code.
    assert len(fake.requests) == 3 + 2 + 2, "the retry resumes at content: the new plan is not asked for again"
