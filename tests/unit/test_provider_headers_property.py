"""Fuzzed provider answers: whatever headers and body a provider or a gateway sends, the HTTP client's error
mapping raises only the AIError family, and every wait it computes is a finite number within its clamp.

The pure functions are fuzzed directly (`retry_after_s`, each kind's `reply`, `retry_wait_s`, `sleep_s`); a few
hostile answers also go through the real fake provider over HTTP (its `headers:<status>:<JSON>` fault).
"""

from __future__ import annotations

import asyncio
import json
import math
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from tests.helpers import KEY, KEY_ENV, SAMPLE_BRIEF, remote
from worker.ai import base
from worker.ai.base import MAX_WAIT_S, AIReply, AIRequest, sleep_s
from worker.ai.http import KINDS, RESET_HEADERS, Answer, HTTPProvider, retry_after_s, retry_wait_s
from worker.errors import AIError, AIRateLimited
from worker.local.fake_server import FakeProviderServer, validate_fault

#: Every header the HTTP client reads from an answer (retry_after_s, _classify, request_id), and the two
#: aiohttp reads for it.
READ_HEADERS = (
    "retry-after",
    "retry-after-ms",
    *RESET_HEADERS,
    "location",
    "x-request-id",
    "request-id",
    "cf-ray",
    "content-type",
    "content-length",
)
REQUEST = AIRequest(task="planning", system="plan", prompt="<input>{}</input>")

# ------------------------------------------------------------------ strategies: what a hostile answer holds

_header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40)
_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from(["nan", "-nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-1e400", "1_000", "9" * 400]),
).map(str)
_durations = st.builds(
    lambda h, m, s, ms: "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s"), (ms, "ms")) if v is not None),
    *(st.none() | st.integers(0, 10**20).map(str) | st.floats(0, 1e300).map(lambda f: f"{f:f}") for _ in range(4)),
)
_dates = st.one_of(
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)).map(
        lambda d: format_datetime(d.replace(tzinfo=UTC), usegmt=True)
    ),
    st.sampled_from(["Wed, 21 Oct 2015 07:28:00 GMT", "Mon, 99 Foo 0000 99:99:99 GMT", "0", "Thu, 01 Jan 1970"]),
)
_values = st.one_of(_numbers, _durations, _dates, _header_text)
_names = st.sampled_from(READ_HEADERS).flatmap(
    lambda name: st.sampled_from([name, name.upper(), name.title()])  # any case: lookups must not care
)
headers_strategy = st.dictionaries(_names, _values, max_size=8)

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
_anything = st.one_of(_json, st.just(None))


def _shaped(kind: str) -> st.SearchStrategy[Any]:
    """Bodies in the shape of `kind`'s answer, with any JSON in each place (the wrong type, usage, text...)."""
    usage = st.one_of(_anything, st.dictionaries(st.sampled_from(_USAGE_KEYS), _anything, max_size=3))
    if kind == "openai":
        message = st.one_of(_anything, st.fixed_dictionaries({"content": _anything}))
        choice = st.one_of(_anything, st.fixed_dictionaries({"message": message, "finish_reason": _anything}))
        return st.fixed_dictionaries({"choices": st.one_of(_anything, st.lists(choice, max_size=2)), "usage": usage})
    if kind == "anthropic":
        block = st.one_of(_anything, st.fixed_dictionaries({"type": st.just("text") | _anything, "text": _anything}))
        return st.fixed_dictionaries(
            {"content": st.one_of(_anything, st.lists(block, max_size=3)), "usage": usage, "stop_reason": _anything}
        )
    result = st.one_of(_anything, st.fixed_dictionaries({"response": _anything, "usage": usage}))
    errors = st.one_of(_anything, st.lists(st.one_of(_anything, st.fixed_dictionaries({"code": _anything}))))
    return st.fixed_dictionaries({"result": result, "errors": errors})


_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens")


def _bodies(kind: str) -> st.SearchStrategy[bytes]:
    return st.one_of(
        _shaped(kind).map(_dumps),
        _json.map(_dumps),
        st.binary(max_size=200),
        st.sampled_from(_RAW_BODIES),
    )


def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode()  # integers past 64 bits too, which orjson neither writes nor reads


_FINE = (
    '"choices": [{"message": {"content": "x"}}], '
    '"content": [{"type": "text", "text": "x"}], "result": {"response": "x"}'
)
_RAW_BODIES = [
    b"",
    b"{",
    b"[" * 5000 + b"]" * 5000,
    b'{"choices": [{"message": {"content": "\xff"}}]}',
    *(
        ("{" + _FINE + f', "usage": {{"{key}": {number}}}' + "}").encode()
        for key in _USAGE_KEYS
        for number in ("1e400", "-3", "NaN", "2.5", "true", '"12"', "18446744073709551616")
    ),
]


_statuses = st.one_of(
    st.sampled_from([200, 301, 302, 400, 401, 403, 404, 408, 409, 422, 429, 500, 503, 529]), st.integers(200, 599)
)


@pytest.fixture(scope="module")
def providers() -> dict[str, HTTPProvider]:
    """One provider of each kind; `reply` reads an answer without sending anything."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_ENV, KEY)
        return {kind: KINDS[kind]("fuzzed", remote(kind, "http://127.0.0.1:9"), KEY) for kind in KINDS}


def _check_wait(wait: float | None) -> None:
    assert wait is None or (isinstance(wait, float) and math.isfinite(wait) and 0.0 <= wait <= MAX_WAIT_S), wait


# ------------------------------------------------------------------ the properties


@settings(max_examples=600, deadline=None)
@given(headers_strategy)
def test_every_wait_read_from_headers_is_finite_and_within_the_clamp(headers: dict[str, str]) -> None:
    _check_wait(retry_after_s(CIMultiDict(headers)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(KINDS)), data=st.data())
def test_any_answer_becomes_a_reply_or_an_ai_error_with_a_finite_wait(
    providers: dict[str, HTTPProvider], kind: str, data: st.DataObject
) -> None:
    status = data.draw(_statuses, label="status")
    headers = data.draw(headers_strategy, label="headers")
    body = data.draw(_bodies(kind), label="body")
    answer = Answer(status, CIMultiDictProxy(CIMultiDict(headers)), body)
    try:
        reply = providers[kind].reply(answer, REQUEST)
    except AIError as exc:
        if isinstance(exc, AIRateLimited):
            _check_wait(exc.retry_after_s)
        for attempt in (0, 1, 5, 40, 10_000):
            wait = retry_wait_s(exc, attempt)
            assert math.isfinite(wait) and 0.0 <= wait <= MAX_WAIT_S, wait
        assert str(exc) and exc.provider == "fuzzed"
        json.dumps(exc.details)  # stored on the generation as JSON
        return
    assert isinstance(reply, AIReply) and status < 300 and isinstance(reply.text, str)
    usage = reply.usage
    assert all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (usage.input_tokens, usage.output_tokens)
    )
    assert math.isfinite(usage.cost_usd)


@pytest.mark.parametrize("seconds", [math.nan, -math.nan, -1.0, -math.inf, math.inf, 10 * MAX_WAIT_S])
async def test_sleep_refuses_a_wait_that_is_not_finite_and_positive_and_says_so_once(
    seconds: float, log_lines: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    slept: list[float] = []

    async def recorded(delay: float) -> None:
        slept.append(delay)

    monkeypatch.setattr(base, "_REFUSED_WAITS", set())
    monkeypatch.setattr(base.asyncio, "sleep", recorded)
    for _ in range(3):
        await sleep_s(seconds, what="fuzzed wait")
    assert slept == [MAX_WAIT_S if seconds > 0 else 0.0] * 3
    assert sum("fuzzed wait: refused to sleep" in line for line in log_lines) == 1


# ------------------------------------------------------------------ through the real fake provider, over HTTP

HOSTILE_OVER_HTTP = [
    {"Content-Length": "5"},  # the body cut short: not JSON
    {"Content-Length": "99999"},  # longer than the body: the connection ends first
    {"Content-Length": "-1"},
    {"Content-Length": "abc"},
    {"Content-Type": "text/html; charset=nope"},  # the body is still JSON: read as such
    {"Transfer-Encoding": "chunked"},  # and not chunked
    {"x-ratelimit-reset-requests": "nan", "retry-after-ms": "-5", "retry-after": "Mon, 99 Foo 0000"},
]


@pytest.mark.parametrize("status", [200, 429, 503])
async def test_hostile_headers_over_http_end_in_a_reply_or_an_ai_error(
    status: int, fake: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    provider = KINDS["openai"]("remote", remote("openai", fake.url, max_retries=0, read_timeout_s=5), KEY)
    prompt = f"<input>{json.dumps({'brief': SAMPLE_BRIEF})}</input>"
    outcomes: list[str] = []
    try:
        for headers in HOSTILE_OVER_HTTP:
            fault = f"headers:{status}:{json.dumps(headers)}"
            fake.script(validate_fault(fault))
            try:
                async with asyncio.timeout(30):
                    reply = await provider.complete(AIRequest(task="planning", system="plan", prompt=prompt))
                outcomes.append("reply")
                assert reply.text
            except AIError as exc:
                outcomes.append(type(exc).__name__)
                if isinstance(exc, AIRateLimited):
                    _check_wait(exc.retry_after_s)
    finally:
        await provider.aclose()
    assert len(fake.requests) == len(HOSTILE_OVER_HTTP), "each answer was read or given up, then the next asked"
    # A body cut short or framed wrong is a provider unavailable (a 429 may be read as rate limited before the
    # extra bytes of a short Content-Length arrive: a race); a JSON body under a wrong content type is read;
    # hostile waits are no instruction.
    unavailable, limited = "AIUnavailable", "AIRateLimited"
    readable = {200: "reply", 429: limited, 503: unavailable}[status]
    assert outcomes[0] in {readable if status == 429 else unavailable, unavailable}, outcomes
    assert outcomes[1:] == [*[unavailable] * 3, readable, unavailable, readable], outcomes


@pytest.mark.parametrize(
    "fault",
    [
        'headers:200:["x"]',
        'headers:302:{"a": "b"}',
        'headers:200:{"a b": "c"}',
        'headers:200:{"a": "b\\r\\nc"}',
        'headers:200:{"a": 1}',
        'headers:200:{"a": "\\u20ac"}',
        "headers:200:not json",
    ],
)
def test_a_scripted_header_http_cannot_carry_is_refused_when_scripted(fault: str) -> None:
    with pytest.raises(ValueError):
        validate_fault(fault)
