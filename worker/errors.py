"""The exception family of the worker and the one place that says what each failure means for the job.

Code raises the narrowest class that says what happened; `describe` turns any exception into
the JSON stored on the generation, and `is_retryable` decides between arq's retry and a final
failure. Nothing else in the project makes that decision.
"""

from __future__ import annotations

import errno
import re
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


class EditInvalid(InputError):
    """An edit or rollback that cannot run as sent: the order has no site yet, or no such version."""

    retryable = False


class EditFailed(SitegenError):
    """The model could not carry out an edit (it said so, or its changes do not apply): the live version stays."""

    retryable = False


class OrderNotFound(InputError):
    pass


# --------------------------------------------------------------------------- coordination


class OrderBusy(SitegenError):
    """Another replica holds a live claim on this order's generation: try again once it may have expired."""

    retryable = True

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float,
        generation_id: int | None = None,
        replica_id: str | None = None,
        waiting: bool = False,
    ) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.retry_after_s = retry_after_s
        self.generation_id = generation_id
        self.replica_id = replica_id
        #: An edit or rollback waiting for its turn (another run of the order, or one sent before it).
        self.waiting = waiting


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


class BudgetWaitExceeded(AIError):
    """The provider's shared budget (requests or tokens per minute, cluster concurrency, a pause after a 429)
    did not free up within the wait allowed: not a failure of the generation, which is handed back and tried
    again after `retry_after_s` (when the budget is expected to be free), or asks the task's fallback."""

    retryable = True

    def __init__(self, message: str, *, retry_after_s: float, budget: str, **kwargs: Any) -> None:
        super().__init__(message, retry_after_s=retry_after_s, budget=budget, **kwargs)
        self.retry_after_s = retry_after_s
        self.budget = budget


#: Failures after which the next provider in a task's fallback list is tried.
FALLBACK_ON = (AIUnavailable, AIRateLimited, AIQuotaExhausted, BudgetWaitExceeded)


class TokenBudgetExceeded(SitegenError):
    """The generation used more tokens than `ai.max_tokens_per_generation` allows."""


# --------------------------------------------------------------------------- output


class SiteCheckFailed(SitegenError):
    """The assembled site failed its checks (broken links, unreachable pages, unsafe paths)."""


#: Failures of the infrastructure that a later try is expected to get past. PostgreSQL's and the
#: operating system's errors are sorted further by `_infrastructure_cause`: a deterministic one
#: (the data, a permission, a full disk) fails at once, whatever its class.
TRANSIENT = (
    OSError,  # connection refused/reset, including asyncpg's and redis' socket errors
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    # A connection the server terminated in the middle of an operation (a restart) can leave asyncpg's
    # protocol mid-error: "cannot switch to state 12; another operation (2) is in progress"
    # (MagicStack/asyncpg#1069). The connection is dropped; the next try gets a new one.
    asyncpg.exceptions.InternalClientError,
    # Connection loss (08), serialization failures (40001), deadlocks (40P01), admin shutdown and
    # restarts (57P01..57P03), too many connections (53300), a statement timeout (57014), and what a
    # trigger raises (P0001): a later try may pass. The deterministic classes are below.
    asyncpg.exceptions.PostgresError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    TimeoutError,
)

#: SQLSTATEs (a whole class by its two characters, or one code) that no retry gets past, and what they mean.
_DETERMINISTIC_SQLSTATES = {
    "22": "PostgreSQL refused the data (a data exception, e.g. an untranslatable character or a value out of range)",
    "23": "PostgreSQL refused the data (an integrity constraint: unique, check, foreign key or not-null)",
    "42501": "PostgreSQL refused the statement: permission denied (grant the worker's role the privilege)",
    "42": "PostgreSQL refused the statement (a missing table or column, or a syntax error: are migrations applied?)",
    "53100": "PostgreSQL's disk is full",
    "54": "PostgreSQL refused the statement: a program limit was exceeded (e.g. a value too large)",
    "0A": "PostgreSQL does not support the statement",
}

#: errno values no retry gets past, and what they mean.
_DETERMINISTIC_ERRNOS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOSPC: "no space left on the device (disk full)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
}


def _infrastructure_cause(exc: BaseException) -> str | None:
    """What a deterministic PostgreSQL or operating-system failure means, in words; None for any other."""
    # asyncpg's client-side DataError (not class 22's `asyncpg.exceptions.DataError`) is an InterfaceError.
    if isinstance(exc, asyncpg.exceptions._base.DataError):
        return "a value could not be sent to PostgreSQL (asyncpg could not encode a query argument)"
    if isinstance(exc, asyncpg.exceptions.PostgresError):
        sqlstate = str(getattr(exc, "sqlstate", None) or "")
        found = _DETERMINISTIC_SQLSTATES.get(sqlstate) or _DETERMINISTIC_SQLSTATES.get(sqlstate[:2])
        return f"{found} [SQLSTATE {sqlstate}]" if found else None
    if isinstance(exc, OSError) and exc.errno in _DETERMINISTIC_ERRNOS:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{_DETERMINISTIC_ERRNOS[exc.errno]}{where} [{errno.errorcode.get(exc.errno, exc.errno)}]"
    return None


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, SitegenError):
        return exc.retryable
    if redis_refusal(exc) is not None:
        return True
    return isinstance(exc, TRANSIENT) and _infrastructure_cause(exc) is None


#: What redis-py raises while Redis is unreachable (BusyLoadingError, Redis still loading its AOF, is a
#: ConnectionError): the replica waits for Redis (worker/redis_outage.py), the limits use their shares.
REDIS_UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, ConnectionError, TimeoutError)

#: The error codes with which a reachable Redis refuses a command for a state of the server that passes:
#: a read-only replica (READONLY: the old primary after a failover), a replica cut off from its primary
#: (MASTERDOWN), its data still loading (LOADING), memory full under `noeviction` (OOM), a snapshot that
#: failed with `stop-writes-on-bgsave-error` (MISCONF), a script running too long (BUSY), too few replicas
#: for `min-replicas-to-write` (NOREPLICAS). Each means "Redis unavailable", as a refused connection does.
#: Replies that say our command is wrong (WRONGTYPE, ERR, an error raised in a script) are not among them.
REDIS_REFUSALS = frozenset({"READONLY", "MASTERDOWN", "LOADING", "OOM", "MISCONF", "BUSY", "NOREPLICAS"})

#: What redis-py raises for an error reply (a refusal among them: `redis_refusal` tells which), so that
#: `except REDIS_ERRORS` followed by `redis_unavailable` catches every outage and nothing else.
REDIS_ERRORS = (*REDIS_UNREACHABLE, redis.exceptions.ResponseError)

# The code is the reply's first word, which redis-py keeps in the message except for the codes it has a
# class for. Redis 6 wraps a command refused inside a script: "Error running script (call to f_...):
# @user_script:9: @user_script: 9: -READONLY You can't write ..."; redis-py prefixes a pipeline's
# error with its command: "Command # 1 (ZADD ...) of pipeline caused error: ('MASTERDOWN ...',)".
_REFUSED_IN_SCRIPT = re.compile(r"^Error running script \(call to [^)]*\): .*?: -([A-Z]+) ")
_PIPELINE_PREFIX = re.compile(r"^Command # \d+ \(.*\) of pipeline caused error: \(['\"]", re.DOTALL)


def redis_refusal(exc: BaseException) -> str | None:
    """The code of the refusal (READONLY, OOM, ...; see REDIS_REFUSALS) if Redis refused a command for a
    state that passes; None for any other exception, our own mistakes (WRONGTYPE, a script error) included."""
    if isinstance(exc, redis.exceptions.ReadOnlyError):
        return "READONLY"
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return "OOM"
    if isinstance(exc, redis.exceptions.BusyLoadingError):
        return "LOADING"
    if not isinstance(exc, redis.exceptions.ResponseError) or isinstance(exc, redis.exceptions.NoScriptError):
        return None
    text = _PIPELINE_PREFIX.sub("", str(exc), count=1)
    wrapped = _REFUSED_IN_SCRIPT.match(text)
    code = wrapped.group(1) if wrapped else text.split(" ", 1)[0]
    return code if code in REDIS_REFUSALS else None


def redis_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says Redis is out of reach or refuses for now (an outage, never the job's fault)."""
    return isinstance(exc, REDIS_UNREACHABLE) or redis_refusal(exc) is not None


def redis_trouble(exc: BaseException) -> str:
    """What a Redis error says, after "Redis": "refuses commands (READONLY: ...)", "is unreachable (...)"."""
    message = message_of(exc)
    code = redis_refusal(exc)
    if code is not None:
        return f"refuses commands ({message if message.startswith(code) else f'{code}: {message}'})"
    if isinstance(exc, REDIS_UNREACHABLE):
        return f"is unreachable ({message})"
    return f"failed ({type(exc).__name__}: {message})"


#: PostgreSQL or Redis out of reach (down, restarting, refusing connections): the job that meets one
#: is kept and retried with capped backoff for as long as it lasts, never failed on its last try.
INFRASTRUCTURE = (
    ConnectionError,  # refused or reset sockets, asyncpg's and redis-py's included
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,  # class 08
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,  # class 57: admin shutdown, crash shutdown, cannot connect now
    asyncpg.exceptions.TooManyConnectionsError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)


def is_infrastructure(exc: BaseException) -> bool:
    """Whether `exc` says PostgreSQL or Redis is out of reach, or Redis refuses for now (never the job's own fault)."""
    if redis_refusal(exc) is not None:
        return True
    return isinstance(exc, INFRASTRUCTURE) and not isinstance(exc, SitegenError) and _infrastructure_cause(exc) is None


def message_of(exc: BaseException) -> str:
    """The exception's message, never empty (the old worker stored bare `ValueError`s)."""
    return str(exc) or repr(exc)


def describe(exc: BaseException, *, phase: str | None = None) -> dict[str, Any]:
    """The JSON stored as a generation's `error` and in the progress log."""
    message = message_of(exc)
    cause = _infrastructure_cause(exc)
    if cause is not None:  # a deterministic failure says what it is, first
        message = f"{cause}: {message}"
    described: dict[str, Any] = {
        "type": type(exc).__name__,
        "message": message,
        "phase": phase,
        "retryable": is_retryable(exc),
        "traceback": "".join(traceback.format_exception(exc))[-8000:],
    }
    if isinstance(exc, SitegenError) and exc.details:
        described["details"] = exc.details
    if isinstance(exc, asyncpg.exceptions.PostgresError):
        described["sqlstate"] = getattr(exc, "sqlstate", None)
        # PostgreSQL's own pointers to the cause: the detail and the constraint, table or column involved.
        for name in ("detail", "constraint_name", "table_name", "column_name"):
            value = getattr(exc, name, None)
            if value:
                described[name] = value
    return described
