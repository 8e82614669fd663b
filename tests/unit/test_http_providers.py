"""What the HTTP providers read from headers and hide from logs."""

from __future__ import annotations

import email.utils
import time
import tracemalloc

import httpx2
import orjson
import pytest

from worker.ai.http import redact, request_body, retry_after_s


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
