"""arq's poll, without re-checking jobs that are already running.

A job stays in arq's queue (a sorted set) until it finishes, so while a replica has a free slot,
each poll (every `worker.poll_delay_s`) reads the running jobs back at the head of the queue, its
own and other replicas'. arq's `Worker.start_jobs` then checks every one of them with four Redis
round trips (WATCH, EXISTS of its in-progress key, ZSCORE, UNWATCH) before it reaches a job it can
start. With model calls that take seconds, that cost grows with the jobs in flight and the time
each one takes. In bench/ (the `inflight` run: 500 generations in flight, 8 s model calls) it was
143 Redis commands and 20.3 ms of the worker's CPU per site; with this module, 36 and 12.4 ms.

`start_jobs` below hands arq's own `start_jobs` only the jobs that may be startable, so arq's
claim of a job (WATCH, MULTI, the in-progress key) is unchanged:
- the jobs this replica is running are dropped without asking Redis;
- for the rest, in-progress keys are read in pipelined round trips, and the jobs running elsewhere
  are dropped: first as many as there are free slots, then twice as many each time the previous
  read found too few startable jobs (other replicas' running jobs can fill the head of the queue).
A key read as missing that appears before arq's WATCH is caught by arq's own check, as before; a key
read as present that goes away means the job finished or was handed back, and the next poll sees it.

arq's CLI (`arq worker.main.WorkerSettings`) builds `arq.worker.Worker` itself, so `install()`
replaces the method on that class; `worker.main` calls it on import. It relies on `Worker.tasks`,
`job_counter`, `max_jobs`, `pool` and `start_jobs(job_ids)` as arq 0.28 has them (pyproject.toml
pins arq below 0.29), and tests/integration/test_polling.py covers it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from arq.constants import in_progress_key_prefix
from arq.worker import Worker

StartJobs = Callable[[Worker, list[bytes]], Awaitable[None]]

_arq_start_jobs: StartJobs = Worker.start_jobs


async def start_jobs(self: Worker, job_ids: list[bytes]) -> None:
    """Start what arq may start among `job_ids` (the queue's head), skipping jobs known to be running."""
    running_here = {job_id for job_id, task in self.tasks.items() if not task.done()}
    waiting = [job_id for job_id in job_ids if job_id.decode() not in running_here]
    size = 0
    while waiting and self.job_counter < self.max_jobs:
        size = max(self.max_jobs - self.job_counter, 2 * size)
        batch, waiting = waiting[:size], waiting[size:]
        async with self.pool.pipeline(transaction=False) as pipe:
            for job_id in batch:
                pipe.exists(in_progress_key_prefix + job_id.decode())
            running = await pipe.execute()
        startable = [job_id for job_id, elsewhere in zip(batch, running, strict=True) if not elsewhere]
        if startable:
            await _arq_start_jobs(self, startable)


def install() -> None:
    """Make every arq Worker in this process poll with `start_jobs` (idempotent)."""
    Worker.start_jobs = start_jobs  # type: ignore[method-assign]


def installed() -> bool:
    return Worker.start_jobs is start_jobs
