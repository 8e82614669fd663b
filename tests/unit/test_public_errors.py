"""What read and stream tokens see of stored errors (issue 20 finding 12): a corpus of the errors the
worker stores, none of whose internals may reach `public_error` or `public_row`."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from worker.api.context import public_error, public_row
from worker.errors import AIBadRequest, AIRateLimited, BriefInvalid, SiteCheckFailed, describe
from worker.store import minimal_error

SECRET = "db-7.internal"


def stored(exc: BaseException, phase: str | None = "code") -> dict[str, Any]:
    try:
        raise exc
    except BaseException as raised:
        return describe(raised, phase=phase)


def postgres_error() -> BaseException:
    exc = asyncpg.exceptions.NotNullViolationError(f'null value in column "claim_token" on host {SECRET}')
    exc.column_name = "claim_token"  # type: ignore[attr-defined]
    exc.table_name = "site_generations"  # type: ignore[attr-defined]
    return exc


CORPUS: list[dict[str, Any]] = [
    stored(AIBadRequest(f"openai: HTTP 400: request refused: {SECRET}", provider="o", task="coding", body=SECRET)),
    stored(AIRateLimited(f"HTTP 429 from {SECRET}", provider="o", task="coding", request_id=SECRET)),
    stored(postgres_error(), phase="assemble"),
    stored(OSError(f"connection refused by {SECRET}:5432")),
    stored(RuntimeError(f"Traceback (most recent call last): {SECRET}")),
    minimal_error(stored(AIBadRequest(SECRET, provider="o", task="x")), ValueError("refused")),
    {
        "type": "AttemptsExhausted",
        "message": f"gave up after 3 attempts (setting worker.max_attempts = 3); last error: AIUnavailable: {SECRET}",
        "phase": "content",
        "details": {"last_error": {"message": SECRET}},
    },
    {"type": "AttemptLost", "message": f"attempt 2 on replica {SECRET} stopped at phase code without an error"},
    {"type": "Interrupted", "message": "the replica is shutting down", "phase": "plan", "traceback": SECRET},
    {"type": "<script>", "message": SECRET},
    {"message": SECRET},
]


@pytest.mark.parametrize("error", CORPUS, ids=lambda e: str(e.get("type")))
def test_no_stored_internal_reaches_a_read_token(error: dict[str, Any]) -> None:
    """Regression: issue 20 finding 12: the stored error went to read tokens whole."""
    shown = public_error(error)
    assert shown is not None and set(shown) == {"type", "message", "phase", "retryable"}
    assert SECRET not in repr(shown) and "Traceback" not in shown["message"], shown
    assert shown["message"], "a read token still learns what kind of failure it was"
    assert shown["phase"] == error.get("phase") and shown["retryable"] is bool(error.get("retryable", False))
    row = {"message": f"generation failed: {error.get('type')}: {error.get('message')}", "details": {"error": error}}
    assert SECRET not in repr(public_row(row))
    # A row whose text no longer holds the stored message verbatim still gives nothing away.
    odd = {"message": f"phase code failed: {SECRET}", "details": {"event": "retry.scheduled", "error": error}}
    shaped = public_row(odd)
    assert SECRET not in repr(shaped) and shaped["details"]["event"] == "retry.scheduled"


def test_our_own_messages_name_what_to_fix() -> None:
    brief = public_error(stored(BriefInvalid("invalid brief: brief.description: Field required\nmore"), None))
    assert brief == {
        "type": "BriefInvalid",
        "message": "invalid brief: brief.description: Field required",
        "phase": None,
        "retryable": False,
    }
    check = public_error(stored(SiteCheckFailed("the generated site failed 1 check(s): broken link x.html")))
    assert check is not None and check["message"].endswith("broken link x.html")
    assert public_error(None) is None
    plain = {"id": 1, "message": "phase plan done", "details": {"event": "phase.done"}}
    assert public_row(plain) is plain
