"""PostgreSQL: the pools, the named queries and every transaction the pipeline needs.

The pipeline asks for domain verbs (`claim_generation`, `commit_phase`, `finish_generation`)
and never sees a cursor. A connection is held only inside one of these methods, never across
a model call.
"""

from __future__ import annotations

import hashlib
import mimetypes
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import asyncpg
import orjson

from worker.errors import AttemptsExhausted, BriefInvalid, ClaimLost, OrderBusy, OrderNotFound
from worker.settings import DatabaseSection

PHASES = ("plan", "content", "code", "assemble")
ACTIVE = ("queued", "running")


def _load_queries() -> dict[str, str]:
    text = (Path(__file__).parent / "queries.sql").read_text()
    queries: dict[str, str] = {}
    for block in re.split(r"^-- name: ", text, flags=re.M)[1:]:
        name, _, body = block.partition("\n")
        queries[name.strip()] = body.strip()
    return queries


QUERIES = _load_queries()


def _json_text(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


async def _init_connection(conn: asyncpg.Connection) -> None:
    for pg_type in ("json", "jsonb"):
        await conn.set_type_codec(pg_type, encoder=_json_text, decoder=orjson.loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset when a connection goes back to its pool.

    asyncpg's default runs `RESET ALL; UNLISTEN *; CLOSE ALL; pg_advisory_unlock_all()`, one more
    round trip per use. The worker changes none of that session state: no SET, LISTEN, cursor or
    session-level advisory lock (only `pg_advisory_xact_lock`, released at commit). asyncpg still
    rolls back a transaction left open before it calls this.
    """


async def create_pool(db: DatabaseSection, *, max_size: int, min_size: int = 0, name: str) -> asyncpg.Pool:
    """A pool whose connections speak JSON for json/jsonb and name themselves in pg_stat_activity."""
    pool = await asyncpg.create_pool(
        db.url,
        min_size=min(min_size, max_size),
        max_size=max_size,
        command_timeout=db.command_timeout_s,
        init=_init_connection,
        reset=_keep_session,
        server_settings={"application_name": f"sitegen-worker:{name}"},
    )
    assert pool is not None
    return pool


@dataclass(frozen=True)
class Claim:
    """The outcome of claiming an order: a generation to run, the one that already succeeded, or the
    cancelled one whose pending job this is (`cancelled`: nothing to do)."""

    kind: Literal["started", "resumed", "done", "cancelled"]
    generation_id: int
    attempt: int
    brief: dict[str, Any] | None
    token: uuid.UUID | None = None
    #: phase -> committed output; phases present here are never run again.
    checkpoints: dict[str, Any] = field(default_factory=dict)
    usage: dict[str, dict[str, Any]] = field(default_factory=dict)
    output_dir: str | None = None
    warnings: tuple[str, ...] = ()
    #: `sitegen cancel` asked a resumed generation to stop while no replica held it.
    cancel_requested: bool = False


@dataclass(frozen=True)
class OutputFile:
    path: str
    content: bytes

    @cached_property  # read for the manifest and again for the final commit
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def media_type(self) -> str:
        return mimetypes.guess_type(self.path)[0] or "application/octet-stream"


class Store:
    """The generation pool's transactions, one method per domain verb."""

    def __init__(self, pool: asyncpg.Pool, *, replica_id: str, lease_s: float) -> None:
        self.pool = pool
        self.replica_id = replica_id
        self.lease_s = lease_s

    async def claim_generation(
        self,
        order_id: int,
        brief: dict[str, Any] | None,
        *,
        regenerate: bool,
        job_id: str | None,
        enqueued_at: datetime | None = None,
        max_attempts: int | None = None,
    ) -> Claim:
        """Decide, under a per-order lock, whether to start, resume or skip a generation of the order.

        `enqueued_at`: when the job was first enqueued; a job enqueued before the latest generation
        was cancelled is that generation's own pending job and gets a `cancelled` claim. A generation
        already claimed `max_attempts` times is failed instead (AttemptsExhausted). One round trip:
        the steps run in the `sitegen_claim` function (migrations/0005_claim_rechecks.sql).
        """
        token = uuid.uuid4()
        async with self.pool.acquire() as conn:
            claimed: dict[str, Any] = await conn.fetchval(
                QUERIES["claim"],
                order_id,
                brief,
                regenerate,
                token,
                self.replica_id,
                job_id,
                self.lease_s,
                enqueued_at,
                max_attempts,
            )
        outcome = claimed["outcome"]
        if outcome == "not_found":
            raise OrderNotFound(
                f"order {order_id} does not exist and the job has no brief: send `brief` with the first job"
            )
        if outcome == "no_brief":
            raise BriefInvalid(f"order {order_id} has no stored brief: send `brief` with the job")
        if outcome == "busy":
            raise OrderBusy(
                f"order {order_id} is being generated by replica {claimed['replica_id']!r} "
                f"(generation {claimed['generation_id']})",
                retry_after_s=float(claimed["lease_left_s"]),
            )
        if outcome == "exhausted":
            error = claimed["error"]
            raise AttemptsExhausted(
                f"generation {claimed['generation_id']} of order {order_id} {error['message']}",
                generation_id=claimed["generation_id"],
                attempts=claimed["attempt"],
                last_error=error["details"]["last_error"],
            )
        warnings: tuple[str, ...] = ()
        if claimed.get("brief_differs"):
            warnings = (
                "the job's brief differs from the one this generation started with; the generation "
                "resumes with its own brief (enqueue with regenerate=true to use the new one)",
            )
        return Claim(
            kind=outcome,
            generation_id=claimed["generation_id"],
            attempt=claimed["attempt"],
            brief=claimed["brief"],
            token=token if outcome in ("started", "resumed") else None,
            checkpoints=claimed.get("checkpoints") or {},
            usage=claimed.get("usage") or {},
            output_dir=claimed.get("output_dir"),
            warnings=warnings,
            cancel_requested=bool(claimed.get("cancel_requested")),
        )

    async def commit_phase(
        self,
        claim: Claim,
        phase: str,
        output: Any,
        *,
        usage: dict[str, Any],
        total_usage: dict[str, Any],
        duration_ms: int,
    ) -> bool:
        """Store a phase's checkpoint and advance the generation to the next phase, in one statement.

        Returns whether `sitegen cancel` asked the generation to stop, read in the same step.
        """
        next_phase = PHASES[PHASES.index(phase) + 1]
        row = await self._as_owner(
            "commit_phase",
            claim,
            "was taken over by another replica",
            next_phase,
            total_usage,
            self.lease_s,
            phase,
            output,
            usage,
            duration_ms,
        )
        return bool(row["cancel_requested"])

    async def finish_generation(
        self,
        claim: Claim,
        manifest: Any,
        files: list[OutputFile],
        *,
        usage: dict[str, Any],
        total_usage: dict[str, Any],
        duration_ms: int,
        output_dir: str,
    ) -> None:
        """Commit the last phase: the manifest, every file and the generation's success, in one statement."""
        await self._as_owner(
            "finish_generation",
            claim,
            "was taken over before it could be finished",
            total_usage,
            output_dir,
            manifest,
            usage,
            duration_ms,
            [f.path for f in files],
            [f.content for f in files],
            [f.sha256 for f in files],
            [len(f.content) for f in files],
            [f.media_type for f in files],
        )

    async def _as_owner(self, query: str, claim: Claim, lost: str, *args: Any) -> asyncpg.Record:
        """Run a statement that only acts while `claim` still holds its generation; ClaimLost when it does not."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(QUERIES[query], claim.generation_id, claim.token, *args)
        if row is None:
            raise ClaimLost(f"generation {claim.generation_id} {lost}")
        return row

    async def fail_generation(self, claim: Claim, error: dict[str, Any]) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(QUERIES["fail_generation"], claim.generation_id, claim.token, error)

    async def release_generation(self, claim: Claim, error: dict[str, Any] | None, *, retry_in_s: float = 0) -> None:
        """Hand the generation back; its job is retried in `retry_in_s` (the sweeper waits for that)."""
        async with self.pool.acquire() as conn:
            await conn.execute(QUERIES["release_generation"], claim.generation_id, claim.token, error, retry_in_s)

    async def settle_assembled(self, claim: Claim) -> bool:
        """Mark a claimed generation whose every phase is committed succeeded; whether it was."""
        async with self.pool.acquire() as conn:
            status: str = await conn.execute(QUERIES["settle_assembled"], claim.generation_id, claim.token)
        return status == "UPDATE 1"

    async def request_cancel(self, order_id: int, reason: str) -> dict[str, Any] | None:
        """Ask the order's active generation to stop; a queued one is cancelled at once. None: nothing active."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(QUERIES["request_cancel"], order_id, reason)
        return dict(row) if row else None

    async def cancel_requested(self, claim: Claim) -> bool:
        async with self.pool.acquire() as conn:
            return bool(await conn.fetchval(QUERIES["cancel_requested"], claim.generation_id))

    async def cancel_generation(self, claim: Claim, reason: str, phase: str | None) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(QUERIES["cancel_generation"], claim.generation_id, claim.token, reason, phase)

    async def heartbeat(self, tokens: list[uuid.UUID]) -> set[uuid.UUID]:
        """Extend these claims; returns those still held (the others were taken over or ended)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(QUERIES["heartbeat"], tokens, self.lease_s)
        return {r["claim_token"] for r in rows}

    async def record_failed_start(self, order_id: int, error: dict[str, Any], *, job_id: str | None) -> int | None:
        """Store a failure that happened before a generation could start, on a generation of its own.

        Only for orders that exist or that the job names with a brief: an unknown order gets
        its error in the progress log alone, so hostile job ids cannot create orders.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(QUERIES["lock_order"], order_id)
            await conn.execute(QUERIES["ensure_order"], order_id)
            latest = await conn.fetchrow(QUERIES["latest_generation"], order_id)
            if latest is not None and latest["status"] in ACTIVE:
                return None  # an active generation owns the order; the log carries this job's error
            generation_id: int = await conn.fetchval(
                QUERIES["record_failed_generation"], order_id, error, job_id, self.replica_id
            )
            return generation_id

    async def stale_generations(self, *, page_size: int = 500) -> AsyncIterator[dict[str, Any]]:
        """Every stale active generation, by id, one page (one short query) at a time."""
        after = 0
        while True:
            async with self.pool.acquire() as conn:
                rows = await conn.fetch(QUERIES["stale_generations"], self.lease_s, page_size, after)
            for row in rows:
                yield dict(row)
            if len(rows) < page_size:
                return
            after = rows[-1]["id"]

    async def load_files(self, generation_id: int) -> list[OutputFile]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(QUERIES["load_files"], generation_id)
        return [OutputFile(r["path"], r["content"]) for r in rows]

    async def order_overview(self, order_id: int) -> dict[str, Any] | None:
        """The order's brief presence and latest generation (id, status, phase, error); None: no such order."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(QUERIES["order_overview"], order_id)
        return dict(row) if row else None
