"""The store's commits: each is one statement, fenced by the claim, all or nothing.

A phase commit and the final commit write nothing for a replica whose claim was taken over, and
a phase commit reports a cancel request in the same step, so the runner needs no query of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.helpers import SAMPLE_BRIEF
from worker.errors import ClaimLost
from worker.settings import Settings
from worker.store import Claim, OutputFile, Store, create_pool

FILES = [OutputFile("index.html", b"<!doctype html><title>x</title>"), OutputFile("css/site.css", b"body{}")]


@pytest.fixture
async def store(settings: Settings, db: asyncpg.Connection) -> AsyncIterator[Store]:
    pool = await create_pool(settings.database, max_size=2, name="test-store")
    yield Store(pool, replica_id="r1", lease_s=30)
    await pool.close()


async def _started(store: Store, order_id: int) -> Claim:
    claim = await store.claim_generation(order_id, SAMPLE_BRIEF, regenerate=False, job_id=f"job-{order_id}")
    assert claim.kind == "started" and not claim.cancel_requested
    return claim


async def _take_over(db: asyncpg.Connection, claim: Claim) -> None:
    await db.execute("UPDATE site_generations SET claim_token = gen_random_uuid() WHERE id = $1", claim.generation_id)


async def test_a_phase_commit_stores_the_checkpoint_and_advances_in_one_step(
    store: Store, db: asyncpg.Connection
) -> None:
    claim = await _started(store, 501)
    cancel = await store.commit_phase(
        claim, "plan", {"pages": ["home"]}, usage={"tokens": 7}, total_usage={"tokens": 7}, duration_ms=12
    )
    assert cancel is False
    row = await db.fetchrow("SELECT current_phase, usage FROM site_generations WHERE id = $1", claim.generation_id)
    assert row["current_phase"] == "content" and row["usage"] == {"tokens": 7}
    phase = await db.fetchrow("SELECT phase, output, usage, duration_ms FROM site_generation_phases")
    assert dict(phase) == {"phase": "plan", "output": {"pages": ["home"]}, "usage": {"tokens": 7}, "duration_ms": 12}


async def test_a_phase_commit_reports_a_cancel_request(store: Store, db: asyncpg.Connection) -> None:
    claim = await _started(store, 502)
    assert await store.request_cancel(502, "test") == {"id": claim.generation_id, "status": "running"}
    assert await store.commit_phase(claim, "plan", {}, usage={}, total_usage={}, duration_ms=1) is True
    assert await db.fetchval("SELECT count(*) FROM site_generation_phases") == 1, "the finished phase is kept"


async def test_a_resumed_claim_carries_a_cancel_requested_while_no_replica_held_it(
    store: Store, db: asyncpg.Connection
) -> None:
    claim = await _started(store, 503)
    await store.request_cancel(503, "test")
    await db.execute("UPDATE site_generations SET lease_expires_at = now() - interval '1 s'")  # its replica died
    resumed = await store.claim_generation(503, None, regenerate=False, job_id="job-503b")
    assert resumed.kind == "resumed" and resumed.generation_id == claim.generation_id
    assert resumed.cancel_requested is True


async def test_a_lost_claim_commits_no_phase(store: Store, db: asyncpg.Connection) -> None:
    claim = await _started(store, 504)
    await _take_over(db, claim)
    with pytest.raises(ClaimLost, match="taken over"):
        await store.commit_phase(claim, "plan", {}, usage={}, total_usage={}, duration_ms=1)
    assert await db.fetchval("SELECT count(*) FROM site_generation_phases") == 0
    assert await db.fetchval("SELECT current_phase FROM site_generations") == "plan"


async def test_the_final_commit_stores_the_manifest_files_and_success_together(
    store: Store, db: asyncpg.Connection
) -> None:
    claim = await _started(store, 505)
    await store.finish_generation(
        claim, {"pages": ["index.html"]}, FILES, usage={}, total_usage={"tokens": 1}, duration_ms=3, output_dir="/x"
    )
    row = await db.fetchrow("SELECT status, output_dir, claim_token FROM site_generations")
    assert dict(row) == {"status": "succeeded", "output_dir": "/x", "claim_token": None}
    files = await db.fetch("SELECT path, content, sha256, bytes, media_type FROM site_files ORDER BY path")
    assert [tuple(f) for f in files] == [
        (f.path, f.content, f.sha256, len(f.content), f.media_type) for f in sorted(FILES, key=lambda f: f.path)
    ]
    assert await store.load_files(claim.generation_id) == sorted(FILES, key=lambda f: f.path)
    assert await db.fetchval("SELECT phase FROM site_generation_phases") == "assemble"


async def test_a_lost_claim_finishes_nothing(store: Store, db: asyncpg.Connection) -> None:
    claim = await _started(store, 506)
    await _take_over(db, claim)
    with pytest.raises(ClaimLost, match="taken over"):
        await store.finish_generation(claim, {}, FILES, usage={}, total_usage={}, duration_ms=1, output_dir="/x")
    assert await db.fetchval("SELECT status FROM site_generations") == "running"
    assert await db.fetchval("SELECT count(*) FROM site_files") == 0
    assert await db.fetchval("SELECT count(*) FROM site_generation_phases") == 0


async def test_pooled_connections_carry_no_lock_or_transaction_to_the_next_use(store: Store) -> None:
    """Safe without asyncpg's reset query (store._keep_session): the worker's locks end with their transaction."""
    async with store.pool.acquire() as conn:
        first = conn.get_server_pid()
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(1)")
    async with store.pool.acquire() as conn:
        assert conn.get_server_pid() == first
        assert await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0
        assert not conn.is_in_transaction()
