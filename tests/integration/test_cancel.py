"""`sitegen cancel`: a running generation ends `cancelled` at a safe point, its committed phases kept."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest
from arq import ArqRedis
from arq.jobs import SerializationError

from tests.helpers import SAMPLE_BRIEF, WorkerFactory, cli_env, order_job, remote, run_sitegen, with_ai
from worker import client
from worker.ai import limits
from worker.local.fake_server import FakeProviderServer
from worker.local.services import LocalServices
from worker.settings import Settings

pytestmark = pytest.mark.usefixtures("provider_key")
ROOT = Path(__file__).resolve().parents[2]


async def test_cancel_ends_a_running_generation_cancelled_with_committed_phases_kept(
    fake: FakeProviderServer,
    settings: Settings,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
    services: LocalServices,
) -> None:
    fake.script("ok", "ok", "hang")  # the coding call hangs until the generation is cancelled
    await start_worker(with_ai(settings, {"remote": remote("openai", fake.url, read_timeout_s=30)}))
    await client.enqueue_generation(redis, 80, SAMPLE_BRIEF)
    await asyncio.to_thread(fake.wait_for_requests, 3)

    code, out = await run_sitegen(cli_env(services), "cancel", "80")
    assert code == 0, out
    assert "cancel requested" in out

    with pytest.raises(SerializationError):  # the job ends aborted
        await order_job(redis, 80).result(timeout=30, poll_delay=0.05)
    assert await db.fetchval("SELECT status FROM site_generations WHERE order_id = 80") == "cancelled"
    generation = await db.fetchrow("SELECT id, error, finished_at FROM site_generations WHERE order_id = 80")
    assert generation["error"]["type"] == "Cancelled" and generation["error"]["phase"] == "code"
    phases = await db.fetch("SELECT phase FROM site_generation_phases WHERE generation_id = $1", generation["id"])
    assert sorted(p["phase"] for p in phases) == ["content", "plan"], "committed phases are kept"
    messages = [
        r["message"] for r in await db.fetch("SELECT message FROM site_generation_logs WHERE order_id = 80 ORDER BY id")
    ]
    assert "generation cancelled at phase code; committed phases kept: plan, content" in messages
    assert len(fake.requests) == 3, "a cancelled generation is not retried"

    code, out = await run_sitegen(cli_env(services), "cancel", "80")
    assert code == 1 and "no queued or running generation" in out


async def test_cancel_of_a_queued_generation_is_immediate(
    settings: Settings, redis: ArqRedis, db: asyncpg.Connection, services: LocalServices, migrated: None
) -> None:
    await db.execute("INSERT INTO site_orders (id, brief) VALUES (81, '{}')")
    await db.execute("INSERT INTO site_generations (order_id, status, current_phase) VALUES (81, 'queued', 'content')")
    code, out = await run_sitegen(cli_env(services), "cancel", "81")
    assert code == 0 and "cancelled" in out
    assert await db.fetchval("SELECT status FROM site_generations WHERE order_id = 81") == "cancelled"


async def test_cancel_of_a_generation_waiting_for_a_deferred_retry_sticks(
    fake: FakeProviderServer,
    settings: Settings,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
    services: LocalServices,
) -> None:
    """Regression: issue 14 defect 4. The cancelled generation's own deferred job ends `cancelled` without
    a model call; a job sent after the cancel is a new request and starts a fresh generation."""
    fake.script("429:3600")  # longer than the in-call wait: the generation goes back to the queue
    retry_announced = asyncio.Event()

    def on_progress(*args: object) -> None:  # logged once the hand-back is committed
        if "will retry in" in str(args[-1]):
            retry_announced.set()

    await db.add_listener("site_generation_progress", on_progress)
    await start_worker(with_ai(settings, {"remote": remote("openai", fake.url, max_retry_wait_s=1)}))
    await client.enqueue_generation(redis, 82, SAMPLE_BRIEF)
    await asyncio.wait_for(retry_announced.wait(), 30)
    assert await db.fetchval("SELECT status FROM site_generations WHERE order_id = 82") == "queued"
    code, out = await run_sitegen(cli_env(services), "cancel", "82")
    assert code == 0 and "cancelled" in out, out
    # The clock: the deferred retry (an hour away) is due now.
    assert await redis.zadd(client.QUEUE_NAME, {client.job_id(82): time.time() * 1000}, xx=True, ch=True) == 1
    await redis.delete(limits.keys("remote")["pause"])  # and the provider's pause after its 429 is over

    result = await order_job(redis, 82).result(timeout=30, poll_delay=0.05)

    assert result["status"] == "cancelled" and result["generation_id"] == 1
    assert len(fake.requests) == 1, "the cancelled generation's pending job calls no model"
    rows = await db.fetch("SELECT id, status FROM site_generations WHERE order_id = 82 ORDER BY id")
    assert [tuple(r) for r in rows] == [(1, "cancelled")]

    await client.enqueue_generation(redis, 82)  # sent after the cancel: a new request
    fresh = await order_job(redis, 82).result(timeout=30, poll_delay=0.05)
    assert fresh["status"] == "succeeded" and fresh["generation_id"] == 2
