"""AI providers: one client per provider for the life of the worker, chosen per task by `[ai.routing]`."""

from __future__ import annotations

import os

from worker.ai.base import AIProvider, AIReply, AIRequest, AIRouter, Task, Usage
from worker.ai.http import KINDS, provider_proxy
from worker.ai.limits import Limits, SharedLimits
from worker.ai.offline import OfflineProvider
from worker.settings import AISection

__all__ = ["AIProvider", "AIReply", "AIRequest", "AIRouter", "Task", "Usage", "build_router", "check_environment"]


def _routed(settings: AISection) -> list[str]:
    return sorted({name for names in settings.routing.values() for name in names})


def check_environment(settings: AISection) -> None:
    """What the providers read from the environment at start (the proxy), checked before the worker
    starts: SettingsError naming the provider and the variables to fix."""
    for name in _routed(settings):
        config = settings.providers[name]
        if config.kind != "offline":
            provider_proxy(name, config.api_root)


def build_router(settings: AISection, limits: SharedLimits | None = None) -> AIRouter:
    """Create every routed provider (and its one HTTP client, for the networked kinds) once, at startup.

    With `limits` (the worker's Redis), every networked provider shares its limits and its 429 pauses
    with the other replicas; without, each replica is on its own (tests, tools).
    """
    providers: dict[str, AIProvider] = {}
    for name in _routed(settings):
        config = settings.providers[name]
        if config.kind == "offline":
            providers[name] = OfflineProvider(name, config.model or "offline-templates-1", config.latency_s)
        else:
            api_key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
            provider = KINDS[config.kind](name, config, api_key)
            if limits is not None:
                provider.limiter = limits.provider(
                    name, Limits(config.requests_per_minute, config.tokens_per_minute, config.cluster_max_concurrency)
                )
            providers[name] = provider
    return AIRouter(
        providers,
        {task: list(names) for task, names in settings.routing.items()},
        max_budget_wait_s=settings.max_budget_wait_s,
        fallback_budget_wait_s=settings.fallback_budget_wait_s,
        limits=limits,
    )
