"""Observability of real workers: Prometheus metrics scraped over HTTP and JSON log lines, with a real
generation through the fake provider server, real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import asyncpg
import httpx2
import pytest
from arq import ArqRedis
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import KEY, KEY_ENV, SAMPLE_BRIEF, WorkerFactory, close_worker, remote, wait_for_result, with_ai
from worker import client
from worker.ai.base import AIRequest
from worker.ai.http import OpenAIProvider
from worker.local.fake_server import FakeProviderServer
from worker.local.services import free_port
from worker.metrics import Metrics
from worker.settings import MetricsSection, Settings

pytestmark = pytest.mark.usefixtures("provider_key")

ROOT = Path(__file__).resolve().parent.parent.parent
ARQ = str(ROOT / ".venv" / "bin" / "arq")
Samples = dict[str, list[tuple[dict[str, str], float]]]


async def scrape(port: int, *, wait_s: float = 15) -> Samples:
    """Every sample the replica exposes, by sample name (`*_total`, `*_count`...); waits `wait_s` for it to be up."""
    deadline = time.monotonic() + wait_s
    async with httpx2.AsyncClient() as http:
        while True:
            try:
                response = await http.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
                break
            except httpx2.ConnectError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def parse(exposition: str) -> Samples:
    """The samples of a Prometheus text exposition, by sample name."""
    samples: Samples = defaultdict(list)
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(value for found, value in samples.get(name, []) if labels.items() <= found.items())


def with_metrics(settings: Settings, port: int) -> Settings:
    return settings.model_copy(update={"metrics": MetricsSection(port=port, queue_sample_every_s=0.1)})


async def test_a_generation_shows_in_the_metrics(
    fake: FakeProviderServer, settings: Settings, start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    port = free_port()
    provider = remote("openai", fake.url, price_input_per_mtok=1.0, price_output_per_mtok=2.0)
    worker = await start_worker(with_metrics(with_ai(settings, {"remote": provider}), port))
    # A job deferred for an hour stays queued, so the sampled queue depth has something to show.
    await redis.enqueue_job("generate_site", 9999, _job_id="deferred", _queue_name=client.QUEUE_NAME, _defer_by=3600)
    await client.enqueue_generation(redis, 80, SAMPLE_BRIEF)

    result = await wait_for_result(redis, 80)
    assert result["status"] == "succeeded"

    deadline = time.monotonic() + 10
    while True:
        m = await scrape(port)
        if total(m, "sitegen_jobs_total") == 1 and total(m, "sitegen_queue_depth") == 1:
            break
        assert time.monotonic() < deadline, "the job's outcome and the queue depth never showed"
        await asyncio.sleep(0.1)

    assert total(m, "sitegen_worker_info", replica="test-replica") == 1
    assert total(m, "sitegen_jobs_started_total") == 1
    assert total(m, "sitegen_jobs_total", outcome="succeeded") == 1
    assert total(m, "sitegen_jobs_running") == 0
    assert total(m, "sitegen_generation_duration_seconds_count", outcome="succeeded") == 1
    assert total(m, "sitegen_generation_duration_seconds_sum") > 0

    phases = {labels["phase"]: value for labels, value in m["sitegen_phase_duration_seconds_count"]}
    assert phases == {"plan": 1, "content": 1, "code": 1, "assemble": 1}
    assert total(m, "sitegen_phase_duration_seconds_count", outcome="ok") == 4

    assert total(m, "sitegen_model_calls_total") == 3
    for task in ("planning", "content", "coding"):
        assert total(m, "sitegen_model_calls_total", provider="remote", task=task, status="ok") == 1
        assert total(m, "sitegen_model_call_duration_seconds_count", provider="remote", task=task) == 1
    tokens_in = total(m, "sitegen_model_tokens_total", provider="remote", direction="input")
    tokens_out = total(m, "sitegen_model_tokens_total", provider="remote", direction="output")
    assert tokens_in > 0 and tokens_out > 0
    assert tokens_in + tokens_out == sum(result["usage"][k] for k in ("input_tokens", "output_tokens")), (
        "the token counters agree with the usage stored with the generation"
    )
    assert total(m, "sitegen_model_cost_usd_total") == pytest.approx(result["usage"]["cost_usd"], abs=1e-6)
    assert total(m, "sitegen_model_cost_usd_total") > 0

    assert total(m, "sitegen_model_max_concurrency", provider="remote") == provider.max_concurrency
    assert total(m, "sitegen_model_calls_in_flight", provider="remote") == 0
    assert total(m, "sitegen_model_calls_waiting", provider="remote") == 0

    assert total(m, "sitegen_db_pool_max_connections", pool="generation") == 4
    assert total(m, "sitegen_db_pool_max_connections", pool="progress") == 2
    assert total(m, "sitegen_db_pool_connections", pool="generation") >= 1
    assert total(m, "sitegen_db_pool_idle_connections", pool="generation") >= 0
    written = await db.fetchval("SELECT count(*) FROM site_generation_logs WHERE order_id = 80")
    assert total(m, "sitegen_progress_rows_written_total") == written > 0
    assert total(m, "sitegen_progress_write_failures_total") == 0
    assert total(m, "sitegen_progress_rows_dropped_total") == 0
    assert total(m, "sitegen_progress_rows_pending") == 0
    assert total(m, "sitegen_queue_oldest_ready_seconds") == 0, "the deferred job is not due yet"
    assert total(m, "sitegen_queue_sampled_timestamp_seconds") > time.time() - 60

    documented = (ROOT / "docs" / "metrics.md").read_text()
    names = {  # `*_created` is the client library's creation time of a counter or histogram
        re.sub(r"_(bucket|count|sum)$", "", name)
        for name in m
        if name.startswith("sitegen_") and not name.endswith("_created")
    }
    assert names and not [n for n in sorted(names) if f"`{n}`" not in documented], "docs/metrics.md lists them all"

    await close_worker(worker)
    with pytest.raises(httpx2.ConnectError):
        await scrape(port, wait_s=0)


async def test_a_running_job_is_not_read_as_the_oldest_waiting_one(
    fake: FakeProviderServer, settings: Settings, start_worker: WorkerFactory, redis: ArqRedis
) -> None:
    """Regression: issue 15 part 1. A running job stayed at the head of arq's queue at its enqueue time, so
    `sitegen_queue_oldest_ready_seconds` grew for as long as it ran (a generation running past the alert's
    5 minutes fired it with nothing waiting). Its score is now the end of its lease: nothing is due."""
    fake.script("hang")
    port = free_port()
    await start_worker(with_metrics(with_ai(settings, {"remote": remote("openai", fake.url, read_timeout_s=30)}), port))
    await client.enqueue_generation(redis, 81, SAMPLE_BRIEF)
    await asyncio.to_thread(fake.wait_for_requests, 1)
    running_since = time.time()

    deadline = time.monotonic() + 10
    while (m := await scrape(port)) and total(m, "sitegen_queue_sampled_timestamp_seconds") < running_since + 0.5:
        assert time.monotonic() < deadline, "the queue was not sampled while the job ran"
        await asyncio.sleep(0.1)

    assert total(m, "sitegen_queue_depth") >= 1, "the running job is still in arq's queue (beside the sweeper's)"
    # Read as waiting, it would show at least 0.5 s (sampled that long after it started); the sweeper's cron
    # job may be caught in the few milliseconds between coming due and being taken.
    assert total(m, "sitegen_queue_oldest_ready_seconds") < 0.25, "but it is not waiting"


async def test_calls_waiting_for_a_providers_slots_show_and_leave_no_count_behind(fake: FakeProviderServer) -> None:
    """max_concurrency 1 and three calls: one in flight (held by the fake), two waiting for its slot.
    Cancelling a waiting call and then the held one frees the slot for the last, and every count
    goes back to 0."""
    fake.script("hang", "ok")
    provider = OpenAIProvider("remote", remote("openai", fake.url, max_concurrency=1, max_retries=0), KEY)
    metrics = Metrics("test-replica")
    metrics.watch({}, None, {"remote": provider.slots})
    request = AIRequest(task="planning", system="plan", prompt=f"<input>{json.dumps({'brief': SAMPLE_BRIEF})}</input>")
    held, first_waiting, last_waiting = (asyncio.create_task(provider.complete(request)) for _ in range(3))
    try:
        await asyncio.to_thread(fake.wait_for_requests, 1)  # the first call is at the fake, hanging
        m = parse(metrics.exposition().decode())
        assert total(m, "sitegen_model_max_concurrency", provider="remote") == 1
        assert total(m, "sitegen_model_calls_in_flight", provider="remote") == 1
        assert total(m, "sitegen_model_calls_waiting", provider="remote") == 2

        last_waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await last_waiting
        assert total(parse(metrics.exposition().decode()), "sitegen_model_calls_waiting", provider="remote") == 1

        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        reply = await first_waiting  # took the freed slot; the fake answers it
        assert reply.text
    finally:
        for call in (held, first_waiting, last_waiting):
            call.cancel()
        await provider.aclose()
    m = parse(metrics.exposition().decode())
    assert total(m, "sitegen_model_calls_in_flight", provider="remote") == 0
    assert total(m, "sitegen_model_calls_waiting", provider="remote") == 0
    assert len(fake.requests) == 2, "the cancelled waiting call never reached the provider"


async def test_a_429_then_ok_shows_both_calls(
    fake: FakeProviderServer, settings: Settings, start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    fake.script("429:0")
    port = free_port()
    await start_worker(with_metrics(with_ai(settings, {"remote": remote("anthropic", fake.url)}), port))
    await client.enqueue_generation(redis, 81, SAMPLE_BRIEF)

    assert (await wait_for_result(redis, 81))["status"] == "succeeded"

    m = await scrape(port)
    assert total(m, "sitegen_model_calls_total", provider="remote", task="planning", status="429") == 1
    assert total(m, "sitegen_model_calls_total", provider="remote", task="planning", status="ok") == 1
    assert total(m, "sitegen_model_calls_total", status="ok") == 3
    assert total(m, "sitegen_model_call_duration_seconds_count", status="429") == 1
    assert total(m, "sitegen_jobs_total", outcome="succeeded") == 1


async def test_two_workers_in_one_process_count_apart(
    settings: Settings, start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    """Each worker has its own registry: no clash at startup, and one's jobs never show in the other's metrics."""
    first, second = free_port(), free_port()
    await start_worker(with_metrics(settings, first))
    await client.enqueue_generation(redis, 82, SAMPLE_BRIEF)
    assert (await wait_for_result(redis, 82))["status"] == "succeeded"
    await start_worker(with_metrics(settings, second))

    assert total(await scrape(first), "sitegen_jobs_total", outcome="succeeded") == 1
    assert total(await scrape(second), "sitegen_jobs_total") == 0
    calls = await scrape(first)
    assert total(calls, "sitegen_model_calls_total", provider="offline", status="ok") == 3


async def test_a_rejected_job_is_counted_as_rejected(
    settings: Settings, start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    port = free_port()
    await start_worker(with_metrics(settings, port))
    await redis.enqueue_job("generate_site", 83, _job_id=client.job_id(83), _queue_name=client.QUEUE_NAME)

    deadline = time.monotonic() + 30
    while total(m := await scrape(port), "sitegen_jobs_total") == 0:
        assert time.monotonic() < deadline, "the job never ended"
        await asyncio.sleep(0.1)
    assert total(m, "sitegen_jobs_total", outcome="rejected") == 1, "an unknown order without a brief is bad input"


async def test_arq_worker_process_logs_json_lines_with_context_and_serves_metrics(
    fake: FakeProviderServer,
    service_env: dict[str, str],
    tmp_path: Path,
    redis: ArqRedis,
    db: asyncpg.Connection,
) -> None:
    """`arq worker.main.WorkerSettings` with SITEGEN_LOG_JSON=1: every stderr line is one JSON object, and a line
    logged inside a phase (the provider's retry warning) names the order, generation, phase and replica."""
    settings_file = tmp_path / "settings.toml"
    settings_file.write_text(
        "[ai.providers.remote]\n"
        'kind = "openai"\n'
        'model = "openai-test-model"\n'
        f'base_url = "{fake.url}/v1"\n'
        f'api_key_env = "{KEY_ENV}"\n'
        "[ai.routing]\n"
        'planning = ["remote"]\ncontent = ["remote"]\ncoding = ["remote"]\n'
    )
    port = free_port()
    env = {
        **service_env,
        "SITEGEN_SETTINGS": str(settings_file),
        "SITEGEN_LOG_JSON": "1",
        "SITEGEN_LOG__LEVEL": "DEBUG",  # routine progress rows (a phase started) are echoed at DEBUG
        "SITEGEN_METRICS__PORT": str(port),
        "SITEGEN_WORKER__REPLICA_ID": "json-replica",
        "SITEGEN_WORKER__POLL_DELAY_S": "0.05",
        "SITEGEN_OUTPUT__DIR": str(tmp_path / "sites"),
        KEY_ENV: KEY,
    }
    fake.script("429:0.2")
    worker = await asyncio.create_subprocess_exec(
        ARQ, "worker.main.WorkerSettings", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert worker.stderr is not None
    lines: list[str] = []

    async def read_stderr() -> None:
        assert worker.stderr is not None
        async for raw in worker.stderr:
            lines.append(raw.decode())

    reader = asyncio.create_task(read_stderr())
    try:
        await client.enqueue_generation(redis, 84, SAMPLE_BRIEF)
        result = await wait_for_result(redis, 84, timeout=60)
        assert result["status"] == "succeeded"
        m = await scrape(port)
        assert total(m, "sitegen_jobs_total", outcome="succeeded") == 1
        assert total(m, "sitegen_model_calls_total", status="429") == 1
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait(), 30) == 0
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
        await asyncio.wait_for(reader, 10)

    entries: list[dict[str, Any]] = [json.loads(line) for line in lines if line.strip()]  # each line is JSON
    assert entries, "the worker logged nothing"
    for entry in entries:
        assert {"time", "level", "message", "replica", "order_id", "generation_id", "phase"} <= entry.keys(), entry
        assert entry["replica"] == "json-replica"
    generation_id = await db.fetchval("SELECT id FROM site_generations WHERE order_id = 84")
    retry = [e for e in entries if "rate limited" in e["message"] and e["level"] == "WARNING"]
    assert retry, "the provider's retry warning is logged"
    assert retry[0]["order_id"] == 84 and retry[0]["generation_id"] == generation_id
    assert retry[0]["phase"] == "plan" and retry[0]["logger"] == "worker.ai.http"
    started = [e for e in entries if e["message"] == "phase content started"]
    assert started and started[0]["level"] == "DEBUG"
    assert started[0]["generation_id"] == generation_id and started[0]["phase"] == "content"
    assert any(e["logger"].startswith("arq") for e in entries), "arq's own logging goes through the same sink"
    assert KEY not in "".join(lines)
