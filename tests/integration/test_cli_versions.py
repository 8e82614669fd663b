"""`sitegen versions`, `diff`, `edit` and `rollback` (issue 22) as an operator runs them: real subprocesses
against real PostgreSQL and Redis, versions seeded with SQL as the worker stores them."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from datetime import UTC, datetime

import asyncpg
import pytest
from arq import ArqRedis

from tests.helpers import cli_env, run_sitegen, wait_until
from tests.integration.test_versions_api import ORDER, V1, V2, add_version, job_of
from worker.local.services import LocalServices
from worker.store import QUERIES

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture
async def seeded(db: asyncpg.Connection) -> None:
    usage = {"input_tokens": 1000, "output_tokens": 234, "calls": 3, "cost_usd": 0.0123}
    await add_version(db, ORDER, 1, V1, usage=usage)
    await add_version(db, ORDER, 2, V2, parent=1, kind="edit", instruction="change the phone number")


async def edit_jobs(redis: ArqRedis) -> list[str]:
    return sorted(k.decode().removeprefix("arq:job:") for k in await redis.keys("arq:job:*"))


async def enqueued_job(redis: ArqRedis, timeout_s: float = 30) -> str:
    """The id of the one job the `sitegen` process under test enqueued, once it did."""
    jobs: list[str] = []

    async def enqueued() -> bool:
        jobs[:] = await edit_jobs(redis)
        return bool(jobs)

    await wait_until(enqueued, timeout=timeout_s, interval=0.05, what="the job sitegen enqueues")
    return jobs[0]


async def test_versions_prints_a_table_newest_first(services: LocalServices, seeded: None) -> None:
    code, out = await run_sitegen(cli_env(services), "versions", str(ORDER))
    assert code == 0, out
    lines = [line for line in out.splitlines() if re.search(r"│\s+\d", line)]
    assert re.search(r"│ 2 live\s+│ edit\s+│ 1\s+│ change the phone number", lines[0]), out
    assert re.search(r"│ 1\s+│ generation\s+│\s+│", lines[1]), out
    assert "1234" in lines[1] and "$0.0123" in lines[1] and " 4 " in lines[1]

    code, out = await run_sitegen(cli_env(services), "versions", "999")
    assert code == 1 and "order 999 not found" in out


async def test_diff_is_coloured_and_defaults_to_the_parent(services: LocalServices, seeded: None) -> None:
    code, out = await run_sitegen(cli_env(services, FORCE_COLOR="1", TERM="xterm-256color"), "diff", str(ORDER), "2")
    assert code == 0, out
    assert "\x1b[31m-<p>Call +351 222 000 111</p>" in out, "removed lines red"
    assert "\x1b[32m+<p>Call +351 222 999 888</p>" in out, "added lines green"
    plain = ANSI.sub("", out)
    assert f"order {ORDER}: version 2 against version 1" in plain
    assert "--- v1/index.html\n+++ v2/index.html\n@@ -1,3 +1,3 @@\n" in plain
    assert "binary file changed: assets/logo.png" in plain
    assert "added: pricing.html (16 B)" in plain and "removed: about.html" in plain
    assert "2 changed, 1 added, 1 removed, 1 unchanged" in plain

    code, out = await run_sitegen(cli_env(services), "diff", str(ORDER), "1", "2")
    assert code == 0, out
    assert "-<p>Call +351 222 999 888</p>\n+<p>Call +351 222 000 111</p>" in out
    assert "added: about.html" in out and "removed: pricing.html" in out

    code, out = await run_sitegen(cli_env(services), "diff", str(ORDER), "1")
    assert code == 0 and "against no earlier version" in out and "4 added" in out

    code, out = await run_sitegen(cli_env(services), "diff", str(ORDER), "9")
    assert code == 1 and f"order {ORDER} has no version 9" in out
    code, out = await run_sitegen(cli_env(services), "diff", str(ORDER), "2", "9")
    assert code == 1 and f"order {ORDER} has no version 9 to compare with" in out


async def test_edit_enqueues_an_edit_site_job(services: LocalServices, seeded: None, redis: ArqRedis) -> None:
    code, out = await run_sitegen(
        cli_env(services),
        *("edit", str(ORDER), "Make the header blue", "--base", "1", "--page", "index", "--page", "about"),
    )
    assert code == 0, out
    job_id = re.search(r"enqueued job (edit_site:\S+)", out)
    assert job_id is not None, out
    info = await job_of(redis, job_id[1])
    assert info.function == "edit_site" and info.args == [ORDER, "Make the header blue"]
    assert info.kwargs == {"base_version": 1, "pages": ["index", "about"]}
    assert await redis.zscore("site_generation", job_id[1]) is not None


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (("x" * 2001,), 2, "instruction: 2,001 characters"),
        (("   ",), 2, "instruction: required"),
        (("blue", "--page", "Not A Slug"), 2, "pages: 'Not A Slug' is not a page slug"),
        (("blue", "--base", "9"), 1, f"--base: order {ORDER} has no version 9"),
    ],
)
async def test_an_invalid_edit_is_refused_and_nothing_is_enqueued(
    services: LocalServices, seeded: None, redis: ArqRedis, args: tuple[str, ...], code: int, says: str
) -> None:
    got, out = await run_sitegen(cli_env(services), "edit", str(ORDER), *args)
    assert got == code and says in out, out
    assert await edit_jobs(redis) == []


async def test_an_order_without_a_site_cannot_be_edited_or_rolled_back(
    services: LocalServices, db: asyncpg.Connection, redis: ArqRedis
) -> None:
    await db.execute("INSERT INTO site_orders (id, brief) VALUES (8, '{}')")
    code, out = await run_sitegen(cli_env(services), "edit", "8", "blue")
    assert code == 1 and "order 8 has no site to edit yet" in out
    code, out = await run_sitegen(cli_env(services), "rollback", "8", "1")
    assert code == 1 and "order 8 has no site to roll back yet" in out
    code, out = await run_sitegen(cli_env(services), "edit", "999", "blue")
    assert code == 1 and "order 999 not found" in out
    assert await edit_jobs(redis) == []


async def test_rollback_enqueues_a_rollback_site_job(services: LocalServices, seeded: None, redis: ArqRedis) -> None:
    code, out = await run_sitegen(cli_env(services), "rollback", str(ORDER), "1")
    assert code == 0, out
    job_id = re.search(r"enqueued job (rollback_site:\S+):", out)
    assert job_id is not None, out
    info = await job_of(redis, job_id[1])
    assert info.function == "rollback_site" and info.args == [ORDER, 1] and info.kwargs == {}

    code, out = await run_sitegen(cli_env(services), "rollback", str(ORDER), "9")
    assert code == 1 and f"version: order {ORDER} has no version 9" in out


async def _log(db: asyncpg.Connection, generation_id: int, message: str, event: str) -> None:
    await db.execute(
        QUERIES["insert_logs"],
        [ORDER],
        [generation_id],
        [None],
        [json.dumps("info")],
        [json.dumps(message)],
        [json.dumps({"event": event})],
        [datetime.now(UTC)],
        "test",
    )


@pytest.mark.timeout(60)
async def test_edit_follow_prints_the_edits_rows_and_ends_with_it(
    services: LocalServices, seeded: None, db: asyncpg.Connection, redis: ArqRedis
) -> None:
    """The edit waits for a generation that ends first (its end does not stop the follow), then ends itself.
    The runs and rows are written here as a replica writes them, so no worker is needed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "worker.cli", "edit", str(ORDER), "Make the header blue", "--follow"),
        env=cli_env(services),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        job_id = await enqueued_job(redis)
        generation = await db.fetchval(
            "INSERT INTO site_generations (order_id, status) VALUES ($1, 'succeeded') RETURNING id", ORDER
        )
        await _log(db, generation, "generation succeeded", "generation.succeeded")
        run = await db.fetchval(
            "INSERT INTO site_generations (order_id, kind, status, job_id, request) VALUES ($1, 'edit', 'running', $2,"
            " '{}') RETURNING id",
            ORDER,
            job_id,
        )
        await _log(db, run, "edit started", "edit.started")
        assert process.stdout is not None
        seen = ""
        while "edit started" not in seen:  # printed after the generation's end: the follow went past it
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            assert line, f"sitegen ended before printing the edit's start:\n{seen}"
            seen += line.decode()
        assert process.returncode is None, "still following: the generation's end is not the edit's"
        await add_version(db, ORDER, 3, V2, parent=2, kind="edit", instruction="Make the header blue")
        await db.execute("UPDATE site_generations SET status = 'succeeded', version = 3 WHERE id = $1", run)
        await _log(db, run, "edit succeeded", "edit.succeeded")
        out = seen + (await asyncio.wait_for(process.stdout.read(), 30)).decode()
        await asyncio.wait_for(process.wait(), 10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, out
    assert f"enqueued job {job_id}" in out
    assert out.index("generation succeeded") < out.index("edit started") < out.index("edit succeeded")
    assert f"edit succeeded: version 3 of order {ORDER} is live" in out


@pytest.mark.timeout(60)
async def test_edit_follow_exits_1_with_the_error_when_the_edit_fails(
    services: LocalServices, seeded: None, db: asyncpg.Connection, redis: ArqRedis
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "worker.cli", "edit", str(ORDER), "Make the header blue", "-f"),
        env=cli_env(services),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        job_id = await enqueued_job(redis)
        error = {"type": "SiteCheckFailed", "message": "the edited site has a broken link", "phase": "edit_files"}
        run = await db.fetchval(
            "INSERT INTO site_generations (order_id, kind, status, job_id, error) VALUES ($1, 'edit', 'failed', $2, $3)"
            " RETURNING id",
            ORDER,
            job_id,
            json.dumps(error),
        )
        await _log(db, run, "edit failed", "edit.failed")
        assert process.stdout is not None
        out = (await asyncio.wait_for(process.stdout.read(), 30)).decode()
        await asyncio.wait_for(process.wait(), 10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 1, out
    assert "edit failed: SiteCheckFailed: the edited site has a broken link (phase edit_files)" in out
