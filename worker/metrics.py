"""Prometheus metrics of one replica: what its jobs, phases and model calls did, and the state of its pools and queue.

Every metric lives in a `Metrics` object with its own `CollectorRegistry`, created in the
worker's on_startup and kept on the Runtime (never the process-wide default registry, so two
workers in one process never clash). With `metrics.port` set, a small asyncio HTTP server on
the worker's own event loop serves `GET /metrics`; it is stopped in on_shutdown. Pool sizes
and progress-log counters are read when scraped; the queue depth is sampled from Redis by a
background task. docs/metrics.md lists the metrics and what to alert on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any, Protocol

from arq import Retry
from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.ai.base import Usage
from worker.errors import InputError, message_of
from worker.tasks import cancel_and_wait

GENERATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
PHASE_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
MODEL_CALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
BUDGET_WAIT_BUCKETS = (0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _Pool(Protocol):
    """What the collector reads of an asyncpg pool."""

    def get_size(self) -> int: ...
    def get_idle_size(self) -> int: ...
    def get_max_size(self) -> int: ...


class _Progress(Protocol):
    """What the collector reads of the progress log (worker.progress.ProgressLog)."""

    written: int
    failed_writes: int
    dropped: int
    refused: int

    @property
    def pending(self) -> Any: ...


class _Slots(Protocol):
    """What the collector reads of a provider's `max_concurrency` slots (worker.ai.http.Slots)."""

    limit: int
    held: int
    waiting: int


class _Limiter(Protocol):
    """What the collector reads of a provider's shared limits (worker.ai.limits.ProviderLimiter)."""

    waiting: int
    pauses: int

    @property
    def limits(self) -> Any: ...
    @property
    def shared(self) -> Any: ...
    @property
    def last(self) -> Any: ...
    def paused_s(self) -> float: ...


class _Redis(Protocol):
    async def zcard(self, name: str) -> int: ...
    async def zrange(self, name: str, start: int, end: int, *, withscores: bool = ...) -> Any: ...


class JobOutcome:
    """Times one job try and counts how it ended; the job sets `outcome` from its result."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.outcome = "succeeded"
        self._started = 0.0

    def __enter__(self) -> JobOutcome:
        self._started = time.monotonic()
        self.metrics.jobs_started.inc()
        self.metrics.jobs_running.inc()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            outcome = self.outcome
        elif isinstance(exc, Retry):
            outcome = "retried"
        elif isinstance(exc, asyncio.CancelledError):
            outcome = "interrupted"
        elif isinstance(exc, InputError):
            outcome = "rejected"
        else:
            outcome = "failed"
        self.metrics.jobs_running.dec()
        self.metrics.jobs.labels(outcome).inc()
        self.metrics.generation_seconds.labels(outcome).observe(time.monotonic() - self._started)


class _RuntimeCollector(Collector):
    """Pool sizes and progress-log counters, read when Prometheus scrapes (nothing to keep in step)."""

    def __init__(
        self,
        pools: Mapping[str, _Pool],
        progress: _Progress | None,
        slots: Mapping[str, _Slots] | None = None,
        limiters: Mapping[str, _Limiter] | None = None,
    ) -> None:
        self.pools = dict(pools)
        self.progress = progress
        self.slots = dict(slots or {})
        self.limiters = dict(limiters or {})

    def collect(self) -> Iterator[Metric]:
        size = GaugeMetricFamily("sitegen_db_pool_connections", "Open connections of the pool", labels=["pool"])
        idle = GaugeMetricFamily("sitegen_db_pool_idle_connections", "Idle connections of the pool", labels=["pool"])
        most = GaugeMetricFamily("sitegen_db_pool_max_connections", "Most connections of the pool", labels=["pool"])
        for name, pool in self.pools.items():
            size.add_metric([name], pool.get_size())
            idle.add_metric([name], pool.get_idle_size())
            most.add_metric([name], pool.get_max_size())
        yield from (size, idle, most)
        if self.slots:
            limit = GaugeMetricFamily(
                "sitegen_model_max_concurrency", "Most calls in flight to the provider", labels=["provider"]
            )
            held = GaugeMetricFamily(
                "sitegen_model_calls_in_flight", "Model calls in flight to the provider", labels=["provider"]
            )
            waiting = GaugeMetricFamily(
                "sitegen_model_calls_waiting",
                "Model calls waiting for one of the provider's max_concurrency slots",
                labels=["provider"],
            )
            for name, slots in self.slots.items():
                limit.add_metric([name], slots.limit)
                held.add_metric([name], slots.held)
                waiting.add_metric([name], slots.waiting)
            yield from (limit, held, waiting)
        if self.limiters:
            yield from self._budgets()
        if self.progress is None:
            return
        p = self.progress
        yield CounterMetricFamily("sitegen_progress_rows_written", "Progress rows written", value=p.written)
        yield CounterMetricFamily(
            "sitegen_progress_write_failures",
            "Progress writes that failed (rows kept and retried)",
            value=p.failed_writes,
        )
        yield CounterMetricFamily(
            "sitegen_progress_rows_dropped",
            "Progress rows lost: the buffer was full, or PostgreSQL refused a row and its placeholder",
            value=p.dropped,
        )
        yield CounterMetricFamily(
            "sitegen_progress_rows_refused",
            "Progress rows PostgreSQL refused for what they hold, each replaced by a placeholder row",
            value=p.refused,
        )
        yield GaugeMetricFamily("sitegen_progress_rows_pending", "Progress rows waiting to be written", len(p.pending))

    def _budgets(self) -> Iterator[Metric]:
        """The providers' shared limits: as set, as last seen in Redis, and this replica's calls waiting."""
        limit = GaugeMetricFamily(
            "sitegen_model_budget_limit",
            "A provider's shared limit: requests_per_minute, tokens_per_minute or cluster_max_concurrency",
            labels=["provider", "limit"],
        )
        waiting = GaugeMetricFamily(
            "sitegen_model_budget_waiting",
            "Model calls of this replica waiting for the provider's budget now",
            labels=["provider"],
        )
        backlog = GaugeMetricFamily(
            "sitegen_model_budget_backlog_seconds",
            "How far ahead the provider's requests or tokens budget is booked, as last seen (0: free now)",
            labels=["provider", "budget"],
        )
        cluster = GaugeMetricFamily(
            "sitegen_model_cluster_calls_in_flight",
            "Calls in flight to the provider from every replica, as last seen (with cluster_max_concurrency)",
            labels=["provider"],
        )
        paused = GaugeMetricFamily(
            "sitegen_model_paused_seconds",
            "What is left of the provider's pause after a 429, as last seen",
            labels=["provider"],
        )
        pauses = CounterMetricFamily(
            "sitegen_model_pauses",
            "429s after which this replica paused the provider for every replica",
            labels=["provider"],
        )
        local = GaugeMetricFamily(
            "sitegen_model_budget_local_share",
            "1 while Redis does not answer and this replica keeps to its share of the limits (limit / replicas)",
        )
        replicas = GaugeMetricFamily(
            "sitegen_model_budget_replicas",
            "Live replicas last counted from the health keys (the local share's divisor)",
        )
        shared = None
        for name, limiter in self.limiters.items():
            shared = limiter.shared
            for key in ("requests_per_minute", "tokens_per_minute", "cluster_max_concurrency"):
                value = getattr(limiter.limits, key)
                if value:
                    limit.add_metric([name, key], value)
            waiting.add_metric([name], limiter.waiting)
            last = limiter.last
            if last is not None:
                backlog.add_metric([name, "requests"], max(last.requests_backlog_s, 0.0))
                backlog.add_metric([name, "tokens"], max(last.tokens_backlog_s, 0.0))
                if limiter.limits.cluster_max_concurrency:
                    cluster.add_metric([name], last.holders)
            paused.add_metric([name], limiter.paused_s())
            pauses.add_metric([name], limiter.pauses)
        yield from (limit, waiting, backlog, cluster, paused, pauses)
        if shared is not None:
            local.add_metric([], 1 if shared.degraded else 0)
            replicas.add_metric([], shared.replicas)
            yield from (local, replicas)


class Metrics:
    """The metrics of one replica (see docs/metrics.md); also the AI router's call observer."""

    def __init__(self, replica: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        Gauge("sitegen_worker_info", "Always 1; names the replica", ["replica"], registry=r).labels(replica).set(1)
        self.jobs_started = Counter("sitegen_jobs_started", "Job tries started", registry=r)
        self.jobs = Counter(
            "sitegen_jobs",
            "Job tries ended, by outcome: succeeded, failed, retried, rejected, cancelled, superseded, interrupted",
            ["outcome"],
            registry=r,
        )
        self.jobs_running = Gauge("sitegen_jobs_running", "Job tries running now", registry=r)
        self.generation_seconds = Histogram(
            "sitegen_generation_duration_seconds",
            "Wall time of one job try (a generation, or the part of it this try ran), by outcome",
            ["outcome"],
            buckets=GENERATION_BUCKETS,
            registry=r,
        )
        self.phase_seconds = Histogram(
            "sitegen_phase_duration_seconds",
            "Wall time of one phase run (model calls, validation and commit), by phase and outcome (ok, failed)",
            ["phase", "outcome"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.model_calls = Counter(
            "sitegen_model_calls",
            "Model calls (each HTTP attempt), by status: ok, the HTTP status, or what failed",
            ["provider", "task", "status"],
            registry=r,
        )
        self.model_call_seconds = Histogram(
            "sitegen_model_call_duration_seconds",
            "Latency of one model call",
            ["provider", "task", "status"],
            buckets=MODEL_CALL_BUCKETS,
            registry=r,
        )
        self.model_tokens = Counter(
            "sitegen_model_tokens", "Tokens of successful model calls", ["provider", "task", "direction"], registry=r
        )
        self.model_cost = Counter(
            "sitegen_model_cost_usd",
            "Cost of successful model calls in USD (from the prices set)",
            ["provider", "task"],
            registry=r,
        )
        self.budget_wait_seconds = Histogram(
            "sitegen_model_budget_wait_seconds",
            "Time a model call waited for the provider's shared budget, by what it waited for (requests, tokens, "
            "concurrency, paused; none) and outcome (granted, or handed_back when it waited too long)",
            ["provider", "budget", "outcome"],
            buckets=BUDGET_WAIT_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "sitegen_queue_depth", "Jobs in the arq queue (waiting, deferred or running)", registry=r
        )
        self.queue_oldest_ready_s = Gauge(
            "sitegen_queue_oldest_ready_seconds", "How long the longest-waiting runnable job has been due", registry=r
        )
        self.queue_sampled_at = Gauge(
            "sitegen_queue_sampled_timestamp_seconds", "When the queue was last read from Redis", registry=r
        )
        self._server: asyncio.Server | None = None
        self._sampler: asyncio.Task[None] | None = None

    # -- recording

    def job(self) -> JobOutcome:
        """`with metrics.job() as job:` around one job try; set `job.outcome` from a returned result."""
        return JobOutcome(self)

    @contextlib.contextmanager
    def phase(self, phase: str) -> Iterator[None]:
        started = time.monotonic()
        outcome = "failed"
        try:
            yield
            outcome = "ok"
        except asyncio.CancelledError:
            outcome = "interrupted"
            raise
        finally:
            self.phase_seconds.labels(phase, outcome).observe(time.monotonic() - started)

    def model_call(self, *, provider: str, task: str, status: str, seconds: float, usage: Usage | None) -> None:
        self.model_calls.labels(provider, task, status).inc()
        self.model_call_seconds.labels(provider, task, status).observe(seconds)
        if usage is not None:
            self.model_tokens.labels(provider, task, "input").inc(usage.input_tokens)
            self.model_tokens.labels(provider, task, "output").inc(usage.output_tokens)
            self.model_cost.labels(provider, task).inc(usage.cost_usd)

    def budget_wait(self, *, provider: str, budget: str, seconds: float, granted: bool) -> None:
        self.budget_wait_seconds.labels(provider, budget, "granted" if granted else "handed_back").observe(seconds)

    def watch(
        self,
        pools: Mapping[str, _Pool],
        progress: _Progress | None = None,
        slots: Mapping[str, _Slots] | None = None,
        limiters: Mapping[str, _Limiter] | None = None,
    ) -> None:
        """Report these pools, this progress log, these providers' slots and shared limits (by provider name)
        at every scrape."""
        self.registry.register(_RuntimeCollector(pools, progress, slots, limiters))

    # -- serving

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    async def serve(self, host: str, port: int) -> None:
        """Serve GET /metrics on host:port from this event loop, until `close`."""
        self._server = await asyncio.start_server(self._answer, host, port)
        logger.info("metrics at http://{}:{}/metrics", host, port)

    def sample_queue(self, redis: _Redis, queue_name: str, every_s: float) -> None:
        """Read the queue's depth from Redis every `every_s` seconds, in a task `close` ends."""
        self._sampler = asyncio.create_task(self._sample(redis, queue_name, every_s))

    async def close(self) -> None:
        if self._sampler is not None:
            await cancel_and_wait([self._sampler], "queue-depth sampler")
            self._sampler = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _sample(self, redis: _Redis, queue_name: str, every_s: float) -> None:
        failing = False
        while True:
            try:
                depth = await redis.zcard(queue_name)
                first = await redis.zrange(queue_name, 0, 0, withscores=True)
            except Exception as exc:  # Redis down: keep the last values, say so once
                if not failing:
                    logger.warning("metrics: cannot read the queue depth: {}", message_of(exc))
                failing = True
            else:
                failing = False
                now = time.time()
                self.queue_depth.set(depth)
                due_s = float(first[0][1]) / 1000 if first else now
                self.queue_oldest_ready_s.set(max(now - due_s, 0.0))
                self.queue_sampled_at.set(now)
            await asyncio.sleep(every_s)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            if path.split("?", 1)[0] not in ("/metrics", "/"):
                status, body, kind = "404 Not Found", b"not found; try /metrics\n", "text/plain; charset=utf-8"
            elif method not in ("GET", "HEAD"):
                status, body, kind = "405 Method Not Allowed", b"GET only\n", "text/plain; charset=utf-8"
            else:
                status, body, kind = "200 OK", self.exposition(), CONTENT_TYPE_LATEST
            headers = f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
            headers += "Connection: close\r\n\r\n"
            writer.write(headers.encode() + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a client that went away or spoke something else than HTTP
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
