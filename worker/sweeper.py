"""The sweeper: PostgreSQL says which generations are unfinished; make sure each has a job in Redis.

A job can leave Redis without its generation finishing: Redis restarted without persistence or
was flushed, arq gave up on it (its own timeout, max tries), or it expired. Every replica runs
the sweeper as an arq cron job; arq lets one replica run each tick, and the job id per order
makes a second enqueue of a queued or running job a no-op anyway. A sweep holds its job's lease while it
runs (`worker.polling` renews every job a replica runs), so a long sweep is not run a second time.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from arq.constants import result_key_prefix
from loguru import logger

from worker.client import JOB_FUNCTION, job_id
from worker.pipeline.runner import Runtime


async def sweep(ctx: dict[str, Any]) -> int:
    """Re-enqueue the jobs of stale active generations; returns how many were missing."""
    rt: Runtime = ctx["runtime"]
    redis = ctx["redis"]
    requeued = 0
    async for generation in rt.store.stale_generations():
        order_id = generation["order_id"]
        # A kept result would make arq drop the enqueue; the generation, not the result, is the truth.
        await redis.delete(result_key_prefix + job_id(order_id))
        # Due at Redis's now, the clock every poll compares scores with, not this replica's.
        seconds, micros = await redis.time()
        job = await redis.enqueue_job(
            JOB_FUNCTION,
            order_id,
            _job_id=job_id(order_id),
            _queue_name=rt.settings.worker.queue_name,
            _defer_until=datetime.fromtimestamp(seconds + micros / 1e6, tz=UTC),
        )
        if job is None:
            continue  # its job is still queued or running: nothing was lost
        requeued += 1
        await rt.progress.log(
            order_id,
            f"sweeper: generation {generation['id']} was {generation['status']} at phase "
            f"{generation['current_phase']} with no job in the queue; re-enqueued",
            generation_id=generation["id"],
            level="warning",
            event="job.requeued",
        )
    if requeued:
        logger.info("sweeper re-enqueued {} generation(s)", requeued)
    return requeued
