"""Fixtures of the fault suite: each scenario gets its own PostgreSQL, Redis (with AOF) and fake provider,
so killing or restarting them touches no other test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.faults.harness import Cluster
from worker.local.fake_server import FakeProviderServer
from worker.local.services import LocalServices
from worker.migrate import migrate

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def services() -> Iterator[LocalServices]:
    with LocalServices(redis_appendonly=True) as running:
        # A SIGKILLed PostgreSQL must keep every commit it acknowledged, as a production one does:
        # synchronous_commit=off (the throwaway default) would lose the last few hundred milliseconds of
        # them and blame the worker. fsync=off stays: the OS keeps the pages through a process crash.
        running.postgres.extra_settings["synchronous_commit"] = "on"
        running.postgres.restart()
        yield running


@pytest.fixture
async def cluster(services: LocalServices, tmp_path: Path) -> AsyncIterator[Cluster]:
    await migrate(services.database_url, ROOT / "migrations")
    with FakeProviderServer() as fake:
        running = Cluster(services, fake, tmp_path)
        try:
            yield running
        finally:
            running.stop_all()
