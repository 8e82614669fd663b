"""Redis reachable but refusing: a failover's old primary (READONLY), memory full (OOM), its data loading (LOADING).

Real `arq worker.main.WorkerSettings` replicas run generations on a provider with `requests_per_minute`, so
every model call asks Redis' limiter too. Each fault holds until the replicas have met it and the running
generations have gone on through it (each wait below is for an event, the fault itself is released by the
test), then Redis recovers and every generation must end `succeeded`, with no replica exiting on its own.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests.faults.harness import Cluster, Replica, slow_next_aof_load, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


#: Every model call asks Redis' limiter first (one EVALSHA that writes), as production's limited providers do.
LIMITED = {"SITEGEN_AI__PROVIDERS__FAKE__REQUESTS_PER_MINUTE": "6000", "SITEGEN_WORKER__LEASE_S": "4"}


async def _start(cluster: Cluster, *names: str) -> list[Replica]:
    cluster.settings_env.update(LIMITED)
    cluster.fake.configure(latency_s=0.5)
    replicas = [cluster.add_replica(name) for name in names]
    for replica in replicas:
        await cluster.wait_healthy(replica)
    return replicas


async def _met(replicas: list[Replica], code: str, *, since: dict[str, int]) -> None:
    """Wait until every replica logged that Redis refused with `code` (written after `since` of its log). A
    LOADING lasts only seconds whatever the replicas do: one replica meeting it is enough (on a loaded
    machine another may not ask Redis anything before the load is over: seen in a fresh-clone run)."""
    enough = any if code == "LOADING" else all

    async def all_met() -> bool:
        for replica in replicas:
            if not replica.alive():
                raise AssertionError(f"replica {replica.name} exited on {code}:\n{replica.log()[-6000:]}")
        return enough(f"Redis refuses commands ({code}" in r.log()[since[r.name] :] for r in replicas)

    await wait_until(all_met, 30, interval=0.1, what=f"every replica to meet {code} and wait for Redis")


async def _carried_on(cluster: Cluster, more: int) -> None:
    """Wait until the provider got `more` further requests: the running generations go on meanwhile."""
    seen = len(cluster.fake.requests)
    await asyncio.to_thread(cluster.fake.wait_for_requests, seen + more, 60)


def _marks(replicas: list[Replica]) -> dict[str, int]:
    return {r.name: len(r.log()) for r in replicas}


def _check_alive(replicas: list[Replica]) -> None:
    for replica in replicas:
        assert replica.alive(), f"replica {replica.name} exited:\n{replica.log()[-6000:]}"


async def test_a_failover_to_read_only_and_back_fails_no_generation_and_stops_no_replica(cluster: Cluster) -> None:
    """Regression: issue 21 defect 1: after `REPLICAOF` on the worker's Redis (a failover's old primary answers
    READONLY), the poll's and the health key's ReadOnlyError escaped `redis_outage` and the replicas exited
    within seconds; the limiter let it through and the runner failed the generation for good; `close()` raised
    at the health key's DEL before `on_shutdown`; `wait_for_redis` probed with PING, which a replica answers."""
    replicas = await _start(cluster, "ro-a", "ro-b")
    orders = list(range(500, 506))
    await cluster.enqueue(orders)
    await asyncio.to_thread(cluster.fake.wait_for_requests, 3, 30)

    # A replica of a primary that is not there: it answers reads and PING, and refuses every write.
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, never listening: the port stays unused and refuses connections
        async with cluster.redis_control() as control:
            marks = _marks(replicas)
            await control.execute_command("REPLICAOF", "127.0.0.1", str(unused.getsockname()[1]))
            try:
                await _met(replicas, "READONLY", since=marks)
                await _carried_on(cluster, 2)  # the limiter uses its local share, the phases commit

                # A replica stopped now still runs its shutdown: its progress rows are written, its pools closed.
                leaving = replicas.pop()
                leaving.terminate()
                assert await leaving.wait_exit(timeout=60) == 0, leaving.log()[-6000:]
                assert "replica ro-b stopped" in leaving.log(), leaving.log()[-6000:]
                _check_alive(replicas)
            finally:
                await control.execute_command("REPLICAOF", "NO", "ONE")

    async def healthy_again() -> bool:
        return await cluster.arq_check("ro-a") == 0

    back_after = await wait_until(healthy_again, 30, interval=0.5, what="arq --check to pass after the failover")
    print(f"arq --check passed {back_after:.1f}s after Redis took writes again")
    await cluster.wait_all_succeeded(orders, timeout=120)
    _check_alive(replicas)
    assert "Redis is back after" in replicas[0].log()
    await cluster.check_invariants(orders)


async def test_oom_loading_and_masterdown_fail_no_generation_and_stop_no_replica(cluster: Cluster) -> None:
    """Redis memory full under noeviction (OOM on every write that needs memory), Redis loading its AOF
    (LOADING on every command), and a replica cut off from its primary with `replica-serve-stale-data no`
    (MASTERDOWN on reads, READONLY on writes): generations running through each end succeeded once Redis
    recovers, and no replica exits."""
    replicas = await _start(cluster, "refused-a", "refused-b")
    async with cluster.redis_control() as control:
        await slow_next_aof_load(control)
        every: list[int] = []
        for stage, code in enumerate(("OOM", "LOADING", "MASTERDOWN")):
            orders = list(range(600 + 10 * stage, 604 + 10 * stage))
            every += orders
            seen = len(cluster.fake.requests)
            await cluster.enqueue(orders)
            await asyncio.to_thread(cluster.fake.wait_for_requests, seen + 2, 30)
            marks = _marks(replicas)
            if code == "OOM":
                await control.config_set("maxmemory-policy", "noeviction")
                await control.config_set("maxmemory", 1)
            elif code == "LOADING":
                loading = asyncio.ensure_future(control.execute_command("DEBUG", "LOADAOF"))
            else:
                unused = socket.socket()
                unused.bind(("127.0.0.1", 0))
                await control.config_set("replica-serve-stale-data", "no")
                await control.execute_command("REPLICAOF", "127.0.0.1", str(unused.getsockname()[1]))
            try:
                await _met(replicas, code, since=marks)
                if code != "LOADING":  # a load is over in seconds, whatever the replicas do
                    await _carried_on(cluster, 2)
            finally:
                if code == "OOM":
                    await control.config_set("maxmemory", 0)
                elif code == "LOADING":
                    assert await loading in (b"OK", "OK")
                else:
                    await control.execute_command("REPLICAOF", "NO", "ONE")
                    await control.config_set("replica-serve-stale-data", "yes")
                    unused.close()
            await cluster.wait_all_succeeded(orders, timeout=120)
            _check_alive(replicas)
        await control.config_set("key-load-delay", 0)
    await cluster.check_invariants(every)
