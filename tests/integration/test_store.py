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
from worker.errors import AttemptsExhausted, BriefInvalid, ClaimLost, OrderBusy, OrderNotFound
from worker.models import OutputFile
from worker.settings import Settings
from worker.store import QUERIES, Claim, Store, create_pool

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
    assert await store.request_cancel(502, "test") == {
        "id": claim.generation_id,
        "status": "running",
        "kind": "generation",
        "job_id": "job-502",  # the arq job to abort, to interrupt its model call in flight
    }
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


# ------------------------------------------------------------------------------- issue 14: the claim races


async def _lease_lapses(db: asyncpg.Connection, generation_id: int) -> None:
    """The controllable clock: the generation's lease is in the past (its replica is slow or dead)."""
    await db.execute(
        "UPDATE site_generations SET lease_expires_at = now() - interval '1 second' WHERE id = $1", generation_id
    )


async def _until_waiting_for_a_lock(db: asyncpg.Connection, claim: asyncio.Task[Claim]) -> None:
    """Until the claim's backend waits for a lock (pg_stat_activity), or the claim is over; no fixed sleep."""
    while not claim.done():
        waiting = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%sitegen_claim%'"
        )
        if waiting:
            return
        await asyncio.wait([claim], timeout=0.005)


@pytest.mark.parametrize("write", ["finish_generation", "fail_generation", "cancel_generation"])
async def test_a_claim_waiting_for_a_finishing_replica_never_reopens_its_generation(
    settings: Settings, db: asyncpg.Connection, write: str
) -> None:
    """Regression: issue 14 defect 2. Replica A's lease lapsed while it commits the generation's end;
    replica B's claim waits for A's row lock, then must see the finished generation, not overwrite it."""
    pool = await create_pool(settings.database, max_size=4, name="race")
    a, b = Store(pool, replica_id="a", lease_s=30), Store(pool, replica_id="b", lease_s=30)
    try:
        claim = await _started(a, 520)
        for phase in ("plan", "content", "code"):
            await a.commit_phase(claim, phase, {"phase": phase}, usage={}, total_usage={}, duration_ms=1)
        await _lease_lapses(db, claim.generation_id)
        args: dict[str, tuple[object, ...]] = {
            "finish_generation": (
                {}, "/x", {"pages": ["index.html"]}, {}, 1,
                [f.path for f in FILES], [f.content for f in FILES], [f.sha256 for f in FILES],
                [len(f.content) for f in FILES], [f.media_type for f in FILES],
            ),
            "fail_generation": ({"type": "Boom", "message": "failed"},),
            "cancel_generation": ("cancelled on request", "assemble"),
        }  # fmt: skip
        async with pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute(QUERIES[write], claim.generation_id, claim.token, *args[write])
                taking_over = asyncio.create_task(
                    b.claim_generation(520, SAMPLE_BRIEF, regenerate=False, job_id="job-520")
                )
                await _until_waiting_for_a_lock(db, taking_over)
            outcome = await taking_over
    finally:
        await pool.close()
    ended = {"finish_generation": "succeeded", "fail_generation": "failed", "cancel_generation": "cancelled"}[write]
    row = await db.fetchrow(
        "SELECT status, attempt, claim_token FROM site_generations WHERE id = $1", claim.generation_id
    )
    assert dict(row) == {"status": ended, "attempt": 1, "claim_token": None}, "a terminal generation never changes"
    if ended == "succeeded":
        assert (outcome.kind, outcome.generation_id) == ("done", claim.generation_id)
    else:  # a failed or cancelled generation's next job is a new request
        assert outcome.kind == "started" and outcome.generation_id != claim.generation_id


async def test_a_claim_of_a_generation_with_every_phase_committed_finishes_it(
    store: Store, db: asyncpg.Connection
) -> None:
    """Regression: issue 14 defect 2. A generation an older claim reopened after its last commit is done."""
    claim = await _started(store, 521)
    await store.finish_generation(claim, {"pages": ["index.html"]}, FILES, usage={}, total_usage={}, duration_ms=1,
                                  output_dir="/x")  # fmt: skip
    await db.execute(  # what the old claim left: running again, attempt 2, its replica gone
        "UPDATE site_generations SET status = 'running', attempt = 2, claim_token = gen_random_uuid(),"
        " lease_expires_at = now() - interval '1 second', finished_at = NULL"
    )
    done = await store.claim_generation(521, None, regenerate=False, job_id="job-521")
    assert (done.kind, done.generation_id, done.token) == ("done", claim.generation_id, None)
    row = await db.fetchrow("SELECT status, claim_token, finished_at FROM site_generations")
    assert row["status"] == "succeeded" and row["claim_token"] is None and row["finished_at"] is not None


async def test_past_max_attempts_the_claim_fails_the_generation_with_its_last_error(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """Regression: issue 14 defect 10. Attempts count every claim, by any replica; past the limit the
    claim fails the generation in the same transaction, naming the attempts and the last error."""
    pool = await create_pool(settings.database, max_size=2, name="attempts")
    stores = [Store(pool, replica_id=f"r{i}", lease_s=30) for i in range(3)]
    try:

        async def claim(i: int) -> Claim:
            return await stores[i % 3].claim_generation(
                522, SAMPLE_BRIEF, regenerate=False, job_id="job-522", max_attempts=3
            )

        first = await claim(0)
        await _lease_lapses(db, first.generation_id)  # r0 was killed (out of memory)
        second = await claim(1)
        await stores[1].release_generation(second, {"type": "AIUnavailable", "message": "HTTP 503"})
        third = await claim(2)
        assert (second.attempt, third.attempt) == (2, 3)
        await _lease_lapses(db, first.generation_id)  # r2 was killed too
        with pytest.raises(AttemptsExhausted) as exhausted:
            await claim(3)
        message = str(exhausted.value)
        assert "gave up after 3 attempts (setting worker.max_attempts = 3)" in message
        assert "last error: AttemptLost: attempt 3 on replica r2 stopped at phase plan" in message
        row = await db.fetchrow("SELECT status, attempt, error, claim_token FROM site_generations")
        assert (row["status"], row["attempt"], row["claim_token"]) == ("failed", 3, None)
        assert row["error"]["type"] == "AttemptsExhausted" and row["error"]["message"] in message
        assert row["error"]["details"]["attempts"] == 3

        # Handed back with an error, the error is the last one named.
        await db.execute("TRUNCATE site_generations CASCADE")
        fourth = await claim(0)
        await db.execute("UPDATE site_generations SET attempt = 3")
        await stores[0].release_generation(fourth, {"type": "AIRateLimited", "message": "HTTP 429: rate limited"})
        with pytest.raises(AttemptsExhausted, match="last error: AIRateLimited: HTTP 429: rate limited"):
            await claim(1)
    finally:
        await pool.close()


async def test_a_generation_waiting_for_its_deferred_retry_is_not_stale(store: Store, db: asyncpg.Connection) -> None:
    """Regression: issue 14 defect 13. A handed-back generation is lost only a lease after its retry is due."""
    claim = await _started(store, 523)
    await store.release_generation(claim, {"type": "AIRateLimited", "message": "429"}, retry_in_s=3600)
    await db.execute(  # the clock: the claim and the hand-back were an hour ago; the retry is due in an hour
        "UPDATE site_generations SET created_at = now() - interval '1 hour', heartbeat_at = now() - interval '1 hour'"
    )
    assert [g async for g in store.stale_generations()] == []
    await db.execute("UPDATE site_generations SET retry_at = now() - interval '29 seconds'")
    assert [g async for g in store.stale_generations()] == [], "within a lease of its due time"
    await db.execute("UPDATE site_generations SET retry_at = now() - interval '31 seconds'")
    assert [g["id"] async for g in store.stale_generations()] == [claim.generation_id]


async def test_hand_backs_for_budget_or_shutdown_do_not_count_towards_max_attempts(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """Issue 15 part 2 with issue 14 defect 10: a generation that waits for a provider's budget, or is
    handed back by a draining replica, is not at fault; only attempts that ended otherwise count."""
    pool = await create_pool(settings.database, max_size=2, name="spared")
    store = Store(pool, replica_id="r0", lease_s=30)
    try:

        async def claim() -> Claim:
            return await store.claim_generation(523, SAMPLE_BRIEF, regenerate=False, job_id="job-523", max_attempts=2)

        current = await claim()
        for _ in range(4):  # four hand-backs for budget or a shutdown: past max_attempts, and still claimed
            await store.release_generation(current, {"type": "BudgetWaitExceeded", "message": "no budget"}, spare=True)
            current = await claim()
        assert current.kind == "resumed" and current.attempt == 5
        await store.release_generation(current, {"type": "AIUnavailable", "message": "HTTP 503"})
        current = await claim()  # the second counted attempt
        await store.release_generation(current, {"type": "AIUnavailable", "message": "HTTP 503"})
        with pytest.raises(AttemptsExhausted, match="gave up after 2 attempts"):
            await claim()
    finally:
        await pool.close()


async def test_a_regenerate_claim_that_loses_every_race_answers_busy(store: Store, db: asyncpg.Connection) -> None:
    """Regression: issue 21 defect 9: a claim with regenerate=true whose five passes were each overtaken by
    the generation's holder (its superseding UPDATE matched nothing every time) fell through to inserting a
    new generation while one was active, and failed on the unique index. It answers busy instead.

    The holder's overtaking is played by a trigger that makes every superseding UPDATE match nothing."""
    running = await _started(store, 81)
    await db.execute(
        """
        CREATE FUNCTION test_holder_wins() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RETURN NULL; END $$;
        CREATE TRIGGER test_holder_wins BEFORE UPDATE ON site_generations FOR EACH ROW
            WHEN (NEW.status = 'cancelled' AND NEW.error ->> 'type' = 'Superseded')
            EXECUTE FUNCTION test_holder_wins();
        """
    )
    try:
        with pytest.raises(OrderBusy) as busy:
            await store.claim_generation(81, SAMPLE_BRIEF, regenerate=True, job_id="job-81-again")
    finally:
        await db.execute("DROP TRIGGER test_holder_wins ON site_generations; DROP FUNCTION test_holder_wins()")
    assert busy.value.generation_id == running.generation_id and busy.value.retry_after_s == 1
    rows = await db.fetch("SELECT id, status FROM site_generations WHERE order_id = 81")
    assert [(r["id"], r["status"]) for r in rows] == [(running.generation_id, "running")]
    # Once the holder lets go of the row, the same job supersedes it.
    fresh = await store.claim_generation(81, SAMPLE_BRIEF, regenerate=True, job_id="job-81-again")
    assert fresh.kind == "started" and fresh.generation_id != running.generation_id
