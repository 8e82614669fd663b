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

from worker.client import EDIT_FUNCTION, JOB_FUNCTION, ROLLBACK_FUNCTION, job_id
from worker.pipeline.runner import Runtime


async def sweep(ctx: dict[str, Any]) -> int:
    """Re-enqueue the jobs of stale active generations; returns how many were missing."""
    rt: Runtime = ctx["runtime"]
    redis = ctx["redis"]
    requeued = 0
    async for generation in rt.store.stale_generations():
        order_id = generation["order_id"]
        function, args, kwargs, its_job_id = _job_of(generation)
        # A kept result would make arq drop the enqueue; the generation, not the result, is the truth.
        await redis.delete(result_key_prefix + its_job_id)
        # Due at Redis's now, the clock every poll compares scores with, not this replica's.
        seconds, micros = await redis.time()
        job = await redis.enqueue_job(
            function,
            order_id,
            *args,
            **kwargs,
            _job_id=its_job_id,
            _queue_name=rt.settings.worker.queue_name,
            _defer_until=datetime.fromtimestamp(seconds + micros / 1e6, tz=UTC),
        )
        if job is None:
            continue  # its job is still queued or running: nothing was lost
        requeued += 1
        await rt.progress.log(
            order_id,
            f"sweeper: {generation['kind']} {generation['id']} was {generation['status']} at phase "
            f"{generation['current_phase']} with no job in the queue; re-enqueued",
            generation_id=generation["id"],
            level="warning",
            event="job.requeued",
        )
    if requeued:
        logger.info("sweeper re-enqueued {} generation(s)", requeued)
    return requeued


def _job_of(run: dict[str, Any]) -> tuple[str, tuple[Any, ...], dict[str, Any], str]:
    """The job that runs a stale run again: (function, positional arguments after the order, keyword
    arguments, job id). An edit or rollback is found again by its own job id (its first enqueue time, which
    orders it, is stored with it), so re-sending it never applies it twice."""
    request = run.get("request") or {}
    if run.get("kind") == "edit" and run.get("job_id"):
        kwargs = {"base_version": request.get("base_version"), "pages": request.get("pages")}
        return EDIT_FUNCTION, (request.get("instruction"),), kwargs, run["job_id"]
    if run.get("kind") == "rollback" and run.get("job_id"):
        return ROLLBACK_FUNCTION, (request.get("version"),), {}, run["job_id"]
    return JOB_FUNCTION, (), {}, job_id(run["order_id"])
