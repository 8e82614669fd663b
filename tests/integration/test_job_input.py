"""Jobs with bad input: refused with a clear, stored error, never retried, nothing written."""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from arq import ArqRedis, create_pool
from arq.connections import RedisSettings

from tests.helpers import SAMPLE_BRIEF, WorkerFactory, failed_result, wait_for_result
from worker import client
from worker.settings import Settings


def _files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


BAD_BRIEFS: list[tuple[str, dict[str, Any], str]] = [
    ("missing business name", {k: v for k, v in SAMPLE_BRIEF.items() if k != "business_name"}, "brief.business_name"),
    ("5 MB description", {**SAMPLE_BRIEF, "description": "x" * 5_000_000}, "brief.description"),
    (
        "page slug ../../etc",
        {**SAMPLE_BRIEF, "pages": [{"slug": "../../etc", "title": "Escape"}]},
        "brief.pages.0.slug",
    ),
]


@pytest.mark.parametrize(("case", "brief", "field"), BAD_BRIEFS, ids=[c[0] for c in BAD_BRIEFS])
async def test_bad_brief_fails_once_with_stored_error_naming_the_field(
    case: str,
    brief: dict[str, Any],
    field: str,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
    settings: Settings,
    tmp_path: Path,
) -> None:
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    worker = await start_worker()
    await redis.enqueue_job("generate_site", 30, brief, _job_id=client.job_id(30), _queue_name=client.QUEUE_NAME)

    info = await failed_result(redis, 30)

    assert info.job_try == 1 and not info.success, "an input error is never retried"
    assert info.result["error"] == "BriefInvalid" and field in info.result["message"]
    generation = await db.fetchrow("SELECT status, error, attempt FROM site_generations WHERE order_id = 30")
    assert generation["status"] == "failed" and generation["attempt"] == 1
    assert generation["error"]["type"] == "BriefInvalid" and field in generation["error"]["message"]
    assert generation["error"]["traceback"]
    log = await db.fetchrow("SELECT level, message FROM site_generation_logs WHERE order_id = 30")
    assert log["level"] == "error" and field in log["message"]
    assert await db.fetchval("SELECT brief FROM site_orders WHERE id = 30") is None, "an invalid brief is not stored"
    assert sum(worker.ctx["runtime"].ai.calls.values()) == 0
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "nothing may be written"


async def test_unknown_order_without_brief_fails_with_logged_error(
    start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    await start_worker()
    await redis.enqueue_job("generate_site", 31, _job_id=client.job_id(31), _queue_name=client.QUEUE_NAME)
    info = await failed_result(redis, 31)
    assert info.job_try == 1 and info.result["error"] == "OrderNotFound"
    assert "order 31 does not exist" in info.result["message"]
    assert await db.fetchval("SELECT count(*) FROM site_orders") == 0, "an unknown order is not created"
    log = await db.fetchrow("SELECT level, message FROM site_generation_logs WHERE order_id = 31")
    assert log["level"] == "error" and "order 31 does not exist" in log["message"]


@pytest.mark.parametrize(
    ("args", "kwargs", "named"),
    [
        (("32",), {}, "order_id"),
        ((32, ["not", "an", "object"]), {}, "brief"),
        ((32,), {"regenerate": "yes"}, "regenerate"),
        ((32,), {"colour": "red"}, "colour"),
    ],
    ids=["order_id as string", "brief as list", "regenerate as string", "unknown argument"],
)
async def test_wrong_job_arguments_fail_without_retry_naming_the_argument(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    named: str,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
) -> None:
    await start_worker()
    await redis.enqueue_job("generate_site", *args, _job_id=client.job_id(32), _queue_name=client.QUEUE_NAME, **kwargs)
    info = await failed_result(redis, 32)
    assert info.job_try == 1 and info.result["error"] == "JobArgumentsInvalid"
    assert named in info.result["message"]
    assert await db.fetchval("SELECT count(*) FROM site_generations") == 0


async def test_pickled_job_is_refused_and_never_executed(
    start_worker: WorkerFactory, settings: Settings, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    worker = await start_worker()
    pickling = await create_pool(RedisSettings.from_dsn(settings.redis.url))  # arq's default: pickle
    try:
        await pickling.enqueue_job(
            "generate_site", 33, SAMPLE_BRIEF, _job_id=client.job_id(33), _queue_name=client.QUEUE_NAME
        )
    finally:
        await pickling.aclose()

    info = await failed_result(redis, 33)

    assert not info.success
    assert "not JSON" in info.result["cause"] and "pickle" in info.result["cause"]
    assert await db.fetchval("SELECT count(*) FROM site_orders") == 0
    assert await db.fetchval("SELECT count(*) FROM site_generation_logs") == 0
    assert sum(worker.ctx["runtime"].ai.calls.values()) == 0


async def test_a_nul_character_in_the_brief_fails_once_naming_the_field(
    start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    """Regression: issue 14 defect 3. PostgreSQL refuses NUL in jsonb: the brief was retried 5 times as
    UntranslatableCharacterError, an error naming no field."""
    brief = {**SAMPLE_BRIEF, "description": "Family bakery\x00 in Porto"}
    await start_worker()
    await client.enqueue_generation(redis, 33, brief)

    info = await failed_result(redis, 33)

    assert info.job_try == 1 and info.result["error"] == "BriefInvalid"
    assert "brief.description" in info.result["message"] and "NUL" in info.result["message"]
    generation = await db.fetchrow("SELECT status, error FROM site_generations WHERE order_id = 33")
    assert generation["status"] == "failed" and generation["error"]["type"] == "BriefInvalid"
    assert "brief.description" in generation["error"]["message"]
    log = await db.fetchrow("SELECT level, message FROM site_generation_logs WHERE order_id = 33")
    assert log["level"] == "error" and "brief.description" in log["message"]


async def test_a_nul_character_in_an_argument_name_is_stored_and_blocks_no_later_progress_row(
    start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    """Regression: issue 14 defect 3. The rejection's progress row named the argument, NUL included:
    PostgreSQL refused the batch, which went back to the front of the buffer and blocked every later row."""
    worker = await start_worker()
    await redis.enqueue_job(
        "generate_site", 34, _job_id=client.job_id(34), _queue_name=client.QUEUE_NAME, **{"col\x00our": "red"}
    )
    info = await failed_result(redis, 34)
    assert info.job_try == 1 and info.result["error"] == "JobArgumentsInvalid"
    await client.enqueue_generation(redis, 35, SAMPLE_BRIEF)
    assert (await wait_for_result(redis, 35))["status"] == "succeeded"

    rejected = await db.fetchval("SELECT message FROM site_generation_logs WHERE order_id = 34")
    assert rejected == "job rejected: unknown job argument(s): col\ufffdour (expected order_id, brief, regenerate)"
    later = await db.fetch("SELECT message FROM site_generation_logs WHERE order_id = 35 ORDER BY id")
    assert len(later) == 10 and later[-1]["message"] == "generation succeeded"
    assert worker.ctx["runtime"].progress.pending == deque()
