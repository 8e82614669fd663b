"""arq's poll with `worker.polling`: one Lua script per poll claims the startable jobs at the head of the
queue; running jobs are not re-checked one by one, and no job is started twice."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from arq import ArqRedis
from arq.constants import in_progress_key_prefix

from tests.helpers import SAMPLE_BRIEF, WorkerFactory, remote, wait_for_result, with_ai
from worker import client, polling
from worker.local.fake_server import FakeProviderServer
from worker.settings import Settings

pytestmark = pytest.mark.usefixtures("provider_key")


async def commands_during_polls(redis: ArqRedis, polls: int) -> list[str]:
    """Every command Redis runs (MONITOR) until the worker has polled the queue `polls` more times."""
    seen: list[str] = []
    async with asyncio.timeout(30), redis.monitor() as monitor:
        while sum(c.startswith(f"ZRANGEBYSCORE {client.QUEUE_NAME} ") for c in seen) < polls:
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
    assert len([c for c in commands if c.startswith("EVALSHA ")]) >= 4, "in the claim script, one call per poll"
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
