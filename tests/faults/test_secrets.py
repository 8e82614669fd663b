"""Secrets never leave the process: not in logs, stored errors, progress rows, job results or CLI output."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
import redis.asyncio

from tests.faults.harness import ROOT, Cluster, wait_until
from worker.local.fake_server import FakeProviderServer
from worker.local.services import LocalServices, RedisServer
from worker.migrate import migrate

# Real processes on a 2-core machine: generous per-test limits, each scenario has its own deadline too.
pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

API_KEY = "sk-live-RECOGNISABLE-0123456789"
PG_PASSWORD = "pg-RECOGNISABLE-pass"
REDIS_PASSWORD = "redis-RECOGNISABLE-pass"
SECRETS = (API_KEY, PG_PASSWORD, REDIS_PASSWORD)


@pytest.fixture
async def secret_cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    with LocalServices(redis=False) as services, RedisServer(tmp_path / "redis") as redis_server:
        admin = await asyncpg.connect(services.database_url)
        await admin.execute(f"CREATE ROLE app LOGIN SUPERUSER PASSWORD '{PG_PASSWORD}'")
        await admin.close()
        plain = redis.asyncio.Redis.from_url(redis_server.url)
        await plain.config_set("requirepass", REDIS_PASSWORD)
        await plain.aclose()
        parts = urlsplit(services.database_url)
        database_url = f"postgresql://app:{PG_PASSWORD}@{parts.hostname}:{parts.port}{parts.path}"
        redis_url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_server.port}/0"
        await migrate(database_url, ROOT / "migrations")
        with FakeProviderServer() as fake:
            cluster = Cluster(services, fake, tmp_path, database_url=database_url, redis_url=redis_url)
            cluster.settings_env["FAULTS_FAKE_KEY"] = API_KEY
            try:
                yield cluster
            finally:
                cluster.stop_all()


async def _read_key(store: redis.asyncio.Redis, key: bytes) -> object:
    kind = (await store.type(key)).decode()
    if kind == "string":
        return await store.get(key)
    if kind == "zset":
        return await store.zrange(key, 0, -1, withscores=True)
    if kind == "hash":
        return await store.hgetall(key)
    if kind == "list":
        return await store.lrange(key, 0, -1)
    if kind == "set":
        return await store.smembers(key)
    return kind


def _cli(cluster: Cluster, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        cwd=ROOT,
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.stdout + result.stderr


async def test_no_secret_appears_anywhere_after_a_failing_generation(secret_cluster: Cluster) -> None:
    cluster = secret_cluster
    cluster.fake.script("status:401")
    replica = cluster.add_replica("secrets-a")
    await cluster.wait_healthy(replica)
    await cluster.enqueue([90])

    async def failed() -> bool:
        return (await cluster.statuses([90])).get(90) == "failed"

    await wait_until(failed, 60, what="the generation to fail")
    assert cluster.fake.requests[0].headers["authorization"] == f"Bearer {API_KEY}", "the key was really used"

    seen: dict[str, str] = {}
    conn = await cluster.connect()
    try:
        for table in ("site_orders", "site_generations", "site_generation_phases", "site_generation_logs"):
            rows = [dict(r) for r in await conn.fetch(f"SELECT * FROM {table}")]
            seen[f"table {table}"] = json.dumps(rows, default=str)
        error = await conn.fetchval("SELECT error FROM site_generations WHERE order_id = 90")
    finally:
        await conn.close()
    assert error["type"] == "AIAuthError" and "FAULTS_FAKE_KEY" in error["message"]

    store = redis.asyncio.Redis.from_url(cluster.redis_url)
    try:
        values = [repr(await _read_key(store, key)) async for key in store.scan_iter()]
    finally:
        await store.aclose()
    seen["redis"] = "\n".join(values)
    assert "AIAuthError" in seen["redis"], "the failed job's result is stored"

    seen["sitegen config"] = _cli(cluster, "config")
    seen["sitegen status"] = _cli(cluster, "status", "90")
    seen["sitegen logs"] = _cli(cluster, "logs", "90")
    replica.terminate()
    await replica.wait_exit(timeout=30)
    seen["worker log"] = replica.log()
    assert "AIAuthError" in seen["worker log"] and "***" in seen["sitegen config"]

    leaks = [(where, secret) for where, text in seen.items() for secret in SECRETS if secret in text]
    assert not leaks, f"secrets leaked: {leaks}"
