"""The provider interface every AI backend implements, token usage, and routing of tasks to providers."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from worker.errors import FALLBACK_ON

if TYPE_CHECKING:
    from worker.ai.http import Slots

Task = Literal["planning", "content", "coding"]


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
    """Which providers serve each task, in fallback order, and how many calls each task made."""

    def __init__(self, providers: dict[str, AIProvider], routing: dict[str, list[str]] | dict[str, str]) -> None:
        self.providers = providers
        self.routing = {task: [names] if isinstance(names, str) else list(names) for task, names in routing.items()}
        self.calls: Counter[str] = Counter()
        self.observer: CallObserver | None = None

    def observe(self, observer: CallObserver) -> None:
        """Report every call to `observer`; providers with an `observer` of their own report each HTTP attempt."""
        self.observer = observer
        for provider in self.providers.values():
            if hasattr(provider, "observer"):
                setattr(provider, "observer", observer)  # noqa: B010 - not part of the AIProvider protocol

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
            try:
                return await self._call(provider, request, notify)
            except FALLBACK_ON as exc:
                if position == len(chain) - 1:
                    raise
                following = chain[position + 1]
                if notify is not None:
                    await notify(
                        f"{request.task}: provider {provider.name} failed ({type(exc).__name__}: {exc}); "
                        f"falling back to {following.name}",
                        level="warning",
                        event="model.fallback",
                        provider=provider.name,
                        fallback=following.name,
                    )
        raise AssertionError("unreachable: a routing chain is never empty")

    async def _call(self, provider: AIProvider, request: AIRequest, notify: Notify | None) -> AIReply:
        if hasattr(provider, "observer"):  # it reports each of its HTTP attempts itself
            return await provider.complete(request, notify=notify)
        return await observe_call(self.observer, provider.name, request.task, provider.complete(request, notify=notify))

    async def aclose(self) -> None:
        for provider in self.providers.values():
            await provider.aclose()
