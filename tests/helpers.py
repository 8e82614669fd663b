"""What tests share besides fixtures: the sample brief and ways to wait for a job."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from arq import ArqRedis
from arq.jobs import Job, JobResult, SerializationError
from arq.worker import Worker

from worker import client
from worker.local.services import LocalServices
from worker.settings import AISection, ProviderSettings, Settings
from worker.tasks import cancel_and_wait

WorkerFactory = Callable[..., Awaitable[Worker]]

SAMPLE_BRIEF: dict[str, Any] = {
    "business_name": "Rosa's Bakery",
    "description": "Family bakery in Porto baking sourdough bread, pastel de nata and celebration cakes since 1998.",
    "industry": "bakery",
    "location": "Porto, Portugal",
    "services": ["Sourdough bread", "Pastries", "Custom cakes"],
    "contact": {
        "email": "hello@rosasbakery.example",
        "phone": "+351 222 000 111",
        "address": "Rua das Flores 12, Porto",
    },
}


def order_job(redis: ArqRedis, order_id: int) -> Job:
    return Job(client.job_id(order_id), redis, _queue_name=client.QUEUE_NAME, _deserializer=client.deserialize)


ROOT = Path(__file__).resolve().parent.parent


def cli_env(services: LocalServices, **extra: str) -> dict[str, str]:
    """Environment for `sitegen` subprocesses: the test services, none of the caller's SITEGEN_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITEGEN_") and k != "PYTHONUNBUFFERED"}
    env.update(DATABASE_URL=services.database_url, REDIS_URL=services.redis_url, COLUMNS="200", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


async def run_sitegen(env: dict[str, str], *args: str, timeout: float = 60) -> tuple[int, str]:
    """Run `python -m worker.cli ARGS` to completion: (exit code, stdout + stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.cli",
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode()


async def close_worker(worker: Worker) -> None:
    """Stop an in-process worker the way a shutdown does, then close it.

    arq's `Worker.close()` gathers the job tasks it cancels and re-raises a CancelledError from
    one cancelled before its job started (e.g. a cron job still reading Redis), skipping its
    shutdown hook. Letting the cancelled tasks finish, and forgetting them, first avoids that.
    """
    worker.handle_sig(signal.SIGUSR1)
    await cancel_and_wait(list(worker.tasks.values()), "a test's worker")  # again, should a cancel be lost
    worker.tasks.clear()
    await worker.close()


async def failed_result(redis: ArqRedis, order_id: int, timeout: float = 60) -> JobResult:
    """The result info of the order's job, which must have failed.

    A failed job's result is our JSON description of the error, which arq hands back as a
    SerializationError (it only re-raises real exception objects).
    """
    job = order_job(redis, order_id)
    with pytest.raises(SerializationError):
        await job.result(timeout=timeout, poll_delay=0.05)
    info = await job.result_info()
    assert info is not None
    return info


async def progress_messages(db: asyncpg.Connection, order_id: int) -> list[str]:
    """The order's progress-log messages, oldest first."""
    rows = await db.fetch("SELECT message FROM site_generation_logs WHERE order_id = $1 ORDER BY id", order_id)
    return [r["message"] for r in rows]


async def wait_for_result(redis: ArqRedis, order_id: int, timeout: float = 60) -> Any:
    """The result of the order's job, as a client would read it."""
    return await order_job(redis, order_id).result(timeout=timeout, poll_delay=0.05)


#: The API key tests configure for providers behind the fake server (see the `provider_key` fixture).
KEY_ENV = "SITEGEN_TEST_PROVIDER_KEY"
KEY = "sk-test-0123456789abcdefSECRET"
CLOUDFLARE_MODEL = "@cf/meta/llama-3.1-8b-instruct"


def remote(kind: str, url: str, **overrides: Any) -> ProviderSettings:
    """Settings of a provider of `kind` served by the fake provider server at `url`."""
    base = {"openai": f"{url}/v1", "anthropic": url, "cloudflare": f"{url}/client/v4"}[kind]
    config: dict[str, Any] = {
        "kind": kind,
        "model": CLOUDFLARE_MODEL if kind == "cloudflare" else f"{kind}-test-model",
        "base_url": base,
        "api_key_env": KEY_ENV,
        "read_timeout_s": 5,
        "max_retry_wait_s": 10,
        **({"account_id": "acc-123"} if kind == "cloudflare" else {}),
        **overrides,
    }
    return ProviderSettings(**config)


def with_ai(
    settings: Settings, providers: dict[str, ProviderSettings], routing: dict[str, list[str]] | None = None, **ai: Any
) -> Settings:
    """`settings` with these providers, routed (by default every task to the first one)."""
    routing = routing or {task: [next(iter(providers))] for task in ("planning", "content", "coding")}
    return settings.model_copy(update={"ai": AISection(providers=providers, routing=routing, **ai)})


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.2, what: str = "condition"
) -> float:
    """Poll `predicate` until true; returns the seconds it took. Fails the test with `what` on timeout."""
    started = time.monotonic()
    while not await predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)
    return time.monotonic() - started
