"""The one error mapping (worker/errors.py): which infrastructure failures a later try gets past."""

from __future__ import annotations

import errno

import asyncpg
import pytest
import redis.exceptions

from worker.errors import AIUnavailable, describe, is_infrastructure, is_retryable

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
