"""The store's claim and commits: each is one statement, the commits fenced by the claim, all or nothing.

The claim (the `sitegen_claim` function) decides under the order's lock whether to start, resume
or skip a generation. A phase commit and the final commit write nothing for a replica whose claim
was taken over, and a phase commit reports a cancel request in the same step, so the runner needs
no query of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.helpers import SAMPLE_BRIEF
from worker.errors import BriefInvalid, ClaimLost, OrderBusy, OrderNotFound
from worker.models import OutputFile
from worker.settings import Settings
from worker.store import Claim, Store, create_pool

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


# ------------------------------------------------------------------------------------------- the claim


async def test_a_claim_without_a_brief_needs_a_stored_one(store: Store, db: asyncpg.Connection) -> None:
    with pytest.raises(OrderNotFound, match="order 510 does not exist and the job has no brief"):
        await store.claim_generation(510, None, regenerate=False, job_id="j")
    assert await db.fetchval("SELECT count(*) FROM site_orders") == 0, "an unknown order is not created"

    await db.execute("INSERT INTO site_orders (id) VALUES (511)")
    with pytest.raises(BriefInvalid, match="order 511 has no stored brief"):
        await store.claim_generation(511, None, regenerate=False, job_id="j")

    await db.execute("UPDATE site_orders SET brief = $1::jsonb WHERE id = 511", '{"business_name": "Stored"}')
    claim = await store.claim_generation(511, None, regenerate=False, job_id="j")
    assert claim.kind == "started" and claim.brief == {"business_name": "Stored"}
    assert await db.fetchval("SELECT brief FROM site_generations") == {"business_name": "Stored"}


async def test_a_claim_of_an_order_held_by_a_live_replica_is_busy(store: Store) -> None:
    claim = await _started(store, 512)
    with pytest.raises(OrderBusy, match=f"replica 'r1' \\(generation {claim.generation_id}\\)") as busy:
        await store.claim_generation(512, SAMPLE_BRIEF, regenerate=False, job_id="j2")
    assert 29 < busy.value.retry_after_s <= 30, "retry when the holder's lease ends"


async def test_a_resumed_claim_carries_the_committed_phases_and_its_own_brief(
    store: Store, db: asyncpg.Connection
) -> None:
    claim = await _started(store, 513)
    await store.commit_phase(claim, "plan", {"pages": 1}, usage={"tokens": 5}, total_usage={}, duration_ms=1)
    await db.execute("UPDATE site_generations SET lease_expires_at = now() - interval '1 s'")  # its replica died
    changed = {**SAMPLE_BRIEF, "business_name": "Renamed"}
    resumed = await store.claim_generation(513, changed, regenerate=False, job_id="j2")
    assert (resumed.kind, resumed.generation_id, resumed.attempt) == ("resumed", claim.generation_id, 2)
    assert resumed.checkpoints == {"plan": {"pages": 1}} and resumed.usage == {"plan": {"tokens": 5}}
    assert resumed.brief == SAMPLE_BRIEF and resumed.token not in (None, claim.token)
    assert resumed.warnings and "brief differs" in resumed.warnings[0]
    row = await db.fetchrow("SELECT status, job_id, claim_token FROM site_generations")
    assert dict(row) == {"status": "running", "job_id": "j2", "claim_token": resumed.token}
    assert await db.fetchval("SELECT brief FROM site_orders") == changed, "the order keeps the newest brief"
    with pytest.raises(OrderBusy):  # held again, by the resumed claim
        await store.claim_generation(513, None, regenerate=False, job_id="j3")


async def test_a_claim_of_a_finished_order_returns_it_and_regenerate_starts_anew(
    store: Store, db: asyncpg.Connection
) -> None:
    claim = await _started(store, 514)
    await store.finish_generation(
        claim, {"pages": ["index.html"]}, FILES, usage={}, total_usage={}, duration_ms=1, output_dir="/sites/514"
    )
    done = await store.claim_generation(514, SAMPLE_BRIEF, regenerate=False, job_id="j2")
    assert (done.kind, done.generation_id, done.token, done.output_dir) == (
        "done",
        claim.generation_id,
        None,
        "/sites/514",
    )
    assert done.checkpoints == {"assemble": {"pages": ["index.html"]}}

    fresh = await store.claim_generation(514, SAMPLE_BRIEF, regenerate=True, job_id="j3")
    assert fresh.kind == "started" and fresh.generation_id != claim.generation_id and fresh.attempt == 1


async def test_regenerate_supersedes_an_active_generation(store: Store, db: asyncpg.Connection) -> None:
    claim = await _started(store, 515)
    fresh = await store.claim_generation(515, SAMPLE_BRIEF, regenerate=True, job_id="j2")
    assert fresh.kind == "started" and fresh.generation_id != claim.generation_id
    old = await db.fetchrow(
        "SELECT status, claim_token, error FROM site_generations WHERE id = $1", claim.generation_id
    )
    assert (old["status"], old["claim_token"]) == ("cancelled", None)
    assert old["error"] == {"type": "Superseded", "message": "superseded by a job with regenerate=true"}


async def test_concurrent_claims_of_one_order_start_one_generation(settings: Settings, db: asyncpg.Connection) -> None:
    """The order's lock serializes claims, and what a claim reads after the lock includes the claim before it."""
    pools = [await create_pool(settings.database, max_size=4, name=f"race-{i}") for i in range(2)]
    stores = [Store(pool, replica_id=f"r{i}", lease_s=30) for i, pool in enumerate(pools)]
    try:
        outcomes = await asyncio.gather(
            *(stores[i % 2].claim_generation(516, SAMPLE_BRIEF, regenerate=False, job_id=f"j{i}") for i in range(8)),
            return_exceptions=True,
        )
    finally:
        for pool in pools:
            await pool.close()
    started = [o for o in outcomes if isinstance(o, Claim)]
    assert len(started) == 1 and started[0].kind == "started"
    assert all(isinstance(o, OrderBusy) for o in outcomes if o is not started[0]), outcomes
    assert await db.fetchval("SELECT count(*) FROM site_generations") == 1
