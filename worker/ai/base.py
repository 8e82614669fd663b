"""The provider interface every AI backend implements, token usage, and routing of tasks to providers."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal, Protocol

Task = Literal["planning", "content", "coding"]


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    calls: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.calls + other.calls,
        )

    def as_dict(self) -> dict[str, int]:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens, "calls": self.calls}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Usage:
        data = data or {}
        return cls(int(data.get("input_tokens", 0)), int(data.get("output_tokens", 0)), int(data.get("calls", 0)))


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


class AIProvider(Protocol):
    name: str
    model: str

    async def complete(self, request: AIRequest) -> AIReply: ...

    async def aclose(self) -> None: ...


class AIRouter:
    """Which provider serves each task, and how many calls each has made (the tests count them)."""

    def __init__(self, providers: dict[str, AIProvider], routing: dict[str, str]) -> None:
        self.providers = providers
        self.routing = routing
        self.calls: Counter[str] = Counter()

    def for_task(self, task: Task) -> AIProvider:
        return self.providers[self.routing[task]]

    async def complete(self, request: AIRequest) -> AIReply:
        self.calls[request.task] += 1
        return await self.for_task(request.task).complete(request)

    async def aclose(self) -> None:
        for provider in self.providers.values():
            await provider.aclose()
