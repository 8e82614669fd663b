"""What the HTTP providers read from headers and hide from logs."""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import threading
import time
import tracemalloc

import httpx2
import orjson
import pytest
from multidict import CIMultiDict

from tests.helpers import KEY, SAMPLE_BRIEF, remote
from worker.ai.base import MAX_WAIT_S, AIRequest
from worker.ai.http import OpenAIProvider, redact, request_body, retry_after_s
from worker.local.fake_server import FakeProviderServer


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"x-ratelimit-reset-requests": "6m0s"}, 360.0),
        ({"x-ratelimit-reset-tokens": "20ms"}, 0.02),
        ({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "1h2m3s"}, 3723.0),
        ({}, None),
        ({"retry-after": "soon"}, None),
    ],
)
def test_retry_after_is_read_from_every_header_providers_use(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after_s(httpx2.Headers(headers)) == expected


def test_retry_after_as_an_http_date() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    wait = retry_after_s(httpx2.Headers({"retry-after": when}))
    assert wait is not None and 25 <= wait <= 31


def test_redact_hides_given_secrets_and_key_shaped_strings() -> None:
    text = 'bad key "my-own-secret-value" sk-abcdefghijklmnop and Authorization: Bearer abc.def-ghi_jkl'
    shown = redact(text, "my-own-secret-value")
    assert "my-own-secret-value" not in shown and "sk-abcdefghijklmnop" not in shown
    assert "abc.def-ghi_jkl" not in shown and shown.count("***") == 3


def test_a_request_body_holds_no_more_memory_than_its_size() -> None:
    # Issue 15 (`inflight`): orjson.dumps hands back its whole working buffer (~128 KiB for a 9 KB code
    # prompt) and aiohttp holds the body until the answer is read: 2,000 calls in flight held ~250 MiB.
    body = {"model": "m", "messages": [{"role": "user", "content": "p" * 9000}], "max_tokens": 8000}
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        held = [request_body(body) for _ in range(50)]
        per_body = (tracemalloc.get_traced_memory()[0] - before) / len(held)
    finally:
        tracemalloc.stop()
    assert orjson.loads(held[0]) == body
    assert per_body < 2 * len(held[0])


WAIT_HEADERS = [
    "retry-after",
    "retry-after-ms",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "x-ratelimit-reset",
]
HOSTILE_WAITS = [
    "nan",
    "NaN",
    "-nan",
    "inf",
    "-inf",
    "Infinity",
    "-5",
    "-0.5",
    "-1e400",
    "1e400",
    "1e12",
    "1_000",
    "9" * 400,
]


@pytest.mark.parametrize("value", HOSTILE_WAITS)
@pytest.mark.parametrize("name", WAIT_HEADERS)
def test_a_hostile_wait_header_gives_no_wait_or_a_finite_one_within_the_clamp(name: str, value: str) -> None:
    """Regression: issue 21 defect 2: `_duration_s` returned float(value) unchecked, so a NaN or negative
    `x-ratelimit-reset-*` came back as the provider's wait (the NaN guard covered only retry-after and
    retry-after-ms), and `asyncio.sleep(nan)` corrupts the event loop's timer heap."""
    wait = retry_after_s(CIMultiDict({name: value}))
    assert wait is None or (math.isfinite(wait) and 0.0 <= wait <= MAX_WAIT_S), wait


def test_a_nan_reset_among_sane_ones_does_not_hide_them() -> None:
    headers = CIMultiDict({"x-ratelimit-reset-requests": "nan", "x-ratelimit-reset-tokens": "2s"})
    assert retry_after_s(headers) == 2.0


async def test_a_nan_rate_limit_reset_stalls_neither_the_call_nor_the_event_loops_timers(
    fake: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: issue 21 defect 2: a 429 with `x-ratelimit-reset-requests: nan` made the retry loop sleep
    NaN seconds; with a few long timers pending (arq keeps one per job), every other timer of the process
    stalled: heartbeats, polls, health writes. The waits here are threads', which need no timer to end."""
    monkeypatch.setenv("SITEGEN_TEST_PROVIDER_KEY", KEY)
    loop = asyncio.get_running_loop()
    pending = [loop.call_later(1800 + i, lambda: None) for i in range(8)]
    fake.script('headers:429:{"x-ratelimit-reset-requests": "nan"}', "ok")
    provider = OpenAIProvider("remote", remote("openai", fake.url, max_retries=1), KEY)
    prompt = f"<input>{json.dumps({'brief': SAMPLE_BRIEF})}</input>"
    ended = threading.Event()
    call = asyncio.ensure_future(provider.complete(AIRequest(task="planning", system="plan", prompt=prompt)))
    call.add_done_callback(lambda _: ended.set())
    ticked = threading.Event()

    async def ticker() -> None:
        for _ in range(20):
            await asyncio.sleep(0.01)
        ticked.set()

    ticks = asyncio.ensure_future(ticker())
    try:
        assert await asyncio.to_thread(ended.wait, 30), "the call never ended: the retry's sleep stalled"
        assert call.result().text and len(fake.requests) == 2
        assert await asyncio.to_thread(ticked.wait, 30), "the event loop's timers stalled"
    finally:
        for timer in pending:
            timer.cancel()
        call.cancel()
        ticks.cancel()
        await asyncio.gather(call, ticks, return_exceptions=True)
        await provider.aclose()
