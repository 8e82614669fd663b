"""The progress log a frontend shows: rows written through their own small autocommit pool.

A write never joins a generation's transaction, so a failed phase cannot take its logs with it,
and a failed write never fails the generation: it is reported through loguru and the rows stay
in a bounded buffer until PostgreSQL takes them. Rows dropped because the buffer was full are
counted, never silent; a row PostgreSQL refuses for what it holds is replaced by a placeholder row,
counted and logged, and never blocks the rows behind it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from itertools import islice
from typing import Any, Literal

import asyncpg
from loguru import logger

from worker.errors import message_of
from worker.store import QUERIES

Level = Literal["debug", "info", "warning", "error"]

#: The machine-readable kind of a progress row is `details.event`; messages are for people and may change.
#: Kinds the runner writes: generation.started, generation.resumed, phase.started, phase.done,
#: retry.scheduled, handed_back, generation.succeeded, generation.failed, generation.cancelled,
#: generation.superseded, generation.already_done, job.rejected, job.waiting, job.not_started, job.skipped,
#: claim.warning, site.warning, site.restored, model.retry, model.fallback, model.answer_rejected,
#: model.budget_wait; the sweeper writes job.requeued.
#: A row of one of these kinds announces that its generation ended (its status is then terminal).
#: Edits and rollbacks write the same lifecycle kinds under their own prefix: edit.started, edit.resumed,
#: edit.phase.started, edit.phase.done, edit.succeeded, edit.failed, edit.cancelled (rollback.* likewise),
#: and edit.fallback when a file is rewritten whole.
END_EVENTS = frozenset(
    {
        "job.rejected",
        *(
            f"{kind}.{end}"
            for kind in ("generation", "edit", "rollback")
            for end in ("succeeded", "failed", "cancelled")
        ),
    }
)


def event_of(row: dict[str, Any]) -> str | None:
    """The kind of a progress row as read from the table (`details.event`), None for a row without one."""
    details = row.get("details")
    event = details.get("event") if isinstance(details, dict) else None
    return event if isinstance(event, str) else None


_ECHO_LEVEL = {"debug": "DEBUG", "info": "DEBUG", "warning": "WARNING", "error": "ERROR"}


@dataclass(frozen=True)
class ProgressRow:
    order_id: int
    generation_id: int | None
    phase: str | None
    level: Level
    message: str
    details: dict[str, Any] | None
    created_at: datetime


class ProgressLog:
    """Rows are buffered by `log` and sent in batches by one writer task, in the order they were logged.

    `log` never waits for PostgreSQL, so a slow or restarting database delays the log, never the
    generations; one batch is one statement (and one commit) however many generations are running.
    """

    def __init__(
        self, pool: asyncpg.Pool, *, replica_id: str, buffer_size: int = 10_000, batch_size: int = 500
    ) -> None:
        self.pool = pool
        self.replica_id = replica_id
        self.buffer_size = buffer_size
        self.batch_size = batch_size
        self.pending: deque[ProgressRow] = deque()
        #: Rows logged, written and dropped so far. Rows leave the buffer in the order they came,
        #: written or dropped, so row n (counting from 1) is out once written + dropped >= n.
        self.logged = 0
        self.written = 0
        self.failed_writes = 0
        self.dropped = 0
        #: Rows PostgreSQL refused for what they hold: each stored as a placeholder row (or, if that is
        #: refused too, dropped and counted in `dropped`), never blocking the rows behind it.
        self.refused = 0
        #: Set, then replaced, whenever a batch is written or the log falls behind: wakes `settle`.
        self._progressed = asyncio.Event()
        #: The log is behind PostgreSQL, so finishing jobs do not wait for their rows: set when a
        #: finishing job gave up waiting for the writer, cleared when the buffer is empty again.
        self.behind = False
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._retry_now = asyncio.Event()

    async def log(
        self,
        order_id: int,
        message: str,
        *,
        generation_id: int | None = None,
        phase: str | None = None,
        level: Level = "info",
        **details: Any,
    ) -> None:
        """Record one progress row; the writer stores and announces it. Never raises, never waits."""
        row = ProgressRow(order_id, generation_id, phase, level, message, details or None, datetime.now(UTC))
        # Warnings and errors are logged at their level; the routine rows (a phase started or done)
        # at DEBUG: they are what `sitegen logs` shows, and echoing ~10 per site cost ~1 ms of CPU.
        # The kind goes to the record's context (a field of JSON lines), not into the echoed text.
        shown = {k: v for k, v in details.items() if k != "event"}
        context = {"event": details["event"]} if "event" in details else {}
        logger.bind(order_id=order_id, generation_id=generation_id, phase=phase, **context).log(
            _ECHO_LEVEL[level], "{}{}", message, f" {shown}" if shown else ""
        )
        self.pending.append(row)
        self.logged += 1
        self._enforce_bound()
        self._wake.set()

    def _announce(self) -> None:
        self._progressed.set()
        self._progressed = asyncio.Event()

    def _enforce_bound(self) -> None:
        while len(self.pending) > self.buffer_size:
            self.pending.popleft()
            self.dropped += 1
            logger.error("progress buffer full: dropped the oldest unwritten progress row ({} so far)", self.dropped)

    async def run_writer(self, retry_s: float = 0.5, max_retry_s: float = 5.0) -> None:
        """The writer task: sends rows as they come; backs off while PostgreSQL cannot take them."""
        delay = retry_s
        while True:
            await self._wake.wait()
            self._wake.clear()
            if await self.flush():
                delay = retry_s
                continue
            # Back off, but a job waiting for its rows (`settle`) asks for a try now: PostgreSQL may be back.
            try:
                async with asyncio.timeout(delay):
                    await self._retry_now.wait()
            except TimeoutError:
                pass
            self._retry_now.clear()
            delay = min(delay * 2, max_retry_s)
            self._wake.set()

    async def settle(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` until every row logged so far is written (a finishing job's rows).

        The writer task writes them; this only waits for it, so the rows of many finishing jobs go
        in the writer's batches. While the log is behind (a wait already timed out and the buffer
        has not emptied since), return at once: a database slower than the log then delays the
        log, bounded by the buffer, and never the generations, which would otherwise each wait the
        full timeout.
        """
        target = self.logged
        if self.behind or timeout_s <= 0 or self.written + self.dropped >= target:
            return
        self._retry_now.set()
        try:
            async with asyncio.timeout(timeout_s):
                while self.written + self.dropped < target and not self.behind:
                    await self._progressed.wait()
        except TimeoutError:
            if not self.behind:  # the first job to give up tells every other waiter to stop too
                self.behind = True
                self._announce()
                logger.warning(
                    "progress log is behind PostgreSQL ({} rows waiting): jobs stop waiting for their rows "
                    "until it catches up",
                    len(self.pending),
                )

    async def flush(self) -> bool:
        """Write every buffered row now, in order; False if PostgreSQL could not take them.

        A row PostgreSQL refuses for what it holds is isolated (its batch split in halves) and
        replaced by a placeholder row, so it never blocks the rows behind it. Rows not written when
        a write fails otherwise, or when the flush is cancelled (a shutdown), go back to the front
        of the buffer, in order.
        """
        async with self._lock:
            while self.pending:
                taken: deque[ProgressRow] = deque(
                    self.pending.popleft() for _ in range(min(self.batch_size, len(self.pending)))
                )
                try:
                    await self._write_front(taken, len(taken))
                except BaseException as exc:  # whatever it is (a connection broken mid-operation raises asyncpg's
                    # InternalClientError, which is none of its other error classes; a shutdown cancels), the rows
                    # not written are kept and the writer lives on: it is the only one that writes them.
                    self.pending.extendleft(reversed(taken))  # back in front, order kept
                    self._enforce_bound()
                    if not isinstance(exc, Exception):
                        raise
                    self.failed_writes += 1
                    logger.opt(exception=exc).warning(
                        "{} progress row(s) not written yet, kept to retry: {}", len(self.pending), message_of(exc)
                    )
                    return False
        if self.behind:
            self.behind = False
            logger.info("progress log caught up with PostgreSQL")
        return True

    def abandon(self, why: str) -> int:
        """Give up the rows still buffered (PostgreSQL could not take them): counted as dropped and logged."""
        lost = len(self.pending)
        if lost:
            self.pending.clear()
            self.dropped += lost
            self._announce()
            logger.error("{} progress row(s) could not be written and are dropped: {}", lost, why)
        return lost

    async def _write_front(self, rows: deque[ProgressRow], count: int) -> None:
        """Write the first `count` of `rows`, taking each off `rows` once it is stored (or replaced)."""
        batch = list(islice(rows, count))
        try:
            await self._insert(batch)
        except Exception as exc:
            if not refused_for_its_data(exc):
                raise
            if count == 1:
                await self._replace_refused(batch[0], exc)
                rows.popleft()
                return
            half = count // 2  # split until the refused row is alone; the others are written, in order
            await self._write_front(rows, half)
            await self._write_front(rows, count - half)
            return
        for _ in batch:
            rows.popleft()
        self.written += len(batch)
        self._announce()

    async def _insert(self, batch: list[ProgressRow]) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                QUERIES["insert_logs"],
                [r.order_id for r in batch],
                [r.generation_id for r in batch],
                [r.phase for r in batch],
                [r.level for r in batch],
                [r.message for r in batch],
                [r.details for r in batch],
                [r.created_at for r in batch],
                self.replica_id,
            )

    async def _replace_refused(self, row: ProgressRow, exc: Exception) -> None:
        """Store a placeholder saying that a row was refused and why; drop the row if even that is refused."""
        self.refused += 1
        why = f"{type(exc).__name__}: {message_of(exc)}"[:500]
        logger.error(
            "progress row refused by PostgreSQL ({} so far), stored as a placeholder: {}; the row was {!r:.500}",
            self.refused,
            why,
            row,
        )
        placeholder = replace(
            row,
            message=f"(a progress row PostgreSQL refused: {why[:200]})",
            details={"refused": {"type": type(exc).__name__, "sqlstate": getattr(exc, "sqlstate", None), "error": why}},
        )
        try:
            await self._insert([placeholder])
        except Exception as again:
            if not refused_for_its_data(again):
                raise  # kept with the rows behind it, to retry
            self.dropped += 1
            logger.error(
                "progress row refused by PostgreSQL, and its placeholder too: dropped ({} so far): {}",
                self.dropped,
                message_of(again),
            )
            return
        self.written += 1
        self._announce()


def refused_for_its_data(exc: BaseException) -> bool:
    """Whether PostgreSQL (or asyncpg, encoding it) refuses a row for what it holds: no retry will take it.

    Data exceptions (class 22), integrity violations (23) and program limits (54); a missing table, a
    permission or a full disk refuse every row alike, so the rows are kept for a later try instead.
    """
    if isinstance(exc, asyncpg.exceptions._base.DataError):
        return True
    sqlstate = str(getattr(exc, "sqlstate", None) or "") if isinstance(exc, asyncpg.PostgresError) else ""
    return sqlstate[:2] in ("22", "23", "54")
