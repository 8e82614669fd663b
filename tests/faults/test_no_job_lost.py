"""Infrastructure failures never drop a job: a new order whose brief lives only in Redis waits out PostgreSQL.

Regression: issue 14 defect 5. Before the fix, with PostgreSQL down longer than the retry window, the
claim failed on the job's last try, arq dropped the job, and the brief, which only Redis had, was lost.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.faults.harness import Cluster, wait_until
from worker import client

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


async def test_a_new_order_survives_postgresql_down_for_longer_than_its_tries(cluster: Cluster) -> None:
    cluster.settings_env.update(
        SITEGEN_WORKER__MAX_TRIES="2", SITEGEN_WORKER__RETRY_BACKOFF_S="0.1", SITEGEN_WORKER__RETRY_BACKOFF_MAX_S="0.5"
    )
    replica = cluster.add_replica("pgdown-a")
    await cluster.wait_healthy(replica)
    await asyncio.to_thread(cluster.services.postgres.stop)
    await cluster.enqueue([401])  # its brief is only in Redis until a claim stores it
    redis = await client.connect(cluster.redis_url)
    try:

        async def tried_past_max_tries() -> bool:
            return int(await redis.get(f"arq:retry:{client.job_id(401)}") or 0) > 4

        await wait_until(tried_past_max_tries, 60, what="the job to be tried more than twice its max_tries")
        assert await redis.zscore(client.QUEUE_NAME, client.job_id(401)) is not None, "the job is still queued"
    finally:
        await redis.aclose()
    await asyncio.to_thread(cluster.services.postgres.start)
    await cluster.wait_all_succeeded([401], timeout=60)
    await cluster.check_invariants([401])
    assert replica.alive()
