"""The real processes ops and people run: `sitegen` commands and `arq` workers as subprocesses,
against the session's real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from arq import ArqRedis

from tests.helpers import SAMPLE_BRIEF, WorkerFactory, wait_for_result
from worker import client
from worker.local.services import LocalServices

ROOT = Path(__file__).resolve().parent.parent.parent
BIN = ROOT / ".venv" / "bin"
SITEGEN = str(BIN / "sitegen")
ARQ = str(BIN / "arq")
CONTRACT_TABLES = {"site_orders", "site_generations", "site_generation_phases", "site_generation_logs", "site_files"}


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.1) -> None:
    """Poll `predicate` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def run(*argv: str, env: dict[str, str], cwd: Path = ROOT, timeout: float = 60) -> tuple[int, str, str]:
    """Run a command to completion; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def cli_env(service_env: dict[str, str], **extra: str) -> dict[str, str]:
    # A wide console, so rich does not wrap the lines the assertions look for; and stdout as a
    # user's pipe has it (block-buffered), so live output must be flushed by the command itself.
    env = {k: v for k, v in service_env.items() if k != "PYTHONUNBUFFERED"}
    return {**env, "COLUMNS": "200", **extra}


async def test_four_concurrent_migrate_runs_apply_each_migration_once(
    services: LocalServices, service_env: dict[str, str]
) -> None:
    name = f"migrate_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(services.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = urlunsplit(urlsplit(services.database_url)._replace(path=f"/{name}"))
    try:
        env = cli_env(service_env, DATABASE_URL=url)
        results = await asyncio.gather(*(run(SITEGEN, "migrate", env=env) for _ in range(4)))
        for code, out, err in results:
            assert code == 0, f"sitegen migrate failed:\n{out}\n{err}"
        assert sum("applied:" in out for _, out, _ in results) == 1, "exactly one run applies the migrations"

        conn = await asyncpg.connect(url)
        try:
            versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]
            rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            tables = {r["tablename"] for r in rows}
        finally:
            await conn.close()
        expected = [p.stem for p in sorted((ROOT / "migrations").glob("*.sql"))]
        assert expected and sorted(versions) == expected
        assert CONTRACT_TABLES <= tables
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_arq_check_passes_while_worker_runs_and_fails_after_it_stops(
    service_env: dict[str, str], redis: ArqRedis
) -> None:
    env = cli_env(service_env, SITEGEN_WORKER__REPLICA_ID="check-test", SITEGEN_WORKER__HEALTH_CHECK_INTERVAL_S="1")
    key = "site_generation:health-check:check-test"
    worker = await asyncio.create_subprocess_exec(
        ARQ,
        "worker.main.WorkerSettings",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:

        async def health_key_exists() -> bool:
            assert worker.returncode is None, "the worker exited early"
            return bool(await redis.exists(key))

        await wait_until(health_key_exists, timeout=30)
        ttl_ms = await redis.pttl(key)
        assert 0 < ttl_ms <= 3000, f"health key TTL {ttl_ms} ms: it must expire within a few seconds"

        code, _, err = await run(ARQ, "worker.main.WorkerSettings", "--check", env=env)
        assert code == 0, err
        other = {**env, "SITEGEN_WORKER__REPLICA_ID": "other"}
        code, _, _ = await run(ARQ, "worker.main.WorkerSettings", "--check", env=other)
        assert code == 1, "another replica's health key must not make this replica healthy"

        worker.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait(), 30) == 0
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
    code, _, _ = await run(ARQ, "worker.main.WorkerSettings", "--check", env=env)
    assert code == 1, "a stopped worker must fail its health check"


async def test_invalid_setting_fails_startup_with_one_line_naming_the_key(service_env: dict[str, str]) -> None:
    code, out, err = await run(
        ARQ, "worker.main.WorkerSettings", "--check", env=cli_env(service_env, SITEGEN_WORKER__MAX_JOBS="lots")
    )
    assert code != 0
    assert "Traceback" not in err and "Traceback" not in out
    assert "worker.max_jobs" in err and "SITEGEN_WORKER__MAX_JOBS" in err
    assert len(err.strip().splitlines()) == 1, err

    code, out, err = await run(SITEGEN, "config", env=cli_env(service_env, DATABASE_URL="mysql://x"))
    assert code != 0
    assert "Traceback" not in err and "Traceback" not in out
    assert "database.url" in out + err


async def test_a_proxy_the_providers_cannot_use_fails_startup_with_one_line_naming_it(
    service_env: dict[str, str],
) -> None:
    env = cli_env(
        service_env,
        SITEGEN_AI__PROVIDERS__REMOTE__KIND="openai",
        SITEGEN_AI__PROVIDERS__REMOTE__MODEL="gpt-test",
        SITEGEN_AI__PROVIDERS__REMOTE__BASE_URL="https://api.example.test/v1",
        SITEGEN_AI__ROUTING__PLANNING="remote",
        ALL_PROXY="socks5://127.0.0.1:1080",
        HTTPS_PROXY="",
        https_proxy="",
        NO_PROXY="",
        no_proxy="",
    )
    code, out, err = await run(ARQ, "worker.main.WorkerSettings", "--check", env=env)
    assert code != 0
    assert "Traceback" not in err and "Traceback" not in out
    assert "ai.providers.remote: the proxy for https:// URLs" in err and "ALL_PROXY" in err and "socks5" in err
    assert len(err.strip().splitlines()) == 1, err


async def test_sitegen_config_masks_passwords(service_env: dict[str, str]) -> None:
    env = cli_env(
        service_env, DATABASE_URL="postgresql://u:s3cretpw@127.0.0.1:1/db", REDIS_URL="redis://:r3dispw@127.0.0.1:2/0"
    )
    code, out, err = await run(SITEGEN, "config", env=env)
    assert code == 0, out + err
    assert "s3cretpw" not in out + err and "r3dispw" not in out + err
    assert "***" in out
    assert "127.0.0.1:1/db" in out and "127.0.0.1:2/0" in out


async def test_demo_generates_the_sample_site_with_live_progress(
    service_env: dict[str, str], redis: ArqRedis, tmp_path: Path
) -> None:
    # The `redis` fixture flushed the shared test Redis: no leftover jobs for the demo's worker.
    sites = tmp_path / "sites"
    env = cli_env(service_env, SITEGEN_OUTPUT__DIR=str(sites))
    code, out, err = await run(SITEGEN, "demo", "--order-id", "4242", env=env, cwd=tmp_path, timeout=120)
    assert code == 0, out + err
    assert (sites / "4242" / "index.html").is_file()
    assert (sites / "4242" / "manifest.json").is_file()
    for line in (
        "phase plan started",
        "phase content done",
        "phase code done",
        "phase assemble done",
        "generation succeeded",
        "site ready",
    ):
        assert line in out, f"{line!r} missing from the demo output:\n{out}"
    assert out.index("phase plan started") < out.index("phase assemble done") < out.index("site ready")
    # It ends with one edit, its progress and its diff (issue 22): the stylesheet's primary colour changes.
    for line in ("editing the site", "phase edit_plan done", "edit succeeded", "version 2 against version 1"):
        assert line in out, f"{line!r} missing from the demo output:\n{out}"
    assert out.index("site ready") < out.index("edit succeeded") < out.index("version 2 against version 1")
    assert "+++ v2/assets/style.css" in out and "+  --primary: #1d4ed8;" in out
    assert "--primary: #1d4ed8;" in (sites / "4242" / "assets" / "style.css").read_text()


async def test_demo_with_the_fake_provider_shows_retries_and_succeeds(
    service_env: dict[str, str], redis: ArqRedis, tmp_path: Path
) -> None:
    sites = tmp_path / "sites"
    env = cli_env(service_env, SITEGEN_OUTPUT__DIR=str(sites))
    code, out, err = await run(
        SITEGEN,
        "demo",
        "--provider",
        "fake",
        "--latency",
        "0",
        "--order-id",
        "4244",
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert code == 0, out + err
    assert "HTTP 429: rate limited; retry after 1s" in out and "HTTP 500" in out
    assert out.index("HTTP 429") < out.index("phase plan done") < out.index("generation succeeded")
    assert (sites / "4244" / "index.html").is_file()
    assert "edit succeeded" in out and "+++ v2/assets/style.css" in out  # the fake provider edits too


async def test_sitegen_status_and_logs_show_the_generation(
    start_worker: WorkerFactory, redis: ArqRedis, service_env: dict[str, str]
) -> None:
    await start_worker()
    await client.enqueue_generation(redis, 4343, SAMPLE_BRIEF)
    assert (await wait_for_result(redis, 4343))["status"] == "succeeded"
    env = cli_env(service_env)

    code, out, err = await run(SITEGEN, "status", "4343", env=env)
    assert code == 0, out + err
    assert "succeeded" in out

    code, out, err = await run(SITEGEN, "logs", "4343", env=env)
    assert code == 0, out + err
    assert "phase plan started" in out and "generation succeeded" in out


async def test_sitegen_logs_follow_prints_existing_rows_then_new_ones_live(
    start_worker: WorkerFactory, redis: ArqRedis, service_env: dict[str, str]
) -> None:
    await start_worker()
    await client.enqueue_generation(redis, 4344, SAMPLE_BRIEF)
    await wait_for_result(redis, 4344)

    follower = await asyncio.create_subprocess_exec(
        SITEGEN,
        "logs",
        "4344",
        "--follow",
        cwd=ROOT,
        env=cli_env(service_env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert follower.stdout is not None and follower.stderr is not None
    seen: list[str] = []

    async def read_until(text: str, timeout: float) -> None:
        assert follower.stdout is not None
        async with asyncio.timeout(timeout):
            while not any(text in line for line in seen):
                line = await follower.stdout.readline()
                assert line, f"the follower exited before printing {text!r}; printed: {seen}"
                seen.append(line.decode())

    try:
        await read_until("generation succeeded", timeout=20)
        assert not any("already generated" in line for line in seen)

        await client.enqueue_generation(redis, 4344)  # a no-op that logs one new row
        await read_until("already generated: nothing to do", timeout=20)

        follower.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(follower.wait(), 10)
    finally:
        if follower.returncode is None:
            follower.kill()
            await follower.wait()
    err = (await follower.stderr.read()).decode()
    assert "Traceback" not in err, err
    assert code == 0, err

    code, out, err = await run(SITEGEN, "status", "4344", env=cli_env(service_env))
    assert code == 0, out + err
    assert "succeeded" in out
