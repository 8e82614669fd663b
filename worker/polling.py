"""arq's poll, with one Redis round trip that claims the startable jobs at the head of the queue.

A job stays in arq's queue (a sorted set) until it finishes, so while a replica has a free slot,
each poll (every `worker.poll_delay_s`) reads the running jobs back at the head of the queue, its
own and other replicas'. arq's `Worker.start_jobs` then checks every one of them with four Redis
round trips (WATCH, EXISTS of its in-progress key, ZSCORE, UNWATCH), and claims a job it can start
with two more (MULTI + PSETEX + EXEC after those), one job at a time. In bench/ (the `inflight` run:
500 generations in flight, 8 s model calls) that was 143 Redis commands and 20.3 ms of the
worker's CPU per site; at latency 0 it was 5 of the worker's 8 round trips to Redis per job.

`start_jobs` below replaces it:
- the jobs this replica is running are dropped without asking Redis;
- one Lua script (`CLAIM`, atomic as arq's WATCH/MULTI is) takes the rest in queue order and claims
  up to the free slots: a job whose in-progress key exists runs elsewhere and is skipped, a job no
  longer in the queue (finished) or deferred past now (`score > now`, re-enqueued with a delay) is
  skipped, and a claimed job gets its in-progress key, for `worker.lease_s` (arq sets
  `job_timeout + 10 s`, half an hour by default, so a SIGKILLed replica's job would stay invisible
  to the others that long; the heartbeat renews the key every beat);
- each claimed job is started as arq starts it (its semaphore and job counter, `run_job` in a task
  in `Worker.tasks`), so arq's `run_job`, `finish_job`, aborts and retries are unchanged.

arq's CLI (`arq worker.main.WorkerSettings`) builds `arq.worker.Worker` itself, so `install()`
replaces the method on that class; `worker.main` calls it on import. It relies on `Worker.tasks`,
`job_counter`, `max_jobs`, `sem`, `loop`, `pool`, `queue_name`, `ctx`, `run_job(job_id, score)` and
`_release_sem_dec_counter_on_complete()` as arq 0.28 has them (pyproject.toml pins arq below 0.29),
and tests/integration/test_polling.py covers it.
"""

from __future__ import annotations

from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from arq.worker import Worker

#: KEYS: the queue, then each candidate job's in-progress key. ARGV: now (ms), the in-progress key's
#: time to live (ms), the most jobs to claim, then the candidate job ids (in KEYS' order).
#: Returns the claimed jobs as a flat list: job id, score, job id, score...
CLAIM = """
local now = tonumber(ARGV[1])
local free = tonumber(ARGV[3])
local claimed = {}
for i = 2, #KEYS do
    if #claimed >= 2 * free then
        break
    end
    if redis.call('EXISTS', KEYS[i]) == 0 then
        local job_id = ARGV[i + 2]
        local score = redis.call('ZSCORE', KEYS[1], job_id)
        if score and tonumber(score) <= now then
            redis.call('PSETEX', KEYS[i], ARGV[2], '1')
            claimed[#claimed + 1] = job_id
            claimed[#claimed + 1] = score
        end
    end
end
return claimed
"""


async def start_jobs(self: Worker, job_ids: list[bytes]) -> None:
    """Claim and start what this replica may start among `job_ids` (the queue's head), in one round trip."""
    free = self.max_jobs - self.job_counter
    if free <= 0:
        return
    running_here = {job_id for job_id, task in self.tasks.items() if not task.done()}
    waiting = [job_id.decode() for job_id in job_ids]
    waiting = [job_id for job_id in waiting if job_id not in running_here]
    if not waiting:
        return
    claim = getattr(self, "_sitegen_claim", None)
    if claim is None:  # EVALSHA of the script, loaded again by redis-py if Redis lost it (NOSCRIPT)
        claim = self._sitegen_claim = self.pool.register_script(CLAIM)  # type: ignore[attr-defined]
    lease_ms = int(self.ctx["settings"].worker.lease_s * 1000)
    claimed = await claim(
        keys=[self.queue_name, *(in_progress_key_prefix + job_id for job_id in waiting)],
        args=[timestamp_ms(), lease_ms, free, *waiting],
    )
    for job_id_b, score in zip(claimed[::2], claimed[1::2], strict=True):
        job_id = job_id_b.decode()
        await self.sem.acquire()  # never waits: the semaphore holds max_jobs + 1 and `free` slots are free
        self.job_counter += 1
        task = self.loop.create_task(self.run_job(job_id, int(float(score))))
        task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
        self.tasks[job_id] = task


def install() -> None:
    """Make every arq Worker in this process poll with `start_jobs` (idempotent)."""
    Worker.start_jobs = start_jobs  # type: ignore[method-assign]


def installed() -> bool:
    return Worker.start_jobs is start_jobs
