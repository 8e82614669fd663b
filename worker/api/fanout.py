"""One LISTEN connection per `serve` process, fanning progress rows out to every SSE client.

NOTIFY only says "look again": on each notification (and on a short poll, which also covers the
notifications lost while the connection was down) the fan-out reads the rows after the last one it
delivered, of every order, in one query, and hands each to the clients following its order. The
table is the durable record; the fan-out never waits for a client: each has a bounded queue, and a
client whose queue is full is dropped (it reconnects with Last-Event-ID and replays from the table).

Ids are taken from a sequence before their rows commit, so rows of different replicas can become
visible out of id order. The fan-out delivers in id order and stops at a hole until the rows behind it
commit. A hole still there after `hole_grace_s` is probed: the missing ids are inserted in a
transaction that is always rolled back. If no transaction holds them, they never will be rows (a
rolled-back batch, the ids PostgreSQL skips after a restart) and the fan-out moves past them; if one
does, the probe waits on it, times out, and the fan-out waits on. `delivered` is the high-water mark
below which every row is known and delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from loguru import logger

from worker.errors import message_of
from worker.store import QUERIES
from worker.tasks import cancel_and_wait

CHANNEL = "site_generation_progress"
READ_BATCH = 2000
#: A hole wider than this is passed after its grace without a probe (nothing writes that many rows at once).
PROBE_MAX_IDS = 10_000


class _RolledBack(Exception):
    pass


@dataclass(eq=False)
class Subscriber:
    """One SSE client: the rows of its order the fan-out delivered, up to `limit` waiting."""

    order_id: int
    limit: int
    rows: deque[dict[str, Any]] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set when the client fell `limit` rows behind: it is dropped and must reconnect.
    overflowed: bool = False
    on_overflow: Callable[[], None] | None = None

    def push(self, row: dict[str, Any]) -> bool:
        if len(self.rows) >= self.limit:
            self.overflowed = True
            self.wake.set()
            if self.on_overflow is not None:
                self.on_overflow()
            return False
        self.rows.append(row)
        self.wake.set()
        return True


def decode_row(record: asyncpg.Record) -> dict[str, Any]:
    row = dict(record)
    if isinstance(row.get("details"), str):
        row["details"] = orjson.loads(row["details"])
    return row


class ProgressFanout:
    """Reads new progress rows once for the whole process and delivers them to the subscribers of their order."""

    def __init__(
        self,
        dsn: str,
        pool: asyncpg.Pool,
        *,
        poll_s: float = 1.0,
        hole_grace_s: float = 1.0,
        reconnect_max_s: float = 5.0,
        acquire_timeout_s: float = 5.0,
        on_delivered: Callable[[dict[str, Any], int], None] | None = None,
    ) -> None:
        self.dsn = dsn
        self.pool = pool
        self.poll_s = poll_s
        self.hole_grace_s = hole_grace_s
        self.reconnect_max_s = reconnect_max_s
        #: A pool busy with client requests fails a read after this (retried at the next wake or poll).
        self.acquire_timeout_s = acquire_timeout_s
        self.on_delivered = on_delivered
        self.subscribers: dict[int, set[Subscriber]] = {}
        #: Every row with an id up to this one has been delivered (or is known never to exist).
        self.delivered = 0
        self.listening = False
        self.reconnects = 0
        self.dropped_clients = 0
        #: Holes probed, and those that were still held by an open transaction.
        self.hole_probes = 0
        self.holes_held = 0
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._tried_listen = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        #: The lowest missing id seen above `delivered`, and since when (monotonic), while it stays missing.
        self._hole: tuple[int, float] | None = None

    # -- lifecycle

    async def start(self) -> None:
        """Start listening and reading; returns once the first read set the high-water mark and LISTEN was tried."""
        self._tasks = [asyncio.create_task(self._listen()), asyncio.create_task(self._read_loop())]
        await self._ready.wait()
        await self._tried_listen.wait()

    async def close(self) -> None:
        """Cancel the fan-out's tasks and wait for them, again while one still runs (`cancel_and_wait`)."""
        await cancel_and_wait(self._tasks, "progress API fan-out")
        self._tasks = []

    @property
    def clients(self) -> int:
        return sum(len(s) for s in self.subscribers.values())

    # -- subscribers

    def subscribe(self, order_id: int, limit: int) -> tuple[Subscriber, int]:
        """Register a client of `order_id`; returns it and the id up to which it must read the table itself.

        Rows after that id reach the subscriber through the fan-out, in order; no await happens between
        the registration and reading the mark, so no row falls between the two.
        """
        subscriber = Subscriber(order_id, limit)
        self.subscribers.setdefault(order_id, set()).add(subscriber)
        return subscriber, self.delivered

    def unsubscribe(self, subscriber: Subscriber) -> None:
        followers = self.subscribers.get(subscriber.order_id)
        if followers is not None:
            followers.discard(subscriber)
            if not followers:
                del self.subscribers[subscriber.order_id]

    # -- the LISTEN connection

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        self._wake.set()

    async def _listen(self) -> None:
        delay = 0.2
        while True:
            conn: asyncpg.Connection | None = None
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(
                    self.dsn, timeout=10, server_settings={"application_name": "sitegen-api:listen"}
                )
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._on_notify)
                if self.reconnects:
                    logger.info("progress API: LISTEN connection back")
                self.listening = True
                self._tried_listen.set()
                delay = 0.2
                self._wake.set()  # read what was written while nobody listened
                await lost.wait()
                logger.warning("progress API: lost the LISTEN connection; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("progress API: cannot LISTEN ({}); retrying in {:.1f}s", message_of(exc), delay)
            finally:
                self.listening = False
                self._tried_listen.set()
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 2)
            self.reconnects += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.reconnect_max_s)

    # -- reading and delivering

    async def _read_loop(self) -> None:
        while not self._ready.is_set():
            try:
                async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
                    self.delivered = int(await conn.fetchval(QUERIES["api_logs_max_id"]))
                self._ready.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("progress API: cannot read the progress log yet: {}", message_of(exc))
                await asyncio.sleep(1)
        while True:
            try:
                async with asyncio.timeout(self._next_wait()):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                while await self.read_once():
                    pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # PostgreSQL away: the next wake or poll reads again from `delivered`
                logger.warning("progress API: cannot read new progress rows: {}", message_of(exc))

    def _next_wait(self) -> float:
        if self._hole is None:
            return self.poll_s
        return max(0.01, min(self.poll_s, self._hole[1] + self.hole_grace_s - time.monotonic()))

    async def read_once(self) -> bool:
        """Read and deliver the rows after `delivered`; True when a full batch came (read again at once)."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            records = await conn.fetch(QUERIES["api_logs_after"], self.delivered, READ_BATCH)
        for record in records:
            row_id = record["id"]
            if row_id != self.delivered + 1 and not await self._hole_settled(self.delivered + 1, row_id - 1):
                return False  # wait for the missing rows to commit
            self._hole = None
            self.delivered = row_id
            self._deliver(decode_row(record))
        return len(records) == READ_BATCH

    async def _hole_settled(self, first: int, last: int) -> bool:
        """Whether the ids first..last will never be rows: no open transaction holds them (probed after a grace)."""
        now = time.monotonic()
        if self._hole is None or self._hole[0] != first:
            self._hole = (first, now)
        if now - self._hole[1] < self.hole_grace_s:
            return False
        if last - first + 1 > PROBE_MAX_IDS:
            return True
        self.hole_probes += 1
        try:
            async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
                try:
                    async with conn.transaction():
                        await conn.execute("SET LOCAL lock_timeout = '200ms'")
                        await conn.execute(QUERIES["api_probe_log_ids"], first, last)
                        raise _RolledBack
                except _RolledBack:
                    return True
        except (asyncpg.UniqueViolationError, asyncpg.LockNotAvailableError):
            # Committed meanwhile (the next read takes it), or its transaction is still open: wait for it.
            self.holes_held += 1
            self._hole = (first, time.monotonic() - self.hole_grace_s / 2)  # probe again half a grace later
            return False

    def _deliver(self, row: dict[str, Any]) -> None:
        followers = self.subscribers.get(row["order_id"])
        if not followers:
            return
        for subscriber in list(followers):
            if not subscriber.push(row):
                self.dropped_clients += 1
                self.unsubscribe(subscriber)
        if self.on_delivered is not None:
            self.on_delivered(row, len(followers))
