"""AI providers: one client per provider for the life of the worker, chosen per task by `[ai.routing]`."""

from __future__ import annotations

from worker.ai.base import AIProvider, AIReply, AIRequest, AIRouter, Task, Usage
from worker.ai.offline import OfflineProvider
from worker.settings import AISection

__all__ = ["AIProvider", "AIReply", "AIRequest", "AIRouter", "Task", "Usage", "build_router"]


def build_router(settings: AISection) -> AIRouter:
    """Create every configured provider (and its HTTP client, for the networked kinds) once."""
    providers: dict[str, AIProvider] = {}
    for name, config in settings.providers.items():
        if config.kind == "offline":
            providers[name] = OfflineProvider(name=name, model=config.model, latency_s=config.latency_s)
    return AIRouter(providers, dict(settings.routing))
