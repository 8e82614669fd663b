"""The progress log a frontend shows: rows written through their own small autocommit pool.

A write never joins a generation's transaction, so a failed phase cannot take its logs with it,
and a failed write never fails the generation: it is reported through loguru, kept in a
bounded buffer and written with the next write that succeeds. Rows dropped because the
buffer was full are counted, never silent.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg
from loguru import logger

from worker.errors import message_of
from worker.store import QUERIES

Level = Literal["debug", "info", "warning", "error"]


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
    def __init__(self, pool: asyncpg.Pool, *, replica_id: str, buffer_size: int = 1000) -> None:
        self.pool = pool
        self.replica_id = replica_id
        self.pending: deque[ProgressRow] = deque(maxlen=buffer_size)
        self.written = 0
        self.failed_writes = 0
        self.dropped = 0
        self._lock = asyncio.Lock()

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
        """Record one progress row and announce it; never raises."""
        row = ProgressRow(order_id, generation_id, phase, level, message, details or None, datetime.now(UTC))
        logger.bind(order_id=order_id, generation_id=generation_id, phase=phase).log(
            level.upper(), "{}{}", message, f" {details}" if details else ""
        )
        if len(self.pending) == self.pending.maxlen:
            self.dropped += 1
            logger.error("progress buffer full: dropped the oldest unwritten progress row ({} so far)", self.dropped)
        self.pending.append(row)
        await self.flush()

    async def flush_periodically(self, every_s: float = 1.0) -> None:
        """Write rows left buffered by a failed write even when no new row comes to carry them."""
        while True:
            await asyncio.sleep(every_s)
            if self.pending:
                await self.flush()

    async def flush(self) -> bool:
        """Write every buffered row in order; False if PostgreSQL could not take them now."""
        async with self._lock:
            while self.pending:
                row = self.pending[0]
                try:
                    async with self.pool.acquire() as conn:
                        await conn.execute(
                            QUERIES["insert_log"],
                            row.order_id,
                            row.generation_id,
                            row.phase,
                            row.level,
                            row.message,
                            row.details,
                            self.replica_id,
                            row.created_at,
                        )
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                    self.failed_writes += 1
                    logger.opt(exception=exc).warning(
                        "progress row for order {} not written yet ({} buffered): {}",
                        row.order_id,
                        len(self.pending),
                        message_of(exc),
                    )
                    return False
                self.pending.popleft()
                self.written += 1
        return True
