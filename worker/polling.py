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
  score before the claim in `<queue>:leased-scores`. The claimed job's in-progress key holds an owner
  token (`<replica>:<random>`, new for each claim) instead of arq's `'1'`: only the run holding it
  renews the lease or records the job's end. Every job a replica runs keeps its lease from its claim
  to its end (`_keeper`, every lease_s/4, one script call for all of them: a generation's claim waiting
  on a row lock, the cron sweep): the in-progress key, the score and the lease move forward together.
  A SIGKILLed replica's job becomes due again when its lease ends, the moment its in-progress key
  expires; a poll within a second after that puts its original score back, so it resumes in its old
  place in the queue, not behind every job enqueued before its lease's end.
- `finish_job` and `finish_failed_job` (arq's, in one script, `FINISH`) do nothing unless the job's
  in-progress key still holds the run's token (issue 21 defect 4: a run taken over, or one that found
  its order busy, deleted the new owner's key and job). The owner's end also drops the lease's two
  records and puts the job's original score back before arq's own bookkeeping: a job arq hands back
  (cancelled at shutdown, `Retry` without a delay) is due at once in its old place, and a deferred
  `Retry` becomes due at Redis's now + its delay. A run that no longer owns its job leaves it as
  Redis has it: the owner ends it, or, if the lease lapsed and nobody claimed it, it runs again and
  PostgreSQL makes that run a no-op.
- Every lease end and score the worker computes is Redis's clock (`TIME` inside the scripts), never
  a replica's own (issue 21 defect 8: a dead replica whose clock ran fast hid its jobs that much
  longer). Jobs' own scores (enqueue time, `_defer_by`) are the enqueuer's clock.

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
import secrets
import time
from dataclasses import dataclass
from functools import partial

from arq.constants import (
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

from worker.errors import message_of

#: Redis's clock, in milliseconds, inside a script: every lease end and every score the worker computes is
#: Redis's `TIME`, never a replica's own clock (issue 21 defect 8). Scripts that call TIME are replicated by
#: their effects, the default since Redis 5 (and the only mode since 7).
REDIS_NOW_MS = """
local function redis_now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

#: KEYS: the queue, arq's abort set, the leases (job id -> the end of its lease), the original scores
#: (job id -> its score before its claim). ARGV: the lease (ms: the in-progress key's time to live), the most
#: jobs to claim, the most due jobs to read, the in-progress key prefix, the job key prefix, 1 to read the
#: abort set (else 0), 1 to look for lapsed leases first (`LAPSED_CHECK_EVERY_S`, else 0), then the owner
#: token the claimed jobs' in-progress keys get.
#: Returns {claimed jobs as a flat list (job id, original score, ...), the job ids asked to abort}.
POLL = (
    REDIS_NOW_MS
    + """
local now = redis_now_ms()
local lease_end = string.format('%.0f', now + tonumber(ARGV[1]))
now = string.format('%.0f', now)
-- Leases that ended without their job's end (its replica died, or lost Redis for longer than a lease):
-- the job gets its original score back, its place in the queue, ahead of the jobs enqueued after it.
local lapsed = {}
if ARGV[7] == '1' then
    lapsed = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 100)
end
for _, job_id in ipairs(lapsed) do
    local original = redis.call('HGET', KEYS[4], job_id)
    redis.call('ZREM', KEYS[3], job_id)
    redis.call('HDEL', KEYS[4], job_id)
    if original and redis.call('EXISTS', ARGV[4] .. job_id) == 0 then
        redis.call('ZADD', KEYS[1], 'XX', original, job_id)
    end
end
local free = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local claimed = {}
local read, skipped = 0, 0
while free > 0 and read < limit do
    -- Claimed jobs leave the due range (their score becomes the lease's end): the next page starts
    -- after the skipped ones only.
    local wanted = math.min(free, limit - read)
    local page = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', skipped, wanted)
    for i = 1, #page, 2 do
        local job_id = page[i]
        local key = ARGV[4] .. job_id
        read = read + 1
        if free > 0 and redis.call('EXISTS', key) == 0 then
            redis.call('PSETEX', key, ARGV[1], ARGV[8])
            redis.call('ZADD', KEYS[1], 'XX', lease_end, job_id)
            redis.call('ZADD', KEYS[3], lease_end, job_id)
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
if ARGV[6] == '1' then
    aborts = redis.call('ZRANGE', KEYS[2], 0, -1)
    -- arq drops requests scored after its own clock's now (plus 60 ms): an abort from a host whose clock
    -- runs fast was gone before the job's replica read it. Only an abort of a job that is neither queued
    -- nor running goes: it can stop nothing, and would stop the order's next job at its start.
    for _, job_id in ipairs(aborts) do
        if redis.call('EXISTS', ARGV[5] .. job_id, ARGV[4] .. job_id) == 0 then
            redis.call('ZREM', KEYS[2], job_id)
        end
    end
end
return {claimed, aborts}
"""
)

#: KEYS: the queue, the leases, then each job's in-progress key. ARGV: the lease (ms), then (job id, owner
#: token) for each key, in KEYS' order. A job whose in-progress key holds another token (the job was taken
#: over, or an older release's '1') or none (finished, handed back, lapsed) is left alone.
#: Returns the job ids whose key this run no longer holds.
RENEW = (
    REDIS_NOW_MS
    + """
local lease_end = string.format('%.0f', redis_now_ms() + tonumber(ARGV[1]))
local lost = {}
for i = 3, #KEYS do
    local job_id, token = ARGV[2 * i - 4], ARGV[2 * i - 3]
    if redis.call('GET', KEYS[i]) == token then
        redis.call('PEXPIRE', KEYS[i], ARGV[1])
        redis.call('ZADD', KEYS[1], 'XX', lease_end, job_id)
        redis.call('ZADD', KEYS[2], 'XX', lease_end, job_id)
    else
        lost[#lost + 1] = job_id
    end
end
return lost
"""
)

#: arq's `finish_job` and `finish_failed_job` in one script, done only by the run whose token the job's
#: in-progress key holds. KEYS: the in-progress key, the job key, the retry key, the result key, the queue,
#: arq's abort set, the leases, the original scores. ARGV: the owner token, the job id, 'finish' (the job
#: ends: its result, its keys go) or 'leave' (it stays queued), the result ('' for none), its time to live
#: (ms, '' for ever), the score to put back ('' for none), the delay of a deferred retry (ms from Redis's now,
#: '' for none), how long to keep the in-progress key (ms, '' to delete it: arq keeps a cron job's).
#: Returns 1, or 0 when the key holds another token or none: another run owns the job, or its lease lapsed.
FINISH = (
    REDIS_NOW_MS
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return 0
end
if ARGV[8] == '' then
    redis.call('DEL', KEYS[1])
else
    redis.call('PEXPIRE', KEYS[1], ARGV[8])
end
if ARGV[3] == 'finish' then
    if ARGV[4] ~= '' then
        if ARGV[5] == '' then
            redis.call('SET', KEYS[4], ARGV[4])
        else
            redis.call('SET', KEYS[4], ARGV[4], 'PX', ARGV[5])
        end
    end
    redis.call('DEL', KEYS[3], KEYS[2])
    redis.call('ZREM', KEYS[6], ARGV[2])
    redis.call('ZREM', KEYS[5], ARGV[2])
elseif ARGV[7] ~= '' then
    redis.call('ZADD', KEYS[5], 'XX', string.format('%.0f', redis_now_ms() + tonumber(ARGV[7])), ARGV[2])
elseif ARGV[6] ~= '' then
    redis.call('ZADD', KEYS[5], 'XX', ARGV[6], ARGV[2])
end
redis.call('ZREM', KEYS[7], ARGV[2])
redis.call('HDEL', KEYS[8], ARGV[2])
return 1
"""
)


#: How often a poll looks for leases that ended without their job's end. Not every poll: it costs an
#: idle replica one more command in its script call (a third of them), and a lapsed job is due anyway;
#: this only puts it back in its old place before a replica reads the due jobs past it.
LAPSED_CHECK_EVERY_S = 1.0


@dataclass
class Run:
    """A job this replica runs: its task, the score it had when claimed, and its in-progress key's token."""

    task: asyncio.Task[None]
    score: int
    token: str
    finishing: bool = False
    lost: bool = False


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


def new_token(replica: str) -> str:
    """An in-progress key's value: the claiming replica and a random part, unique to one claim."""
    return f"{replica}:{secrets.token_hex(8)}"


async def claim(
    script: AsyncScript,
    queue_name: str,
    *,
    free: int,
    read_limit: int,
    lease_ms: int,
    token: str,
    read_aborts: bool,
    lapsed_check: bool = True,
) -> tuple[list[bytes], list[bytes]]:
    """One call of `POLL`: (claimed jobs as job id, original score, ...; job ids asked to abort)."""
    claimed, aborts = await script(
        keys=[queue_name, abort_jobs_ss, leases_key(queue_name), original_scores_key(queue_name)],
        args=[
            lease_ms,
            free,
            read_limit,
            in_progress_key_prefix,
            job_key_prefix,
            int(read_aborts),
            int(lapsed_check),
            token,
        ],
    )
    return claimed, aborts


def _script(self: Worker, name: str, text: str) -> AsyncScript:
    """EVALSHA of the script, loaded again by redis-py if Redis lost it (NOSCRIPT)."""
    attr = f"_sitegen_{name}"
    script: AsyncScript | None = getattr(self, attr, None)
    if script is None:
        script = self.pool.register_script(text)
        setattr(self, attr, script)
    return script


def _lease_s(self: Worker) -> float:
    return float(self.ctx["settings"].worker.lease_s)


def stop_if_cancelled() -> None:
    """End the poll loop if its stop was asked for but swallowed on the way.

    arq stops a replica by cancelling its poll loop once. Python 3.11's `asyncio.wait_for` returns the inner
    result instead of raising when the outer task is cancelled as the inner one finishes (CPython gh-86296,
    fixed in 3.12), and redis-py 5 sends every command under `wait_for` once a socket timeout is set: the
    loop then polled on, its health key fresh, until SIGKILL (issue 21 soak, seed 621816). The cancel
    still counts in `Task.cancelling()`, which nothing here resets (`asyncio.timeout` resets only its own).
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        logger.warning("the poll loop's stop was swallowed on its way (Python 3.11's asyncio.wait_for): stopping now")
        raise asyncio.CancelledError


async def poll_iteration(self: Worker) -> None:
    """arq's `_poll_iteration`: claim and start jobs, cancel aborted ones (one script call), then clean up."""
    stop_if_cancelled()
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
        lapsed_check = time.monotonic() >= getattr(self, "_sitegen_lapsed_check_at", 0.0)
        if lapsed_check:
            self._sitegen_lapsed_check_at = time.monotonic() + LAPSED_CHECK_EVERY_S  # type: ignore[attr-defined]
        token = new_token(self.ctx["settings"].worker.replica)
        claimed, aborts = await claim(
            _script(self, "poll", POLL),
            self.queue_name,
            free=free,
            read_limit=count,
            lease_ms=int(_lease_s(self) * 1000),
            token=token,
            read_aborts=self.allow_abort_jobs,
            lapsed_check=lapsed_check,
        )
        await _start(self, claimed, token)
        if aborts:
            await _cancel_aborted(self, aborts)

    for job_id, t in list(self.tasks.items()):
        if t.done():
            del self.tasks[job_id]
            t.result()  # as arq: errors in run_job propagate
    await self.heart_beat()


async def _start(self: Worker, claimed: list[bytes], token: str) -> None:
    """Start each claimed job as arq's `start_jobs` does (its slot, its counter, `run_job` in a task)."""
    held = runs(self)
    for job_id_b, score_b in zip(claimed[::2], claimed[1::2], strict=True):
        job_id = job_id_b.decode()
        running = self.tasks.get(job_id)
        if running is not None and not running.done():
            # Its lease lapsed (Redis was out of reach longer than a lease) and this poll took it back:
            # the claim renewed it, under this claim's token; the job runs here already.
            logger.warning("job {}: its lease in Redis had lapsed; renewed for the run in progress here", job_id)
            run = held.get(job_id)
            if run is not None and run.task is running:
                run.token, run.lost = token, False
            continue
        score = int(float(score_b))
        await self.sem.acquire()  # never waits: it holds max_jobs + 1 and the script claimed at most the free slots
        self.job_counter += 1
        task = self.loop.create_task(self.run_job(job_id, score))
        held[job_id] = Run(task, score, token)
        task.add_done_callback(partial(_finished, self, job_id))
        self.tasks[job_id] = task
    if held:
        _keep_leases(self)


def _finished(self: Worker, job_id: str, task: asyncio.Task[None]) -> None:
    self._release_sem_dec_counter_on_complete()
    held = runs(self)
    run = held.get(job_id)
    if run is not None and run.task is task:  # not a later run of the same job, claimed since
        del held[job_id]
    keeper: asyncio.Task[None] | None = getattr(self, "_sitegen_keeper", None)
    if not held and keeper is not None and not keeper.done():
        keeper.cancel()  # nothing left to renew; the next claim starts it again


def runs(self: Worker) -> dict[str, Run]:
    """job id -> the run of that job on this replica."""
    held: dict[str, Run] | None = getattr(self, "_sitegen_runs", None)
    if held is None:
        held = self._sitegen_runs = {}  # type: ignore[attr-defined]
    return held


def _keep_leases(self: Worker) -> None:
    """Renew the lease of every job this replica runs (generations, the sweep) every lease_s/4, from its claim
    to its end: a generation's claim waiting on a row lock, or a sweep longer than a lease, keeps its job."""
    keeper: asyncio.Task[None] | None = getattr(self, "_sitegen_keeper", None)
    if keeper is None or keeper.done():
        self._sitegen_keeper = self.loop.create_task(_keeper(self))  # type: ignore[attr-defined]


async def _keeper(self: Worker) -> None:
    every_s = _lease_s(self) / 4
    while runs(self):
        await asyncio.sleep(every_s)
        try:
            async with asyncio.timeout(every_s):  # a renewal that hangs is given up in time for the next one
                await renew_runs(self)
        except Exception as exc:  # the next beat tries again; a lease that lapses meanwhile is taken back
            why = f"no answer within {every_s:.1f}s" if isinstance(exc, TimeoutError) else message_of(exc)
            logger.warning("could not renew the leases of {} job(s) in Redis: {}", len(runs(self)), why)


async def renew_runs(self: Worker) -> None:
    """Extend, once, the lease of every job this replica runs whose in-progress key still holds its token."""
    held = {job_id: run for job_id, run in runs(self).items() if not run.finishing and not run.task.done()}
    lost = await renew(self.pool, self.queue_name, {job_id: run.token for job_id, run in held.items()}, _lease_s(self))
    for job_id in lost:
        run = held[job_id]
        if not run.lost:
            run.lost = True
            logger.warning(
                "job {}: its in-progress key no longer holds this run's claim (taken over, or lapsed): "
                "its lease is not renewed, and its end will leave the job as Redis has it",
                job_id,
            )


async def renew(redis: Redis, queue_name: str, held: dict[str, str], lease_s: float) -> list[str]:
    """Extend the leases of these running jobs (job id -> owner token); returns those no longer held."""
    if not held:
        return []
    script = redis.register_script(RENEW)
    lost = await script(
        keys=[queue_name, leases_key(queue_name), *(in_progress_key_prefix + job_id for job_id in held)],
        args=[int(lease_s * 1000), *(part for item in held.items() for part in item)],
    )
    return [job_id.decode() for job_id in lost]


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


async def _finish(
    self: Worker,
    job_id: str,
    *,
    finish: bool,
    result_data: bytes | None,
    result_ttl_ms: int | None,
    defer_ms: int | None,
    keep_in_progress_ms: int | None,
) -> None:
    run = runs(self).get(job_id)
    if run is not None:
        run.finishing = True  # its lease is not renewed past this
    done = await _script(self, "finish", FINISH)(
        keys=[
            in_progress_key_prefix + job_id,
            job_key_prefix + job_id,
            retry_key_prefix + job_id,
            result_key_prefix + job_id,
            self.queue_name,
            abort_jobs_ss,
            leases_key(self.queue_name),
            original_scores_key(self.queue_name),
        ],
        args=[
            "" if run is None else run.token,
            job_id,
            "finish" if finish else "leave",
            result_data or "",
            "" if result_ttl_ms is None else result_ttl_ms,
            "" if run is None else run.score,
            "" if defer_ms is None else defer_ms,
            "" if keep_in_progress_ms is None else keep_in_progress_ms,
        ],
    )
    if not done:
        logger.warning(
            "job {}: this run no longer holds its claim in Redis (another replica took it over, or its lease "
            "lapsed): its end is not recorded there, and the job is left as Redis has it",
            job_id,
        )


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
    """arq's `finish_job`, by the job's owner only; a job left in the queue first gets back the score it had
    when it was claimed, and a deferred retry is due at Redis's now plus its delay."""
    defer_ms = None
    run = runs(self).get(job_id)
    if not finish and incr_score and run is not None:
        # arq's incr_score is `defer + now - score` on this process's clock: take this clock's part out.
        defer_ms = max(incr_score - (timestamp_ms() - run.score), 0)
    await _finish(
        self,
        job_id,
        finish=finish,
        result_data=result_data if finish else None,
        result_ttl_ms=None if keep_result_forever else to_ms(result_timeout_s),
        defer_ms=defer_ms,
        keep_in_progress_ms=to_ms(keep_in_progress),
    )


async def finish_failed_job(self: Worker, job_id: str, result_data: bytes | None) -> None:
    """arq's `finish_failed_job` (expired, not JSON, aborted before its start, unknown function, out of tries),
    by the job's owner only, and its lease records go with it (issue 21 defect 9)."""
    keep_result = self.keep_result_forever or self.keep_result_s > 0
    await _finish(
        self,
        job_id,
        finish=True,
        result_data=result_data if keep_result else None,
        result_ttl_ms=None if self.keep_result_forever else to_ms(self.keep_result_s),
        defer_ms=None,
        keep_in_progress_ms=None,
    )


def install() -> None:
    """Make every arq Worker in this process poll and finish jobs as above (idempotent).

    `worker.redis_outage` wraps `poll_iteration` (its `install` replaces `_poll_iteration` again).
    """
    Worker._poll_iteration = poll_iteration  # type: ignore[method-assign]
    Worker.finish_job = finish_job  # type: ignore[method-assign]
    Worker.record_health = record_health  # type: ignore[method-assign]
    Worker.finish_failed_job = finish_failed_job  # type: ignore[method-assign]


def installed() -> bool:
    return Worker.finish_job is finish_job
