"""The exception family of the worker and the one place that says what each failure means for the job.

Code raises the narrowest class that says what happened; `describe` turns any exception into
the JSON stored on the generation, and `is_retryable` decides between arq's retry and a final
failure. Nothing else in the project makes that decision.
"""

from __future__ import annotations

import traceback
from typing import Any

import asyncpg
import redis.exceptions


class SitegenError(Exception):
    """Base of every error the worker raises on purpose."""

    retryable = False

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return self.message


# --------------------------------------------------------------------------- input: never retried


class InputError(SitegenError):
    """The job's input is wrong; retrying cannot help. The message names the field to fix."""


class JobArgumentsInvalid(InputError):
    pass


class BriefInvalid(InputError):
    pass


class OrderNotFound(InputError):
    pass


# --------------------------------------------------------------------------- coordination


class OrderBusy(SitegenError):
    """Another replica holds a live claim on this order's generation: try again once it may have expired."""

    retryable = True

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.retry_after_s = retry_after_s


class AttemptsExhausted(SitegenError):
    """The generation was claimed `worker.max_attempts` times; the claim failed it rather than try again."""


class ClaimLost(SitegenError):
    """Our claim on the generation expired and another replica took it over: stop, it carries on."""


# --------------------------------------------------------------------------- AI


class AIError(SitegenError):
    """A model call failed; the subclass says what to do about it. Carries what an operator needs."""

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        task: str,
        model: str = "",
        status: int | None = None,
        request_id: str | None = None,
        body: str | None = None,
        **details: Any,
    ) -> None:
        super().__init__(
            message,
            provider=provider,
            task=task,
            model=model,
            status=status,
            request_id=request_id,
            body=body,
            **details,
        )
        self.provider = provider
        self.task = task
        self.model = model
        self.status = status


class AIAuthError(AIError):
    """401/403: the key is missing, wrong or lacks permission. Fix the setting; retrying cannot help."""


class AIBadRequest(AIError):
    """400/404/422: the provider refused the request (wrong model name, URL or parameters)."""


class AIQuotaExhausted(AIError):
    """The provider's quota is used up for a long while (e.g. Cloudflare's daily allocation): use another."""


class AIRateLimited(AIError):
    """429: try again after `retry_after_s` (when the provider said) or a backoff."""

    retryable = True

    def __init__(self, message: str, *, retry_after_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **kwargs)
        self.retry_after_s = retry_after_s


class AIUnavailable(AIError):
    """408/409/5xx/529, timeouts, refused or reset connections: the provider may be back soon."""

    retryable = True


class AIBadOutput(AIError):
    """The model's answer could not be parsed or validated, even after re-asking it."""


#: Failures after which the next provider in a task's fallback list is tried.
FALLBACK_ON = (AIUnavailable, AIRateLimited, AIQuotaExhausted)


class TokenBudgetExceeded(SitegenError):
    """The generation used more tokens than `ai.max_tokens_per_generation` allows."""


# --------------------------------------------------------------------------- output


class SiteCheckFailed(SitegenError):
    """The assembled site failed its checks (broken links, unreachable pages, unsafe paths)."""


#: Failures of the infrastructure that a later try is expected to get past.
TRANSIENT = (
    OSError,  # connection refused/reset, including asyncpg's and redis' socket errors
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    # A connection the server terminated in the middle of an operation (a restart) can leave asyncpg's
    # protocol mid-error: "cannot switch to state 12; another operation (2) is in progress"
    # (MagicStack/asyncpg#1069). The connection is dropped; the next try gets a new one.
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.PostgresError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    TimeoutError,
)


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, SitegenError):
        return exc.retryable
    return isinstance(exc, TRANSIENT)


def message_of(exc: BaseException) -> str:
    """The exception's message, never empty (the old worker stored bare `ValueError`s)."""
    return str(exc) or repr(exc)


def describe(exc: BaseException, *, phase: str | None = None) -> dict[str, Any]:
    """The JSON stored as a generation's `error` and in the progress log."""
    described: dict[str, Any] = {
        "type": type(exc).__name__,
        "message": message_of(exc),
        "phase": phase,
        "retryable": is_retryable(exc),
        "traceback": "".join(traceback.format_exception(exc))[-8000:],
    }
    if isinstance(exc, SitegenError) and exc.details:
        described["details"] = exc.details
    if isinstance(exc, asyncpg.exceptions.PostgresError):
        described["sqlstate"] = getattr(exc, "sqlstate", None)
    return described
