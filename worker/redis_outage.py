"""Keeps a replica running through a Redis outage of any length (a crash, a restart, a managed failover).

arq lets a `redis.exceptions.ConnectionError` escape from its poll loop and from `finish_job`
(arq issues #498, #435), so the process exits and every generation in flight is interrupted. Here:
- the poll stops claiming while Redis is unreachable and retries it with capped exponential backoff
  and jitter (`wait_for_redis`); the generations this replica runs carry on, and their PostgreSQL
  leases are renewed by the heartbeat, which does not need Redis;
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
from worker.errors import REDIS_UNREACHABLE, message_of

REDIS_DOWN = REDIS_UNREACHABLE

#: First and longest wait between two attempts to reach Redis again (each with jitter: half to all of it).
FIRST_RETRY_S = 0.25
MAX_RETRY_S = 5.0

_arq_run_job = Worker.run_job


async def poll_iteration(self: Worker) -> None:
    """The poll (`worker.polling`); when Redis is unreachable, wait for it instead of letting the process exit."""
    try:
        await polling.poll_iteration(self)
    except REDIS_DOWN as exc:
        await wait_for_redis(self, exc)


async def wait_for_redis(self: Worker, exc: BaseException) -> None:
    """Take no job until Redis answers again; the running generations go on meanwhile."""
    running = sum(not task.done() for task in self.tasks.values())
    logger.warning(
        "Redis is unreachable ({}): taking no new jobs until it is back; {} job(s) running here carry on",
        message_of(exc),
        running,
    )
    began = time.monotonic()
    delay = FIRST_RETRY_S
    attempts = 0
    while True:
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        attempts += 1
        try:
            await self.pool.ping()
        except REDIS_DOWN:
            delay = min(delay * 2, MAX_RETRY_S)
            continue
        break
    # Record the health key at the next poll, not an interval later: `arq --check` passes again at once.
    self._last_health_check = 0
    logger.warning(
        "Redis is back after {:.1f}s ({} attempt(s) to reach it): taking jobs again", time.monotonic() - began, attempts
    )


async def run_job(self: Worker, job_id: str, score: int) -> None:
    """arq's `run_job`; a job whose bookkeeping cannot reach Redis is left as Redis has it, not a crash."""
    try:
        await _arq_run_job(self, job_id, score)
    except REDIS_DOWN as exc:
        logger.warning(
            "job {}: Redis unreachable while recording it ({}); left as Redis has it: it runs again once its "
            "in-progress key expires, and PostgreSQL decides whether any work is left",
            job_id,
            message_of(exc),
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
    except REDIS_DOWN as exc:  # it expires on its own within the health check interval
        logger.warning("could not delete the health key {} on shutdown: {}", self.health_check_key, message_of(exc))
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
