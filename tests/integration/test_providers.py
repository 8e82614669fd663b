"""Real providers through the fake provider server (real HTTP on loopback), real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import trustme
from arq import ArqRedis

from tests.helpers import (
    CLOUDFLARE_MODEL,
    KEY,
    KEY_ENV,
    SAMPLE_BRIEF,
    WorkerFactory,
    close_worker,
    failed_result,
    order_job,
    progress_messages,
    remote,
    wait_for_result,
    with_ai,
)
from worker import client
from worker.ai.base import AIRequest, call_status
from worker.ai.http import OpenAIProvider
from worker.errors import AIBadRequest, AIUnavailable
from worker.local.fake_server import FakeProviderServer
from worker.local.services import free_port
from worker.settings import Settings, SettingsError

pytestmark = pytest.mark.usefixtures("provider_key")

#: Every variable a proxy is read from, in both cases (lower case wins where both are set).
PROXY_VARIABLES = tuple(n for v in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY") for n in (v, v.lower()))


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """None of the machine's proxy variables: a test sets the ones it is about."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


async def _all_text(db: asyncpg.Connection) -> str:
    """Every stored row that a person or a frontend could read, as text."""
    parts = []
    for table in ("site_generations", "site_generation_phases", "site_generation_logs", "site_orders"):
        parts += [json.dumps(dict(r), default=str) for r in await db.fetch(f"SELECT * FROM {table}")]
    return "\n".join(parts)


@pytest.mark.parametrize("kind", ["openai", "anthropic", "cloudflare"])
async def test_each_provider_kind_generates_a_site_with_the_right_requests(
    kind: str,
    fake: FakeProviderServer,
    settings: Settings,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
    log_lines: list[str],
) -> None:
    await start_worker(with_ai(settings, {"remote": remote(kind, fake.url)}))
    await client.enqueue_generation(redis, 60, SAMPLE_BRIEF)

    result = await wait_for_result(redis, 60)

    assert result["status"] == "succeeded" and result["usage"]["calls"] == 3
    assert [r.api for r in fake.requests] == [kind] * 3
    first = fake.requests[0]
    path = {
        "openai": "/v1/chat/completions",
        "anthropic": "/v1/messages",
        "cloudflare": f"/client/v4/accounts/acc-123/ai/run/{CLOUDFLARE_MODEL}",
    }[kind]
    assert first.path == path and first.method == "POST"
    if kind == "anthropic":
        assert first.headers["x-api-key"] == KEY and first.headers["anthropic-version"] == "2023-06-01"
        assert first.body["model"] == "anthropic-test-model" and first.body["max_tokens"] == 8192
        assert "JSON" in first.body["system"] and first.body["messages"][0]["role"] == "user"
        prompt = first.body["messages"][0]["content"]
    else:
        assert first.headers["authorization"] == f"Bearer {KEY}"
        roles = [m["role"] for m in first.body["messages"]]
        assert roles == ["system", "user"]
        prompt = first.body["messages"][1]["content"]
        if kind == "openai":
            assert first.body["model"] == "openai-test-model"
    assert "Rosa's Bakery" in prompt and "<input>" in prompt
    assert KEY not in await _all_text(db)
    assert not [line for line in log_lines if KEY in line]


async def test_401_fails_at_once_naming_provider_and_env_var(
    fake: FakeProviderServer,
    settings: Settings,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
    log_lines: list[str],
) -> None:
    fake.script("status:401")
    await start_worker(with_ai(settings, {"remote": remote("openai", fake.url)}))
    await client.enqueue_generation(redis, 61, SAMPLE_BRIEF)

    info = await failed_result(redis, 61)

    assert info.job_try == 1 and info.result["error"] == "AIAuthError"
    assert len(fake.requests) == 1, "an authentication error is never retried"
    error = await db.fetchval("SELECT error FROM site_generations WHERE order_id = 61")
    assert "remote" in error["message"] and KEY_ENV in error["message"]
    assert "ai.providers.remote.api_key_env" in error["message"]
    assert error["details"]["status"] == 401 and error["details"]["provider"] == "remote"
    assert error["details"]["request_id"] and error["phase"] == "plan"
    assert KEY not in await _all_text(db)
    assert not [line for line in log_lines if KEY in line]


async def test_429_with_retry_after_waits_that_long_then_succeeds(
    fake: FakeProviderServer,
    settings: Settings,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
) -> None:
    fake.script("429:2")
    await start_worker(with_ai(settings, {"remote": remote("anthropic", fake.url)}))
    await client.enqueue_generation(redis, 62, SAMPLE_BRIEF)

    result = await wait_for_result(redis, 62)

    assert result["status"] == "succeeded"
    first, second = fake.requests[:2]
    assert first.fault == "429:2" and second.fault == "ok"
    assert second.at - first.at >= 2.0, "Retry-After: 2 must be honoured"
    assert any("rate limited; retry after 2s" in m for m in await progress_messages(db, 62))


async def test_500_twice_then_success(
    fake: FakeProviderServer, settings: Settings, start_worker: WorkerFactory, redis: ArqRedis
) -> None:
    fake.script("status:500", "status:500")
    await start_worker(with_ai(settings, {"remote": remote("cloudflare", fake.url)}))
    await client.enqueue_generation(redis, 63, SAMPLE_BRIEF)
    result = await wait_for_result(redis, 63)
    assert result["status"] == "succeeded"
    assert [r.fault for r in fake.requests] == ["status:500", "status:500", "ok", "ok", "ok"]


async def test_provider_down_for_good_falls_back_to_the_next_one(
    fake: FakeProviderServer,
    settings: Settings,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
) -> None:
    down = remote("openai", f"http://127.0.0.1:{free_port()}", max_retries=1)  # nothing listens there
    custom = with_ai(
        settings,
        {"down": down, "remote": remote("openai", fake.url)},
        routing={task: ["down", "remote"] for task in ("planning", "content", "coding")},
    )
    await start_worker(custom)
    await client.enqueue_generation(redis, 64, SAMPLE_BRIEF)

    result = await wait_for_result(redis, 64)

    assert result["status"] == "succeeded" and len(fake.requests) == 3
    fallbacks = [m for m in await progress_messages(db, 64) if "falling back to remote" in m]
    assert len(fallbacks) == 3 and "provider down failed (AIUnavailable" in fallbacks[0]


async def test_cloudflare_daily_quota_is_not_retried_but_falls_back(
    fake: FakeProviderServer,
    settings: Settings,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
) -> None:
    fake.script("cf-quota", api="cloudflare")
    custom = with_ai(
        settings,
        {"cf": remote("cloudflare", fake.url), "remote": remote("openai", fake.url)},
        routing={"planning": ["cf", "remote"], "content": ["remote"], "coding": ["remote"]},
    )
    await start_worker(custom)
    await client.enqueue_generation(redis, 65, SAMPLE_BRIEF)
    assert (await wait_for_result(redis, 65))["status"] == "succeeded"
    assert [r.api for r in fake.requests] == ["cloudflare", "openai", "openai", "openai"]
    assert any("AIQuotaExhausted" in m and "falling back to remote" in m for m in await progress_messages(db, 65))


@pytest.mark.parametrize("fault", ["malformed", "fenced", "truncated", "wrong-schema"])
async def test_bad_answers_recover_within_the_bounded_re_asks(
    fault: str,
    fake: FakeProviderServer,
    settings: Settings,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
) -> None:
    fake.script(fault)
    await start_worker(with_ai(settings, {"remote": remote("openai", fake.url)}))
    await client.enqueue_generation(redis, 66, SAMPLE_BRIEF)
    assert (await wait_for_result(redis, 66))["status"] == "succeeded"
    re_asked = fault in ("truncated", "wrong-schema")
    assert len(fake.requests) == (4 if re_asked else 3)
    rejected = [m for m in await progress_messages(db, 66) if "answer rejected" in m]
    assert len(rejected) == (1 if re_asked else 0)
    if re_asked:
        assert "Your previous answer was rejected" in fake.requests[1].body["messages"][1]["content"]


@pytest.mark.parametrize(
    ("fault", "shown"),
    [
        ("malformed-hard", "invalid JSON at line 1 column"),
        ("wrong-schema", "pages: Input should be a valid list"),
        ("truncated", "cut off at the provider's length limit"),
    ],
)
async def test_bad_answers_that_never_recover_fail_showing_what_was_wrong(
    fault: str,
    shown: str,
    fake: FakeProviderServer,
    settings: Settings,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
) -> None:
    fake.script(fault, fault, fault)
    await start_worker(with_ai(settings, {"remote": remote("openai", fake.url)}, max_output_retries=2))
    await client.enqueue_generation(redis, 67, SAMPLE_BRIEF)

    info = await failed_result(redis, 67)

    assert info.job_try == 1 and info.result["error"] == "AIBadOutput" and len(fake.requests) == 3
    error = await db.fetchval("SELECT error FROM site_generations WHERE order_id = 67")
    assert error["type"] == "AIBadOutput" and shown in error["message"] and error["phase"] == "plan"


async def test_hung_provider_times_out_and_is_retried_while_other_generations_progress(
    fake: FakeProviderServer,
    settings: Settings,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
) -> None:
    fake.script("hang")
    await start_worker(with_ai(settings, {"remote": remote("openai", fake.url, read_timeout_s=1.5)}))
    await client.enqueue_generation(redis, 68, SAMPLE_BRIEF)
    await asyncio.to_thread(fake.wait_for_requests, 1)  # order 68's first call is now hanging
    await client.enqueue_generation(redis, 69, SAMPLE_BRIEF)

    other = await wait_for_result(redis, 69)
    hung = await wait_for_result(redis, 68)

    assert other["status"] == hung["status"] == "succeeded"
    finished_69 = await db.fetchval("SELECT finished_at FROM site_generations WHERE order_id = 69")
    retried_68 = await db.fetchval(
        "SELECT created_at FROM site_generation_logs WHERE order_id = 68 AND message LIKE 'planning: %retrying%'"
    )
    assert finished_69 < retried_68, "order 69 finished while order 68's request hung"
    assert fake.requests[0].fault == "hang"


async def test_usage_and_cost_add_up_per_phase_and_generation(
    fake: FakeProviderServer,
    settings: Settings,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
) -> None:
    priced = remote("openai", fake.url, price_input_per_mtok=3.0, price_output_per_mtok=15.0)
    await start_worker(with_ai(settings, {"remote": priced}))
    await client.enqueue_generation(redis, 70, SAMPLE_BRIEF)
    result = await wait_for_result(redis, 70)

    phases = {r["phase"]: r["usage"] for r in await db.fetch("SELECT phase, usage FROM site_generation_phases")}
    total = await db.fetchval("SELECT usage FROM site_generations WHERE order_id = 70")
    for key in ("input_tokens", "output_tokens", "calls"):
        assert total[key] == sum(p[key] for p in phases.values()) == result["usage"][key]
    assert total["input_tokens"] > 0 and total["output_tokens"] > 0 and total["calls"] == 3
    expected_cost = (total["input_tokens"] * 3.0 + total["output_tokens"] * 15.0) / 1_000_000
    assert total["cost_usd"] == pytest.approx(expected_cost, abs=1e-5)
    assert total["by_phase"]["plan"] == phases["plan"]


async def test_token_budget_lower_than_the_need_stops_the_generation(
    fake: FakeProviderServer,
    settings: Settings,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
) -> None:
    await start_worker(with_ai(settings, {"remote": remote("openai", fake.url)}, max_tokens_per_generation=2000))
    await client.enqueue_generation(redis, 71, SAMPLE_BRIEF)
    info = await failed_result(redis, 71)
    assert info.job_try == 1 and info.result["error"] == "TokenBudgetExceeded"
    error = await db.fetchval("SELECT error FROM site_generations WHERE order_id = 71")
    assert "over its budget of 2,000" in error["message"] and "ai.max_tokens_per_generation" in error["message"]
    assert await db.fetchval("SELECT status FROM site_generations WHERE order_id = 71") == "failed"


async def test_rerun_after_a_crash_reuses_committed_phases(
    fake: FakeProviderServer,
    settings: Settings,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
) -> None:
    custom = with_ai(settings, {"remote": remote("openai", fake.url)})
    fake.script("ok", "ok", "hang")  # the coding call hangs: the worker dies in the middle of it
    first = await start_worker(custom)
    await client.enqueue_generation(redis, 72, SAMPLE_BRIEF)
    await asyncio.to_thread(fake.wait_for_requests, 3)
    await close_worker(first)

    await start_worker(custom)
    result = await wait_for_result(redis, 72)

    assert result["status"] == "succeeded"
    tasks = [_task_of(r.body) for r in fake.requests]
    assert tasks == ["planning", "content", "coding", "coding"], "no call repeated for a committed phase"
    messages = await progress_messages(db, 72)
    assert "handed back at phase code: interrupted (worker shutting down, job aborted or timed out)" in messages
    assert "generation resumed at phase code (attempt 2)" in messages


def _task_of(body: Any) -> str:
    prompt = body["messages"][-1]["content"]
    inputs = json.loads(prompt[prompt.rindex("<input>") + 7 : prompt.index("</input>")])
    return "coding" if "content" in inputs else "content" if "plan" in inputs else "planning"


async def test_exhausted_retries_send_the_job_back_to_the_queue_and_it_resumes(
    fake: FakeProviderServer,
    settings: Settings,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
) -> None:
    fake.script("ok", "status:503", "status:503")  # content fails twice: once more than max_retries allows
    await start_worker(with_ai(settings, {"remote": remote("openai", fake.url, max_retries=1)}))
    await client.enqueue_generation(redis, 73, SAMPLE_BRIEF)

    result = await wait_for_result(redis, 73)

    assert result["status"] == "succeeded"
    info = await order_job(redis, 73).result_info()
    assert info is not None and info.job_try == 2
    assert [_task_of(r.body) for r in fake.requests] == ["planning", "content", "content", "content", "coding"]
    messages = await progress_messages(db, 73)
    assert any(m.startswith("phase content failed, will retry in") and "HTTP 503" in m for m in messages)
    assert "generation resumed at phase content (attempt 2)" in messages


async def test_heartbeat_keeps_a_long_model_call_claimed_and_its_job_marker_short(
    fake: FakeProviderServer,
    settings: Settings,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
) -> None:
    fake.script("hang")  # the plan call takes longer than several leases
    custom = with_ai(settings, {"remote": remote("openai", fake.url, read_timeout_s=30)})
    custom = custom.model_copy(update={"worker": custom.worker.model_copy(update={"lease_s": 2})})
    await start_worker(custom)
    await client.enqueue_generation(redis, 74, SAMPLE_BRIEF)
    await asyncio.to_thread(fake.wait_for_requests, 1)
    first = await db.fetchval("SELECT lease_expires_at FROM site_generations WHERE order_id = 74")

    # Nothing announces a heartbeat: let one lease pass (about four beats) while the call hangs.
    await asyncio.sleep(2)

    later = await db.fetchval("SELECT lease_expires_at FROM site_generations WHERE order_id = 74")
    assert later > first, "the heartbeat extended the claim"
    assert await db.fetchval("SELECT lease_expires_at > now() FROM site_generations WHERE order_id = 74")
    ttl_ms = await redis.pttl(f"arq:in-progress:{client.job_id(74)}")
    assert 0 < ttl_ms <= 2000, "arq's in-progress marker lives one lease, not job_timeout + 10 s"


async def test_a_provider_has_as_many_calls_in_flight_as_its_max_concurrency(fake: FakeProviderServer) -> None:
    """max_concurrency 120 is above aiohttp's default pool of 100 connections: every call still gets a
    connection at once, none waits for another's answer."""
    fake.configure(latency_s=4.0)  # every answer waits 4 s, so all 120 are held by the fake at once
    provider = OpenAIProvider("remote", remote("openai", fake.url, max_concurrency=120), KEY)
    try:
        prompt = f"<input>{json.dumps({'brief': SAMPLE_BRIEF})}</input>"
        request = AIRequest(task="planning", system="plan", prompt=prompt)
        calls = asyncio.gather(*(provider.complete(request) for _ in range(120)))
        # All 120 arrive before the first answer; a call waiting for a pooled connection would come after.
        await asyncio.to_thread(fake.wait_for_requests, 120, 3.0)
        replies = await calls
    finally:
        await provider.aclose()
    assert len(replies) == 120 and all(r.text for r in replies)
    assert provider.slots.held == provider.slots.waiting == 0


@pytest.mark.usefixtures("no_proxy_env")
async def test_a_provider_goes_through_the_proxy_of_the_environment(
    fake: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calls go straight to the transport the client chose for the provider's URL, which is the proxy
    when HTTP_PROXY names one: the fake plays the proxy and sees the absolute-form request."""
    host_port = fake.url.removeprefix("http://")
    monkeypatch.setenv("HTTP_PROXY", f"http://proxy-user:pr%40xy-pass@{host_port}")  # credentials, one escaped
    unreachable = f"http://127.0.0.2:{free_port()}"  # nothing listens there: only the proxy can answer
    provider = OpenAIProvider("remote", remote("openai", unreachable), KEY)
    try:
        prompt = f"<input>{json.dumps({'brief': SAMPLE_BRIEF})}</input>"
        reply = await provider.complete(AIRequest(task="planning", system="plan", prompt=prompt))
    finally:
        await provider.aclose()
    assert reply.text
    (seen,) = fake.wait_for_requests(1)
    assert seen.path == f"{unreachable}/v1/chat/completions"
    assert seen.headers["authorization"] == f"Bearer {KEY}" and seen.headers["content-type"] == "application/json"
    expected = base64.b64encode(b"proxy-user:pr@xy-pass").decode()
    assert seen.headers["proxy-authorization"] == f"Basic {expected}", "the proxy's credentials, for the proxy"
    assert "proxy-user" not in seen.path


@pytest.mark.parametrize(
    ("fault", "overrides", "failure", "said"),
    [
        ("hang", {"read_timeout_s": 0.5}, "ReadTimeout", "timed out (ReadTimeout)"),
        ("delay:5", {"total_timeout_s": 0.5}, "TimeoutError", "timed out (TimeoutError)"),
        ("reset", {}, "NetworkError", "connection failed (NetworkError)"),
        ("close", {}, "RemoteProtocolError", "connection failed (RemoteProtocolError): ServerDisconnectedError"),
    ],
)
async def test_a_request_without_an_answer_fails_as_unavailable_in_stable_words(
    fake: FakeProviderServer, fault: str, overrides: dict[str, Any], failure: str, said: str
) -> None:
    """What failed is named in words that do not depend on the HTTP library: the error's `failure`
    detail, its message and the `status` label of the model call metrics (`call_status`)."""
    fake.script(fault)
    provider = OpenAIProvider("remote", remote("openai", fake.url, max_retries=0, **overrides), KEY)
    try:
        with pytest.raises(AIUnavailable) as raised:
            await provider.complete(AIRequest(task="planning", system="plan", prompt="hello"))
    finally:
        await provider.aclose()
    assert raised.value.details["failure"] == failure and call_status(raised.value) == failure
    assert said in str(raised.value) and str(raised.value).startswith("remote (openai, model openai-test-model): ")


async def test_a_provider_nothing_listens_on_fails_with_connect_error() -> None:
    provider = OpenAIProvider("remote", remote("openai", f"http://127.0.0.1:{free_port()}", max_retries=0), KEY)
    try:
        with pytest.raises(AIUnavailable) as raised:
            await provider.complete(AIRequest(task="planning", system="plan", prompt="hello"))
    finally:
        await provider.aclose()
    assert call_status(raised.value) == "ConnectError"
    assert "connection failed (ConnectError): ClientConnectorError: Cannot connect to host 127.0.0.1" in str(
        raised.value
    )


@pytest.mark.usefixtures("no_proxy_env")
async def test_all_proxy_applies_and_no_proxy_skips_it(
    fake: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proxy is read from the environment once, as curl and httpx read it: HTTP(S)_PROXY, else
    ALL_PROXY, except for hosts in NO_PROXY."""
    monkeypatch.setenv("ALL_PROXY", fake.url)
    unreachable = f"http://127.0.0.2:{free_port()}"
    prompt = f"<input>{json.dumps({'brief': SAMPLE_BRIEF})}</input>"
    provider = OpenAIProvider("remote", remote("openai", unreachable), KEY)
    try:
        assert (await provider.complete(AIRequest(task="planning", system="plan", prompt=prompt))).text
    finally:
        await provider.aclose()
    (proxied,) = fake.wait_for_requests(1)
    assert proxied.path == f"{unreachable}/v1/chat/completions"
    assert "proxy-authorization" not in proxied.headers, "no credentials for the proxy, and never the API key"

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    direct = OpenAIProvider("remote", remote("openai", fake.url, max_retries=0), KEY)
    try:
        assert (await direct.complete(AIRequest(task="planning", system="plan", prompt=prompt))).text
    finally:
        await direct.aclose()
    assert fake.wait_for_requests(2)[1].path == "/v1/chat/completions", "NO_PROXY: straight to the provider"


@pytest.mark.usefixtures("no_proxy_env")
def test_a_proxy_aiohttp_cannot_use_is_a_settings_error_naming_the_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1080")
    with pytest.raises(SettingsError, match=r"ai.providers.remote: the proxy for http:// URLs .* is a socks5 URL"):
        OpenAIProvider("remote", remote("openai", "http://127.0.0.2:9"), KEY)


@pytest.mark.usefixtures("no_proxy_env")
async def test_https_providers_are_verified_against_the_systems_cas_and_ssl_cert_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A certificate from an unknown CA is refused (ConnectError naming the check); trusting the CA
    through SSL_CERT_FILE, as OpenSSL reads it, lets the same calls through."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    prompt = f"<input>{json.dumps({'brief': SAMPLE_BRIEF})}</input>"
    with FakeProviderServer(tls=server_context) as tls_fake:
        assert tls_fake.url.startswith("https://")
        untrusting = OpenAIProvider("remote", remote("openai", tls_fake.url, max_retries=0), KEY)
        try:
            with pytest.raises(AIUnavailable) as raised:
                await untrusting.complete(AIRequest(task="planning", system="plan", prompt=prompt))
        finally:
            await untrusting.aclose()
        assert call_status(raised.value) == "ConnectError" and "certificate verify failed" in str(raised.value)
        assert tls_fake.requests == [], "nothing was sent over the unverified connection"

        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
        trusting = OpenAIProvider("remote", remote("openai", tls_fake.url), KEY)
        try:
            reply = await trusting.complete(AIRequest(task="planning", system="plan", prompt=prompt))
        finally:
            await trusting.aclose()
        assert reply.text and len(tls_fake.requests) == 1


@pytest.mark.usefixtures("no_proxy_env")
@pytest.mark.parametrize("credentials", ["", "tunnel-user:tunnel-pass@"])
async def test_an_https_provider_behind_a_proxy_opens_a_tunnel_without_showing_the_proxy_its_api_key(
    monkeypatch: pytest.MonkeyPatch, credentials: str
) -> None:
    """The CONNECT to the proxy carries the proxy's own credentials (if any), never the provider's key.
    The test's proxy records the CONNECT and refuses it (407), so the call fails as a connect error."""
    seen: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setenv("HTTPS_PROXY", f"http://{credentials}127.0.0.1:{port}")
    provider = OpenAIProvider("remote", remote("openai", "https://api.example.test", max_retries=0), KEY)
    try:
        with pytest.raises(AIUnavailable) as raised:
            await provider.complete(AIRequest(task="planning", system="plan", prompt="hello"))
    finally:
        await provider.aclose()
        server.close()
        await server.wait_closed()
    (head,) = seen
    assert head.startswith(b"CONNECT api.example.test:443 HTTP/1.1\r\n")
    assert KEY.encode() not in head and b"Bearer" not in head, head
    if credentials:
        assert f"Basic {base64.b64encode(b'tunnel-user:tunnel-pass').decode()}".encode() in head
    else:
        assert b"proxy-authorization" not in head.lower()
    assert call_status(raised.value) == "ProxyError" and "407" in str(raised.value)


@pytest.mark.parametrize("status", [301, 307])
async def test_a_redirect_is_not_followed_and_names_the_setting_to_fix(fake: FakeProviderServer, status: int) -> None:
    """Following it would send the key wherever the redirect points; the error says where that is."""
    fake.script(f"status:{status}")
    provider = OpenAIProvider("remote", remote("openai", fake.url, max_retries=0), KEY)
    try:
        with pytest.raises(AIBadRequest) as raised:
            await provider.complete(AIRequest(task="planning", system="plan", prompt="hello"))
    finally:
        await provider.aclose()
    assert len(fake.requests) == 1, "the redirect was not followed"
    message = str(raised.value)
    assert f"HTTP {status}: the provider redirects to /moved/v1/chat/completions" in message
    assert "set ai.providers.remote.base_url" in message and raised.value.status == status


async def test_a_nul_character_in_a_provider_error_body_is_stored_and_the_generation_fails_once(
    fake: FakeProviderServer, settings: Settings, start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    """Regression: issue 14 defect 3. The error body's excerpt carried the NUL into the stored error, which
    PostgreSQL refused: the failure was swallowed and the generation stayed `running`, re-enqueued for ever."""
    fake.script("body:400:upstream said \x00 no")
    await start_worker(with_ai(settings, {"remote": remote("openai", fake.url)}))
    await client.enqueue_generation(redis, 66, SAMPLE_BRIEF)

    info = await failed_result(redis, 66)

    assert info.job_try == 1 and info.result["error"] == "AIBadRequest"
    generation = await db.fetchrow("SELECT status, error FROM site_generations WHERE order_id = 66")
    assert generation["status"] == "failed" and generation["error"]["type"] == "AIBadRequest"
    assert "upstream said \ufffd no" in generation["error"]["message"]
    assert generation["error"]["details"]["body"] == "upstream said \ufffd no"
    assert any("upstream said \ufffd no" in m for m in await progress_messages(db, 66))


@pytest.mark.parametrize(
    "fault", ["429:inf", "429:nan", "429:-5", "429:1e12", "429ms:inf", "429ms:-1000", "429ms:1e15"]
)
async def test_a_hostile_retry_after_is_bounded_and_the_site_is_still_generated(
    fault: str, fake: FakeProviderServer, settings: Settings, start_worker: WorkerFactory, redis: ArqRedis
) -> None:
    """Regression: issue 14 defect 11. Retry-After was trusted: inf or NaN crashed the job (OverflowError,
    ValueError), 1e12 deferred it for ever, a negative value was read as no wait only by luck."""
    fake.script(fault)
    await start_worker(with_ai(settings, {"remote": remote("openai", fake.url)}, max_retry_defer_s=0.5))
    await client.enqueue_generation(redis, 67, SAMPLE_BRIEF)

    result = await wait_for_result(redis, 67, timeout=30)

    assert result["status"] == "succeeded"
    assert [r.fault for r in fake.requests][:2] == [fault, "ok"]
    waited = fake.requests[1].at - fake.requests[0].at
    assert waited < 10, f"waited {waited:.1f}s: the wait is capped (max_retry_wait_s, ai.max_retry_defer_s)"
