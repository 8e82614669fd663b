"""A network partition: one replica's path to Redis, or to PostgreSQL, goes silent (packets dropped, no reset),
while the other replicas stay connected.

Each replica under test reaches Redis and PostgreSQL through FaultProxies of its own
(`Cluster.add_replica(..., proxied=True)`); `blackhole` accepts and drops every byte and closes nothing, as a
vanished host or a firewall does. The partition lasts until the replicas have met it (each wait below is for an
event), then the proxy heals and the replica must come back by itself.

Regression: issue 21 defect 3. Before the fix the worker's Redis connections had no socket timeout: the poll
waited on its socket for ever (about 15 minutes of TCP retransmission on a real network, for ever behind a
blackhole), so the outage handling never started and `arq --check` could not tell, and a SIGTERM hung at the
shutdown `DEL` of the health key until SIGKILL. On PostgreSQL, a connection opened during a partition waited
60 s (asyncpg's connect timeout, no setting), so a SIGTERM took minutes; and the heartbeat's `asyncio.timeout`
waited out asyncpg's cancel request, as long as the statement itself (command_timeout_s, then 30 s), before it
could report a silent renewal.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.faults.harness import Cluster, Replica, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]


#: Short leases, so that a claim that must lapse does so within the test, and a short grace on SIGTERM.
FAST = {"SITEGEN_WORKER__LEASE_S": "4", "SITEGEN_WORKER__SHUTDOWN_GRACE_S": "3"}

#: Generous bounds on events that the worker's defaults put within a few seconds (redis.socket_timeout_s 5,
#: database.connect_timeout_s 5); without the fix they never come (Redis) or come after a minute (PostgreSQL).
NOTICE_S = 25
EXIT_S = 25


async def _logged(replica: Replica, text: str, *, since: int, timeout: float) -> float:
    """Wait until `replica` logged `text` after offset `since` of its log; it must stay alive meanwhile."""

    async def seen() -> bool:
        if not replica.alive():
            raise AssertionError(f"replica {replica.name} exited:\n{replica.log()[-6000:]}")
        return text in replica.log()[since:]

    return await wait_until(seen, timeout, interval=0.1, what=f"replica {replica.name} to log {text!r}")


async def _owners(cluster: Cluster, order_id: int) -> list[str]:
    """The replicas that started or resumed the order's generation, in order."""
    conn = await cluster.connect()
    try:
        rows = await conn.fetch(
            "SELECT replica_id FROM site_generation_logs WHERE order_id = $1 AND "
            "(message LIKE 'generation started%' OR message LIKE 'generation resumed%') ORDER BY created_at, id",
            order_id,
        )
    finally:
        await conn.close()
    return [r["replica_id"] for r in rows]


async def test_a_replica_cut_off_from_redis_notices_stops_claiming_and_recovers_after_heal(cluster: Cluster) -> None:
    """Regression: issue 21 defect 3: the poll of a replica whose Redis path is blackholed must give up within its
    socket timeout and wait for Redis as in an outage (before the fix it waited on the socket for ever)."""
    cluster.settings_env.update(FAST)
    cluster.fake.configure(latency_s=1.5)
    cut = cluster.add_replica("part-r", proxied=True)
    await cluster.wait_healthy(cut)
    await cluster.enqueue([700])
    await asyncio.to_thread(cluster.fake.wait_for_requests, 1, 30)  # 700 runs on the replica to be cut off
    other = cluster.add_replica("part-o")
    await cluster.wait_healthy(other)

    assert cut.redis_proxy is not None
    mark = len(cut.log())
    cut.redis_proxy.set("blackhole")
    noticed = await _logged(cut, "Redis is unreachable", since=mark, timeout=NOTICE_S)
    print(f"the cut-off replica logged the Redis outage {noticed:.1f}s into the partition")

    async def check_fails() -> bool:
        return await cluster.arq_check(cut.name) != 0

    await wait_until(check_fails, 20, interval=0.5, what="arq --check to fail for the cut-off replica")
    # A new order while the partition lasts: the connected replica takes it, the cut-off one claims nothing.
    await cluster.enqueue([701])
    await cluster.wait_all_succeeded([701], timeout=60)
    assert await _owners(cluster, 701) == [other.name]
    assert cut.alive(), cut.log()[-4000:]

    healed_at = len(cut.log())
    cut.redis_proxy.heal()
    await _logged(cut, "Redis is back", since=healed_at, timeout=30)

    async def check_passes() -> bool:
        return await cluster.arq_check(cut.name) == 0

    await wait_until(check_passes, 20, interval=0.5, what="arq --check to pass again after the heal")
    await cluster.wait_all_succeeded([700, 701], timeout=90)
    for replica in (cut, other):
        assert replica.alive(), f"replica {replica.name} exited:\n{replica.log()[-4000:]}"
        assert "Traceback" not in replica.log(), replica.log()[-4000:]
    await cluster.check_invariants([700, 701])
    # Its PostgreSQL lease never depended on Redis: the cut-off replica kept its claim on 700 throughout.
    assert await _owners(cluster, 700) == [cut.name]


async def test_sigterm_during_a_redis_partition_exits_within_the_grace(cluster: Cluster) -> None:
    """Regression: issue 21 defect 3: SIGTERM while the replica's Redis path is blackholed ends the process (health
    key DEL, pools, progress log) within its grace period (before the fix it hung at the DEL until SIGKILL)."""
    cluster.settings_env.update(FAST)
    cut = cluster.add_replica("part-t", proxied=True)
    await cluster.wait_healthy(cut)
    assert cut.redis_proxy is not None
    cut.redis_proxy.set("blackhole")
    cut.terminate()
    began = time.monotonic()
    await cut.wait_exit(timeout=EXIT_S)
    print(f"exited {time.monotonic() - began:.1f}s after SIGTERM, its Redis path blackholed")
    assert "replica part-t stopped" in cut.log(), cut.log()[-4000:]  # on_shutdown ran: pools closed, log written


async def test_a_replica_cut_off_from_postgresql_recovers_and_the_generation_succeeds(cluster: Cluster) -> None:
    """Regression: issue 21 defect 3: a replica whose PostgreSQL path is blackholed mid-generation does not hang:
    its heartbeat, claims and progress rows give up within their bounds, its claim lapses cleanly (or is kept),
    the generation ends `succeeded` after the heal, and a SIGTERM during a partition exits in time."""
    # A connection the partition caught stays dead after the heal (as on a real network): asyncpg gives its call
    # up after command_timeout_s, and its cancel request as long again. Shorter than the default, to keep it lean.
    cluster.settings_env.update(FAST, SITEGEN_DATABASE__COMMAND_TIMEOUT_S="3")
    cluster.fake.configure(latency_s=1.0)
    cut = cluster.add_replica("part-p", proxied=True)
    await cluster.wait_healthy(cut)
    await cluster.enqueue([710])
    await asyncio.to_thread(cluster.fake.wait_for_requests, 1, 30)

    assert cut.pg_proxy is not None
    mark = len(cut.log())
    cut.pg_proxy.set("blackhole")
    await _logged(cut, "heartbeat: could not renew the PostgreSQL leases", since=mark, timeout=NOTICE_S)
    cut.pg_proxy.heal()
    await cluster.wait_all_succeeded([710], timeout=90)
    assert cut.alive(), cut.log()[-4000:]
    await cluster.check_invariants([710])

    # SIGTERM while the path is silent again, with a generation running: the shutdown may not hang on PostgreSQL.
    seen = len(cluster.fake.requests)
    await cluster.enqueue([711])
    await asyncio.to_thread(cluster.fake.wait_for_requests, seen + 1, 30)
    cut.pg_proxy.set("blackhole")
    cut.terminate()
    began = time.monotonic()
    # Past its grace the interrupted run hands its generation back (two PostgreSQL calls, each given up within
    # connect_timeout_s or twice command_timeout_s) and waits progress_wait_s for its rows; then one bounded flush.
    await cut.wait_exit(timeout=2 * EXIT_S)
    print(f"exited {time.monotonic() - began:.1f}s after SIGTERM, its PostgreSQL path blackholed")
    assert "replica part-p stopped" in cut.log(), cut.log()[-4000:]
