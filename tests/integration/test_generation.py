"""The job end to end through in-process workers: contract result, rows, dedup, no-op, regenerate, resume."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import asyncpg
from arq import ArqRedis, create_pool
from arq.connections import RedisSettings

from tests.helpers import SAMPLE_BRIEF, WorkerFactory, wait_for_result, wait_until
from worker import client
from worker.settings import Settings


async def test_enqueue_with_client_generates_site_and_stores_contract_rows(
    start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection, settings: Settings
) -> None:
    await start_worker()
    job = await client.enqueue_generation(redis, 7, SAMPLE_BRIEF)
    assert job is not None and job.job_id == "generate_site:7"

    result = await wait_for_result(redis, 7)

    site = Path(settings.output.dir).resolve() / "7"
    assert result["order_id"] == 7 and result["status"] == "succeeded"
    assert result["output_dir"] == str(site)
    assert result["pages"] == ["index.html", "about.html", "services.html", "contact.html"]
    assert result["usage"]["calls"] == 3 and result["usage"]["output_tokens"] > 0
    assert (site / "index.html").read_text().startswith("<!DOCTYPE html>")
    manifest = json.loads((site / "manifest.json").read_text())
    assert manifest["pages"] == result["pages"]
    assert {f["path"] for f in manifest["files"]} == {*result["pages"], "assets/style.css"}

    generation = await db.fetchrow("SELECT * FROM site_generations WHERE order_id = 7")
    assert generation["status"] == "succeeded" and generation["current_phase"] is None
    assert generation["id"] == result["generation_id"] and generation["output_dir"] == str(site)
    assert generation["usage"]["calls"] == 3 and generation["finished_at"] is not None
    phases = await db.fetch("SELECT phase FROM site_generation_phases WHERE generation_id = $1", generation["id"])
    assert sorted(p["phase"] for p in phases) == ["assemble", "code", "content", "plan"]
    files = await db.fetch("SELECT path, sha256 FROM site_files WHERE generation_id = $1", generation["id"])
    stored_files = {f["path"]: f["sha256"] for f in files}
    assert stored_files.pop("manifest.json")
    assert stored_files == {f["path"]: f["sha256"] for f in manifest["files"]}
    messages = [
        r["message"] for r in await db.fetch("SELECT message FROM site_generation_logs WHERE order_id = 7 ORDER BY id")
    ]
    assert messages[0] == "generation started (attempt 1)"
    for phase in ("plan", "content", "code", "assemble"):
        assert f"phase {phase} started" in messages and f"phase {phase} done" in messages
    assert messages[-1] == "generation succeeded"
    stored = await db.fetchval("SELECT brief FROM site_orders WHERE id = 7")
    assert stored["business_name"] == SAMPLE_BRIEF["business_name"]


async def test_enqueue_with_raw_arq_and_json_serializer(
    start_worker: WorkerFactory, services: object, db: asyncpg.Connection, settings: Settings, redis: ArqRedis
) -> None:
    await start_worker()
    raw = await create_pool(
        RedisSettings.from_dsn(settings.redis.url),
        job_serializer=lambda v: json.dumps(v).encode(),
        job_deserializer=json.loads,
    )
    try:
        job = await raw.enqueue_job(
            "generate_site", 8, SAMPLE_BRIEF, _job_id="generate_site:8", _queue_name="site_generation"
        )
        assert job is not None
        result = await job.result(timeout=60, poll_delay=0.05)
    finally:
        await raw.aclose()
    assert result["status"] == "succeeded" and result["order_id"] == 8
    assert await db.fetchval("SELECT count(*) FROM site_generation_phases") == 4


async def test_four_quick_enqueues_make_one_generation(
    start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    jobs = [await client.enqueue_generation(redis, 9, SAMPLE_BRIEF) for _ in range(4)]
    assert sum(job is not None for job in jobs) == 1
    await start_worker()
    await wait_for_result(redis, 9)
    assert await db.fetchval("SELECT count(*) FROM site_generations WHERE order_id = 9") == 1


async def test_after_success_enqueue_is_noop_and_regenerate_starts_fresh(
    start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection, settings: Settings
) -> None:
    worker = await start_worker()
    ai = lambda: worker.ctx["runtime"].ai  # noqa: E731
    await client.enqueue_generation(redis, 10, SAMPLE_BRIEF)
    first = await wait_for_result(redis, 10)
    calls_after_first = sum(ai().calls.values())

    await client.enqueue_generation(redis, 10)
    again = await wait_for_result(redis, 10)
    assert again["generation_id"] == first["generation_id"] and again["status"] == "succeeded"
    assert sum(ai().calls.values()) == calls_after_first, "a no-op must not call the model"
    assert await db.fetchval("SELECT count(*) FROM site_generations WHERE order_id = 10") == 1
    assert (
        await db.fetchval(
            "SELECT count(*) FROM site_generation_logs WHERE order_id = 10 AND message LIKE 'already generated%'"
        )
        == 1
    )

    await client.enqueue_generation(redis, 10, regenerate=True)
    fresh = await wait_for_result(redis, 10)
    assert fresh["generation_id"] != first["generation_id"] and fresh["status"] == "succeeded"
    assert sum(ai().calls.values()) == calls_after_first + 3
    rows = await db.fetch("SELECT status FROM site_generations WHERE order_id = 10 ORDER BY id")
    assert [r["status"] for r in rows] == ["succeeded", "succeeded"]


async def test_noop_restores_missing_site_from_stored_files(
    start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection, settings: Settings
) -> None:
    await start_worker()
    await client.enqueue_generation(redis, 11, SAMPLE_BRIEF)
    await wait_for_result(redis, 11)
    site = Path(settings.output.dir).resolve() / "11"
    original = (site / "index.html").read_bytes()
    for path in sorted(site.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    site.rmdir()

    await client.enqueue_generation(redis, 11)
    await wait_for_result(redis, 11)
    assert (site / "index.html").read_bytes() == original
    assert (site / "manifest.json").is_file()


async def test_failed_phase_keeps_logs_leaves_nothing_and_resumes_there(
    start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    # A real failure inside the `code` phase's commit transaction, after its first statement.
    await db.execute("""
        DROP SEQUENCE IF EXISTS code_phase_inserts;
        CREATE SEQUENCE code_phase_inserts;  -- sequences survive a rollback: the failure happens once
        CREATE OR REPLACE FUNCTION fail_code_once() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF NEW.phase = 'code' AND nextval('code_phase_inserts') = 1 THEN
            RAISE EXCEPTION 'injected failure in the code phase';
          END IF;
          RETURN NEW;
        END $$;
        CREATE TRIGGER fail_code_once BEFORE INSERT ON site_generation_phases
            FOR EACH ROW EXECUTE FUNCTION fail_code_once();
    """)
    try:
        worker = await start_worker()
        await client.enqueue_generation(redis, 12, SAMPLE_BRIEF)
        result = await wait_for_result(redis, 12)
    finally:
        await db.execute(
            "DROP TRIGGER fail_code_once ON site_generation_phases; DROP FUNCTION fail_code_once();"
            " DROP SEQUENCE code_phase_inserts;"
        )
    assert result["status"] == "succeeded"
    calls = worker.ctx["runtime"].ai.calls
    assert calls == {"planning": 1, "content": 1, "coding": 2}, "committed phases must not call the model again"
    generation = await db.fetchrow("SELECT id, attempt FROM site_generations WHERE order_id = 12")
    assert generation["attempt"] == 2
    logs = await db.fetch("SELECT level, message FROM site_generation_logs WHERE order_id = 12 ORDER BY id")
    messages = [r["message"] for r in logs]
    failed_at = next(i for i, m in enumerate(messages) if m.startswith("phase code failed, will retry"))
    assert "injected failure in the code phase" in messages[failed_at]
    assert messages[:failed_at] == [
        "generation started (attempt 1)",
        "phase plan started",
        "phase plan done",
        "phase content started",
        "phase content done",
        "phase code started",
    ], "progress written before the failure is kept"
    assert messages[failed_at + 1] == "generation resumed at phase code (attempt 2)"
    assert (
        await db.fetchval(
            "SELECT count(*) FROM site_generation_phases WHERE generation_id = $1 AND phase = 'code'", generation["id"]
        )
        == 1
    )


async def test_startup_removes_what_a_crashed_site_write_left_behind(
    settings: Settings, start_worker: WorkerFactory
) -> None:
    """Issue 14 defect 12: every write has its own build folder; a replica's startup cleans dead ones."""
    root = settings.output.dir
    leftover = root / ".7.build-00000000-999999-1"
    (leftover / "about").mkdir(parents=True)
    (leftover / "index.html").write_text("<p>half a site</p>")
    hour_ago = time.time() - 3600
    os.utime(leftover, (hour_ago, hour_ago))
    await start_worker()

    async def removed() -> bool:
        return not leftover.exists()

    await wait_until(removed, 30, 0.02, "the replica's startup to remove the dead build folder")
