"""The one logger setup: loguru for our code, with arq's and asyncpg's standard logging routed into it."""

from __future__ import annotations

import logging
import sys

from loguru import logger

from worker.settings import LogSection

_FORMAT = "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> <cyan>{extra[replica]}</cyan> {message}"


class _ToLoguru(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, "{}", record.getMessage())


def setup_logging(settings: LogSection, *, replica: str) -> None:
    """Send everything to stderr, one line per event (JSON lines when `log.json_lines` is set)."""
    logger.remove()
    logger.configure(extra={"replica": replica})
    if settings.json_lines:
        logger.add(sys.stderr, level=settings.level.upper(), serialize=True, backtrace=False, diagnose=False)
    else:
        logger.add(sys.stderr, level=settings.level.upper(), format=_FORMAT, backtrace=False, diagnose=False)
    handler = _ToLoguru()
    for name in ("arq", "asyncpg"):
        std = logging.getLogger(name)
        std.handlers = [handler]
        std.propagate = False
        std.setLevel(logging.INFO)
