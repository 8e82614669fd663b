"""Prometheus metrics of one `serve` process, in a registry of its own (docs/metrics.md lists them)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from worker.api.fanout import ProgressFanout

DELAY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _FanoutCollector(Collector):
    def __init__(self, fanout: ProgressFanout) -> None:
        self.fanout = fanout

    def collect(self) -> Iterator[Metric]:
        f = self.fanout
        yield GaugeMetricFamily("sitegen_api_sse_clients", "SSE clients connected", value=f.clients)
        yield GaugeMetricFamily(
            "sitegen_api_listen_connected", "1 while the LISTEN connection is up", value=int(f.listening)
        )
        yield CounterMetricFamily(
            "sitegen_api_listen_reconnects",
            "Times the LISTEN connection was (re)opened after a loss",
            value=f.reconnects,
        )
        yield CounterMetricFamily(
            "sitegen_api_sse_clients_dropped",
            "SSE clients disconnected because they fell too far behind (they reconnect with Last-Event-ID)",
            value=f.dropped_clients,
        )


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "sitegen_api_requests",
            "HTTP requests, by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.streams_refused = Counter(
            "sitegen_api_sse_streams_refused",
            "SSE streams refused with 429, by the cap they would pass (setting api.max_streams*)",
            ["cap"],
            registry=r,
        )
        self.events_sent = Counter("sitegen_api_sse_events_sent", "SSE progress events sent to clients", registry=r)
        self.event_delay = Histogram(
            "sitegen_api_sse_event_delay_seconds",
            "From a progress row's creation to its event being written to a live client",
            buckets=DELAY_BUCKETS,
            registry=r,
        )

    def watch(self, fanout: ProgressFanout) -> None:
        self.registry.register(_FanoutCollector(fanout))

    def sent(self, row: dict[str, Any], *, live: bool) -> None:
        self.events_sent.inc()
        created = row.get("created_at")
        if live and isinstance(created, datetime):
            self.event_delay.observe(max((datetime.now(UTC) - created).total_seconds(), 0.0))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
