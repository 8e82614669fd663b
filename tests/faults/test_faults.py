"""The fault suite: real worker processes, killed, stopped and starved of their servers on purpose.

Each scenario has its own PostgreSQL, Redis and fake provider, so restarting them touches no
other test. Run alone with `pytest -m faults`.
"""

from __future__ import annotations

import asyncio
import random
import time

import asyncpg
import pytest

from tests.faults.harness import Cluster, order_of_request, wait_until
from worker import client
from worker.local.fake_server import FakeProviderServer
from worker.settings import WorkerSection

# Real processes on a 2-core machine: generous per-test limits, each scenario has its own deadline too.
pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


async def _resumed_by(cluster: Cluster, order_id: int) -> asyncpg.Record | None:
    conn = await cluster.connect()
    try:
        return await conn.fetchrow(
            "SELECT replica_id, created_at FROM site_generation_logs WHERE order_id = $1 "
            "AND message LIKE 'generation resumed%' ORDER BY id LIMIT 1",
            order_id,
        )
    finally:
        await conn.close()


async def _owner(cluster: Cluster, order_id: int) -> str | None:
    conn = await cluster.connect()
    try:
        owner: str | None = await conn.fetchval(
            "SELECT replica_id FROM site_generations WHERE order_id = $1 AND status = 'running'", order_id
        )
        return owner
    finally:
        await conn.close()


def _calls(fake: FakeProviderServer, order_id: int) -> list[str]:
    return [task for order, task in (order_of_request(r.body) for r in fake.requests) if order == order_id]


async def test_sigkill_mid_phase_resumes_on_another_replica_within_the_bound(cluster: Cluster) -> None:
    """With the default settings (issue 14 acceptance 4: at most 15 s from the kill to the resume).

    Both replicas are up before the order is enqueued, and the one that claims it is killed as soon as its
    coding call arrives: starting the other one in between took longer than the hung call's 10 s read
    timeout on a loaded machine (parallel test workers), and the generation was no longer running."""
    lease_s = WorkerSection().lease_s
    cluster.fake.script("ok", "ok", "hang")  # order 1's coding call hangs: the replica dies inside it
    both = [cluster.add_replica("kill-a"), cluster.add_replica("kill-b")]
    for replica in both:
        await cluster.wait_healthy(replica)
    await cluster.enqueue([1])
    await asyncio.to_thread(cluster.fake.wait_for_requests, 3, 30)
    owner = await _owner(cluster, 1)
    first, second = both if owner == "kill-a" else both[::-1]
    assert owner == first.name, f"the order is running on {owner}"

    first.kill()
    killed_at = time.time()
    await cluster.wait_all_succeeded([1], timeout=90)

    resumed = await _resumed_by(cluster, 1)
    assert resumed is not None and resumed["replica_id"] == second.name
    recovery_s = resumed["created_at"].timestamp() - killed_at
    print(
        f"\nSIGKILL recovery: resumed on another replica {recovery_s:.1f}s after the kill "
        f"(default settings: lease_s={lease_s}, job_timeout_s=1800)"
    )
    assert recovery_s <= 15, "a killed replica's generation must resume elsewhere within 15 s"
    assert _calls(cluster.fake, 1) == ["planning", "content", "coding", "coding"]
    await cluster.check_invariants([1])


async def test_sigterm_finishes_the_current_phase_then_hands_back(cluster: Cluster) -> None:
    """Both replicas are up before the order is enqueued, and the one that claims it is SIGTERMed as soon as
    its plan call arrives: starting the other one in between took longer than the 1 s call on a loaded
    machine (parallel test workers), and the SIGTERM then came a phase late."""
    cluster.fake.configure(latency_s=1.0)
    both = [cluster.add_replica("term-a"), cluster.add_replica("term-b")]
    for replica in both:
        await cluster.wait_healthy(replica)
    await cluster.enqueue([2])
    await asyncio.to_thread(cluster.fake.wait_for_requests, 1, 30)  # the plan call is under way
    owner = await _owner(cluster, 2)
    leaving, staying = both if owner == "term-a" else both[::-1]
    assert owner == leaving.name, f"the order is running on {owner}"

    leaving.terminate()
    assert await leaving.wait_exit(timeout=30) == 0
    redis = await client.connect(cluster.services.redis_url)
    try:
        assert not await redis.exists(f"site_generation:health-check:{leaving.name}"), "the leaving replica's key goes"
        assert await redis.exists(f"site_generation:health-check:{staying.name}"), "the other replica's key stays"
    finally:
        await redis.aclose()
    await cluster.wait_all_succeeded([2], timeout=60)

    conn = await cluster.connect()
    try:
        rows = await conn.fetch("SELECT replica_id, message FROM site_generation_logs WHERE order_id = 2 ORDER BY id")
    finally:
        await conn.close()
    messages = [(r["replica_id"], r["message"]) for r in rows]
    assert (leaving.name, "phase plan done") in messages, "the current phase is finished, not thrown away"
    assert (leaving.name, f"handed back at phase content: replica {leaving.name} is shutting down") in messages
    assert (staying.name, "generation resumed at phase content (attempt 2)") in messages
    assert _calls(cluster.fake, 2) == ["planning", "content", "coding"]
    await cluster.check_invariants([2])


async def test_postgres_restart_mid_run_loses_nothing(cluster: Cluster) -> None:
    cluster.fake.configure(latency_s=0.3)
    orders = list(range(10, 20))
    for name in ("pg-a", "pg-b"):
        await cluster.wait_healthy(cluster.add_replica(name))
    await cluster.enqueue(orders)
    await asyncio.to_thread(cluster.fake.wait_for_requests, 8, 30)

    await asyncio.to_thread(cluster.services.postgres.restart)
    await cluster.wait_all_succeeded(orders, timeout=120)

    await cluster.check_invariants(orders)
    conn = await cluster.connect()
    try:
        for order_id in orders:
            messages = [
                r["message"]
                for r in await conn.fetch(
                    "SELECT message FROM site_generation_logs WHERE order_id = $1 ORDER BY created_at, id", order_id
                )
            ]
            for phase in ("plan", "content", "code", "assemble"):
                assert f"phase {phase} done" in messages, f"order {order_id}: progress of {phase} lost"
            assert messages[-1] == "generation succeeded"
    finally:
        await conn.close()
    for replica in cluster.replicas:
        assert "dropped" not in replica.log(), "no progress row may be dropped"


async def test_redis_restart_with_aof_loses_no_queued_job(cluster: Cluster) -> None:
    orders = list(range(30, 40))
    await cluster.enqueue(orders)  # queued while no replica runs: they live only in Redis
    await asyncio.to_thread(cluster.services.redis.restart)
    cluster.fake.configure(latency_s=0.2)
    replica = cluster.add_replica("aof-a")
    await cluster.wait_healthy(replica)
    await asyncio.to_thread(cluster.fake.wait_for_requests, 5, 30)
    await asyncio.to_thread(cluster.services.redis.restart)  # and once more while they run
    await cluster.wait_all_succeeded(orders, timeout=120)
    await cluster.check_invariants(orders)


async def test_redis_wiped_mid_run_the_sweeper_finishes_every_started_generation(cluster: Cluster) -> None:
    # Every first plan call fails and its job waits in Redis for a deferred retry; then Redis loses
    # everything, as a restart without persistence would. Only PostgreSQL still knows the work.
    cluster.settings_env.update(
        SITEGEN_WORKER__SWEEP_EVERY_S="2",
        SITEGEN_WORKER__LEASE_S="4",
        SITEGEN_WORKER__RETRY_BACKOFF_S="20",
        SITEGEN_WORKER__RETRY_BACKOFF_MAX_S="20",
        SITEGEN_AI__PROVIDERS__FAKE__MAX_RETRIES="0",
    )
    orders = list(range(40, 46))
    cluster.fake.script(*["status:500"] * len(orders))
    replica = cluster.add_replica("wipe-a")
    await cluster.wait_healthy(replica)
    await cluster.enqueue(orders)

    async def all_waiting_for_retry() -> bool:
        statuses = await cluster.statuses(orders)
        return len(statuses) == len(orders) and set(statuses.values()) == {"queued"}

    await wait_until(all_waiting_for_retry, 30, what="every order to wait for its retry")
    redis = await client.connect(cluster.services.redis_url)
    try:
        await redis.flushall()  # as a restart without persistence would
    finally:
        await redis.aclose()

    await cluster.wait_all_succeeded(orders, timeout=120)
    conn = await cluster.connect()
    try:
        swept = await conn.fetchval("SELECT count(*) FROM site_generation_logs WHERE message LIKE 'sweeper:%'")
    finally:
        await conn.close()
    assert swept >= 1, "the sweeper re-enqueued the generations whose jobs were wiped"
    await cluster.check_invariants(orders)


async def test_replicas_under_fire(cluster: Cluster) -> None:
    """3 replicas, 60 orders, 100-300 ms model latency with 10% 429s and 5% 500s; one replica is
    SIGKILLed every 10 s and restarted. Every order must succeed with the invariants intact."""
    # One generation at a time per replica, so the run lasts long enough for several kills.
    cluster.settings_env.update(SITEGEN_WORKER__LEASE_S="8", SITEGEN_WORKER__MAX_JOBS="1")
    cluster.fake.configure(latency_s=0.1, latency_max_s=0.3, rate_429=0.10, rate_500=0.05, seed=7)
    orders = list(range(100, 160))
    for name in ("fire-1", "fire-2", "fire-3"):
        await cluster.wait_healthy(cluster.add_replica(name))
    await cluster.enqueue(orders)

    chooser = random.Random(11)
    kills = 0
    started = time.monotonic()

    async def finished() -> bool:
        statuses = await cluster.statuses(orders)
        return len(statuses) == len(orders) and set(statuses.values()) == {"succeeded"}

    while not await finished():
        assert time.monotonic() - started < 240, "replicas under fire did not finish in 240 s"
        try:
            await wait_until(finished, timeout=10, interval=0.5, what="the next kill")
            break
        except AssertionError:
            pass
        victim = chooser.choice([r for r in cluster.replicas if r.alive()])
        victim.kill()
        kills += 1
        await cluster.wait_healthy(cluster.add_replica(f"{victim.name.split('.')[0]}.{kills}"))

    await cluster.wait_all_succeeded(orders, timeout=30)
    print(
        f"\nreplicas under fire: {len(orders)} orders succeeded in {time.monotonic() - started:.1f}s "
        f"with {kills} SIGKILLs and {len(cluster.fake.requests)} model calls"
    )
    assert kills >= 2
    await cluster.check_invariants(orders)
