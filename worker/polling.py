"""arq's poll, in one Redis round trip, and a running job's lease on its place in the queue.

arq keeps a job in its queue (a sorted set scored by when the job is due) until the job finishes, and
its poll reads only the first `queue_read_limit` due jobs (`max(5 x max_jobs, 100)`). So once that
many jobs ran across the cluster, a replica with free slots read only running jobs and idled while the
backlog waited behind them (issue 15: 10 replicas x 20 slots ran 100 generations at once, not 200).
arq then checked every job it read with four round trips (WATCH, EXISTS of its in-progress key,
ZSCORE, UNWATCH) and claimed one with two more, one job at a time.

Here a running job leases its place in the queue instead:
- `POLL`, one Lua script per poll (atomic, as arq's WATCH/MULTI is), reads the due jobs in queue
  order and claims up to the free slots. A job whose in-progress key exists runs elsewhere and is
  skipped. A claimed job gets its in-progress key for `worker.lease_s` (arq's `job_timeout + 10 s`,
  half an hour by default, would hide a SIGKILLed replica's job that long) and its score is pushed
  to the end of that lease, so it leaves the due range: a poll reads waiting jobs, never running
  ones, whatever the number of jobs running across the cluster. The same call reads arq's abort
  set (arq's `_cancel_aborted_jobs` took a MULTI of its own on every poll).
- The claim also records the lease in `<queue>:leases` (job id -> the lease's end) and the job's
  score before the claim in `<queue>:leased-scores`. The heartbeat (`renew`, every lease_s/4, one
  script call for all of a replica's jobs) pushes the in-progress key, the score and the lease
  forward while the job runs. A SIGKILLed replica's job becomes due again when its lease ends, the
  moment its in-progress key expires; a poll within a second after that puts its original score back, so
  it resumes in its old place in the queue, not behind every job enqueued before its lease's end.
- `finish_job` (arq's, plus three commands in its MULTI: the lease's two records go) puts the job's
  original score back before
  arq's own bookkeeping: a job arq hands back (cancelled at shutdown, `Retry` without a delay) is
  due at once in its old place, and a deferred `Retry` (arq's ZINCRBY adds `defer + now - score`
  to the current score, with `score` the one `run_job` was given) becomes due at now + defer.

While it runs, a job's score is the end of its lease: arq's `Job.status()` still says
`in_progress` (it checks the in-progress key before the score), `Job.info().score` is the lease's
end, the queue's depth counts it as before, and `sitegen_queue_oldest_ready_seconds` no longer reads
a running job as the oldest waiting one.

arq's CLI (`arq worker.main.WorkerSettings`) builds `arq.worker.Worker` itself, so `install()`
replaces methods on that class; `worker.main` calls it on import. It relies on `Worker.tasks`,
`job_tasks`, `aborting_tasks`, `job_counter`, `max_jobs`, `sem`, `loop`, `pool`, `queue_name`,
`queue_read_limit`, `allow_pick_jobs`, `allow_abort_jobs`, `burst`, `max_burst_jobs`,
`_jobs_started()`, `heart_beat()`, `run_job(job_id, score)`, `_release_sem_dec_counter_on_complete()`
and `finish_job`'s arguments as arq 0.28 has them (pyproject.toml pins arq below 0.29), and on
Redis running scripts that touch keys they build from a prefix (a single Redis, as arq needs,
not Redis Cluster). tests/integration/test_polling.py covers it.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial

from arq.constants import (
    abort_job_max_age,
    abort_jobs_ss,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from arq.utils import timestamp_ms, to_ms
from arq.worker import Worker
from loguru import logger
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

#: KEYS: the queue, arq's abort set, the leases (job id -> the end of its lease), the original scores
#: (job id -> its score before its claim). ARGV: now (ms), the lease (ms: the in-progress key's time to
#: live), its end (ms: the claimed job's new score), the most jobs to claim, the most due jobs to read,
#: the in-progress key prefix, the abort set's cutoff (as arq computes it) or '' not to read it, then 1 to
#: look for lapsed leases first (`LAPSED_CHECK_EVERY_S`) or 0.
#: Returns {claimed jobs as a flat list (job id, original score, ...), the job ids asked to abort}.
POLL = """
-- Leases that ended without their job's end (its replica died, or lost Redis for longer than a lease):
-- the job gets its original score back, its place in the queue, ahead of the jobs enqueued after it.
local lapsed = {}
if ARGV[8] == '1' then
    lapsed = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[1], 'LIMIT', 0, 100)
end
for _, job_id in ipairs(lapsed) do
    local original = redis.call('HGET', KEYS[4], job_id)
    redis.call('ZREM', KEYS[3], job_id)
    redis.call('HDEL', KEYS[4], job_id)
    if original and redis.call('EXISTS', ARGV[6] .. job_id) == 0 then
        redis.call('ZADD', KEYS[1], 'XX', original, job_id)
    end
end
local free = tonumber(ARGV[4])
local limit = tonumber(ARGV[5])
local claimed = {}
local read, skipped = 0, 0
while free > 0 and read < limit do
    -- Claimed jobs leave the due range (their score becomes the lease's end): the next page starts
    -- after the skipped ones only.
    local wanted = math.min(free, limit - read)
    local page = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', skipped, wanted)
    for i = 1, #page, 2 do
        local job_id = page[i]
        local key = ARGV[6] .. job_id
        read = read + 1
        if free > 0 and redis.call('EXISTS', key) == 0 then
            redis.call('PSETEX', key, ARGV[2], '1')
            redis.call('ZADD', KEYS[1], 'XX', ARGV[3], job_id)
            redis.call('ZADD', KEYS[3], ARGV[3], job_id)
            redis.call('HSET', KEYS[4], job_id, page[i + 1])
            claimed[#claimed + 1] = job_id
            claimed[#claimed + 1] = page[i + 1]
            free = free - 1
        else
            skipped = skipped + 1
        end
    end
    if #page < 2 * wanted then
        break  -- no more due jobs
    end
end
local aborts = {}
if ARGV[7] ~= '' then
    aborts = redis.call('ZRANGE', KEYS[2], 0, -1)
    if #aborts > 0 then  -- arq's clean-up, which has nothing to remove from an empty set
        redis.call('ZREMRANGEBYSCORE', KEYS[2], ARGV[7], '+inf')
    end
end
return {claimed, aborts}
"""

#: KEYS: the queue, the leases, then each job's in-progress key. ARGV: the lease (ms), its end (ms), then
#: the job ids (in KEYS' order). A job whose in-progress key is gone (finished, handed back) is left alone.
RENEW = """
for i = 3, #KEYS do
    if redis.call('PEXPIRE', KEYS[i], ARGV[1]) == 1 then
        redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[i])
        redis.call('ZADD', KEYS[2], 'XX', ARGV[2], ARGV[i])
    end
end
return 0
"""


#: How often a poll looks for leases that ended without their job's end. Not every poll: it costs an
#: idle replica one more command in its script call (a third of them), and a lapsed job is due anyway;
#: this only puts it back in its old place before a replica reads the due jobs past it.
LAPSED_CHECK_EVERY_S = 1.0


def leases_key(queue_name: str) -> str:
    """The sorted set of running jobs' leases: job id -> the end of its lease (ms)."""
    return f"{queue_name}:leases"


def original_scores_key(queue_name: str) -> str:
    """The hash of running jobs' scores before their claim, for when a lease ends without its job's end."""
    return f"{queue_name}:leased-scores"


def replicas_key(queue_name: str) -> str:
    """The sorted set of replicas that wrote a health key: replica id -> when it last did (Unix seconds).

    The dashboard reads it, then each replica's health key `<queue>:health-check:<replica>`, instead of
    scanning the keyspace; members older than `REPLICAS_MAX_AGE_S` are pruned by writers and readers.
    """
    return f"{queue_name}:replicas"


#: A replica not heard of for this long leaves `replicas_key` (its health key expired long before).
REPLICAS_MAX_AGE_S = 86400.0
_arq_record_health = Worker.record_health


async def record_health(self: Worker) -> None:
    """arq's `record_health`; each time it writes the health key, the replica is recorded in `replicas_key`."""
    before = self._last_health_check
    await _arq_record_health(self)
    queue, marker, replica = self.health_check_key.rpartition(":health-check:")
    if self._last_health_check == before or not marker or queue != self.queue_name:
        return
    now = time.time()
    async with self.pool.pipeline(transaction=False) as pipe:
        pipe.zadd(replicas_key(self.queue_name), {replica: now})
        pipe.zremrangebyscore(replicas_key(self.queue_name), "-inf", now - REPLICAS_MAX_AGE_S)
        await pipe.execute()


async def claim(
    script: AsyncScript,
    queue_name: str,
    *,
    free: int,
    read_limit: int,
    lease_ms: int,
    abort_cutoff: int | None,
    lapsed_check: bool = True,
) -> tuple[list[bytes], list[bytes]]:
    """One call of `POLL`: (claimed jobs as job id, original score, ...; job ids asked to abort)."""
    now = timestamp_ms()
    claimed, aborts = await script(
        keys=[queue_name, abort_jobs_ss, leases_key(queue_name), original_scores_key(queue_name)],
        args=[
            now,
            lease_ms,
            now + lease_ms,
            free,
            read_limit,
            in_progress_key_prefix,
            abort_cutoff or "",
            int(lapsed_check),
        ],
    )
    return claimed, aborts


async def poll_iteration(self: Worker) -> None:
    """arq's `_poll_iteration`: claim and start jobs, cancel aborted ones (one script call), then clean up."""
    count = self.queue_read_limit
    if self.burst and self.max_burst_jobs >= 0:
        burst_jobs_remaining = self.max_burst_jobs - self._jobs_started()
        if burst_jobs_remaining < 1:
            return
        count = min(burst_jobs_remaining, count)
    free = max(self.max_jobs - self.job_counter, 0) if self.allow_pick_jobs else 0
    if self.burst:
        free = min(free, count)
    if free or self.allow_abort_jobs:
        script = getattr(self, "_sitegen_poll", None)
        if script is None:  # EVALSHA of the script, loaded again by redis-py if Redis lost it (NOSCRIPT)
            script = self._sitegen_poll = self.pool.register_script(POLL)  # type: ignore[attr-defined]
        lease_ms = int(self.ctx["settings"].worker.lease_s * 1000)
        # arq drops abort requests scored past now + abort_job_max_age (its milliseconds plus seconds, kept).
        abort_cutoff = timestamp_ms() + abort_job_max_age if self.allow_abort_jobs else None
        lapsed_check = time.monotonic() >= getattr(self, "_sitegen_lapsed_check_at", 0.0)
        if lapsed_check:
            self._sitegen_lapsed_check_at = time.monotonic() + LAPSED_CHECK_EVERY_S  # type: ignore[attr-defined]
        claimed, aborts = await claim(
            script,
            self.queue_name,
            free=free,
            read_limit=count,
            lease_ms=lease_ms,
            abort_cutoff=abort_cutoff,
            lapsed_check=lapsed_check,
        )
        await _start(self, claimed)
        if aborts:
            await _cancel_aborted(self, aborts)

    for job_id, t in list(self.tasks.items()):
        if t.done():
            del self.tasks[job_id]
            t.result()  # as arq: errors in run_job propagate
    await self.heart_beat()


async def _start(self: Worker, claimed: list[bytes]) -> None:
    """Start each claimed job as arq's `start_jobs` does (its slot, its counter, `run_job` in a task)."""
    scores = original_scores(self)
    for job_id_b, score_b in zip(claimed[::2], claimed[1::2], strict=True):
        job_id = job_id_b.decode()
        running = self.tasks.get(job_id)
        if running is not None and not running.done():
            # Its lease lapsed (Redis was out of reach longer than a lease) and this poll took it back:
            # the claim renewed it; the job runs here already.
            logger.warning("job {}: its lease in Redis had lapsed; renewed for the run in progress here", job_id)
            continue
        score = int(float(score_b))
        await self.sem.acquire()  # never waits: it holds max_jobs + 1 and the script claimed at most the free slots
        self.job_counter += 1
        task = self.loop.create_task(self.run_job(job_id, score))
        scores[job_id] = (task, score)
        task.add_done_callback(partial(_finished, self, job_id))
        self.tasks[job_id] = task


def _finished(self: Worker, job_id: str, task: asyncio.Task[None]) -> None:
    self._release_sem_dec_counter_on_complete()
    scores = original_scores(self)
    if job_id in scores and scores[job_id][0] is task:  # not a later run of the same job, claimed since
        del scores[job_id]


def original_scores(self: Worker) -> dict[str, tuple[asyncio.Task[None], int]]:
    """job id -> (its run's task, the score it had in the queue when this replica claimed it)."""
    scores: dict[str, tuple[asyncio.Task[None], int]] | None = getattr(self, "_sitegen_scores", None)
    if scores is None:
        scores = self._sitegen_scores = {}  # type: ignore[attr-defined]
    return scores


async def _cancel_aborted(self: Worker, aborts: list[bytes]) -> None:
    """The rest of arq's `_cancel_aborted_jobs`, given the abort set the poll read."""
    aborted: set[str] = set()
    for job_id_b in aborts:
        job_id = job_id_b.decode()
        task = self.job_tasks.get(job_id)
        if task is not None:
            aborted.add(job_id)
            task.cancel()
    if aborted:
        self.aborting_tasks.update(aborted)
        await self.pool.zrem(abort_jobs_ss, *aborted)


async def finish_job(
    self: Worker,
    job_id: str,
    finish: bool,
    result_data: bytes | None,
    result_timeout_s: float | None,
    keep_result_forever: bool,
    incr_score: int | None,
    keep_in_progress: float | None,
) -> None:
    """arq's `finish_job`; a job left in the queue first gets back the score it had when it was claimed."""
    run = original_scores(self).get(job_id)
    async with self.pool.pipeline(transaction=True) as tr:
        delete_keys = []
        in_progress_key = in_progress_key_prefix + job_id
        if keep_in_progress is None:
            delete_keys += [in_progress_key]
        else:
            tr.pexpire(in_progress_key, to_ms(keep_in_progress))
        if finish:
            if result_data:
                expire = None if keep_result_forever else result_timeout_s
                tr.set(result_key_prefix + job_id, result_data, px=to_ms(expire))
            delete_keys += [retry_key_prefix + job_id, job_key_prefix + job_id]
            tr.zrem(abort_jobs_ss, job_id)
            tr.zrem(self.queue_name, job_id)
        else:
            if run is not None:
                tr.zadd(self.queue_name, {job_id: run[1]}, xx=True)
            if incr_score:
                tr.zincrby(self.queue_name, incr_score, job_id)
        if delete_keys:
            tr.delete(*delete_keys)
        tr.zrem(leases_key(self.queue_name), job_id)
        tr.hdel(original_scores_key(self.queue_name), job_id)
        await tr.execute()


async def renew(redis: Redis, queue_name: str, job_ids: list[str], lease_s: float) -> None:
    """Extend the lease of these running jobs in Redis: their in-progress keys and their place in the queue."""
    if not job_ids:
        return
    lease_ms = int(lease_s * 1000)
    script = redis.register_script(RENEW)
    await script(
        keys=[queue_name, leases_key(queue_name), *(in_progress_key_prefix + job_id for job_id in job_ids)],
        args=[lease_ms, timestamp_ms() + lease_ms, *job_ids],
    )


def install() -> None:
    """Make every arq Worker in this process poll and finish jobs as above (idempotent).

    `worker.redis_outage` wraps `poll_iteration` (its `install` replaces `_poll_iteration` again).
    """
    Worker._poll_iteration = poll_iteration  # type: ignore[method-assign]
    Worker.finish_job = finish_job  # type: ignore[method-assign]
    Worker.record_health = record_health  # type: ignore[method-assign]


def installed() -> bool:
    return Worker.finish_job is finish_job
