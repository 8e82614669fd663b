"""The networked providers: OpenAI-compatible chat completions, Anthropic Messages, Cloudflare Workers AI.

Each owns one `aiohttp.ClientSession` (its connection pool) for the life of the worker. One
request goes through one place (`HTTPProvider.complete`) that bounds concurrency and time,
classifies every failure into the `AIError` family, and retries what may pass (honouring
Retry-After) a bounded number of times. The kinds differ only in how a request is written and an
answer read.

Why aiohttp and not httpx: a model call through httpx2 (its transport called directly) cost
about 490 us of CPU against 115 us through aiohttp (3,000 calls, 8 in flight, the fake provider
in its own process), and the worker's CPU per site at latency 0 went from 6.3-6.4 to 4.9-5.0 ms
(bench/README.md, finding 9): aiohttp's C HTTP parser, no anyio layer, and a pool that does not
walk its connections on every request.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import math
import random
import re
import ssl
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar
from urllib.parse import urlsplit

import aiohttp
import orjson
from loguru import logger
from multidict import CIMultiDictProxy
from yarl import URL

from worker.ai.base import AIReply, AIRequest, CallObserver, Notify, Usage, clamp_wait_s, observe_call, sleep_s
from worker.ai.limits import DEFAULT_PAUSE_S, Budget, OnWait, ProviderLimiter
from worker.errors import (
    AIAuthError,
    AIBadRequest,
    AIError,
    AIQuotaExhausted,
    AIRateLimited,
    AIUnavailable,
    BudgetWaitExceeded,
)
from worker.settings import ProviderSettings, SettingsError

#: Cloudflare's error code for a used-up daily allocation: waiting minutes will not help.
CLOUDFLARE_QUOTA_CODES = frozenset({3036})
_SECRET_PATTERNS = re.compile(r"(sk-[A-Za-z0-9_\-]{8,}|Bearer\s+[A-Za-z0-9_\-\.=]{8,}|key-[A-Za-z0-9]{16,})")
_JSON_CONTENT = {"content-type": "application/json"}
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?$")


class Slots:
    """A provider's `max_concurrency`: a semaphore that counts the calls holding and waiting for a slot.

    The metrics read `held` and `waiting` at each scrape (`sitegen_model_calls_in_flight` and
    `sitegen_model_calls_waiting`): calls that keep waiting mean `max_concurrency` is what limits
    the replica, not `worker.max_jobs`.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.waiting = 0
        self._semaphore = asyncio.Semaphore(limit)

    async def __aenter__(self) -> None:
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:  # acquired, or cancelled while waiting
            self.waiting -= 1
        self.held += 1

    async def __aexit__(self, *exc_info: object) -> None:
        self.held -= 1
        self._semaphore.release()


def request_body(body: dict[str, Any]) -> bytes:
    """`body` as JSON, in a buffer of its own size.

    orjson returns its whole working buffer (4 KiB and up, grown by doubling: ~128 KiB for a 9 KB code
    prompt) and only sets the bytes' length; aiohttp holds the body until the answer is read, so 2,000
    calls in flight held ~250 MiB of it (issue 15, `inflight`). One copy of a few KB frees the rest.
    """
    return bytes(memoryview(orjson.dumps(body)))


def redact(text: str, *secrets: str) -> str:
    """`text` with the given secrets and anything shaped like an API key or bearer token masked."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _SECRET_PATTERNS.sub("***", text)


def _number(value: str) -> float | None:
    """`value` as a number (any Python reads, NaN and infinities included), None if it is none."""
    try:
        return float(value.strip())
    except ValueError:
        return None


def _duration_s(value: str) -> float | None:
    """Seconds in `1.5`, `6m0s`, `20ms` or `1h2m3s` (OpenAI's x-ratelimit-reset-* format), unclamped."""
    number = _number(value)
    if number is not None:
        return number
    match = _DURATION.match(value.strip())
    if not match or not any(match.groups()):
        return None
    hours, minutes, seconds, millis = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds + millis / 1000


def _until_s(value: str) -> float | None:
    """Seconds from now until the HTTP date `value` (Retry-After's other form), None if it is not one."""
    try:
        return email.utils.parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError, OverflowError, IndexError):
        return None


def _token_count(value: Any) -> int:
    """A token count of an answer's usage: a whole number >= 0 (JSON may write it 12.0), or null/absent (0)."""
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"a token count in its usage is {value!r:.40}, not a whole number of 0 or more")


#: The headers that say when a provider's rate limit resets (OpenAI's, and the gateways that copy them).
RESET_HEADERS = ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens", "x-ratelimit-reset")


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """How long the provider asked us to wait: retry-after-ms, Retry-After (seconds or date), x-ratelimit-reset-*;
    None when it said nothing readable. Every value goes through the one clamp (`clamp_wait_s`): a NaN is no
    instruction, the rest is a finite wait within [0, MAX_WAIT_S], which the caller caps further
    (`max_retry_wait_s` in a call, `ai.max_retry_defer_s` for the job).

    `headers` must look names up case-insensitively, as an answer's headers do.
    """
    if "retry-after-ms" in headers:
        millis = _number(headers["retry-after-ms"])
        if millis is not None and (wait := clamp_wait_s(millis / 1000)) is not None:
            return wait
    if "retry-after" in headers:
        value = headers["retry-after"]
        seconds = _number(value)
        if seconds is None:
            seconds = _until_s(value)  # a value we cannot read is no instruction: back off as usual
        if seconds is not None and (wait := clamp_wait_s(seconds)) is not None:
            return wait
    resets = [_duration_s(headers[name]) for name in RESET_HEADERS if name in headers]
    known = [wait for r in resets if r is not None and (wait := clamp_wait_s(r)) is not None]
    return max(known) if known else None


@dataclass(frozen=True)
class Answer:
    """A provider's HTTP answer, read whole."""

    status_code: int
    headers: CIMultiDictProxy[str]
    content: bytes

    @cached_property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return orjson.loads(self.content)


def failure_kind(exc: BaseException) -> str:
    """What failed in a request that got no HTTP answer, in stable words (the `status` label of the
    model call metrics, and the error's `failure` detail): alerts must not change with the client library."""
    if isinstance(exc, aiohttp.ClientHttpProxyError | aiohttp.ClientProxyConnectionError):
        return "ProxyError"  # the proxy refused the tunnel, or could not be reached
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "ConnectTimeout"
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return "ReadTimeout"
    if isinstance(exc, TimeoutError):
        return "TimeoutError"  # total_timeout_s
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "ConnectError"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return "RemoteProtocolError"  # closed before a whole answer, or not HTTP
    return "NetworkError"


#: The proxy schemes aiohttp can talk to (an https:// URL is tunnelled through either).
_PROXY_SCHEMES = ("http", "https")


def env_proxy(url: str) -> str | None:
    """The proxy the environment names for `url` (HTTP(S)_PROXY, ALL_PROXY, NO_PROXY; None: go direct).

    Read once per provider, at start: aiohttp's own reading of the environment (`trust_env`) runs
    in a thread on every request, and it ignores ALL_PROXY.
    """
    parts = urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy:
        return None
    scheme = urlsplit(proxy).scheme.lower()
    if scheme not in _PROXY_SCHEMES:
        raise SettingsError(
            f"the proxy for {parts.scheme}:// URLs in the environment (HTTPS_PROXY, HTTP_PROXY or ALL_PROXY) "
            f"is a {scheme or 'scheme-less'} URL; only http:// and https:// proxies are supported "
            f"(or exclude {parts.hostname} with NO_PROXY)"
        )
    return proxy


def provider_proxy(name: str, url: str) -> str | None:
    """`env_proxy` of provider `name`'s URL; its SettingsError names the provider."""
    try:
        return env_proxy(url)
    except SettingsError as exc:
        raise SettingsError(f"ai.providers.{name}: {exc}") from None


class HTTPProvider:
    """Shared request, retry and error handling; subclasses write the request and read the answer."""

    kind: ClassVar[str]
    #: Set by `AIRouter.observe`: hears about each HTTP attempt, retries included.
    observer: CallObserver | None = None
    #: The provider's limits shared with every replica (set by `build_router` when Redis is there).
    limiter: ProviderLimiter | None = None

    def __init__(self, name: str, config: ProviderSettings, api_key: str) -> None:
        self.name = name
        self.model = config.model
        self.config = config
        self._api_key = api_key
        self.slots = Slots(config.max_concurrency)
        self._url = URL(config.api_root.rstrip("/") + "/" + self.endpoint())
        # Sent with each request, not as the session's defaults: aiohttp adds a session's default
        # headers to the headers for the proxy (aio-libs/aiohttp#9372), and its connector (3.14)
        # then sends their Authorization, the API key, to the proxy as Proxy-Authorization, on the
        # CONNECT of an https:// URL too (tests/integration/test_providers.py checks it does not).
        self._headers = {
            "user-agent": "sitegen-worker",
            **config.headers,
            **self.auth_headers(api_key),
            **_JSON_CONTENT,
        }
        proxy = URL(found) if (found := provider_proxy(name, str(self._url))) else None
        self._proxy = proxy.with_user(None) if proxy is not None else None
        self._proxy_headers: dict[str, str] | None = None
        if proxy is not None and (proxy.user or proxy.password):  # user:password in the proxy's URL
            credentials = base64.b64encode(f"{proxy.user or ''}:{proxy.password or ''}".encode()).decode()
            if self._url.scheme == "https":  # on the CONNECT that opens the tunnel
                self._proxy_headers = {"proxy-authorization": f"Basic {credentials}"}
            else:  # the request itself goes to the proxy
                self._headers["proxy-authorization"] = f"Basic {credentials}"
        self._session: aiohttp.ClientSession | None = None
        #: Output tokens each task's answers took lately, for the tokens/min estimate before a call.
        self._output_tokens: dict[str, float] = {}

    def _client(self) -> aiohttp.ClientSession:
        """The provider's session, made at its first call (aiohttp needs the running loop), then kept."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                # No cookies, and no reading of proxies and ~/.netrc from the environment per request
                # (aiohttp does that in a thread each time; the proxy was read once, above).
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                timeout=aiohttp.ClientTimeout(
                    total=None,  # total_timeout_s is `_attempt`'s asyncio.timeout, retries apart
                    connect=self.config.connect_timeout_s,
                    sock_read=self.config.read_timeout_s,
                ),
                connector=aiohttp.TCPConnector(
                    limit=self.config.max_concurrency,  # the slots already hold calls to this many
                    limit_per_host=0,
                    ssl=ssl.create_default_context(),  # the system's CAs (SSL_CERT_FILE / SSL_CERT_DIR apply)
                ),
            )
        return self._session

    # -- what differs between kinds

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {api_key}"} if api_key else {}

    def endpoint(self) -> str:
        raise NotImplementedError

    def body(self, request: AIRequest) -> dict[str, Any]:
        raise NotImplementedError

    def read(self, data: Any) -> tuple[str, int, int, str]:
        """(text, input tokens, output tokens, finish reason) from a successful answer."""
        raise NotImplementedError

    def request_id(self, response: Answer) -> str | None:
        found: str | None = response.headers.get("x-request-id") or response.headers.get("request-id")
        return found

    def is_quota_exhausted(self, response: Answer) -> bool:
        return False

    # -- shared

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _error(self, cls: type[AIError], message: str, request: AIRequest, **extra: Any) -> AIError:
        return cls(
            f"{self.name} ({self.kind}, model {self.model}): {message}",
            provider=self.name,
            task=request.task,
            model=self.model,
            **extra,
        )

    def _classify(self, response: Answer, request: AIRequest) -> AIError:
        status = response.status_code
        excerpt = redact(response.text[:500], self._api_key)
        extra: dict[str, Any] = {"status": status, "request_id": self.request_id(response), "body": excerpt}
        if status < 400:
            location = redact(response.headers.get("location", "(no Location header)"), self._api_key)
            return self._error(
                AIBadRequest,
                f"HTTP {status}: the provider redirects to {location[:300]}; "
                f"set ai.providers.{self.name}.base_url to where it points",
                request,
                **extra,
            )
        if status in (401, 403):
            where = (
                f"the key in environment variable {self.config.api_key_env} "
                f"(setting ai.providers.{self.name}.api_key_env)"
                if self.config.api_key_env
                else f"setting ai.providers.{self.name}.api_key_env (no key is configured)"
            )
            return self._error(AIAuthError, f"HTTP {status}: authentication refused; check {where}", request, **extra)
        if status == 429:
            if self.is_quota_exhausted(response):
                return self._error(AIQuotaExhausted, f"HTTP 429: quota used up: {excerpt}", request, **extra)
            wait = retry_after_s(response.headers)
            said = f"; retry after {wait:g}s" if wait is not None else ""
            return self._error(AIRateLimited, f"HTTP 429: rate limited{said}", request, retry_after_s=wait, **extra)
        if status in (408, 409) or status >= 500:
            return self._error(AIUnavailable, f"HTTP {status}: provider unavailable: {excerpt}", request, **extra)
        return self._error(
            AIBadRequest,
            f"HTTP {status}: request refused (check ai.providers.{self.name}.model and base_url): {excerpt}",
            request,
            **extra,
        )

    async def _send(self, body: bytes) -> Answer:
        """POST `body` and read the whole answer (the connection goes back to the pool)."""
        session = self._client()
        async with session.post(
            self._url,
            data=body,
            headers=self._headers,
            proxy=self._proxy,
            proxy_headers=self._proxy_headers,
            allow_redirects=False,
        ) as response:
            return Answer(response.status, response.headers, await response.read())

    def estimate_tokens(self, request: AIRequest) -> int:
        """The tokens a call is charged before it is made: its prompt (about four characters a token) and
        the output this task's answers took lately (at first, `max_output_tokens`, as OpenAI counts it)."""
        prompt = (len(request.system) + len(request.prompt)) // 4 + 1
        output = self._output_tokens.get(request.task, self.config.max_output_tokens)
        return prompt + min(int(output), self.config.max_output_tokens)

    async def _attempt(self, request: AIRequest, allowance: _Allowance | None = None) -> AIReply:
        async with self.slots:
            budget: Budget | None = None
            if self.limiter is not None:
                allowance = allowance or _Allowance(math.inf, None)
                budget = await self.limiter.acquire(
                    self.estimate_tokens(request), max_wait_s=allowance.left_s, on_wait=allowance.waiting(self.limiter)
                )
                allowance.left_s -= budget.waited_s
            used: int | None = None
            pause: float | None = None
            failed = True  # until it answers: a 429, 5xx, timeout or lost connection gives its estimate back
            try:
                reply = await self._exchange(request)
                failed = False
                used = reply.usage.tokens
                if reply.usage.output_tokens:
                    seen = self._output_tokens.get(request.task)
                    out = reply.usage.output_tokens
                    self._output_tokens[request.task] = out if seen is None else 0.8 * seen + 0.2 * out
                return reply
            except AIRateLimited as exc:
                pause = exc.retry_after_s if exc.retry_after_s is not None else DEFAULT_PAUSE_S
                raise
            finally:
                if self.limiter is not None:
                    await self.limiter.release(budget, used_tokens=used, pause_s=pause, failed=failed)

    async def _exchange(self, request: AIRequest) -> AIReply:
        try:
            async with asyncio.timeout(self.config.total_timeout_s):
                response = await self._send(request_body(self.body(request)))
        except TimeoutError as exc:  # total_timeout_s, and aiohttp's connect and read timeouts
            kind = failure_kind(exc)
            raise self._error(AIUnavailable, f"timed out ({kind})", request, failure=kind) from exc
        except aiohttp.ClientError as exc:
            kind = failure_kind(exc)
            raise self._error(
                AIUnavailable, f"connection failed ({kind}): {type(exc).__name__}: {exc}", request, failure=kind
            ) from exc
        return self.reply(response, request)

    def reply(self, response: Answer, request: AIRequest) -> AIReply:
        """The model's reply in a whole HTTP answer, or the AIError that says what is wrong with it."""
        if response.status_code >= 300:  # redirects are not followed: the key would go wherever they point
            raise self._classify(response, request)
        try:
            text, tokens_in, tokens_out, finish = self.read(orjson.loads(response.content))
            if not isinstance(text, str):
                raise TypeError(f"the answer's text is a {type(text).__name__}, not a string")
            tokens_in, tokens_out = _token_count(tokens_in), _token_count(tokens_out)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:  # any JSON in any place
            raise self._error(
                AIUnavailable,
                f"unreadable answer ({type(exc).__name__}: {exc}): {redact(response.text[:300], self._api_key)}",
                request,
                status=response.status_code,
                request_id=self.request_id(response),
            ) from exc
        cost = (
            tokens_in * self.config.price_input_per_mtok + tokens_out * self.config.price_output_per_mtok
        ) / 1_000_000
        return AIReply(text, Usage(tokens_in, tokens_out, 1, cost), self.name, self.model, finish)

    async def _observed_attempt(self, request: AIRequest, allowance: _Allowance | None = None) -> AIReply:
        return await observe_call(self.observer, self.name, request.task, self._attempt(request, allowance))

    async def complete(
        self, request: AIRequest, *, notify: Notify | None = None, budget_wait_s: float | None = None
    ) -> AIReply:
        """Answer `request`, retrying what may pass; with shared limits, wait at most `budget_wait_s` in all
        for the provider's budget (BudgetWaitExceeded past it; None: no bound)."""
        allowance = _Allowance(math.inf if budget_wait_s is None else budget_wait_s, notify)
        for attempt in range(self.config.max_retries + 1):
            try:
                return await self._observed_attempt(request, allowance)
            except BudgetWaitExceeded as exc:
                exc.task = exc.details["task"] = request.task
                raise
            except (AIRateLimited, AIUnavailable) as exc:
                wait = retry_wait_s(exc, attempt)
                if attempt == self.config.max_retries or wait > self.config.max_retry_wait_s:
                    raise
                logger.warning("{}; retry {} of {} in {:.1f}s", exc, attempt + 1, self.config.max_retries, wait)
                if notify is not None:
                    await notify(
                        f"{request.task}: {exc}; retrying in {wait:.1f}s ({attempt + 1}/{self.config.max_retries})",
                        level="warning",
                        event="model.retry",
                        provider=self.name,
                        status=exc.status,
                    )
                await sleep_s(wait, what=f"provider {self.name}: the wait before a retry")
        raise AssertionError("unreachable")


def retry_wait_s(exc: AIError, attempt: int) -> float:
    """The wait before retry `attempt + 1` of a call that failed with `exc`: what a 429 asked for (already
    clamped by `retry_after_s`), else exponential backoff with jitter (1 s, 2 s, 4 s... up to 30 s)."""
    asked = exc.retry_after_s if isinstance(exc, AIRateLimited) else None
    return asked if asked is not None else min(2.0 ** min(attempt, 30), 30.0) * random.uniform(0.5, 1.0)


@dataclass
class _Allowance:
    """What is left of one `complete` call's wait for budget, and the progress log that hears of a wait."""

    left_s: float
    notify: Notify | None

    def waiting(self, limiter: ProviderLimiter) -> OnWait | None:
        notify = self.notify
        if notify is None:
            return None

        async def told(budget: str, expected_s: float) -> None:
            await notify(
                f"waiting for {limiter.name}: {limiter.what(budget)} (about {expected_s:.0f}s)",
                level="info",
                event="model.budget_wait",
                provider=limiter.name,
                budget=budget,
                wait_s=round(expected_s, 1),
            )

        return told


class OpenAIProvider(HTTPProvider):
    """Any OpenAI-compatible `/chat/completions`: OpenAI, Ollama, vLLM, OpenRouter, Cloudflare's compat API."""

    kind = "openai"

    def endpoint(self) -> str:
        return "chat/completions"

    def body(self, request: AIRequest) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": [{"role": "system", "content": request.system}, {"role": "user", "content": request.prompt}],
            "max_tokens": self.config.max_output_tokens,
            "temperature": self.config.temperature,
        }

    def read(self, data: Any) -> tuple[str, int, int, str]:
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        return (
            choice["message"]["content"] or "",
            usage.get("prompt_tokens", 0),
            usage.get("completion_tokens", 0),
            finish,
        )


class AnthropicProvider(HTTPProvider):
    """Anthropic's Messages API."""

    kind = "anthropic"
    API_VERSION = "2023-06-01"

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"x-api-key": api_key, "anthropic-version": self.API_VERSION}

    def endpoint(self) -> str:
        return "v1/messages"

    def body(self, request: AIRequest) -> dict[str, Any]:
        return {
            "model": self.model,
            "max_tokens": self.config.max_output_tokens,
            "temperature": self.config.temperature,
            "system": request.system,
            "messages": [{"role": "user", "content": request.prompt}],
        }

    def read(self, data: Any) -> tuple[str, int, int, str]:
        text = "".join(block.get("text", "") for block in data["content"] if block.get("type") == "text")
        usage = data.get("usage") or {}
        finish = "length" if data.get("stop_reason") == "max_tokens" else "stop"
        return text, usage.get("input_tokens", 0), usage.get("output_tokens", 0), finish


class CloudflareProvider(HTTPProvider):
    """Cloudflare Workers AI: `/accounts/{account_id}/ai/run/{model}`, the answer under `result.response`."""

    kind = "cloudflare"

    def endpoint(self) -> str:
        return f"accounts/{self.config.account_id}/ai/run/{self.model}"

    def body(self, request: AIRequest) -> dict[str, Any]:
        return {
            "messages": [{"role": "system", "content": request.system}, {"role": "user", "content": request.prompt}],
            "max_tokens": self.config.max_output_tokens,
            "temperature": self.config.temperature,
        }

    def read(self, data: Any) -> tuple[str, int, int, str]:
        result = data["result"]
        answer = result["response"]
        text = answer if isinstance(answer, str) else json.dumps(answer)
        usage = result.get("usage") or {}
        return text, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), "stop"

    def request_id(self, response: Answer) -> str | None:
        found: str | None = response.headers.get("cf-ray")
        return found

    def is_quota_exhausted(self, response: Answer) -> bool:
        try:
            data = response.json()
        except ValueError:
            return False
        errors = data.get("errors") if isinstance(data, dict) else None
        if not isinstance(errors, list):
            return False
        return any(
            isinstance(e, dict) and type(e.get("code")) is int and e["code"] in CLOUDFLARE_QUOTA_CODES for e in errors
        )


KINDS: dict[str, type[HTTPProvider]] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
    "cloudflare": CloudflareProvider,
}
