"""arq's poll with `worker.polling`: one Lua script per poll claims the due jobs at the head of the queue; a
running job leases its place in the queue (its score is the end of its lease), so polls never read it,
it is due again when its lease ends, and arq's bookkeeping finds its original score when it is handed back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import asyncpg
import pytest
from arq import ArqRedis
from arq.constants import abort_jobs_ss, in_progress_key_prefix
from arq.jobs import JobStatus
from arq.utils import timestamp_ms

from tests.helpers import SAMPLE_BRIEF, WorkerFactory, close_worker, order_job, remote, wait_for_result, with_ai
from worker import client, polling
from worker.local.fake_server import FakeProviderServer
from worker.settings import Settings

pytestmark = pytest.mark.usefixtures("provider_key")


def is_poll(command: str) -> bool:
    """One call of the poll script (`worker.polling.POLL`), which reads the queue and arq's abort set."""
    return command.startswith("EVALSHA ") and f" 4 {client.QUEUE_NAME} {abort_jobs_ss} " in command


async def commands_during_polls(redis: ArqRedis, polls: int) -> list[str]:
    """Every command Redis runs (MONITOR, the poll script's own included) until the worker has polled `polls` times."""
    seen: list[str] = []
    async with asyncio.timeout(30), redis.monitor() as monitor:
        while sum(is_poll(c) for c in seen) < polls:
            seen.append((await monitor.next_command())["command"])
    return seen


def touching(commands: list[str], key: str, *names: str) -> list[str]:
    return [c for c in commands if c.split(" ")[0] in names and key in c.split(" ")[1:]]


async def test_a_replica_does_not_recheck_the_jobs_it_is_running_when_it_polls(
    fake: FakeProviderServer, settings: Settings, start_worker: WorkerFactory, redis: ArqRedis
) -> None:
    assert polling.installed(), "importing worker.main installs the poll filter"
    fake.script("hang")  # order 90's planning call hangs: its job stays running, and in the queue
    await start_worker(with_ai(settings, {"remote": remote("openai", fake.url, read_timeout_s=30)}))
    await client.enqueue_generation(redis, 90, SAMPLE_BRIEF)
    await asyncio.to_thread(fake.wait_for_requests, 1)

    commands = await commands_during_polls(redis, polls=5)

    key = in_progress_key_prefix + client.job_id(90)
    lease_ms = settings.worker.lease_s * 1000
    assert 0 < await redis.pttl(key) <= lease_ms, "the claim set the in-progress key for one lease, not half an hour"
    # arq alone sends WATCH, EXISTS and ZSCORE for the running job on every poll.
    assert touching(commands, key, "WATCH", "EXISTS") == []
    assert f"ZSCORE {client.QUEUE_NAME} {client.job_id(90)}" not in commands


async def test_a_job_running_on_another_replica_costs_one_script_call_per_poll_and_starts_once_it_is_free(
    settings: Settings, start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    await client.enqueue_generation(redis, 91, SAMPLE_BRIEF)
    key = in_progress_key_prefix + client.job_id(91)
    await redis.set(key, b"1", px=60_000)  # as another replica does when it starts the job
    await start_worker(settings)

    commands = await commands_during_polls(redis, polls=5)

    assert touching(commands, key, "WATCH", "PSETEX") == [], "arq's WATCH protocol is not entered for a running job"
    assert len(touching(commands, key, "EXISTS")) >= 4, "one EXISTS per poll tells the job is running elsewhere"
    assert len([c for c in commands if is_poll(c)]) >= 4, "in the poll script, one call per poll"
    assert await db.fetchval("SELECT count(*) FROM site_generations WHERE order_id = 91") == 0, "not started here"

    await redis.delete(key)  # the other replica handed the job back
    result = await wait_for_result(redis, 91)
    assert result["status"] == "succeeded"


async def test_a_job_behind_many_running_elsewhere_is_started_by_a_replica_with_one_free_slot(
    settings: Settings, start_worker: WorkerFactory, redis: ArqRedis
) -> None:
    elsewhere = list(range(100, 120))
    for order_id in elsewhere:  # the head of the queue: 20 jobs other replicas are running
        await client.enqueue_generation(redis, order_id, SAMPLE_BRIEF)
        await redis.set(in_progress_key_prefix + client.job_id(order_id), b"1", px=60_000)
    await client.enqueue_generation(redis, 120, SAMPLE_BRIEF)

    async with asyncio.timeout(60), redis.monitor() as monitor:
        await start_worker(settings, max_jobs=1)
        result = await wait_for_result(redis, 120)
        await redis.echo("end of the test's commands")
        commands = []
        while (command := (await monitor.next_command())["command"]) != "ECHO end of the test's commands":
            commands.append(command)

    assert result["status"] == "succeeded"
    for order_id in elsewhere:
        key = in_progress_key_prefix + client.job_id(order_id)
        assert touching(commands, key, "WATCH") == [], f"order {order_id} runs elsewhere: no WATCH"
        assert touching(commands, key, "EXISTS"), f"order {order_id} was read"


async def test_two_replicas_polling_one_queue_start_every_job_exactly_once(
    fake: FakeProviderServer, settings: Settings, start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    """The claim is atomic (one script): replicas polling at the same moment never both start a job."""
    fake.configure(latency_s=0.05)
    orders = list(range(130, 170))
    custom = with_ai(settings, {"remote": remote("openai", fake.url, max_concurrency=10)})

    def replica(name: str) -> Settings:
        return custom.model_copy(update={"worker": custom.worker.model_copy(update={"replica_id": name})})

    async with asyncio.timeout(90), redis.monitor() as monitor:
        for order_id in orders:
            await client.enqueue_generation(redis, order_id, SAMPLE_BRIEF)
        await start_worker(replica("poll-a"), max_jobs=5, poll_delay=0.01)
        await start_worker(replica("poll-b"), max_jobs=5, poll_delay=0.01)
        results = [await wait_for_result(redis, order_id) for order_id in orders]
        await redis.echo("end of the test's commands")
        commands = []
        while (command := (await monitor.next_command())["command"]) != "ECHO end of the test's commands":
            commands.append(command)

    assert {r["status"] for r in results} == {"succeeded"}
    for order_id in orders:
        key = in_progress_key_prefix + client.job_id(order_id)
        assert len(touching(commands, key, "PSETEX")) == 1, f"order {order_id}'s job was claimed once"
    rows = await db.fetch("SELECT replica_id, attempt FROM site_generations WHERE order_id = ANY($1)", orders)
    assert len(rows) == len(orders) and {r["attempt"] for r in rows} == {1}, "one generation, one attempt, per order"
    assert {r["replica_id"] for r in rows} == {"poll-a", "poll-b"}, "both replicas took jobs"


async def test_jobs_still_start_after_redis_forgets_the_claim_script(
    settings: Settings, start_worker: WorkerFactory, redis: ArqRedis
) -> None:
    """A Redis restart empties its script cache: the claim loads the script again (NOSCRIPT) and goes on."""
    await start_worker(settings)
    await client.enqueue_generation(redis, 171, SAMPLE_BRIEF)
    assert (await wait_for_result(redis, 171))["status"] == "succeeded"

    await redis.script_flush()
    await client.enqueue_generation(redis, 172, SAMPLE_BRIEF)
    assert (await wait_for_result(redis, 172))["status"] == "succeeded"


async def test_a_deep_backlog_keeps_every_slot_of_every_replica_busy_whatever_the_read_window(
    fake: FakeProviderServer, settings: Settings, start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    """Regression: issue 15 part 1. Running jobs stay in arq's queue until they finish, and a poll reads only
    the first `queue_read_limit` jobs of it: once that many run across the cluster, replicas with free slots
    read only running jobs and idle while the backlog waits behind them. Here 4 replicas x 5 slots read 5 jobs
    per poll: all 20 slots must fill, not 5."""
    fake.configure(latency_s=3)  # each generation holds its slot for 3 model calls
    orders = list(range(200, 260))
    custom = with_ai(settings, {"remote": remote("openai", fake.url, max_concurrency=5, read_timeout_s=30)})
    for order_id in orders:
        await client.enqueue_generation(redis, order_id, SAMPLE_BRIEF)
    for name in ("window-a", "window-b", "window-c", "window-d"):
        replica = custom.model_copy(update={"worker": custom.worker.model_copy(update={"replica_id": name})})
        await start_worker(replica, max_jobs=5, queue_read_limit=5)

    peak = 0

    async def every_slot_busy() -> bool:
        nonlocal peak
        running = await db.fetchval("SELECT count(*) FROM site_generations WHERE status = 'running'")
        assert running <= 20, "never more than the 20 slots"
        peak = max(peak, running)
        return bool(running == 20)

    # On arq's poll alone, 5 ran at once and the other 15 slots stayed empty.
    await _until(every_slot_busy, lambda: f"20 generations running at once (at most {peak} did)", timeout=60)

    fake.configure(latency_s=0)
    results = [await wait_for_result(redis, order_id, timeout=120) for order_id in orders]
    assert {r["status"] for r in results} == {"succeeded"}
    rows = await db.fetch("SELECT attempt FROM site_generations WHERE order_id = ANY($1)", orders)
    assert len(rows) == len(orders) and {r["attempt"] for r in rows} == {1}, "one generation, one attempt, per order"


async def _until(predicate: Callable[[], Awaitable[bool]], what: str | Callable[[], str], timeout: float = 30) -> None:
    """Await a condition (polled: it lives in Redis, PostgreSQL or another task); fail with `what` on timeout."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what if isinstance(what, str) else what()}"
            )
        await asyncio.sleep(0.02)


async def test_a_running_job_leases_its_place_in_the_queue_and_the_heartbeat_renews_it(
    fake: FakeProviderServer, settings: Settings, start_worker: WorkerFactory, redis: ArqRedis
) -> None:
    """Regression: issue 15 part 1. A running job's score is the end of its lease, as its in-progress key's
    expiry is: no poll reads it among the due jobs, arq's Job.status() still says in progress, and the
    heartbeat pushes both forward together."""
    fake.script("hang")
    worker = await start_worker(with_ai(settings, {"remote": remote("openai", fake.url, read_timeout_s=30)}))
    before = timestamp_ms()
    await client.enqueue_generation(redis, 180, SAMPLE_BRIEF)
    job_id = client.job_id(180)
    enqueued = await redis.zscore(client.QUEUE_NAME, job_id)
    await asyncio.to_thread(fake.wait_for_requests, 1)

    lease_ms = settings.worker.lease_s * 1000
    claimed = await redis.zscore(client.QUEUE_NAME, job_id)
    assert enqueued is not None and claimed is not None and claimed > timestamp_ms()
    assert before + lease_ms - 5 <= claimed <= timestamp_ms() + lease_ms + 5, "scored at the end of its lease"
    assert await redis.zrangebyscore(client.QUEUE_NAME, "-inf", timestamp_ms()) == [], "no poll reads it"
    assert await order_job(redis, 180).status() == JobStatus.in_progress

    beat_at = timestamp_ms()
    await polling.renew_runs(worker)
    renewed = await redis.zscore(client.QUEUE_NAME, job_id)
    # Redis's clock (TIME, truncated to the millisecond) against this process's: a few ms apart on one host.
    assert renewed is not None and renewed >= beat_at + lease_ms - 5, "the heartbeat moved the lease's end"
    assert await redis.zscore(polling.leases_key(client.QUEUE_NAME), job_id) == renewed, "and its lease record"
    assert await redis.hget(polling.original_scores_key(client.QUEUE_NAME), job_id) == str(int(enqueued)).encode()
    assert renewed - timestamp_ms() - 50 <= await redis.pttl(in_progress_key_prefix + job_id) <= lease_ms


async def test_a_job_handed_back_at_shutdown_is_due_again_at_once_in_its_old_place(
    fake: FakeProviderServer, settings: Settings, start_worker: WorkerFactory, redis: ArqRedis
) -> None:
    """Regression: issue 15 part 1. arq leaves a job it hands back (cancelled at shutdown) at its current
    score: the claim's lease end would hide it from every replica for a lease. It gets its old score back."""
    fake.script("hang")
    worker = await start_worker(with_ai(settings, {"remote": remote("openai", fake.url, read_timeout_s=30)}))
    await client.enqueue_generation(redis, 181, SAMPLE_BRIEF)
    job_id = client.job_id(181)
    enqueued = await redis.zscore(client.QUEUE_NAME, job_id)
    await asyncio.to_thread(fake.wait_for_requests, 1)
    assert (await redis.zscore(client.QUEUE_NAME, job_id) or 0) > timestamp_ms(), "leased while it runs"

    await close_worker(worker)

    assert await redis.zscore(client.QUEUE_NAME, job_id) == enqueued
    assert not await redis.exists(in_progress_key_prefix + job_id)
    await start_worker(settings)
    assert (await wait_for_result(redis, 181))["status"] == "succeeded"


async def test_a_deferred_retry_is_due_after_its_delay_not_after_the_lease_and_the_delay(
    fake: FakeProviderServer, settings: Settings, start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    """Regression: issue 15 part 1. arq defers a `Retry` by adding `defer + now - score` to the job's current
    score, `score` being the one it started with: from the lease's end, that would be a lease too late."""
    fake.script("status:500")
    custom = with_ai(settings, {"remote": remote("openai", fake.url, max_retries=0)})
    custom = custom.model_copy(
        update={
            "worker": custom.worker.model_copy(
                update={"lease_s": 120, "retry_backoff_s": 20, "retry_backoff_max_s": 20}
            )
        }
    )
    await start_worker(custom)
    await client.enqueue_generation(redis, 182, SAMPLE_BRIEF)
    job_id = client.job_id(182)

    async def handed_back_for_a_retry() -> bool:  # its generation waits, its job is queued, not in progress
        status = await db.fetchval("SELECT status FROM site_generations WHERE order_id = 182")
        return status == "queued" and not await redis.exists(in_progress_key_prefix + job_id)

    await _until(handed_back_for_a_retry, "the job to be handed back")
    handed_back = timestamp_ms()

    due = await redis.zscore(client.QUEUE_NAME, job_id)
    assert due is not None, "still queued, for its retry"
    assert handed_back + 5_000 <= due <= handed_back + 20_000, "due after its delay (10 to 20 s), not 120 s later"


async def test_a_job_whose_lease_lapsed_while_it_runs_here_is_not_started_twice(
    fake: FakeProviderServer,
    settings: Settings,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
    log_lines: list[str],
) -> None:
    """A job runs on through a Redis outage longer than its lease; when its replica's poll claims it again,
    the claim renews its lease and the replica does not start it a second time."""
    fake.script("hang")
    worker = await start_worker(with_ai(settings, {"remote": remote("openai", fake.url, read_timeout_s=30)}))
    await client.enqueue_generation(redis, 183, SAMPLE_BRIEF)
    job_id = client.job_id(183)

    async def started() -> bool:
        return job_id in worker.tasks

    await _until(started, "the job to start")
    running = worker.tasks[job_id]
    await asyncio.to_thread(fake.wait_for_requests, 1)

    async with redis.pipeline(transaction=True) as lapse:  # as if the lease had ended during an outage
        lapse.delete(in_progress_key_prefix + job_id)
        lapse.zadd(client.QUEUE_NAME, {job_id: timestamp_ms()}, xx=True)
        await lapse.execute()

    async def leased_again() -> bool:
        return bool(await redis.exists(in_progress_key_prefix + job_id))

    await _until(leased_again, "the poll to claim the job again")

    assert worker.tasks[job_id] is running and not running.done()
    assert (await redis.zscore(client.QUEUE_NAME, job_id) or 0) > timestamp_ms(), "leased again"
    assert any("lease in Redis had lapsed" in line for line in log_lines)
    assert await db.fetchval("SELECT count(*) FROM site_generations WHERE order_id = 183") == 1
    assert len(fake.requests) == 1, "one model call: the job was not started again"


async def test_a_job_whose_replica_died_comes_due_in_its_old_place_ahead_of_the_jobs_enqueued_after_it(
    settings: Settings, start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    """Regression: issue 15 part 1. A replica SIGKILLed mid-job leaves its job scored at the end of its lease,
    behind every job enqueued before then: with a backlog, the half-done generation would wait for all of
    them. When the lease ends, the next poll puts back the score it was claimed with."""
    await client.enqueue_generation(redis, 190, SAMPLE_BRIEF)
    job_id = client.job_id(190)
    # A replica claims it for a short lease, as worker.polling's poll does, and dies.
    script = redis.register_script(polling.POLL)
    claimed, _ = await polling.claim(
        script, client.QUEUE_NAME, free=1, read_limit=100, lease_ms=500, token="dead-replica:1", read_aborts=False
    )
    assert claimed[0].decode() == job_id
    backlog = list(range(191, 196))
    for order_id in backlog:  # enqueued after the claim, before the lease's end
        await client.enqueue_generation(redis, order_id, SAMPLE_BRIEF)
    assert (await redis.zscore(client.QUEUE_NAME, job_id) or 0) > (
        await redis.zscore(client.QUEUE_NAME, client.job_id(backlog[-1])) or 0
    ), "while leased, it sorts after the backlog"

    async def lease_over() -> bool:
        return not await redis.exists(in_progress_key_prefix + job_id)

    await _until(lease_over, "the dead replica's lease to end")
    await start_worker(settings, max_jobs=1)
    for order_id in [190, *backlog]:
        assert (await wait_for_result(redis, order_id))["status"] == "succeeded"

    started = await db.fetch("SELECT order_id FROM site_generations ORDER BY started_at")
    assert [r["order_id"] for r in started] == [190, *backlog], "the dead replica's job first, in its old place"
    assert await redis.zscore(client.QUEUE_NAME, job_id) is None
    assert await redis.zscore(polling.leases_key(client.QUEUE_NAME), job_id) is None, "its lease is gone"
    assert await redis.hget(polling.original_scores_key(client.QUEUE_NAME), job_id) is None
