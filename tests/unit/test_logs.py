"""The log line formats: compact JSON objects carrying the context bound by the job and the runner, and text."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import socket
from collections.abc import Iterator

import pytest
from loguru import logger

from worker.logs import JSON_ENV, JsonLines, json_requested, setup_logging, text_format
from worker.settings import LogSection


@pytest.fixture
def json_sink() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    sink = logger.add(JsonLines(stream), level="DEBUG", format="{message}")
    yield stream
    logger.remove(sink)


def entries(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_json_line_carries_the_bound_context(json_sink: io.StringIO) -> None:
    log = logger.bind(replica="r-1")
    log.info("outside any job")
    with logger.contextualize(order_id=7, job_try=2), logger.contextualize(generation_id=11, phase="content"):
        log.warning("inside a phase: {} {{braces}}", "done")

    outside, inside = entries(json_sink)
    assert outside["order_id"] is None and outside["generation_id"] is None and outside["phase"] is None
    assert inside["message"] == "inside a phase: done {braces}"
    assert inside["level"] == "WARNING" and inside["replica"] == "r-1"
    assert (inside["order_id"], inside["generation_id"], inside["phase"]) == (7, 11, "content")
    assert inside["job_try"] == 2 and inside["logger"] == __name__
    assert str(inside["time"]).endswith("Z")
    assert list(inside)[:7] == ["time", "level", "message", "replica", "order_id", "generation_id", "phase"]
    assert len(json_sink.getvalue().splitlines()) == 2, "one line per event"


def test_an_exception_is_one_string_field_on_the_same_line(json_sink: io.StringIO) -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        logger.exception("it failed")

    (entry,) = entries(json_sink)
    assert entry["level"] == "ERROR" and entry["message"] == "it failed"
    assert isinstance(entry["exception"], str)
    assert "Traceback" in entry["exception"] and "ValueError: bad\nvalue" in entry["exception"]


def test_values_json_cannot_encode_are_written_as_text(json_sink: io.StringIO) -> None:
    logger.bind(path=socket).info("odd extra")
    (entry,) = entries(json_sink)
    assert "module 'socket'" in str(entry["path"])


@pytest.mark.parametrize(
    ("env", "setting", "expected"),
    [(None, False, False), ("1", False, True), ("true", False, True), ("0", False, False), (None, True, True)],
)
def test_json_is_chosen_by_the_setting_or_sitegen_log_json(
    monkeypatch: pytest.MonkeyPatch, env: str | None, setting: bool, expected: bool
) -> None:
    if env is None:
        monkeypatch.delenv(JSON_ENV, raising=False)
    else:
        monkeypatch.setenv(JSON_ENV, env)
    assert json_requested(LogSection(json_lines=setting)) is expected


def test_setup_logging_with_sitegen_log_json_routes_std_logging_into_json_lines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.StringIO()
    monkeypatch.setenv(JSON_ENV, "1")
    try:
        with contextlib.redirect_stderr(stream):
            setup_logging(LogSection(), replica="unit-replica")
            with logger.contextualize(order_id=3):
                logger.info("ours")
                logging.getLogger("arq.worker").info("from arq %s", "too")
            logger.debug("below the level")
    finally:
        monkeypatch.delenv(JSON_ENV)
        setup_logging(LogSection(), replica=socket.gethostname())

    ours, arq = entries(stream)
    assert ours["replica"] == arq["replica"] == "unit-replica"
    assert ours["order_id"] == arq["order_id"] == 3
    assert arq["message"] == "from arq too" and arq["logger"] == "arq.worker"


def test_text_lines_show_the_context_when_known() -> None:
    stream = io.StringIO()
    sink = logger.add(stream, format=text_format, level="DEBUG", colorize=False)
    try:
        log = logger.bind(replica="r-2")
        log.info("plain")
        with logger.contextualize(order_id=5, generation_id=9, phase="plan"):
            log.info("in phase")
    finally:
        logger.remove(sink)
    plain, in_phase = stream.getvalue().splitlines()
    assert plain.endswith(" r-2 plain") and "order=" not in plain
    assert in_phase.endswith(" r-2 order=5 generation=9 phase=plan in phase")
