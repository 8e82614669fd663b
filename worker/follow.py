"""Reading an order's progress log live: rows from the table, woken by LISTEN/NOTIFY.

The table is the durable record and NOTIFY only says "look again": a notification lost while
the connection was down costs nothing, because every wake-up (and a periodic poll) reads the
rows after the last one seen. The listening connection is dedicated, and replaced when it dies.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from loguru import logger

from worker.store import QUERIES

CHANNEL = "site_generation_progress"
BATCH = 1000


async def _fetch(conn: asyncpg.Connection, order_id: int, after_id: int) -> list[dict[str, Any]]:
    rows = await conn.fetch(QUERIES["logs_for_order"], order_id, after_id, BATCH)
    return [
        {**dict(r), "details": json.loads(r["details"]) if isinstance(r["details"], str) else r["details"]}
        for r in rows
    ]


async def follow_logs(
    dsn: str, order_id: int, *, after_id: int = 0, poll_s: float = 2.0, stop: asyncio.Event | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Yield the order's progress rows, oldest first, then new ones as they are written, until `stop` is set.

    With `stop` already set, yields the stored rows once and returns.
    """
    stop = stop or asyncio.Event()
    wake = asyncio.Event()

    def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            if json.loads(payload).get("order_id") == order_id:
                wake.set()
        except ValueError:
            pass

    while True:
        try:
            conn = await asyncpg.connect(dsn)
        except (OSError, asyncpg.PostgresError) as exc:
            if stop.is_set():
                raise
            logger.warning("cannot reach PostgreSQL to follow the log ({}); retrying", exc)
            await _wait(stop, wake, poll_s)
            continue
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c, lost=lost: lost.set())
        try:
            await conn.add_listener(CHANNEL, on_notify)
            while not lost.is_set():
                # Read everything there is before honouring `stop`, so one pass sees every row.
                while True:
                    rows = await _fetch(conn, order_id, after_id)
                    for row in rows:
                        after_id = row["id"]
                        yield row
                    if len(rows) < BATCH:
                        break
                if stop.is_set():
                    return
                await _wait(stop, wake, poll_s, lost)
                wake.clear()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            logger.warning("lost the connection following the log ({}); reconnecting", exc)
        finally:
            if not conn.is_closed():
                await conn.close()


async def _wait(stop: asyncio.Event, wake: asyncio.Event, wait_s: float, lost: asyncio.Event | None = None) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in (stop, wake, lost) if e is not None]
    try:
        await asyncio.wait(waiters, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


async def follow_position(dsn: str, order_id: int, *, timeout_s: float = 10) -> tuple[int, bool]:
    """(id of the order's last progress row, whether a generation of the order is queued or running)."""
    conn = await asyncpg.connect(dsn, timeout=timeout_s)
    try:
        row = await conn.fetchrow(QUERIES["follow_position"], order_id)
    finally:
        await conn.close()
    assert row is not None
    return int(row["last_log_id"]), bool(row["active"])
