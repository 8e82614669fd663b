"""Failures inside a generation: stored with everything needed to debug them; progress never lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, cast

import asyncpg
import pytest
from arq import ArqRedis
from arq.jobs import SerializationError

from tests.helpers import SAMPLE_BRIEF, WorkerFactory, order_job, progress_messages, remote, wait_for_result, with_ai
from worker import client
from worker.local.fake_server import FakeProviderServer
from worker.local.services import LocalServices
from worker.progress import ProgressLog
from worker.settings import Settings
from worker.store import create_pool


async def _fail_inserts(db: asyncpg.Connection, table: str, *, times: int, when: str = "true") -> None:
    """A real PostgreSQL failure: the next `times` inserts into `table` matching `when` raise."""
    await db.execute(f"""
        DROP SEQUENCE IF EXISTS injected_failures;
        CREATE SEQUENCE injected_failures;  -- survives the rollback of the failing transaction
        CREATE OR REPLACE FUNCTION inject_failure() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF ({when}) AND nextval('injected_failures') <= {times} THEN
            RAISE EXCEPTION 'injected failure writing {table}';
          END IF;
          RETURN NEW;
        END $$;
        CREATE TRIGGER inject_failure BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION inject_failure();
    """)


async def _remove_failures(db: asyncpg.Connection, table: str) -> None:
    await db.execute(f"DROP TRIGGER inject_failure ON {table}; DROP FUNCTION inject_failure();")


async def test_retryable_failure_on_last_try_fails_generation_with_full_error(
    start_worker: WorkerFactory, settings: Settings, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    await _fail_inserts(db, "site_generation_phases", times=100, when="NEW.phase = 'content'")
    try:
        await start_worker(settings.model_copy(update={"worker": settings.worker.model_copy(update={"max_tries": 2})}))
        await client.enqueue_generation(redis, 50, SAMPLE_BRIEF)
        with pytest.raises(SerializationError):
            await order_job(redis, 50).result(timeout=30, poll_delay=0.05)
    finally:
        await _remove_failures(db, "site_generation_phases")
    info = await order_job(redis, 50).result_info()
    assert info is not None and info.job_try == 2 and not info.success
    generation = await db.fetchrow("SELECT status, attempt, error, current_phase FROM site_generations")
    assert generation["status"] == "failed" and generation["attempt"] == 2
    error = generation["error"]
    assert error["type"] == "RaiseError" and error["phase"] == "content"
    assert "injected failure writing site_generation_phases" in error["message"]
    assert "Traceback" in error["traceback"] and "commit_phase" in error["traceback"]
    assert error["sqlstate"] == "P0001"
    levels = [r["level"] for r in await db.fetch("SELECT level FROM site_generation_logs ORDER BY id")]
    assert levels.count("warning") == 1 and levels[-1] == "error", "one retry announced, then the failure"
    assert generation["current_phase"] == "content"
    assert await db.fetchval("SELECT array_agg(phase) FROM site_generation_phases") == ["plan"]


async def test_failing_progress_writes_never_fail_the_generation_and_are_written_later(
    start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    await _fail_inserts(db, "site_generation_logs", times=3)
    worker = await start_worker()
    try:
        await client.enqueue_generation(redis, 51, SAMPLE_BRIEF)
        result = await wait_for_result(redis, 51)
    finally:
        await _remove_failures(db, "site_generation_logs")
    assert result["status"] == "succeeded"
    progress = worker.ctx["runtime"].progress
    assert progress.failed_writes >= 1 and progress.dropped == 0
    assert await progress.flush()
    messages = [r["message"] for r in await db.fetch("SELECT message FROM site_generation_logs ORDER BY id")]
    # Every row arrives, in order, even those whose first write failed.
    assert messages[0] == "generation started (attempt 1)" and messages[-1] == "generation succeeded"
    assert len(messages) == 10


async def test_a_stalled_progress_log_holds_no_generation_up_and_loses_no_row(
    start_worker: WorkerFactory,
    settings: Settings,
    redis: ArqRedis,
    db: asyncpg.Connection,
    services: LocalServices,
    log_lines: list[str],
) -> None:
    """PostgreSQL takes no progress row at all (the log table is locked): jobs still finish, the
    first one after waiting `database.progress_wait_s` for its rows, the others without waiting;
    every row is kept and written, in order, once the table is free again."""
    waits = settings.model_copy(update={"database": settings.database.model_copy(update={"progress_wait_s": 0.2})})
    blocker = await asyncpg.connect(services.database_url)
    lock = blocker.transaction()
    await lock.start()
    await blocker.execute("LOCK TABLE site_generation_logs IN EXCLUSIVE MODE")  # reads still work
    try:
        worker = await start_worker(waits)
        for order_id in (52, 53, 54):
            await client.enqueue_generation(redis, order_id, SAMPLE_BRIEF)
            assert (await wait_for_result(redis, order_id, timeout=30))["status"] == "succeeded"
        progress = worker.ctx["runtime"].progress
        assert progress.behind, "the first job gave up waiting; the log is marked behind"
        gave_up = [line for line in log_lines if line.startswith("progress log is behind PostgreSQL")]
        assert len(gave_up) == 1, "only the first job waited; the next two did not wait at all"
        assert await db.fetchval("SELECT count(*) FROM site_generation_logs") == 0
        assert await db.fetchval("SELECT count(*) FROM site_generations WHERE status = 'succeeded'") == 3
    finally:
        await lock.rollback()
        await blocker.close()
    assert await progress.flush()
    assert not progress.behind and progress.dropped == 0
    rows = await db.fetch("SELECT order_id, message FROM site_generation_logs ORDER BY id")
    assert len(rows) == 30, "ten rows per generation, none lost"
    for order_id in (52, 53, 54):
        messages = [r["message"] for r in rows if r["order_id"] == order_id]
        assert messages[0] == "generation started (attempt 1)" and messages[-1] == "generation succeeded"


class _BreaksOnce:
    """The real pool, but the first connection it hands out is one a server restart broke mid-operation."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.broken = False

    def acquire(self) -> Any:
        if not self.broken:
            self.broken = True
            raise asyncpg.exceptions.InternalClientError(
                "cannot switch to state 12; another operation (2) is in progress"
            )
        return self.pool.acquire()


async def test_a_progress_write_failing_in_an_unforeseen_way_keeps_its_rows_and_its_writer(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """Seen with a PostgreSQL restart (tests/faults): asyncpg raised InternalClientError, which is none of
    its other error classes; the writer task died with the batch, and every later row stayed unwritten."""
    pool = await create_pool(settings.database, max_size=1, name="test-progress")
    progress = ProgressLog(cast(asyncpg.Pool, _BreaksOnce(pool)), replica_id="r1")
    writer = asyncio.create_task(progress.run_writer(retry_s=0.01))
    try:
        await progress.log(61, "first")
        await progress.log(61, "second")
        await progress.settle(10)
        assert not writer.done(), "the writer lives on"
        await progress.log(61, "third")
        await progress.settle(10)
    finally:
        writer.cancel()
        await pool.close()
    assert progress.failed_writes == 1 and progress.written == 3 and not progress.behind
    messages = [r["message"] for r in await db.fetch("SELECT message FROM site_generation_logs ORDER BY id")]
    assert messages == ["first", "second", "third"]


async def test_a_constraint_postgresql_enforces_fails_the_generation_once_naming_it(
    start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    """Regression: issue 14 defect 8. Every PostgresError counted as transient: a row PostgreSQL refuses
    for good (here a check constraint) was retried on every try, and the error did not say why."""
    await db.execute(
        "ALTER TABLE site_generation_phases ADD CONSTRAINT no_content CHECK (phase <> 'content') NOT VALID"
    )
    try:
        await start_worker()
        await client.enqueue_generation(redis, 55, SAMPLE_BRIEF)
        with pytest.raises(SerializationError):
            await order_job(redis, 55).result(timeout=30, poll_delay=0.05)
    finally:
        await db.execute("ALTER TABLE site_generation_phases DROP CONSTRAINT no_content")
    info = await order_job(redis, 55).result_info()
    assert info is not None and info.job_try == 1, "a deterministic failure is not retried"
    generation = await db.fetchrow("SELECT status, attempt, error FROM site_generations WHERE order_id = 55")
    assert generation["status"] == "failed" and generation["attempt"] == 1
    error = generation["error"]
    assert error["type"] == "CheckViolationError" and error["retryable"] is False and error["phase"] == "content"
    assert error["sqlstate"] == "23514" and error["constraint_name"] == "no_content"
    assert "integrity constraint" in error["message"] and "no_content" in error["message"]


async def test_a_progress_row_postgresql_refuses_is_replaced_and_blocks_no_row_behind_it(
    settings: Settings, db: asyncpg.Connection, log_lines: list[str]
) -> None:
    """Regression: issue 14 defect 3. A batch PostgreSQL refused went back to the front of the buffer:
    one refused row blocked every later row of the replica, for ever."""
    await db.execute("ALTER TABLE site_generation_logs ADD CONSTRAINT no_poison CHECK (message <> 'poison') NOT VALID")
    pool = await create_pool(settings.database, max_size=1, name="test-progress")
    progress = ProgressLog(pool, replica_id="r1")
    try:
        await progress.log(71, "first")
        await progress.log(71, "poison")  # refused by the constraint: replaced by a placeholder
        await progress.log(2**63, "order id out of bigint range")  # refused, and its placeholder too: dropped
        await progress.log(71, "nul \x00 in the text")  # stored, sanitised
        await progress.log(71, "last", **{"k\x00": "v\x00"})
        assert await progress.flush()
    finally:
        await pool.close()
        await db.execute("ALTER TABLE site_generation_logs DROP CONSTRAINT no_poison")
    rows = await db.fetch("SELECT message, details FROM site_generation_logs ORDER BY id")
    messages = [r["message"] for r in rows]
    assert messages[0] == "first" and messages[2:] == ["nul \ufffd in the text", "last"]
    assert messages[1].startswith("(a progress row PostgreSQL refused: CheckViolationError:")
    assert rows[1]["details"]["refused"]["sqlstate"] == "23514"
    assert rows[3]["details"] == {"k\ufffd": "v\ufffd"}
    assert progress.refused == 2 and progress.dropped == 1 and progress.written == 4 and not progress.pending
    assert sum("progress row refused by PostgreSQL" in line for line in log_lines) == 3


async def test_a_failure_postgresql_refuses_in_full_is_stored_minimal_and_the_generation_ends(
    start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    """Regression: issue 14 defect 3. `fail_generation` raised when PostgreSQL refused the error, the
    failure was swallowed, and the generation stayed `running`, to be re-enqueued for ever."""
    await db.execute(
        "ALTER TABLE site_generations ADD CONSTRAINT no_tracebacks CHECK (NOT coalesce(error ? 'traceback', false))"
        " NOT VALID;"
        "ALTER TABLE site_generation_phases ADD CONSTRAINT no_content CHECK (phase <> 'content') NOT VALID"
    )
    try:
        await start_worker()
        await client.enqueue_generation(redis, 56, SAMPLE_BRIEF)
        with pytest.raises(SerializationError):
            await order_job(redis, 56).result(timeout=30, poll_delay=0.05)
    finally:
        await db.execute(
            "ALTER TABLE site_generations DROP CONSTRAINT no_tracebacks;"
            "ALTER TABLE site_generation_phases DROP CONSTRAINT no_content"
        )
    generation = await db.fetchrow("SELECT status, error FROM site_generations WHERE order_id = 56")
    assert generation["status"] == "failed", "the generation ends, with the error PostgreSQL takes"
    error = generation["error"]
    assert error["type"] == "CheckViolationError" and "no_content" in error["message"] and error["phase"] == "content"
    assert error["stored"].startswith("minimal: PostgreSQL refused the full error (CheckViolationError")
    assert "no_tracebacks" in error["stored"]


class _StallsOnce:
    """The real pool, but the first acquire waits until it is cancelled: a writer caught mid-batch."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.entered = asyncio.Event()
        self.stalled = False

    def acquire(self) -> Any:
        if self.stalled:
            return self.pool.acquire()
        self.stalled = True
        return self._stall()

    @contextlib.asynccontextmanager
    async def _stall(self) -> AsyncIterator[None]:
        self.entered.set()
        await asyncio.Event().wait()
        yield

    async def close(self) -> None:
        await self.pool.close()


async def test_shutdown_writes_the_progress_batch_the_writer_was_sending(
    start_worker: WorkerFactory, db: asyncpg.Connection
) -> None:
    """Regression: issue 14 defect 9. `shutdown` cancelled the writer in the middle of a batch, and the
    last flush missed the rows already taken off the buffer: they were lost, silently."""
    from worker.main import shutdown

    worker = await start_worker()
    while "progress_writer" not in worker.ctx:  # noqa: ASYNC110 - arq's on_startup sets no event to await
        await asyncio.sleep(0.01)
    progress = worker.ctx["runtime"].progress
    stalls = _StallsOnce(progress.pool)
    progress.pool = stalls
    for n in range(3):
        await progress.log(57, f"row {n}")
    await stalls.entered.wait()  # the writer took the rows off the buffer and waits for a connection
    assert not progress.pending
    writer = worker.ctx["progress_writer"]

    async with asyncio.timeout(30):
        await shutdown(worker.ctx)

    assert writer.done()
    messages = [r["message"] for r in await db.fetch("SELECT message FROM site_generation_logs ORDER BY id")]
    assert messages == ["row 0", "row 1", "row 2"], "written by the last flush, in order"
    assert progress.dropped == 0 and not progress.pending


async def _generation_left_running(
    db: asyncpg.Connection, order_id: int, *, attempt: int, phases: tuple[str, ...]
) -> int:
    """An active generation whose replica is gone (its lease in the past), with these phases committed."""
    await db.execute("INSERT INTO site_orders (id, brief) VALUES ($1, $2::jsonb)", order_id, json.dumps(SAMPLE_BRIEF))
    generation_id: int = await db.fetchval(
        "INSERT INTO site_generations (order_id, status, current_phase, attempt, brief, claim_token, replica_id,"
        " heartbeat_at, lease_expires_at, started_at)"
        " VALUES ($1, 'running', 'content', $2, $3::jsonb, gen_random_uuid(), 'gone', now() - interval '1 minute',"
        " now() - interval '1 second', now() - interval '1 minute') RETURNING id",
        order_id,
        attempt,
        json.dumps(SAMPLE_BRIEF),
    )
    for phase in phases:
        await db.execute(
            "INSERT INTO site_generation_phases (generation_id, phase, output) VALUES ($1, $2, '{\"pages\": []}')",
            generation_id,
            phase,
        )
    return generation_id


async def test_a_generation_with_every_phase_committed_ends_succeeded_and_never_runs_again(
    start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    """Regression: issue 14 defect 2. What a reopening claim left behind (running, every phase committed) is
    finished: the job returns it, the generation ends succeeded, and no phase runs again (never an IndexError)."""
    await start_worker()
    await client.enqueue_generation(redis, 53, SAMPLE_BRIEF)
    first = await wait_for_result(redis, 53)
    await db.execute(  # reopened by a claim that raced the final commit; that replica then died
        "UPDATE site_generations SET status = 'running', attempt = 2, claim_token = gen_random_uuid(),"
        " lease_expires_at = now() - interval '1 second', finished_at = NULL"
    )
    await client.enqueue_generation(redis, 53)
    result = await wait_for_result(redis, 53)
    assert (result["status"], result["generation_id"]) == ("succeeded", first["generation_id"])
    row = await db.fetchrow("SELECT status, claim_token, attempt FROM site_generations")
    assert (row["status"], row["claim_token"], row["attempt"]) == ("succeeded", None, 2)
    messages = await progress_messages(db, 53)
    assert messages.count("phase plan started") == 1 and messages.count("generation succeeded") == 1


async def test_a_generation_past_max_attempts_fails_and_its_job_is_not_retried(
    start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection, settings: Settings
) -> None:
    """Regression: issue 14 defect 10. A generation whose replicas kept dying (10 attempts, its lease lapsed
    again) is failed by the next claim, naming the attempts and the last error; the job ends, not retried."""
    await _generation_left_running(db, 54, attempt=10, phases=("plan",))
    await start_worker()
    await client.enqueue_generation(redis, 54)
    with pytest.raises(SerializationError):
        await order_job(redis, 54).result(timeout=30, poll_delay=0.05)
    info = await order_job(redis, 54).result_info()
    assert info is not None and info.job_try == 1 and not info.success
    assert info.result["error"] == "AttemptsExhausted"
    row = await db.fetchrow("SELECT status, attempt, error FROM site_generations")
    assert (row["status"], row["attempt"]) == ("failed", 10), "the claim failed it instead of trying again"
    message = row["error"]["message"]
    assert message.startswith("gave up after 10 attempts (setting worker.max_attempts = 10); last error: AttemptLost")
    assert "replica gone stopped at phase content" in message
    assert await db.fetchval("SELECT count(*) FROM site_generation_phases") == 1, "no phase ran"
    assert f"generation failed: generation 1 of order 54 {message}" in await progress_messages(db, 54)


async def test_runs_of_a_job_that_did_no_work_do_not_use_up_its_tries(
    fake: FakeProviderServer,
    settings: Settings,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
    provider_key: None,
) -> None:
    """Found by the chaos soak (issue 14): a job that ran twice only to find its order held by another
    replica's live claim (after a Redis outage let its in-progress key expire) was on its last of 3
    tries when its first model call met a 429, and the generation failed. The generation's own
    attempts decide its last try, not arq's count of the job's runs."""
    fake.script("status:503")
    custom = with_ai(settings, {"remote": remote("openai", fake.url, max_retries=0)})
    custom = custom.model_copy(update={"worker": custom.worker.model_copy(update={"max_tries": 3})})
    await client.enqueue_generation(redis, 57, SAMPLE_BRIEF)
    await redis.set(f"arq:retry:{client.job_id(57)}", 2)  # two runs that waited behind a busy order
    await start_worker(custom)

    result = await wait_for_result(redis, 57)

    assert result["status"] == "succeeded"
    assert await db.fetchval("SELECT attempt FROM site_generations WHERE order_id = 57") == 2
