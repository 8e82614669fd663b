"""A Redis outage, as a crash or a managed failover makes it: Redis SIGKILLed, down for seconds, back on its port.

Regression: issue 14 defect 1. Before the fix every `arq worker.main.WorkerSettings` process exited with
`redis.exceptions.ConnectionError` out of arq's `Worker.run`/`close`, so every generation in flight was
interrupted at once and waited for its lease.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.faults.harness import Cluster, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


async def test_replicas_survive_a_redis_outage_longer_than_the_lease_and_finish_every_order(cluster: Cluster) -> None:
    # A lease shorter than the outage: the generations in flight keep their claims only if their
    # PostgreSQL lease renewal goes on while Redis is away.
    cluster.settings_env.update(SITEGEN_WORKER__LEASE_S="4")
    cluster.fake.configure(latency_s=1.5)
    replicas = [cluster.add_replica(name) for name in ("outage-a", "outage-b")]
    for replica in replicas:
        await cluster.wait_healthy(replica)
    orders = list(range(300, 306))
    await cluster.enqueue(orders)
    await asyncio.to_thread(cluster.fake.wait_for_requests, 4, 30)

    cluster.services.redis.kill()
    # The outage itself is the fault under test: Redis stays down this long, whatever the replicas do.
    await asyncio.sleep(6)
    for replica in replicas:
        assert replica.alive(), f"replica {replica.name} exited during the outage:\n{replica.log()[-4000:]}"
    assert await cluster.arq_check("outage-a") != 0, "arq --check must fail while Redis is unreachable"
    await asyncio.to_thread(cluster.services.redis.start)

    async def healthy_again() -> bool:
        return await cluster.arq_check("outage-a") == 0

    back_after = await wait_until(healthy_again, 20, interval=0.5, what="arq --check to pass after Redis returned")
    print(f"arq --check passed {back_after:.1f}s after Redis returned")
    await cluster.wait_all_succeeded(orders, timeout=120)
    for replica in replicas:
        assert replica.alive(), f"replica {replica.name} exited:\n{replica.log()[-4000:]}"
        assert "Traceback" not in replica.log(), replica.log()[-4000:]
    await cluster.check_invariants(orders)
    conn = await cluster.connect()
    try:
        superseded = await conn.fetchval(
            "SELECT count(*) FROM site_generation_logs WHERE order_id = ANY($1::bigint[]) AND message LIKE 'stopped:%'",
            orders,
        )
    finally:
        await conn.close()
    assert superseded == 0, "no claim may be taken over while its replica lives through the outage"
