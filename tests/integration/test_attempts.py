"""What counts as one of a generation's tries: hand-backs caused by PostgreSQL or Redis never do, and the
backoff of a hand-back follows the generation's own counted attempts, not arq's count of the job's runs.

Real PostgreSQL (its connection really terminated by the server, from a trigger), real Redis, the fake
provider over HTTP, an in-process worker."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from arq import ArqRedis

from tests.helpers import SAMPLE_BRIEF, WorkerFactory, remote, wait_for_result, wait_until, with_ai
from worker import client
from worker.ai.limits import keys
from worker.local.fake_server import FakeProviderServer
from worker.settings import Settings

pytestmark = pytest.mark.usefixtures("provider_key")
BLIPS = 4


@pytest.fixture
async def postgresql_blips(db: asyncpg.Connection) -> AsyncIterator[None]:
    """The first BLIPS phase commits lose their connection: the server terminates the backend that runs them
    (57P01, as when PostgreSQL restarts or a pooler drops the connection)."""
    await db.execute(
        f"""
        CREATE SEQUENCE IF NOT EXISTS test_blips;
        CREATE OR REPLACE FUNCTION test_blip() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('test_blips') <= {BLIPS} THEN
                PERFORM pg_terminate_backend(pg_backend_pid());
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER test_blip BEFORE INSERT ON site_generation_phases FOR EACH ROW EXECUTE FUNCTION test_blip();
        """
    )
    try:
        yield
    finally:
        await db.execute(
            "DROP TRIGGER test_blip ON site_generation_phases; DROP FUNCTION test_blip(); DROP SEQUENCE test_blips"
        )


@pytest.mark.usefixtures("postgresql_blips")
async def test_postgresql_hand_backs_do_not_count_towards_a_generations_tries(
    fake: FakeProviderServer, settings: Settings, start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    """Regression: issue 21 defect 7: PostgreSQL- and Redis-caused hand-backs were released without `spare`,
    so they counted as the generation's attempts: four PostgreSQL blips and one 503 failed a generation
    (worker.max_tries 2 here), against the README's "never the job's fault, whatever the try"."""
    # The plan call of each try, then the content call answered 503 (a retryable provider failure).
    fake.script(*["ok"] * (BLIPS + 1), "status:503")
    custom = with_ai(settings, {"remote": remote("openai", fake.url, max_retries=0)})
    custom = custom.model_copy(update={"worker": custom.worker.model_copy(update={"max_tries": 2})})
    await start_worker(custom)
    await client.enqueue_generation(redis, 71, SAMPLE_BRIEF)

    result = await wait_for_result(redis, 71, timeout=60)

    row = await db.fetchrow("SELECT status, attempt, spared_attempts, error FROM site_generations WHERE order_id = 71")
    assert result["status"] == "succeeded", row["error"]
    assert row["attempt"] == BLIPS + 2 and row["spared_attempts"] == BLIPS, dict(row)
    assert [r.fault for r in fake.requests].count("status:503") == 1


async def test_a_budget_hand_back_after_many_runs_retries_when_the_budget_frees(
    fake: FakeProviderServer, settings: Settings, start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    """Regression: issue 21 defect 7: the budget-wait backoff grew with arq's count of the job's runs, and
    reached 80-300 s after about 6 runs even when the budget freed in seconds. It follows the generation's
    own counted attempts (budget hand-backs are spared), so the retry comes when the budget frees."""
    custom = with_ai(settings, {"remote": remote("openai", fake.url, requests_per_minute=60)}, max_budget_wait_s=0)
    custom = custom.model_copy(
        update={"worker": custom.worker.model_copy(update={"retry_backoff_s": 2, "retry_backoff_max_s": 300})}
    )
    await client.enqueue_generation(redis, 72, SAMPLE_BRIEF)
    await redis.set(f"arq:retry:{client.job_id(72)}", 6)  # the 7th run of the job: its earlier ones waited too
    redis_now = await redis.time()
    booked_ms = redis_now[0] * 1000 + redis_now[1] / 1000 + 3000  # the budget frees in 3 s
    await redis.set(keys("remote")["requests"], f"{booked_ms:.3f}", px=10_000)
    await start_worker(custom)

    async def handed_back() -> bool:
        return bool(await db.fetchval("SELECT retry_at IS NOT NULL FROM site_generations WHERE order_id = 72"))

    await wait_until(handed_back, 30, interval=0.05, what="the budget hand-back")
    row = await db.fetchrow(
        "SELECT extract(epoch FROM retry_at - now()) AS retry_in_s, spared_attempts FROM site_generations"
        " WHERE order_id = 72"
    )
    assert row["spared_attempts"] == 1, "a wait for budget is not the generation's fault"
    assert float(row["retry_in_s"]) <= 10, (
        f"retried in {float(row['retry_in_s']):.0f}s although the budget frees in 3 s: the backoff followed arq's "
        "count of the job's runs"
    )


@pytest.fixture
async def commit_and_release_lost(db: asyncpg.Connection) -> AsyncIterator[None]:
    """The first plan commit and the hand-back after it (both of its tries: the full error, then the
    minimal one) lose their connection, as during a PostgreSQL restart: the generation stays `running` in
    this replica's name, with a live lease."""
    await db.execute(
        """
        CREATE SEQUENCE IF NOT EXISTS test_commit_blips;
        CREATE SEQUENCE IF NOT EXISTS test_release_blips;
        CREATE OR REPLACE FUNCTION test_commit_blip() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('test_commit_blips') <= 1 THEN PERFORM pg_terminate_backend(pg_backend_pid()); END IF;
            RETURN NEW;
        END $$;
        CREATE OR REPLACE FUNCTION test_release_blip() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('test_release_blips') <= 2 THEN PERFORM pg_terminate_backend(pg_backend_pid()); END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER test_commit_blip BEFORE INSERT ON site_generation_phases
            FOR EACH ROW EXECUTE FUNCTION test_commit_blip();
        CREATE TRIGGER test_release_blip BEFORE UPDATE ON site_generations
            FOR EACH ROW WHEN (OLD.status = 'running' AND NEW.status = 'queued') EXECUTE FUNCTION test_release_blip();
        """
    )
    try:
        yield
    finally:
        await db.execute(
            """
            DROP TRIGGER test_commit_blip ON site_generation_phases; DROP FUNCTION test_commit_blip();
            DROP TRIGGER test_release_blip ON site_generations; DROP FUNCTION test_release_blip();
            DROP SEQUENCE test_commit_blips; DROP SEQUENCE test_release_blips;
            """
        )


@pytest.mark.usefixtures("commit_and_release_lost")
async def test_a_replica_takes_back_its_own_dead_claim_at_once(
    start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection, settings: Settings
) -> None:
    """Regression: issue 21 defect 10: after a PostgreSQL restart mid-generation the job was retried while the
    same replica's earlier claim was still live; the replica wrote "waiting: order N is being generated by
    replica '<itself>'" and resumed only when the lease ran out. A replica that can prove it holds no live
    run for a claim in its own name (the claim's token is one it issued and no run of it holds) takes it
    over at once."""
    await start_worker()
    await client.enqueue_generation(redis, 73, SAMPLE_BRIEF)

    result = await wait_for_result(redis, 73, timeout=60)

    assert result["status"] == "succeeded"
    rows = await db.fetch("SELECT message, details FROM site_generation_logs WHERE order_id = 73 ORDER BY id")
    waits = [r["message"] for r in rows if (r["details"] or {}).get("event") == "job.waiting"]
    assert not [w for w in waits if settings.worker.replica in w], f"the replica waited for itself: {waits}"
    assert await db.fetchval("SELECT attempt FROM site_generations WHERE order_id = 73") == 2
