"""Shared fixtures: real throwaway PostgreSQL and Redis for the session, a clean database per test,
and in-process workers on the test's event loop."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from arq import ArqRedis
from arq.worker import Worker
from loguru import logger

from tests.helpers import KEY, KEY_ENV, WorkerFactory, close_worker
from worker import client
from worker.local.fake_server import FakeProviderServer
from worker.local.services import LocalServices
from worker.migrate import migrate
from worker.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def services() -> Iterator[LocalServices]:
    with LocalServices() as running:
        yield running


@pytest.fixture(scope="session")
def service_env(services: LocalServices) -> dict[str, str]:
    """Environment for subprocesses (real `arq` workers, `sitegen`) pointing at the test services."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITEGEN_")}
    env.update(DATABASE_URL=services.database_url, REDIS_URL=services.redis_url, PYTHONPATH=str(ROOT))
    return env


@pytest.fixture(scope="session")
async def migrated(services: LocalServices) -> None:
    await migrate(services.database_url, ROOT / "migrations")


@pytest.fixture
async def db(services: LocalServices, migrated: None) -> AsyncIterator[asyncpg.Connection]:
    """A connection for assertions, on a database emptied before the test."""
    conn = await asyncpg.connect(services.database_url)
    await conn.set_type_codec("jsonb", encoder=str, decoder=json.loads, schema="pg_catalog")
    await conn.execute(
        "TRUNCATE site_version_files, site_versions, site_blobs, site_files, site_generation_phases,"
        " site_generation_logs, site_generations, site_orders"
        " RESTART IDENTITY"
    )
    yield conn
    await conn.close()


@pytest.fixture
async def redis(services: LocalServices) -> AsyncIterator[ArqRedis]:
    pool = await client.connect(services.redis_url)
    await pool.flushdb()
    yield pool
    await pool.aclose()


@pytest.fixture
def settings(services: LocalServices, tmp_path: Path) -> Settings:
    return load_settings(
        # Tests read a job's progress rows as soon as its result is in: let it wait for them even on a
        # loaded CI machine (the default, 0.1 s, is for throughput; the wait ends when they are written).
        database={"url": services.database_url, "pool_max_size": 4, "progress_wait_s": 5},
        redis={"url": services.redis_url},
        output={"dir": tmp_path / "sites"},
        worker={
            "replica_id": "test-replica",
            "retry_backoff_s": 0.05,
            "retry_backoff_max_s": 0.2,
            "health_check_interval_s": 1,
            "run_migrations": False,
            "poll_delay_s": 0.02,
        },
    )


@pytest.fixture
async def start_worker(settings: Settings, db: asyncpg.Connection, redis: ArqRedis) -> AsyncIterator[WorkerFactory]:
    """Start in-process workers on this event loop; all are closed at the end of the test."""
    from worker.main import create_worker

    running: list[tuple[Worker, asyncio.Task[None]]] = []

    async def start(custom: Settings | None = None, **overrides: Any) -> Worker:
        worker = create_worker(custom or settings, handle_signals=False, **overrides)
        task = asyncio.create_task(worker.async_run())
        running.append((worker, task))
        return worker

    yield start
    for worker, task in running:
        await close_worker(worker)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
def fake() -> Iterator[FakeProviderServer]:
    """The fake provider: a real HTTP server on loopback speaking the OpenAI, Anthropic and Cloudflare APIs."""
    with FakeProviderServer() as server:
        yield server


@pytest.fixture
def provider_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The API key env var that `tests.helpers.remote` providers name."""
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """Everything the worker logs during the test, exceptions included."""
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="DEBUG", format="{message}")
    yield lines
    logger.remove(sink)


# --------------------------------------------------------------------------- parallel runs (pytest-xdist)

#: The longest tests, started first so that none of them is the tail of a parallel run: the chaos soak
#: (2 minutes of faults), the bench smoke test, the hostile pages in Chromium (one test of about 2 minutes), the
#: stateful claim model, then the fault suite.
START_FIRST = (
    "tests/faults/test_chaos.py",
    "tests/integration/test_bench.py",
    "tests/quality/test_hostile_pages.py",
    "tests/integration/test_claim_model.py",
    "tests/faults/",
)
#: Scopes whose fixtures a module's tests share: its tests stay on one worker (set up once, in order).
SHARED_SCOPES = frozenset({"module", "class", "package"})


def _shared_fixture_scope(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(
        defs and defs[-1].scope in SHARED_SCOPES and not name.startswith("_")
        for name, defs in info.name2fixturedefs.items()
    )


def _group_of(item: pytest.Item) -> str | None:
    """Which xdist group an item joins: one for the fault suite (real replicas killed and restarted, with
    recovery bounds: one scenario at a time, never two beside each other), and one per module whose tests
    share a module-scoped fixture (a browser, servers); None for every other test, which runs anywhere."""
    path = item.nodeid.partition("::")[0]
    if path.startswith("tests/faults/") and path != START_FIRST[0]:
        return "faults"
    if _shared_fixture_scope(item):
        return path
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group and order the tests for `pytest -n N --dist loadgroup --no-loadscope-reorder` (`make test`):
    the longest first, then the groups with the most tests, then the rest as collected. Tests that add
    their own `xdist_group` mark keep it."""
    sizes: dict[str, int] = {}
    first_seen: dict[str, int] = {}
    for index, item in enumerate(items):
        group = _group_of(item)
        if group is not None and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(group))
        mark = item.get_closest_marker("xdist_group")
        if mark is not None:
            name = str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
            sizes[name] = sizes.get(name, 0) + 1
            first_seen.setdefault(name, index)

    def key(indexed: tuple[int, pytest.Item]) -> tuple[int, int, int, int]:
        index, item = indexed
        path = item.nodeid.partition("::")[0]
        rank = next((i for i, prefix in enumerate(START_FIRST) if path.startswith(prefix)), len(START_FIRST))
        mark = item.get_closest_marker("xdist_group")
        name = str(mark.args[0] if mark.args else mark.kwargs.get("name", "default")) if mark else None
        if name is None:
            return rank, -1, index, index
        return rank, -sizes[name], first_seen[name], index

    items[:] = [item for _, item in sorted(enumerate(items), key=key)]
