"""The pure functions of worker/pipeline/runner.py: job arguments, the brief, and retry backoff."""

from __future__ import annotations

import copy
import random
from typing import Any

import asyncpg
import pytest

from tests.helpers import SAMPLE_BRIEF
from worker.errors import BriefInvalid, JobArgumentsInvalid, describe, is_retryable
from worker.pipeline.runner import backoff_s, validate_brief, validate_edit_args, validate_job_args
from worker.settings import Settings, load_settings

# --------------------------------------------------------------------------- validate_job_args


def test_valid_job_args_return_the_order_id() -> None:
    assert validate_job_args(12, None, False, {}, ()) == 12
    assert validate_job_args(1, {"business_name": "x"}, True, {}, ()) == 1


@pytest.mark.parametrize("order_id", ["12", 12.0, 1.5, True, False, 0, -3, None, [12]])
def test_bad_order_id_is_named(order_id: Any) -> None:
    with pytest.raises(JobArgumentsInvalid) as caught:
        validate_job_args(order_id, None, False, {}, ())
    assert "order_id" in str(caught.value)
    assert "positive integer" in str(caught.value)
    assert not is_retryable(caught.value)


@pytest.mark.parametrize("brief", [["business_name"], "brief", 5])
def test_brief_that_is_not_an_object_is_named(brief: Any) -> None:
    with pytest.raises(JobArgumentsInvalid) as caught:
        validate_job_args(12, brief, False, {}, ())
    assert "brief" in str(caught.value)
    assert type(brief).__name__ in str(caught.value)


@pytest.mark.parametrize("regenerate", ["yes", 1, None, "true"])
def test_regenerate_that_is_not_a_bool_is_named(regenerate: Any) -> None:
    with pytest.raises(JobArgumentsInvalid) as caught:
        validate_job_args(12, None, regenerate, {}, ())
    assert "regenerate" in str(caught.value)
    assert repr(regenerate) in str(caught.value)


def test_unknown_kwarg_is_named() -> None:
    with pytest.raises(JobArgumentsInvalid) as caught:
        validate_job_args(12, None, False, {"force": True, "breif": {}}, ())
    message = str(caught.value)
    assert "breif, force" in message
    assert "unknown job argument" in message


def test_extra_positional_argument_is_reported() -> None:
    with pytest.raises(JobArgumentsInvalid) as caught:
        validate_job_args(12, None, False, {}, ("extra", 2))
    assert "2 extra positional argument(s)" in str(caught.value)
    assert "order_id, brief=None, regenerate=False" in str(caught.value)


def test_huge_order_id_value_is_truncated_in_the_message() -> None:
    with pytest.raises(JobArgumentsInvalid) as caught:
        validate_job_args("9" * 10_000, None, False, {}, ())
    assert len(str(caught.value)) < 200


# --------------------------------------------------------------------------- validate_brief


def brief_data(**overrides: Any) -> dict[str, Any]:
    data = copy.deepcopy(SAMPLE_BRIEF)
    data.update(overrides)
    return data


def test_valid_brief_is_returned() -> None:
    brief = validate_brief(brief_data(), 64 * 1024)
    assert brief.business_name == SAMPLE_BRIEF["business_name"]


def test_oversized_brief_names_the_field_and_the_setting() -> None:
    raw = brief_data(description="x" * (5 * 1024 * 1024))
    with pytest.raises(BriefInvalid) as caught:
        validate_brief(raw, 64 * 1024)
    message = str(caught.value)
    assert "brief.description" in message
    assert "limits.max_brief_bytes" in message
    assert "65,536" in message
    assert caught.value.details["field"] == "brief.description"
    assert not is_retryable(caught.value)
    assert len(message) < 500  # the brief itself is never echoed


def test_missing_business_name_is_named() -> None:
    raw = brief_data()
    del raw["business_name"]
    with pytest.raises(BriefInvalid) as caught:
        validate_brief(raw, 64 * 1024)
    assert "brief.business_name" in str(caught.value)
    assert caught.value.details["fields"] == ["brief.business_name"]
    assert describe(caught.value)["retryable"] is False


def test_every_invalid_field_is_named() -> None:
    raw = brief_data(description="", pages=[{"slug": "../../etc", "title": "x"}], extra_key=1)
    with pytest.raises(BriefInvalid) as caught:
        validate_brief(raw, 64 * 1024)
    assert caught.value.details["fields"] == ["brief.description", "brief.pages.0.slug", "brief.extra_key"]


# --------------------------------------------------------------------------- backoff_s


@pytest.fixture
def settings() -> Settings:
    return load_settings(worker={"retry_backoff_s": 2, "retry_backoff_max_s": 50})


def test_backoff_grows_with_job_try_and_is_capped(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(random, "uniform", lambda low, high: high)  # the jitter's upper end
    assert [backoff_s(settings, job_try) for job_try in range(1, 8)] == [2, 4, 8, 16, 32, 50, 50]
    assert backoff_s(settings, 0) == 2


def test_backoff_is_jittered_between_half_and_full(settings: Settings) -> None:
    for job_try, full in ((1, 2), (3, 8), (20, 50)):
        delays = [backoff_s(settings, job_try) for _ in range(200)]
        assert all(full * 0.5 <= d <= full for d in delays)
        assert len(set(delays)) > 1


def test_backoff_of_zero_means_retry_at_once() -> None:
    settings = load_settings(worker={"retry_backoff_s": 0, "retry_backoff_max_s": 0})
    assert backoff_s(settings, 4) == 0


def test_a_connection_broken_by_a_server_restart_is_retried() -> None:
    """asyncpg's InternalClientError after the server terminated a connection mid-operation: seen in
    tests/faults (PostgreSQL restarted while a claim was sent); a permanent failure would lose the job."""
    broken = asyncpg.exceptions.InternalClientError("cannot switch to state 12; another operation (2) is in progress")
    assert is_retryable(broken) and describe(broken)["retryable"] is True


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"instruction": None}, "instruction"),
        ({"instruction": "   "}, "instruction"),
        ({"instruction": 42}, "instruction"),
        ({"instruction": "x" * 2001}, "instruction"),
        ({"instruction": "make it\x00blue"}, "instruction"),
        ({"instruction": "ok", "base_version": 0}, "base_version"),
        ({"instruction": "ok", "base_version": True}, "base_version"),
        ({"instruction": "ok", "base_version": "2"}, "base_version"),
        ({"instruction": "ok", "base_version": 2**31}, "base_version"),
        ({"instruction": "ok", "pages": []}, "pages"),
        ({"instruction": "ok", "pages": "index"}, "pages"),
        ({"instruction": "ok", "pages": ["Index"]}, "pages"),
        ({"instruction": "ok", "pages": ["../etc"]}, "pages"),
        ({"instruction": "ok", "pages": ["index", "index"]}, "pages"),
        ({"instruction": "ok", "pages": [f"p{i}" for i in range(13)]}, "pages"),
    ],
)
def test_an_edit_jobs_bad_argument_is_named(args: dict[str, object], field: str) -> None:
    """Issue 22: the edit_site job checks its arguments as the API does (one check, `edit_request_problem`)."""
    request = {"instruction": None, "base_version": None, "pages": None, **args}
    with pytest.raises(JobArgumentsInvalid) as raised:
        validate_edit_args("edit", 5, request, {}, ())
    assert raised.value.details["field"] == field and str(raised.value).startswith(f"{field}: ")


def test_a_valid_edit_request_is_kept_with_its_instruction_stripped() -> None:
    request = {"instruction": "  Make the header blue ", "base_version": 2, "pages": ["index", "about-us"]}
    assert validate_edit_args("edit", 5, request, {}, ()) == (
        5,
        {"instruction": "Make the header blue", "base_version": 2, "pages": ["index", "about-us"]},
    )
