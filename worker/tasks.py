"""Stopping asyncio tasks for good.

On Python 3.11 a cancel can be lost: `asyncio.wait_for` (asyncpg's and others' timeouts use it) swallows
a cancel that comes as the call it waits for finishes, and the task runs on. A shutdown that cancels its
tasks once and waits for them without a bound then hangs forever on such a task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from loguru import logger

#: Seconds to wait for cancelled tasks before cancelling those still running again.
CANCEL_AGAIN_S = 1.0


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object]], what: str, *, again_s: float = CANCEL_AGAIN_S) -> None:
    """Cancel `tasks` and wait until every one has ended, cancelling again every `again_s` those still running
    (a lost cancel). Their results and exceptions are dropped: the caller is stopping them."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=again_s)
        if pending:
            logger.warning("{}: {} task(s) still running after a cancel; cancelling again", what, len(pending))
