"""`sitegen` for operators: check, retry, preview, status with cost, `logs --follow` across a PostgreSQL
restart, and the container commands exactly as docker-compose.yml and the Dockerfile spell them."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx2
import pytest
from arq import ArqRedis

from tests.helpers import (
    KEY,
    KEY_ENV,
    SAMPLE_BRIEF,
    WorkerFactory,
    cli_env,
    remote,
    run_sitegen,
    wait_for_result,
    with_ai,
)
from worker import client
from worker.local.fake_server import FakeProviderServer
from worker.local.services import LocalServices, free_port
from worker.settings import Settings
from worker.store import QUERIES

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


async def insert_log(
    conn: asyncpg.Connection,
    order_id: int,
    generation_id: int | None,
    phase: str | None,
    level: str,
    message: str,
    event: str | None = None,
) -> None:
    """A progress row written (and announced) the way the worker's progress log writes it, of kind `event`."""
    await conn.execute(
        QUERIES["insert_logs"],
        [order_id],
        [generation_id],
        [None if phase is None else json.dumps(phase)],  # jsonb[]: the query takes its texts as JSON strings
        [json.dumps(level)],
        [json.dumps(message)],
        [None if event is None else json.dumps({"event": event})],
        [datetime.now(UTC)],
        "test",
    )


async def _wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.1)


def _row(out: str, name: str) -> str:
    """The line of `sitegen check`'s table that names `name`."""
    lines = [line for line in out.splitlines() if f" {name}" in line and ("ok" in line or "FAIL" in line)]
    assert lines, f"no check row for {name!r}:\n{out}"
    return lines[0]


@pytest.fixture
async def fresh_database(services: LocalServices) -> AsyncIterator[str]:
    """The URL of a new, empty database on the test server (dropped afterwards)."""
    name = f"fresh_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(services.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(services.database_url)._replace(path=f"/{name}"))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


# --------------------------------------------------------------------------- check


async def test_check_passes_with_everything_up(services: LocalServices, migrated: None) -> None:
    code, out = await run_sitegen(cli_env(services), "check")
    assert code == 0, out
    for name in ("redis", "postgresql", "migrations", "provider offline"):
        assert "ok" in _row(out, name)
    assert "all checks passed" in out


async def test_check_fails_naming_an_unreachable_redis(services: LocalServices, migrated: None) -> None:
    code, out = await run_sitegen(cli_env(services, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"), "check")
    assert code == 1, out
    assert "FAIL" in _row(out, "redis") and "ok" in _row(out, "postgresql")
    assert "1 check(s) failed: redis" in out


async def test_check_fails_naming_an_unreachable_postgresql(services: LocalServices) -> None:
    url = f"postgresql://sitegen:pw-not-shown@127.0.0.1:{free_port()}/sitegen"
    code, out = await run_sitegen(cli_env(services, DATABASE_URL=url), "check")
    assert code == 1, out
    assert "FAIL" in _row(out, "postgresql") and "FAIL" in _row(out, "migrations")
    assert "ok" in _row(out, "redis")
    assert "pw-not-shown" not in out, "a password is never printed"


async def test_check_and_config_never_print_a_password_from_a_query(services: LocalServices, migrated: None) -> None:
    """Regression: issue 20 finding 13: `?password=` in DATABASE_URL and REDIS_URL was printed as written."""
    env = cli_env(
        services,
        DATABASE_URL=services.database_url + "?password=pg-query-secret&sslmode=disable",
        REDIS_URL=f"redis://:redis-user-secret@127.0.0.1:{free_port()}/0?password=redis-query-secret",
    )
    outputs = [await run_sitegen(env, "check", "--timeout", "2"), await run_sitegen(env, "config")]
    for _code, out in outputs:
        for secret in ("pg-query-secret", "redis-user-secret", "redis-query-secret"):
            assert secret not in out, f"{secret} printed:\n{out}"
    code, out = outputs[0]
    assert code == 1 and "FAIL" in _row(out, "redis") and "ok" in _row(out, "postgresql"), out
    assert "password=***" in out
    code, out = outputs[1]
    assert code == 0, out
    config = json.loads(out)
    assert config["database"]["url"].endswith("?password=***&sslmode=disable")
    assert config["redis"]["url"].startswith("redis://:***@") and config["redis"]["url"].endswith("?password=***")


async def test_check_fails_on_pending_migrations_until_the_compose_migrate_command_ran(
    services: LocalServices, fresh_database: str
) -> None:
    env = cli_env(services, DATABASE_URL=fresh_database)
    code, out = await run_sitegen(env, "check")
    assert code == 1, out
    row = _row(out, "migrations")
    assert "FAIL" in row and "pending: 0001_initial" in row and "sitegen migrate" in row

    # The one-shot `migrate` service of docker-compose.yml, exactly as it is spelled there.
    command = _compose_command("migrate")
    assert command == ["sitegen", "migrate"]
    process = await asyncio.create_subprocess_exec(
        str(BIN / command[0]),
        *command[1:],
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out_migrate, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, out_migrate.decode()

    code, out = await run_sitegen(env, "check")
    assert code == 0, out
    assert "ok" in _row(out, "migrations")


async def test_check_fails_naming_an_unreachable_routed_provider(services: LocalServices, migrated: None) -> None:
    env = cli_env(
        services,
        SITEGEN_AI__PROVIDERS__GPT__KIND="openai",
        SITEGEN_AI__PROVIDERS__GPT__MODEL="gpt-test",
        SITEGEN_AI__PROVIDERS__GPT__BASE_URL=f"http://127.0.0.1:{free_port()}/v1",
        SITEGEN_AI__PROVIDERS__GPT__API_KEY_ENV=KEY_ENV,
        SITEGEN_AI__ROUTING__CONTENT="gpt",
        **{KEY_ENV: KEY},
    )
    code, out = await run_sitegen(env, "check", "--timeout", "3")
    assert code == 1, out
    assert "FAIL" in _row(out, "provider gpt (openai)")
    assert "ok" in _row(out, "provider offline")
    assert "1 check(s) failed: provider gpt (openai)" in out
    assert KEY not in out, "an API key is never printed"


async def test_check_counts_any_http_answer_as_reachable(
    services: LocalServices, migrated: None, fake: FakeProviderServer
) -> None:
    env = cli_env(
        services,
        SITEGEN_AI__PROVIDERS__GPT__KIND="openai",
        SITEGEN_AI__PROVIDERS__GPT__MODEL="gpt-test",
        SITEGEN_AI__PROVIDERS__GPT__BASE_URL=f"{fake.url}/v1",
        SITEGEN_AI__PROVIDERS__GPT__API_KEY_ENV=KEY_ENV,
        SITEGEN_AI__ROUTING__PLANNING="gpt,offline",
        **{KEY_ENV: KEY},
    )
    code, out = await run_sitegen(env, "check")
    assert code == 0, out
    assert re.search(r"HTTP \d{3} from", _row(out, "provider gpt (openai)"))
    assert all(KEY not in r.headers.get("authorization", "") for r in fake.requests), "no key is sent"


# --------------------------------------------------------------------------- retry, status


@pytest.mark.usefixtures("provider_key")
async def test_retry_runs_a_failed_order_again_and_then_refuses_a_succeeded_one(
    fake: FakeProviderServer,
    settings: Settings,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
    services: LocalServices,
) -> None:
    fake.script("status:401")  # the key is refused: the generation fails at once, no retry
    await start_worker(with_ai(settings, {"remote": remote("openai", fake.url)}))
    await client.enqueue_generation(redis, 90, SAMPLE_BRIEF)

    async def failed() -> bool:
        return await db.fetchval("SELECT status FROM site_generations WHERE order_id = 90") == "failed"

    await _wait_until(failed, 30, "the first generation fails")
    env = cli_env(services)
    code, out = await run_sitegen(env, "status", "90")
    assert code == 0, out
    assert "failed" in out and "AIAuthError" in out

    code, out = await run_sitegen(env, "retry", "90")  # the fake answers normally from now on
    assert code == 0, out
    assert "enqueued job generate_site:90" in out and "ended failed" in out
    result = await wait_for_result(redis, 90)
    assert result["status"] == "succeeded"
    rows = await db.fetch("SELECT id, status FROM site_generations WHERE order_id = 90 ORDER BY id")
    assert [r["status"] for r in rows] == ["failed", "succeeded"], "a fresh generation, the failed one kept"
    assert result["generation_id"] == rows[1]["id"]
    assert (Path(result["output_dir"]) / "index.html").is_file()

    code, out = await run_sitegen(env, "retry", "90")
    assert code == 1, out
    assert "succeeded: nothing to retry" in out and "sitegen enqueue 90 --regenerate" in out

    code, out = await run_sitegen(env, "retry", "91")
    assert code == 1 and "order 91 does not exist" in out


async def test_status_shows_cost_tokens_and_the_error_summary(db: asyncpg.Connection, services: LocalServices) -> None:
    await db.execute("INSERT INTO site_orders (id, brief) VALUES (96, '{}')")
    usage = {"input_tokens": 1200, "output_tokens": 300, "calls": 3, "cost_usd": 0.0123}
    await db.execute(
        "INSERT INTO site_generations (order_id, status, current_phase, attempt, usage, started_at, finished_at)"
        " VALUES (96, 'succeeded', 'assemble', 1, $1, now() - interval '3 seconds', now())",
        json.dumps(usage),
    )
    error = {"type": "AIAuthError", "message": "HTTP 401 from gpt: set OPENAI_API_KEY", "phase": "plan"}
    await db.execute(
        "INSERT INTO site_generations (order_id, status, current_phase, attempt, error, started_at, finished_at)"
        " VALUES (96, 'failed', 'plan', 1, $1, now(), now())",
        json.dumps(error),
    )
    code, out = await run_sitegen(cli_env(services), "status", "96")
    assert code == 0, out
    header = next(line for line in out.splitlines() if "status" in line and "cost" in line)
    assert "tokens" in header and "error" in header
    assert "$0.0123" in out and "1500" in out
    assert "AIAuthError: HTTP 401 from gpt: set OPENAI_API_KEY (phase plan)" in out


# --------------------------------------------------------------------------- preview


async def test_preview_serves_the_site_and_stops_on_sigterm(services: LocalServices, tmp_path: Path) -> None:
    site = tmp_path / "sites" / "97"
    site.mkdir(parents=True)
    (site / "index.html").write_text("<!doctype html><h1>Rosa's Bakery</h1>")
    (site / "menu.html").write_text("<h1>Menu</h1>")
    env = cli_env(services, SITEGEN_OUTPUT__DIR=str(tmp_path / "sites"))

    code, out = await run_sitegen(env, "preview", "98")
    assert code == 1 and "no site for order 98" in out

    port = free_port()
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.cli",
        "preview",
        "97",
        "--port",
        str(port),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        async with httpx2.AsyncClient(timeout=2) as http:

            async def serving() -> bool:
                assert server.returncode is None, "sitegen preview exited early"
                try:
                    return (await http.get(url)).status_code == 200
                except httpx2.TransportError:
                    return False

            await _wait_until(serving, 30, "sitegen preview serves the site")
            index = await http.get(url)
            assert "<h1>Rosa's Bakery</h1>" in index.text
            assert (await http.get(url + "menu.html")).text == "<h1>Menu</h1>"
            assert (await http.get(url + "missing.html")).status_code == 404
        server.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.wait(), 10) == 0
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()
    assert server.stdout is not None
    out = (await server.stdout.read()).decode()
    assert url in out and "Traceback" not in out


# --------------------------------------------------------------------------- logs --follow


async def test_logs_follow_survives_a_postgres_restart_and_stops_when_the_generation_ends(
    services: LocalServices, migrated: None
) -> None:
    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(services.database_url)

    async def log(conn: asyncpg.Connection, message: str, phase: str | None = None, event: str | None = None) -> None:
        await insert_log(conn, 95, generation_id, phase, "info", message, event)

    conn = await connect()
    try:
        await conn.execute("DELETE FROM site_generation_logs WHERE order_id = 95")
        await conn.execute("DELETE FROM site_generations WHERE order_id = 95")
        await conn.execute("INSERT INTO site_orders (id, brief) VALUES (95, '{}') ON CONFLICT DO NOTHING")
        generation_id = await conn.fetchval(
            "INSERT INTO site_generations (order_id, status, current_phase, started_at)"
            " VALUES (95, 'running', 'plan', now()) RETURNING id"
        )
        await log(conn, "generation started (attempt 1)")
    finally:
        await conn.close()

    follower = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.cli",
        "logs",
        "95",
        "--follow",
        cwd=ROOT,
        env=cli_env(services),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    seen: list[str] = []

    async def read_until(text: str, timeout: float) -> None:
        assert follower.stdout is not None
        async with asyncio.timeout(timeout):
            while not any(text in line for line in seen):
                line = await follower.stdout.readline()
                assert line, f"the follower exited before printing {text!r}; printed: {seen}"
                seen.append(line.decode())

    try:
        await read_until("generation started", 20)
        conn = await connect()
        await log(conn, "phase plan done", "plan")
        await conn.close()
        await read_until("phase plan done", 20)

        await asyncio.to_thread(services.postgres.restart)

        conn = await connect()
        try:
            await log(conn, "phase content done", "content")
            await read_until("phase content done", 30)  # written after the restart
            assert follower.returncode is None, "the generation is still running: keep following"
            await conn.execute(
                "UPDATE site_generations SET status = 'succeeded', finished_at = now() WHERE id = $1", generation_id
            )
            # The end is recognised by the row's kind, not its text (messages are for people).
            await log(conn, "the site is ready", event="generation.succeeded")
        finally:
            await conn.close()
        await read_until("the site is ready", 20)
        code = await asyncio.wait_for(follower.wait(), 20)  # stops by itself: the generation ended
    finally:
        if follower.returncode is None:
            follower.kill()
            await follower.wait()
    assert follower.stderr is not None
    err = (await follower.stderr.read()).decode()
    assert code == 0, err
    assert "Traceback" not in err, err
    assert "reconnecting" in err or "retrying" in err, f"the follower noticed the restart:\n{err}"


async def test_logs_follow_keep_goes_on_after_the_generation_ends(
    services: LocalServices, db: asyncpg.Connection
) -> None:
    await db.execute("INSERT INTO site_orders (id, brief) VALUES (94, '{}')")
    generation_id = await db.fetchval(
        "INSERT INTO site_generations (order_id, status, current_phase) VALUES (94, 'running', 'plan') RETURNING id"
    )
    follower = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.cli",
        "logs",
        "94",
        "--follow",
        "--keep",
        cwd=ROOT,
        env=cli_env(services),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await db.execute("UPDATE site_generations SET status = 'failed' WHERE id = $1", generation_id)
        await insert_log(db, 94, generation_id, None, "error", "generation failed: Boom: no", "generation.failed")
        assert follower.stdout is not None
        line = await asyncio.wait_for(follower.stdout.readline(), 20)
        assert b"generation failed" in line
        # --keep: a row written after the end still arrives; Ctrl-C stops.
        await insert_log(db, 94, None, None, "info", "a later row")
        line = await asyncio.wait_for(follower.stdout.readline(), 20)
        assert b"a later row" in line
        follower.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(follower.wait(), 10) == 0
    finally:
        if follower.returncode is None:
            follower.kill()
            await follower.wait()


# --------------------------------------------------------------------------- the container's commands


def _compose_command(service: str) -> list[str]:
    """`command:` of a service in docker-compose.yml (written there as a JSON-style flow list)."""
    text = (ROOT / "docker-compose.yml").read_text()
    block = re.search(rf"^  {re.escape(service)}:\n((?:    .*\n|\s*\n)+)", text, flags=re.M)
    assert block, f"no service {service!r} in docker-compose.yml"
    command = re.search(r"^    command: (\[.*\])\s*$", block.group(1), flags=re.M)
    assert command, f"service {service!r} has no one-line command list"
    value: list[str] = json.loads(command.group(1))
    return value


def _dockerfile_instruction(name: str) -> list[str]:
    """The exec-form argument list of the Dockerfile's CMD or HEALTHCHECK CMD."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    pattern = r"^HEALTHCHECK .*?CMD (\[.*\])\s*$" if name == "HEALTHCHECK" else r"^CMD (\[.*\])\s*$"
    found = re.findall(pattern, text, flags=re.M)
    assert found, f"no exec-form {name} in the Dockerfile"
    value: list[str] = json.loads(found[-1])
    return value


async def test_the_images_worker_command_passes_its_healthcheck_while_running(
    services: LocalServices, migrated: None, redis: ArqRedis, tmp_path: Path
) -> None:
    worker_command = _compose_command("worker")
    assert worker_command == _dockerfile_instruction("CMD") == ["arq", "worker.main.WorkerSettings"]
    healthcheck = _dockerfile_instruction("HEALTHCHECK")
    assert healthcheck == ["arq", "worker.main.WorkerSettings", "--check"]
    # As in the compose file: no replica id set, so the host name names the health key.
    env = cli_env(
        services,
        SITEGEN_WORKER__RUN_MIGRATIONS="false",
        SITEGEN_WORKER__HEALTH_CHECK_INTERVAL_S="1",
        SITEGEN_OUTPUT__DIR=str(tmp_path / "sites"),
    )

    async def check() -> int:
        probe = await asyncio.create_subprocess_exec(
            str(BIN / healthcheck[0]),
            *healthcheck[1:],
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        return await asyncio.wait_for(probe.wait(), 30)

    worker = await asyncio.create_subprocess_exec(
        str(BIN / worker_command[0]),
        *worker_command[1:],
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:

        async def healthy() -> bool:
            assert worker.returncode is None, "the worker exited early"
            return await check() == 0

        await _wait_until(healthy, 30, "the HEALTHCHECK command passes")
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait(), 30) == 0
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
    assert await check() == 1, "a stopped replica fails its HEALTHCHECK"
