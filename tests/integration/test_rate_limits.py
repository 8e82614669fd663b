"""Provider limits shared by every replica, against real Redis and the fake provider over HTTP.

A "replica" here is what one worker process has: its own Redis connection, its own `SharedLimits`
and its own provider client; several live in this test's event loop (and one test runs workers).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio
from arq import ArqRedis
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from tests.helpers import (
    SAMPLE_BRIEF,
    WorkerFactory,
    cli_env,
    progress_messages,
    remote,
    run_sitegen,
    wait_for_result,
    with_ai,
)
from worker import client
from worker.ai.base import AIReply, AIRequest
from worker.ai.http import OpenAIProvider
from worker.ai.limits import Budget, Limits, ProviderLimiter, SharedLimits, keys
from worker.errors import BudgetWaitExceeded
from worker.follow import follow_logs
from worker.local.fake_server import FakeProviderServer
from worker.local.services import LocalServices, RedisServer
from worker.settings import ProviderSettings, Settings

pytestmark = pytest.mark.usefixtures("provider_key")

REQUEST = AIRequest(task="planning", system="Answer with JSON.", prompt="Say ok.")
TASKS = ("planning", "content", "coding")


class Replica:
    """One replica's view of a provider: its own Redis connection, shared limits and HTTP client."""

    def __init__(self, redis_url: str, name: str, config: ProviderSettings, *, lease_s: float = 8.0) -> None:
        self.redis: redis.asyncio.Redis = redis.asyncio.Redis.from_url(redis_url)
        self.limits = SharedLimits(self.redis, replica=name, lease_s=lease_s, max_pause_s=60)
        self.provider = OpenAIProvider("remote", config, "key")
        self.provider.limiter = self.limits.provider(
            "remote", Limits(config.requests_per_minute, config.tokens_per_minute, config.cluster_max_concurrency)
        )

    async def complete(self, **kwargs: Any) -> AIReply:
        return await self.provider.complete(REQUEST, **kwargs)

    async def aclose(self) -> None:
        await self.provider.aclose()
        await self.limits.aclose()
        await self.redis.aclose()


@asynccontextmanager
async def replicas(redis_url: str, config: ProviderSettings, n: int, **kwargs: Any) -> AsyncIterator[list[Replica]]:
    started = [Replica(redis_url, f"replica-{i}", config, **kwargs) for i in range(n)]
    try:
        yield started
    finally:
        for replica in started:
            await replica.aclose()


def assert_spaced(arrivals: list[float], interval_s: float, jitter_s: float) -> None:
    """GCRA with no burst: any k+1 requests span at least k intervals (less the network's jitter), which is
    the count of every window at once: at most ceil((w + jitter) / interval) requests in any w seconds."""
    times = sorted(arrivals)
    for i, first in enumerate(times):
        for j in range(i + 1, len(times)):
            assert times[j] - first >= (j - i) * interval_s - jitter_s, (
                f"requests {i} and {j} arrived {times[j] - first:.3f}s apart, "
                f"less than {j - i} intervals of {interval_s}s: the shared limit was exceeded"
            )


async def test_three_replicas_together_never_exceed_the_requests_per_minute(
    services: LocalServices, redis: ArqRedis, fake: FakeProviderServer
) -> None:
    rpm = 240  # one request every 250 ms for the whole cluster
    interval_s = 60 / rpm
    config = remote("openai", fake.url, requests_per_minute=rpm)
    booked: list[float] = []
    async with replicas(services.redis_url, config, 3) as three:
        for replica in three:
            replica.provider.limiter = _recording(replica, booked)
        deadline = time.monotonic() + 4.0
        made: dict[str, int] = {}

        async def caller(replica: Replica) -> None:
            while time.monotonic() < deadline:
                await replica.complete()
                made[replica.limits.replica] = made.get(replica.limits.replica, 0) + 1

        await asyncio.gather(*(caller(r) for r in three for _ in range(4)))

    # What the limiter decided, on Redis' clock: exactly one interval apart at least.
    assert len(booked) == len(fake.requests)
    assert_spaced([ms / 1000 for ms in booked], interval_s, jitter_s=0.002)
    # What the provider saw: the same, give or take the way there (a booked call goes at its time or later).
    arrivals = [r.at for r in fake.requests]
    assert_spaced(arrivals, interval_s, jitter_s=0.3)
    for start in arrivals:  # every 1 s window: 4 at the rate, one more at most for a late arrival
        assert sum(start <= at < start + 1 for at in arrivals) <= 1 / interval_s + 1
    # 12 callers with an instant provider would make thousands of calls: the limit is what held them.
    assert len(arrivals) >= 12 and len(made) == 3, made
    assert all(r.fault == "ok" for r in fake.requests)


def _recording(replica: Replica, booked: list[float]) -> ProviderLimiter:
    """The replica's limiter, noting when each call's budget was booked for (on Redis' clock)."""
    limiter = replica.provider.limiter
    assert limiter is not None
    acquire = limiter.acquire

    async def recorded(tokens: int, **kwargs: Any) -> Budget:
        budget = await acquire(tokens, **kwargs)
        booked.append(budget.booked_ms)
        return budget

    limiter.acquire = recorded  # type: ignore[method-assign]
    return limiter


async def test_one_replicas_429_pauses_every_replica_until_its_retry_after(
    services: LocalServices, redis: ArqRedis, fake: FakeProviderServer
) -> None:
    fake.script("429:2")
    async with replicas(services.redis_url, remote("openai", fake.url), 3) as (first, second, third):
        paused = asyncio.Event()

        async def notify(message: str, **details: Any) -> None:
            if "retrying in" in message:  # after its 429 was answered and the pause stored
                paused.set()

        answered = asyncio.create_task(first.complete(notify=notify))
        await paused.wait()
        await asyncio.gather(second.complete(), third.complete(), answered)

    refused, *after = fake.requests
    assert refused.fault == "429:2" and [r.fault for r in after] == ["ok"] * 3
    earliest = min(r.at for r in after) - refused.at
    assert earliest >= 1.95, f"a replica asked {earliest:.2f}s after the 429: the pause of 2 s was not shared"
    assert (await redis.pttl(keys("remote")["pause"])) == -2, "the pause ends by itself"


async def test_a_call_that_cannot_get_budget_in_time_is_refused_at_once_naming_the_budget(
    services: LocalServices, redis: ArqRedis, fake: FakeProviderServer
) -> None:
    async with replicas(services.redis_url, remote("openai", fake.url, requests_per_minute=2), 2) as (one, two):
        await one.complete(budget_wait_s=1)
        started = time.monotonic()
        with pytest.raises(BudgetWaitExceeded) as raised:
            await two.complete(budget_wait_s=1)
    assert time.monotonic() - started < 1, "30 s of budget needed: no point waiting 1 s first"
    assert raised.value.budget == "requests" and 29 < raised.value.retry_after_s <= 30
    assert raised.value.task == "planning" and "2 requests/min budget" in str(raised.value)
    assert len(fake.requests) == 1


async def test_tokens_are_charged_by_estimate_and_given_back_from_the_reported_usage(
    services: LocalServices, redis: ArqRedis, fake: FakeProviderServer
) -> None:
    # 6,000 tokens/min: 10 ms a token. The first estimate (max_output_tokens, 1,000) books 10 s of budget;
    # the usage reported (a few tokens) gives it back, so the next call goes at once.
    config = remote("openai", fake.url, tokens_per_minute=6000, max_output_tokens=1000)
    async with replicas(services.redis_url, config, 2) as (one, two):
        reply = await one.complete(budget_wait_s=0.5)
        assert reply.usage.tokens < 50
        await two.complete(budget_wait_s=0.5)
        booked_until = await redis.get(keys("remote")["tokens"])  # gone: nothing booked ahead any more
        backlog_ms = float(booked_until) - _ms(await redis.time()) if booked_until else 0.0
    assert len(fake.requests) == 2
    assert backlog_ms < 1000, "only the tokens used stay charged"


async def test_a_failed_call_gives_back_its_token_estimate(
    services: LocalServices, redis: ArqRedis, fake: FakeProviderServer
) -> None:
    """Regression: issue 21 defect 9: failed calls (429, 5xx, timeout) kept their token estimate, so a retry
    after a 500 waited for budget the failed call never used. 6,000 tokens/min with a 1,000-token estimate:
    the 500 books 10 s of budget; given back, the retry goes at once."""
    fake.script("status:500")
    config = remote("openai", fake.url, tokens_per_minute=6000, max_output_tokens=1000, max_retries=1)
    async with replicas(services.redis_url, config, 1) as (one,):
        reply = await one.complete(budget_wait_s=2)
    assert [r.fault for r in fake.requests] == ["status:500", "ok"]
    assert reply.usage.tokens < 50


def _ms(redis_time: tuple[int, int]) -> float:
    return redis_time[0] * 1000 + redis_time[1] / 1000


async def test_cluster_concurrency_is_shared_and_a_killed_replicas_slots_come_back(
    services: LocalServices, redis: ArqRedis, fake: FakeProviderServer
) -> None:
    fake.configure(latency_s=0.3)
    config = remote("openai", fake.url, cluster_max_concurrency=2)
    # The default lease: nothing renews these replicas' slots, so a 1 s lease would let a call that a loaded
    # machine (parallel test workers) stretched past 1 s lose its slot to a third call, mid-call.
    async with replicas(services.redis_url, config, 3) as three:
        in_flight = 0
        most = 0

        def counted(replica: Replica) -> Callable[[AIRequest], Awaitable[AIReply]]:
            exchange = replica.provider._exchange

            async def wrapped(request: AIRequest) -> AIReply:
                nonlocal in_flight, most
                in_flight += 1
                most = max(most, in_flight)
                try:
                    return await exchange(request)
                finally:
                    in_flight -= 1

            return wrapped

        for replica in three:
            replica.provider._exchange = counted(replica)  # type: ignore[method-assign]
        await asyncio.gather(*(r.complete() for r in three for _ in range(4)))
        assert most == 2 and len(fake.requests) == 12
        assert await redis.zcard(keys("remote")["slots"]) == 0, "every slot was given back"

    # A replica SIGKILLed during its call: its slots are never released nor renewed.
    async with replicas(services.redis_url, config, 2, lease_s=1.0) as two:
        dead = two[0].provider.limiter
        assert dead is not None
        await dead.acquire(1, max_wait_s=1)
        await dead.acquire(1, max_wait_s=1)
        two[0].limits.held.clear()  # no heartbeat renews them any more
        started = time.monotonic()
        await two[1].complete(budget_wait_s=5)
        waited = time.monotonic() - started
    assert 0.8 <= waited < 3, f"the dead replica's slots came back after {waited:.2f}s (lease 1 s)"


async def test_the_heartbeat_keeps_a_long_calls_cluster_slot(
    services: LocalServices, redis: ArqRedis, fake: FakeProviderServer
) -> None:
    async with replicas(services.redis_url, remote("openai", fake.url, cluster_max_concurrency=1), 2, lease_s=1.0) as (
        holder,
        other,
    ):
        assert holder.provider.limiter is not None
        await holder.provider.limiter.acquire(1, max_wait_s=1)
        for _ in range(3):  # 1.5 s: past the lease, renewed as the heartbeat does (in its pipeline)
            async with holder.redis.pipeline(transaction=False) as pipe:
                await holder.limits.renew(pipe)
                await pipe.execute()
            await asyncio.sleep(0.5)
        with pytest.raises(BudgetWaitExceeded) as raised:
            await other.complete(budget_wait_s=0.3)
    assert raised.value.budget == "concurrency" and not fake.requests


async def test_a_redis_outage_falls_back_to_each_replicas_share_and_warns_once(
    tmp_path: Path, fake: FakeProviderServer, log_lines: list[str]
) -> None:
    rpm = 360  # with 3 live replicas, 120/min each while Redis is away: one request every 500 ms here
    with RedisServer(tmp_path / "redis") as dedicated:
        async with replicas(dedicated.url, remote("openai", fake.url, requests_per_minute=rpm), 1) as (replica,):
            for name in ("replica-0", "replica-1", "replica-2"):
                await replica.redis.set(f"site_generation:health-check:{name}", "alive", ex=60)
            await replica.complete()
            assert await replica.limits.count_replicas() == 3
            dedicated.kill()

            started = time.monotonic()
            deadline = started + 2.6

            async def caller() -> int:
                made = 0
                while time.monotonic() < deadline:
                    await replica.complete()  # never stalls: Redis refuses, the local share answers
                    made += 1
                return made

            made = sum(await asyncio.gather(*(caller() for _ in range(4))))
            elapsed = time.monotonic() - started

    local = [r.at for r in fake.requests[1:]]
    assert made == len(local) and 4 <= made <= elapsed / 0.5 + 2
    assert_spaced(local, 0.5, jitter_s=0.15)
    warnings = [line for line in log_lines if "Redis does not answer" in line]
    assert len(warnings) == 1, warnings
    assert "1/3" in warnings[0] and "remote: 120 requests/min" in warnings[0]


async def test_a_task_with_a_fallback_uses_it_while_the_first_provider_has_no_budget(
    fake: FakeProviderServer,
    settings: Settings,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
) -> None:
    now_ms = _ms(await redis.time())
    await redis.set(keys("first")["pause"], f"{now_ms + 60_000:.3f}", px=60_000)  # another replica's 429
    custom = with_ai(
        settings,
        {"first": remote("openai", fake.url, model="first-model"), "backup": remote("openai", fake.url)},
        routing={task: ["first", "backup"] for task in TASKS},
        fallback_budget_wait_s=0.2,
    )
    await start_worker(custom)
    await client.enqueue_generation(redis, 81, SAMPLE_BRIEF)

    result = await wait_for_result(redis, 81)

    assert result["status"] == "succeeded"
    assert [r.body["model"] for r in fake.requests] == ["openai-test-model"] * 3
    messages = await progress_messages(db, 81)
    assert any("provider first has no budget" in m and "falling back to backup" in m for m in messages)


async def test_a_waiting_generation_says_so_and_hands_back_after_the_longest_wait(
    services: LocalServices,
    fake: FakeProviderServer,
    settings: Settings,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
) -> None:
    config = remote("openai", fake.url, cluster_max_concurrency=1)
    # Another replica holds the only cluster slot for a long call.
    async with replicas(services.redis_url, config, 1) as (other,):
        assert other.provider.limiter is not None
        held = await other.provider.limiter.acquire(1, max_wait_s=1)
        worker = await start_worker(with_ai(settings, {"remote": config}, max_budget_wait_s=1.5))
        await client.enqueue_generation(redis, 82, SAMPLE_BRIEF)

        rows = await _wait_for_log(services.database_url, 82, "handed back after waiting")
        assert not fake.requests, "no call while the cluster's only slot is taken"
        metrics = _samples(worker.ctx["runtime"].metrics.exposition().decode())
        waited = metrics[("sitegen_model_budget_wait_seconds_count", "concurrency", "handed_back", "remote")]
        assert waited >= 1
        assert metrics[("sitegen_model_budget_limit", "cluster_max_concurrency", "remote")] == 1
        await other.provider.limiter.release(held)  # the long call ends: the deferred retry goes on

        result = await wait_for_result(redis, 82)

    assert result["status"] == "succeeded" and len(fake.requests) == 3
    waiting = next(r for r in rows if r["message"].startswith("waiting for remote:"))
    assert "1 calls at once across the cluster" in waiting["message"] and waiting["phase"] == "plan"
    started = next(r for r in rows if r["message"] == "phase plan started")
    handed = next(r for r in rows if "handed back after waiting" in r["message"])
    assert 1.4 <= (handed["created_at"] - started["created_at"]).total_seconds() < 5
    assert "will retry in" in handed["message"] and handed["level"] == "info"
    assert "generation resumed at phase plan (attempt 2)" in await progress_messages(db, 82)


def _samples(exposition: str) -> dict[tuple[str, ...], float]:
    """Prometheus samples by (name, label values in the order of the label names)."""
    return {
        (sample.name, *(value for _, value in sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


async def _wait_for_log(dsn: str, order_id: int, text: str, timeout: float = 30) -> list[dict[str, Any]]:
    """The order's progress rows up to the first that holds `text`, followed live (LISTEN/NOTIFY)."""
    rows: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout), aclosing(follow_logs(dsn, order_id)) as followed:
        async for row in followed:
            rows.append(row)
            if text in row["message"]:
                return rows
    raise AssertionError(f"no progress row with {text!r}: {[r['message'] for r in rows]}")


async def test_status_shows_what_generations_wait_for_and_each_providers_budget(
    services: LocalServices, db: asyncpg.Connection, redis: ArqRedis, fake: FakeProviderServer
) -> None:
    await db.execute("INSERT INTO site_orders (id, brief) VALUES (83, '{}'), (84, '{}')")
    running = await db.fetchval(
        "INSERT INTO site_generations (order_id, status, current_phase, attempt, started_at)"
        " VALUES (83, 'running', 'content', 1, now()) RETURNING id"
    )
    await db.execute(
        "INSERT INTO site_generation_logs (order_id, generation_id, phase, level, message) VALUES"
        " (83, $1, 'content', 'info', 'phase content started'),"
        " (83, $1, 'content', 'info', 'waiting for remote: 60 requests/min budget (about 12s)')",
        running,
    )
    handed_back = {
        "type": "BudgetWaitExceeded",
        "message": "remote: no budget after 120.0s of waiting",
        "phase": "plan",
        "details": {"provider": "remote", "budget": "tokens"},
    }
    await db.execute(
        "INSERT INTO site_generations (order_id, status, current_phase, attempt, error)"
        " VALUES (84, 'queued', 'plan', 1, $1)",
        json.dumps(handed_back),
    )
    now_ms = _ms(await redis.time())
    await redis.set(keys("remote")["pause"], f"{now_ms + 30_000:.3f}", px=30_000)
    await redis.set(keys("remote")["requests"], f"{now_ms + 12_000:.3f}", px=12_000)
    env = cli_env(
        services,
        SITEGEN_AI__PROVIDERS__REMOTE__KIND="openai",
        SITEGEN_AI__PROVIDERS__REMOTE__MODEL="gpt-test",
        SITEGEN_AI__PROVIDERS__REMOTE__BASE_URL=f"{fake.url}/v1",
        SITEGEN_AI__PROVIDERS__REMOTE__REQUESTS_PER_MINUTE="60",
        **{f"SITEGEN_AI__ROUTING__{task.upper()}": "remote" for task in TASKS},
    )

    code, out = await run_sitegen(env, "status")

    assert code == 0, out
    assert "remote: 60 requests/min budget (about 12s)" in out
    assert "remote's tokens budget (handed back)" in out and "BudgetWaitExceeded" not in out
    provider_row = next(line for line in out.splitlines() if "60 req/min" in line)
    assert "s ahead" in provider_row and "s left" in provider_row


def test_the_offline_provider_takes_no_limits() -> None:
    with pytest.raises(ValidationError, match="requests_per_minute: the offline provider"):
        ProviderSettings(kind="offline", requests_per_minute=60)
