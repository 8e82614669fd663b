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
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import asyncpg
import orjson

from worker.errors import BriefInvalid, ClaimLost, OrderBusy, OrderNotFound
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


async def _checkpoints(
    conn: asyncpg.Connection, generation_id: int
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A generation's committed phases: phase -> output, and phase -> usage."""
    phases = await conn.fetch(QUERIES["load_checkpoints"], generation_id)
    return {p["phase"]: p["output"] for p in phases}, {p["phase"]: p["usage"] for p in phases}


@dataclass(frozen=True)
class Claim:
    """The outcome of claiming an order: a generation to run, or the one that already succeeded."""

    kind: Literal["started", "resumed", "done"]
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
        self, order_id: int, brief: dict[str, Any] | None, *, regenerate: bool, job_id: str | None
    ) -> Claim:
        """Decide, under a per-order lock, whether to start, resume or skip a generation of the order."""
        token = uuid.uuid4()
        warnings: list[str] = []
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(QUERIES["lock_order"], order_id)
            order = await conn.fetchrow(QUERIES["get_order_for_update"], order_id)
            if brief is not None:
                await conn.execute(QUERIES["upsert_order_brief"], order_id, brief)
            elif order is None:
                raise OrderNotFound(
                    f"order {order_id} does not exist and the job has no brief: send `brief` with the first job"
                )
            elif order["brief"] is None:
                raise BriefInvalid(f"order {order_id} has no stored brief: send `brief` with the job")
            order_brief = brief if brief is not None else order["brief"]

            latest = await conn.fetchrow(QUERIES["latest_generation"], order_id)
            if latest is not None and latest["status"] in ACTIVE:
                if regenerate:
                    await conn.execute(
                        QUERIES["supersede_generation"], latest["id"], "superseded by a job with regenerate=true"
                    )
                else:
                    if latest["status"] == "running" and latest["lease_left_s"] > 0:
                        raise OrderBusy(
                            f"order {order_id} is being generated by replica {latest['replica_id']!r} "
                            f"(generation {latest['id']})",
                            retry_after_s=float(latest["lease_left_s"]),
                        )
                    if brief is not None and latest["brief"] != brief:
                        warnings.append(
                            "the job's brief differs from the one this generation started with; the generation "
                            "resumes with its own brief (enqueue with regenerate=true to use the new one)"
                        )
                    row = await conn.fetchrow(
                        QUERIES["resume_generation"], latest["id"], token, self.replica_id, job_id, self.lease_s
                    )
                    assert row is not None
                    checkpoints, usage = await _checkpoints(conn, row["id"])
                    return Claim(
                        kind="resumed",
                        generation_id=row["id"],
                        attempt=row["attempt"],
                        brief=row["brief"],
                        token=token,
                        checkpoints=checkpoints,
                        usage=usage,
                        warnings=tuple(warnings),
                        cancel_requested=row["cancel_requested"],
                    )
            elif latest is not None and latest["status"] == "succeeded" and not regenerate:
                checkpoints, usage = await _checkpoints(conn, latest["id"])
                return Claim(
                    kind="done",
                    generation_id=latest["id"],
                    attempt=latest["attempt"],
                    brief=latest["brief"],
                    checkpoints=checkpoints,
                    usage=usage,
                    output_dir=latest["output_dir"],
                )

            row = await conn.fetchrow(
                QUERIES["start_generation"], order_id, order_brief, token, self.replica_id, job_id, self.lease_s
            )
            assert row is not None
            return Claim(kind="started", generation_id=row["id"], attempt=1, brief=row["brief"], token=token)

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
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                QUERIES["commit_phase"],
                claim.generation_id,
                claim.token,
                next_phase,
                total_usage,
                self.lease_s,
                phase,
                output,
                usage,
                duration_ms,
            )
        if not rows:
            raise ClaimLost(f"generation {claim.generation_id} was taken over by another replica")
        return bool(rows[0]["cancel_requested"])

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
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                QUERIES["finish_generation"],
                claim.generation_id,
                claim.token,
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
        if not rows:
            raise ClaimLost(f"generation {claim.generation_id} was taken over before it could be finished")

    async def fail_generation(self, claim: Claim, error: dict[str, Any]) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(QUERIES["fail_generation"], claim.generation_id, claim.token, error)

    async def release_generation(self, claim: Claim, error: dict[str, Any] | None) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(QUERIES["release_generation"], claim.generation_id, claim.token, error)

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

    async def stale_generations(self, limit: int = 500) -> list[dict[str, Any]]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(QUERIES["stale_generations"], self.lease_s, limit)
        return [dict(r) for r in rows]

    async def load_files(self, generation_id: int) -> list[OutputFile]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(QUERIES["load_files"], generation_id)
        return [OutputFile(r["path"], r["content"]) for r in rows]

    async def order_overview(self, order_id: int) -> dict[str, Any] | None:
        """The order's brief presence and latest generation (id, status, phase, error); None: no such order."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(QUERIES["order_overview"], order_id)
        return dict(row) if row else None
