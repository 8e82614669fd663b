"""Issue 22 acceptance 1: an edit survives a SIGKILLed replica like a generation does."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.faults.harness import Cluster, wait_until
from worker import client

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


def _task(body: Any) -> str | None:
    """The edit task of a request the fake provider saw (None: a generation's)."""
    text = json.dumps(body)
    if "with search/replace blocks" in text:
        return "editing"
    if "Plan how to carry out the instruction" in text:
        return "edit_planning"
    if "Write the whole file" in text:
        return "rewriting"
    return None


async def test_sigkill_during_an_edit_resumes_on_another_replica_without_repeating_committed_phases(
    cluster: Cluster,
) -> None:
    both = [cluster.add_replica("edit-a"), cluster.add_replica("edit-b")]
    for replica in both:
        await cluster.wait_healthy(replica)
    await cluster.enqueue([1])
    await cluster.wait_all_succeeded([1], timeout=90)
    cluster.fake.script("hang", when=lambda body: _task(body) == "editing")  # the replica dies inside this call
    redis = await client.connect(cluster.redis_url)
    try:
        job = await client.enqueue_edit(redis, 1, "Make the header blue")
        assert job is not None

        async def editing() -> bool:
            return any(_task(r.body) == "editing" for r in cluster.fake.requests)

        await wait_until(editing, timeout=60)
        conn = await cluster.connect()
        try:
            owner = await conn.fetchval(
                "SELECT replica_id FROM site_generations WHERE kind = 'edit' AND status = 'running'"
            )
        finally:
            await conn.close()
        killed = next(r for r in both if r.name == owner)
        killed.kill()
        result = await job.result(timeout=120, poll_delay=0.2)
    finally:
        await redis.aclose()
    assert result["status"] == "succeeded" and result["version"] == 2
    tasks = [t for t in (_task(r.body) for r in cluster.fake.requests) if t]
    # The plan was committed before the kill: it is not asked for again; the hung editing call is.
    assert tasks == ["edit_planning", "editing", "editing"]
    conn = await cluster.connect()
    try:
        resumed = await conn.fetchval(
            "SELECT replica_id FROM site_generation_logs WHERE order_id = 1 AND details ->> 'event' = 'edit.resumed'"
        )
        live = await conn.fetchval("SELECT live_version FROM site_orders WHERE id = 1")
    finally:
        await conn.close()
    assert resumed is not None and resumed != owner and live == 2
    css = (cluster.output_dir / "1" / "assets" / "style.css").read_text()
    assert "--primary: #1d4ed8" in css
