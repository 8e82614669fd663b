"""Keeps a replica running through a Redis outage of any length (a crash, a restart, a managed failover).

arq lets a `redis.exceptions.ConnectionError` escape from its poll loop and from `finish_job`
(arq issues #498, #435), so the process exits and every generation in flight is interrupted. An
outage is also a Redis that answers but refuses (`worker.errors.redis_refusal`: READONLY from a
failover's old primary, LOADING, OOM, MISCONF, MASTERDOWN, BUSY). Here:
- the poll stops claiming while Redis is unreachable or refuses, and tries it again with capped
  exponential backoff and jitter (`wait_for_redis`) by writing the health key: a read-only replica
  answers PING, so only a write says Redis is back. The generations this replica runs carry on, and
  their PostgreSQL leases are renewed by the heartbeat, which does not need Redis;
- a job whose own bookkeeping in Redis fails (its start, its result, its deferred retry) is logged
  and left as Redis has it. PostgreSQL is the record: a job still in the queue runs again once its
  in-progress key expires, and its claim then resumes the generation or, for a finished one, does
  no work;
- shutting down without Redis still closes the pools and writes the progress log.

`arq --check` fails while Redis is unreachable (it cannot read the health key) and passes again at
the first poll after Redis returns, which records the health key at once.

Installed on arq's `Worker` class by `install()` (`worker.main` calls it on import); its poll wraps
`worker.polling`'s. It relies on `Worker.run_job`, `close`, `_pool`, `tasks`,
`_handle_signals`, `handle_sig`, `health_check_key`, `on_shutdown` and `_last_health_check` as
arq 0.28 has them, and tests/faults/test_redis_outage.py covers it.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time

from arq.worker import Worker
from loguru import logger

from worker import polling
from worker.errors import REDIS_ERRORS, redis_trouble, redis_unavailable

#: What an outage raises (with `redis_unavailable` to tell a refusal from our own mistake).
REDIS_DOWN = REDIS_ERRORS

#: First and longest wait between two attempts to reach Redis again (each with jitter: half to all of it).
FIRST_RETRY_S = 0.25
MAX_RETRY_S = 5.0

_arq_run_job = Worker.run_job


async def poll_iteration(self: Worker) -> None:
    """The poll (`worker.polling`); when Redis is unreachable, wait for it instead of letting the process exit."""
    try:
        await polling.poll_iteration(self)
    except REDIS_DOWN as exc:
        if not redis_unavailable(exc):
            raise
        await wait_for_redis(self, exc)


async def wait_for_redis(self: Worker, exc: BaseException) -> None:
    """Take no job until Redis takes writes again; the running generations go on meanwhile."""
    running = sum(not task.done() for task in self.tasks.values())
    logger.warning(
        "Redis {}: taking no new jobs until it is back; {} job(s) running here carry on", redis_trouble(exc), running
    )
    began = time.monotonic()
    delay = FIRST_RETRY_S
    attempts = 0
    while True:
        polling.stop_if_cancelled()
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        attempts += 1
        _forget_finished(self)
        try:
            # A write, arq's own health record (its key at once: `arq --check` passes again at once). PING
            # would pass on a read-only replica, and during OOM or MISCONF, which refuse writes only.
            self._last_health_check = 0
            await self.record_health()
        except REDIS_DOWN as again:
            if not redis_unavailable(again):
                raise
            delay = min(delay * 2, MAX_RETRY_S)
            continue
        break
    logger.warning(
        "Redis is back after {:.1f}s ({} attempt(s) to reach it): taking jobs again", time.monotonic() - began, attempts
    )


def _forget_finished(self: Worker) -> None:
    """Drop the finished jobs' tasks, as each poll does: a SIGTERM waits for `tasks` to empty, up to its grace
    period, and without this would wait all of it whenever Redis is away."""
    for job_id, task in list(self.tasks.items()):
        if task.done():
            del self.tasks[job_id]
            task.result()  # as arq's poll: errors in run_job propagate


async def run_job(self: Worker, job_id: str, score: int) -> None:
    """arq's `run_job`; a job whose bookkeeping cannot reach Redis is left as Redis has it, not a crash."""
    try:
        await _arq_run_job(self, job_id, score)
    except REDIS_DOWN as exc:
        if not redis_unavailable(exc):
            raise
        logger.warning(
            "job {}: Redis {} while recording it; left as Redis has it: it runs again once its "
            "in-progress key expires, and PostgreSQL decides whether any work is left",
            job_id,
            redis_trouble(exc),
        )


async def close(self: Worker) -> None:
    """arq's `close`, except that an unreachable Redis does not skip `on_shutdown` (pools, progress log)."""
    if not self._handle_signals:
        self.handle_sig(signal.SIGUSR1)
    if not self._pool:
        return
    await asyncio.gather(*self.tasks.values(), return_exceptions=True)
    try:
        await self.pool.delete(self.health_check_key)
    except REDIS_DOWN as exc:  # it expires on its own within the health check interval; the shutdown goes on
        logger.warning(
            "could not delete the health key {} on shutdown: Redis {}", self.health_check_key, redis_trouble(exc)
        )
    try:
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
    finally:
        try:
            await self.pool.aclose(close_connection_pool=True)
        except REDIS_DOWN:
            pass
        self._pool = None


def install() -> None:
    """Make every arq Worker in this process ride out Redis outages (idempotent)."""
    Worker._poll_iteration = poll_iteration  # type: ignore[method-assign]
    Worker.run_job = run_job  # type: ignore[method-assign]
    Worker.close = close  # type: ignore[method-assign]


def installed() -> bool:
    return Worker._poll_iteration is poll_iteration
