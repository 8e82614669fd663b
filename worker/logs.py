"""The one logger setup: loguru for our code, with arq's and asyncpg's standard logging routed into it.

One line per event on stderr. The job and the runner bind `order_id`, `generation_id` and `phase`
with `logger.contextualize`, so every line logged while a phase runs carries them, and
`replica` is a global extra. Text by default; JSON lines (one compact object per line, for log
shippers) with the setting `log.json_lines` or the environment variable `SITEGEN_LOG_JSON=1`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from datetime import UTC
from typing import TYPE_CHECKING, Any, TextIO

from loguru import logger

from worker.settings import LogSection

if TYPE_CHECKING:
    from loguru import Message, Record

#: The context every JSON line has (null when unknown), in this order, after time, level and message.
CONTEXT_FIELDS = ("replica", "order_id", "generation_id", "phase")
JSON_ENV = "SITEGEN_LOG_JSON"

_TEXT = "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> <cyan>{extra[replica]}</cyan>"


def json_requested(settings: LogSection) -> bool:
    """JSON lines when the setting says so or `SITEGEN_LOG_JSON` is 1/true/yes/on."""
    return settings.json_lines or os.environ.get(JSON_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def text_format(record: Record) -> str:
    """The text line: time, level, replica, the order/generation/phase context when known, the message."""
    extra = record["extra"]
    context = "".join(
        f" {key.removesuffix('_id')}={{extra[{key}]}}" for key in CONTEXT_FIELDS[1:] if extra.get(key) is not None
    )
    return _TEXT + (f"<dim>{context}</dim>" if context else "") + " {message}\n{exception}"


def json_line(record: Record) -> str:
    """One log record as a compact JSON object: time (UTC), level, message, the context fields, then the rest."""
    extra = dict(record["extra"])
    entry: dict[str, Any] = {
        "time": record["time"].astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": record["level"].name,
        "message": record["message"],
    }
    for key in CONTEXT_FIELDS:
        entry[key] = extra.pop(key, None)
    entry["logger"] = extra.pop("logger", None) or record["name"]
    entry["function"] = record["function"]
    entry["line"] = record["line"]
    for key, value in extra.items():
        entry.setdefault(key, value)
    exc = record["exception"]
    if exc is not None and exc.type is not None:
        entry["exception"] = "".join(traceback.format_exception(exc.type, exc.value, exc.traceback)).rstrip()
    return json.dumps(entry, default=str, ensure_ascii=False, separators=(",", ":"))


class JsonLines:
    """A loguru sink writing `json_line` of each record to `stream` (default: the current stderr)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    def __call__(self, message: Message) -> None:
        stream = self.stream or sys.stderr
        stream.write(json_line(message.record) + "\n")
        stream.flush()


class _ToLoguru(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).bind(logger=record.name).log(level, "{}", record.getMessage())


def setup_logging(settings: LogSection, *, replica: str) -> None:
    """Send everything to stderr, one line per event (JSON lines when `log.json_lines` or SITEGEN_LOG_JSON is set)."""
    logger.remove()
    logger.configure(extra={"replica": replica})
    level = settings.level.upper()
    if json_requested(settings):
        logger.add(JsonLines(), level=level, format="{message}", backtrace=False, diagnose=False)
    else:
        logger.add(sys.stderr, level=level, format=text_format, backtrace=False, diagnose=False)
    handler = _ToLoguru()
    for name in ("arq", "asyncpg"):
        std = logging.getLogger(name)
        std.handlers = [handler]
        std.propagate = False
        std.setLevel(logging.INFO)
    arq_cli = sys.modules.get("arq.cli")
    if arq_cli is not None:
        # Run by `arq worker.main.WorkerSettings`: after importing us, arq's CLI applies its own logging
        # config (a plain-text handler on "arq") unless given --custom-log-dict; make it apply ours.
        arq_cli.default_log_config = arq_log_config  # type: ignore[attr-defined]


def arq_log_config(verbose: bool) -> dict[str, Any]:
    """arq's logging config (for `logging.config.dictConfig`), sending its records to loguru like ours."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"loguru": {"()": _ToLoguru}},
        "loggers": {"arq": {"handlers": ["loguru"], "level": "DEBUG" if verbose else "INFO", "propagate": False}},
    }
