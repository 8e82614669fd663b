"""The provider interface every AI backend implements, token usage, and routing of tasks to providers."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from loguru import logger

from worker.errors import FALLBACK_ON, BudgetWaitExceeded

if TYPE_CHECKING:
    from worker.ai.http import Slots
    from worker.ai.limits import ProviderLimiter, SharedLimits

Task = Literal["planning", "content", "coding", "edit_planning", "editing", "rewriting"]

#: The longest wait a provider (or Redis, for a provider's budget) can make a call take, as read: a longer
#: one is this long. Far past the caps applied after it (`max_retry_wait_s` in a call, `ai.max_retry_defer_s`
#: for the job), so no decision changes: it only keeps every wait computed from outside a finite number.
MAX_WAIT_S = 86_400.0


def clamp_wait_s(seconds: float) -> float | None:
    """The one clamp of every duration that comes from outside (a provider's headers, Redis' answer):
    None for NaN (no instruction), else within [0, MAX_WAIT_S]."""
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_WAIT_S)


#: The places that were handed a wait `sleep_s` refused, each logged once.
_REFUSED_WAITS: set[str] = set()


async def sleep_s(seconds: float, *, what: str) -> None:
    """`asyncio.sleep` for a computed wait (a model call's retry, a wait for a provider's budget).

    `asyncio.sleep(nan)` corrupts the event loop's timer heap: every other timer of the process stalls
    (heartbeats, polls, health writes), the leases lapse and the health key expires. A NaN, negative or
    longer-than-MAX_WAIT_S wait is a bug before this point (`clamp_wait_s` should have caught it): it is
    slept as 0 s (NaN, negative) or MAX_WAIT_S, and logged once for each `what`.
    """
    if not 0.0 <= seconds <= MAX_WAIT_S:  # NaN fails both comparisons
        safe = MAX_WAIT_S if seconds > MAX_WAIT_S else 0.0
        if what not in _REFUSED_WAITS:
            _REFUSED_WAITS.add(what)
            logger.error(
                "{}: refused to sleep {!r} s (not a finite wait of 0 s or more); slept {:g} s", what, seconds, safe
            )
        seconds = safe
    await asyncio.sleep(seconds)


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    calls: int = 0
    cost_usd: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.calls + other.calls,
            self.cost_usd + other.cost_usd,
        )

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def as_dict(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "calls": self.calls,
            "cost_usd": round(self.cost_usd, 6),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Usage:
        data = data or {}
        return cls(
            int(data.get("input_tokens", 0)),
            int(data.get("output_tokens", 0)),
            int(data.get("calls", 0)),
            float(data.get("cost_usd", 0.0)),
        )


@dataclass(frozen=True)
class AIRequest:
    task: Task
    system: str
    prompt: str


@dataclass(frozen=True)
class AIReply:
    text: str
    usage: Usage
    provider: str
    model: str
    #: "stop" for a complete answer, "length" when the provider cut it off.
    finish_reason: str = "stop"


Notify = Callable[..., Awaitable[None]]


class CallObserver(Protocol):
    """Hears about every model call (the worker's metrics): `status` is "ok", an HTTP status or an error class."""

    def model_call(self, *, provider: str, task: str, status: str, seconds: float, usage: Usage | None) -> None: ...


class AIProvider(Protocol):
    name: str
    model: str

    async def complete(self, request: AIRequest, *, notify: Notify | None = None) -> AIReply:
        """Answer one request; `notify` (the progress log) hears about retries."""
        ...

    async def aclose(self) -> None: ...


def call_status(exc: BaseException) -> str:
    """A failed call's metrics label: its HTTP error status, else what failed (ReadTimeout, ConnectError...)."""
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status >= 400:
        return str(status)
    failure = getattr(exc, "details", {}).get("failure")  # set by the HTTP providers (http.failure_kind)
    return failure if isinstance(failure, str) else type(exc).__name__


async def observe_call(observer: CallObserver | None, provider: str, task: str, call: Awaitable[AIReply]) -> AIReply:
    """Await one model call, reporting its status, duration and usage to `observer` (if any)."""
    if observer is None:
        return await call
    started = time.monotonic()
    status = "ok"
    usage: Usage | None = None
    try:
        reply = await call
        usage = reply.usage
        return reply
    except asyncio.CancelledError:
        status = "cancelled"
        raise
    except Exception as exc:
        status = call_status(exc)
        raise
    finally:
        observer.model_call(
            provider=provider, task=task, status=status, seconds=time.monotonic() - started, usage=usage
        )


class AIRouter:
    """Which providers serve each task, in fallback order, and how many calls each task made.

    A provider with shared limits is waited for at most `max_budget_wait_s` when it is the last of the
    task's chain, `fallback_budget_wait_s` when a fallback follows it.
    """

    def __init__(
        self,
        providers: dict[str, AIProvider],
        routing: dict[str, list[str]] | dict[str, str],
        *,
        max_budget_wait_s: float | None = None,
        fallback_budget_wait_s: float | None = None,
        limits: SharedLimits | None = None,
    ) -> None:
        self.providers = providers
        self.routing = {task: [names] if isinstance(names, str) else list(names) for task, names in routing.items()}
        self.calls: Counter[str] = Counter()
        self.observer: CallObserver | None = None
        self.max_budget_wait_s = max_budget_wait_s
        self.fallback_budget_wait_s = fallback_budget_wait_s
        #: The Redis side of the providers' shared limits (None: no Redis, no shared limits).
        self.limits = limits

    def observe(self, observer: CallObserver) -> None:
        """Report every call to `observer`; providers with an `observer` of their own report each HTTP attempt."""
        self.observer = observer
        for provider in self.providers.values():
            if hasattr(provider, "observer"):
                setattr(provider, "observer", observer)  # noqa: B010 - not part of the AIProvider protocol
        if hasattr(observer, "budget_wait"):  # the worker's metrics also hear how long calls wait for budget
            for limiter in self.limiters().values():
                limiter.observer = observer  # type: ignore[assignment]

    def limiters(self) -> dict[str, ProviderLimiter]:
        """The shared limits of each provider that has them (the HTTP ones, with Redis), by provider name."""
        found: dict[str, ProviderLimiter] = {}
        for name, provider in self.providers.items():
            limiter = getattr(provider, "limiter", None)
            if limiter is not None:
                found[name] = limiter
        return found

    def slots(self) -> dict[str, Slots]:
        """The `max_concurrency` slots of each provider that has them (the HTTP ones), by provider name."""
        found: dict[str, Slots] = {name: p.slots for name, p in self.providers.items() if hasattr(p, "slots")}
        return found

    def chain(self, task: Task) -> list[AIProvider]:
        return [self.providers[name] for name in self.routing[task]]

    async def complete(self, request: AIRequest, *, notify: Notify | None = None) -> AIReply:
        """Ask the task's providers in order; the next one is tried when one is down or out of quota."""
        chain = self.chain(request.task)
        for position, provider in enumerate(chain):
            self.calls[request.task] += 1
            last = position == len(chain) - 1
            wait_s = self.max_budget_wait_s if last else self.fallback_budget_wait_s
            try:
                return await self._call(provider, request, notify, wait_s)
            except FALLBACK_ON as exc:
                if last:
                    raise
                following = chain[position + 1]
                if notify is not None:
                    why = (
                        f"has no budget ({exc})"
                        if isinstance(exc, BudgetWaitExceeded)
                        else f"failed ({type(exc).__name__}: {exc})"
                    )
                    await notify(
                        f"{request.task}: provider {provider.name} {why}; falling back to {following.name}",
                        level="warning",
                        event="model.fallback",
                        provider=provider.name,
                        fallback=following.name,
                    )
        raise AssertionError("unreachable: a routing chain is never empty")

    async def _call(
        self, provider: AIProvider, request: AIRequest, notify: Notify | None, budget_wait_s: float | None
    ) -> AIReply:
        limiter = getattr(provider, "limiter", None)  # shared limits: waits for budget at most budget_wait_s
        if limiter is not None:
            call = provider.complete(request, notify=notify, budget_wait_s=budget_wait_s)  # type: ignore[call-arg]
        else:
            call = provider.complete(request, notify=notify)
        if hasattr(provider, "observer"):  # it reports each of its HTTP attempts itself
            return await call
        return await observe_call(self.observer, provider.name, request.task, call)

    async def aclose(self) -> None:
        for provider in self.providers.values():
            await provider.aclose()
        if self.limits is not None:
            await self.limits.aclose()
