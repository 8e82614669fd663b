"""PostgreSQL: the pools, the named queries and every transaction the pipeline needs.

The pipeline asks for domain verbs (`claim_generation`, `commit_phase`, `finish_generation`)
and never sees a cursor. A connection is held only inside one of these methods, never across
a model call.
"""

from __future__ import annotations

import asyncio
import re
import socket
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import asyncpg
import orjson
from loguru import logger

from worker.errors import (
    AttemptsExhausted,
    BriefInvalid,
    ClaimLost,
    EditInvalid,
    OrderBusy,
    OrderNotFound,
    message_of,
)
from worker.models import OutputFile
from worker.settings import DatabaseSection

#: How many of its latest claim tokens a process remembers (16 bytes each, and the dict's overhead).
ISSUED_TOKENS = 10_000

PHASES = ("plan", "content", "code", "assemble")
#: An edit's phases: plan the edit, change the files, assemble (the same checks as a generation's).
EDIT_PHASES = ("edit_plan", "edit_files", "assemble")
#: A rollback's one phase: publish the old version's files as a new version.
ROLLBACK_PHASES = ("publish",)
#: The phases of each kind of job, in order.
PHASES_OF: dict[str, tuple[str, ...]] = {"generation": PHASES, "edit": EDIT_PHASES, "rollback": ROLLBACK_PHASES}
ACTIVE = ("queued", "running")


def _load_queries() -> dict[str, str]:
    text = (Path(__file__).parent / "queries.sql").read_text()
    queries: dict[str, str] = {}
    for block in re.split(r"^-- name: ", text, flags=re.M)[1:]:
        name, _, body = block.partition("\n")
        queries[name.strip()] = body.strip()
    return queries


QUERIES = _load_queries()


#: PostgreSQL refuses NUL in `text` and `jsonb` (and UTF-8 cannot hold a lone surrogate): such a
#: character is stored as U+FFFD, the replacement character, so the rest of the text still goes in.
REPLACEMENT = "\ufffd"
_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS


def pg_text(value: str) -> str:
    """`value` as PostgreSQL can store it: NUL and lone surrogates replaced by U+FFFD."""
    if "\x00" in value:
        value = value.replace("\x00", REPLACEMENT)
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            value = value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return value


def _pg_json_value(value: Any) -> Any:
    """`value` with every string in it (keys included) made storable by `pg_text`."""
    if isinstance(value, str):
        return pg_text(value)
    if isinstance(value, dict):
        return {pg_text(k) if isinstance(k, str) else k: _pg_json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_pg_json_value(v) for v in value]
    return value


def _json_text(value: Any) -> str:
    """The json/jsonb encoder: orjson's text, with the characters PostgreSQL refuses replaced."""
    try:
        data = orjson.dumps(value, option=_JSON_OPTIONS)
    except orjson.JSONEncodeError:  # lone surrogates, which orjson refuses; anything else is raised again
        data = orjson.dumps(_pg_json_value(value), option=_JSON_OPTIONS)
    if b"\\u0000" in data:  # rare: the whole value is walked only when a NUL (or a literal '\\u0000') is in it
        data = orjson.dumps(_pg_json_value(value), option=_JSON_OPTIONS)
    return data.decode()


#: TCP keepalive of every connection to PostgreSQL (asyncpg sets none): an idle connection to a host that
#: vanished is found dead after about 10 + 3 * 3 s instead of hours. A call waiting for its answer is bounded by
#: `database.command_timeout_s`, and the opening of a connection by `database.connect_timeout_s`.
KEEPALIVE = tuple(
    (option, value)
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 3), ("TCP_KEEPCNT", 3))
    if (option := getattr(socket, name, None)) is not None
)


def _keep_alive(conn: asyncpg.Connection) -> None:
    """Turn TCP keepalive on for `conn` (a TCP connection; a unix socket has none)."""
    transport = getattr(conn, "_transport", None)  # asyncpg's own; it offers no public way to the socket
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in KEEPALIVE:
        sock.setsockopt(socket.IPPROTO_TCP, option, value)


async def _init_connection(conn: asyncpg.Connection) -> None:
    """The one boundary where text enters PostgreSQL: every text, varchar, json and jsonb parameter.

    asyncpg applies a codec set here to parameters of that type and to arrays of json/jsonb, but not
    to `text[]`, which has a built-in array codec: free text goes in as `jsonb[]` (see `insert_logs`),
    and `text[]` parameters carry only values the worker made (file paths, hashes, media types).
    """
    _keep_alive(conn)
    for pg_type in ("json", "jsonb"):
        await conn.set_type_codec(pg_type, encoder=_json_text, decoder=orjson.loads, schema="pg_catalog")
    for pg_type in ("text", "varchar"):
        await conn.set_type_codec(pg_type, encoder=pg_text, decoder=str, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset when a connection goes back to its pool.

    asyncpg's default runs `RESET ALL; UNLISTEN *; CLOSE ALL; pg_advisory_unlock_all()`, one more
    round trip per use. The worker changes none of that session state: no SET, LISTEN, cursor or
    session-level advisory lock (only `pg_advisory_xact_lock`, released at commit). asyncpg still
    rolls back a transaction left open before it calls this.
    """


async def close_pool(pool: asyncpg.Pool, within_s: float, what: str) -> None:
    """Close a pool on shutdown within `within_s`: asyncpg's `Pool.close` waits for every connection to come
    back and for PostgreSQL's goodbye; past the bound (a handler stuck on a connection, a silent server) it
    is cancelled, which terminates the pool (its connections dropped)."""
    try:
        await asyncio.wait_for(pool.close(), within_s)
    except TimeoutError:
        logger.warning("{}: its pool did not close within {:.0f}s: its connections dropped", what, within_s)


async def create_pool(db: DatabaseSection, *, max_size: int, min_size: int = 0, name: str) -> asyncpg.Pool:
    """A pool whose connections speak JSON for json/jsonb and name themselves in pg_stat_activity."""
    pool = await asyncpg.create_pool(
        db.url,
        min_size=min(min_size, max_size),
        max_size=max_size,
        command_timeout=db.command_timeout_s,
        timeout=db.connect_timeout_s,
        init=_init_connection,
        reset=_keep_session,
        server_settings={"application_name": f"sitegen-worker:{name}"},
    )
    assert pool is not None
    return pool


@dataclass(frozen=True)
class Claim:
    """The outcome of claiming an order: a generation to run, the one that already succeeded, the
    cancelled one whose pending job this is (`cancelled`), or the failed or cancelled one whose own
    job this is, left in Redis (`ended`, with `status`): nothing to do for the last two."""

    kind: Literal["started", "resumed", "done", "cancelled", "ended"]
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
    #: The status an `ended` generation ended with (`failed` or `cancelled`).
    status: str | None = None
    #: Attempts that count towards `worker.max_tries` and `worker.max_attempts`: `attempt` less the
    #: hand-backs that were not the generation's fault (a wait for budget, a drain).
    counted_attempts: int = 1
    #: What kind of run this is: "generation", "edit" or "rollback" (its phases: PHASES_OF).
    job: str = "generation"
    order_id: int = 0
    #: An edit's or rollback's request as the claim stored it (`live_version`: the version live when it started).
    request: dict[str, Any] = field(default_factory=dict)
    #: The version an `ended` edit or rollback made.
    version: int | None = None

    @property
    def phases(self) -> tuple[str, ...]:
        return PHASES_OF[self.job]


@dataclass(frozen=True)
class NewVersion:
    """A version of an order's site to add and make live, with the run that made it."""

    kind: str
    files: list[OutputFile]
    plan: dict[str, Any] | None
    quality: dict[str, Any]
    instruction: str | None = None
    rolled_back_to: int | None = None


@dataclass(frozen=True)
class LiveSite:
    """The live version of an order's site: its number, the plan it was built from and its files."""

    number: int
    plan: dict[str, Any] | None
    files: list[OutputFile]


def minimal_error(error: dict[str, Any], refused: BaseException) -> dict[str, Any]:
    """The least of `error` that PostgreSQL takes whatever the full one held: short ASCII text, no details."""

    def ascii_text(value: Any, limit: int) -> str:
        return str(value)[:limit].encode("ascii", "backslashreplace").decode()

    return {
        "type": ascii_text(error.get("type") or "Error", 200),
        "message": ascii_text(error.get("message") or "", 2000),
        "phase": ascii_text(error["phase"], 100) if error.get("phase") else None,
        "retryable": bool(error.get("retryable", False)),
        "stored": "minimal: PostgreSQL refused the full error "
        f"({ascii_text(f'{type(refused).__name__}: {message_of(refused)}', 500)})",
    }


def _exhausted(claimed: dict[str, Any], what: str) -> AttemptsExhausted:
    """The failure a claim stored when a run's attempts ran out (outcome `exhausted`), as an exception."""
    error = claimed["error"]
    return AttemptsExhausted(
        f"{what} {error['message']}",
        generation_id=claimed["generation_id"],
        attempts=claimed["attempt"],
        last_error=error["details"]["last_error"],
    )


class Store:
    """The generation pool's transactions, one method per domain verb."""

    def __init__(self, pool: asyncpg.Pool, *, replica_id: str, lease_s: float, keep_versions: int = 0) -> None:
        self.pool = pool
        self.replica_id = replica_id
        self.lease_s = lease_s
        #: How many versions of each order's site to keep (0: all); see `output.keep_versions`.
        self.keep_versions = keep_versions
        #: The claim tokens this process issued lately (oldest first), to tell its own dead claims apart
        #: from those of another process with the same replica id (`lapse_own_claim`).
        self.issued: OrderedDict[uuid.UUID, None] = OrderedDict()

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
        token = self._issue_token()
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
                generation_id=claimed["generation_id"],
                replica_id=claimed["replica_id"],
            )
        if outcome == "exhausted":
            raise _exhausted(claimed, f"generation {claimed['generation_id']} of order {order_id}")
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
            status=claimed.get("status"),
            counted_attempts=claimed.get("counted_attempts", claimed["attempt"]),
            order_id=order_id,
        )

    async def claim_edit(
        self,
        order_id: int,
        kind: Literal["edit", "rollback"],
        request: dict[str, Any],
        *,
        job_id: str,
        enqueued_at: datetime | None,
        max_attempts: int | None,
        ahead: list[str],
    ) -> Claim:
        """Register, start, resume or skip an edit or rollback job of the order (`sitegen_claim_edit`).

        `ahead`: the ids of the jobs of this order sent before this one that Redis still holds; the edit
        waits (OrderBusy) while one of them is not registered yet, so edits run in the order they were sent.
        """
        token = self._issue_token()
        async with self.pool.acquire() as conn:
            claimed: dict[str, Any] = await conn.fetchval(
                QUERIES["claim_edit"],
                order_id,
                kind,
                request,
                token,
                self.replica_id,
                job_id,
                self.lease_s,
                enqueued_at,
                max_attempts,
                ahead,
            )
        outcome = claimed["outcome"]
        if outcome == "not_found":
            raise OrderNotFound(f"order {order_id} does not exist: there is no site to {kind}")
        if outcome in ("no_site", "no_version"):
            error = claimed["error"]
            raise EditInvalid(error["message"], generation_id=claimed["generation_id"], field=error.get("field"))
        if outcome == "busy":
            what = {
                "held": f"this {kind} is being run by replica {claimed['replica_id']!r}",
                "waiting": f"waiting for {claimed.get('kind')} {claimed['generation_id']} of the order to end",
                "ahead": f"waiting for job {claimed.get('job_id')!r} of the order, sent earlier, to be picked up",
            }[claimed.get("reason", "held")]
            raise OrderBusy(
                f"order {order_id}: {what}",
                retry_after_s=float(claimed["lease_left_s"]),
                generation_id=claimed.get("own_id", claimed["generation_id"]),
                replica_id=claimed["replica_id"],
                waiting=claimed.get("reason") != "held",
            )
        if outcome == "exhausted":
            raise _exhausted(claimed, f"{kind} {claimed['generation_id']} of order {order_id}")
        return Claim(
            kind=outcome,
            generation_id=claimed["generation_id"],
            attempt=claimed["attempt"],
            brief=None,
            token=token if outcome in ("started", "resumed") else None,
            checkpoints=claimed.get("checkpoints") or {},
            usage=claimed.get("usage") or {},
            cancel_requested=bool(claimed.get("cancel_requested")),
            status=claimed.get("status"),
            counted_attempts=claimed.get("counted_attempts", claimed["attempt"]),
            job=kind,
            order_id=order_id,
            request=claimed.get("request") or request,
            version=claimed.get("version"),
        )

    def _issue_token(self) -> uuid.UUID:
        token = uuid.uuid4()
        self.issued[token] = None
        if len(self.issued) > ISSUED_TOKENS:
            self.issued.popitem(last=False)
        return token

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
        next_phase = claim.phases[claim.phases.index(phase) + 1]
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
        version: NewVersion | None = None,
    ) -> int | None:
        """Commit the last phase: the manifest, every file, the generation's success and its version, made
        live, in one transaction. The number of the version (None: no `version` given)."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
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
            if row is None:
                raise ClaimLost(f"generation {claim.generation_id} was taken over before it could be finished")
            if version is None:
                return None
            return await self._add_version(conn, claim, version, total_usage)

    async def finish_run(
        self,
        claim: Claim,
        phase: str,
        checkpoint: Any,
        version: NewVersion,
        *,
        usage: dict[str, Any],
        total_usage: dict[str, Any],
        duration_ms: int,
        output_dir: str,
    ) -> int:
        """Commit the last phase of an edit or rollback: its success and its version, made live, in one
        transaction; the version's number."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                QUERIES["finish_run"],
                claim.generation_id,
                claim.token,
                total_usage,
                output_dir,
                phase,
                checkpoint,
                usage,
                duration_ms,
            )
            if row is None:
                raise ClaimLost(f"{claim.job} {claim.generation_id} was taken over before it could be finished")
            return await self._add_version(conn, claim, version, total_usage)

    async def _add_version(
        self, conn: asyncpg.Connection, claim: Claim, version: NewVersion, usage: dict[str, Any]
    ) -> int:
        files = version.files
        known = {r["sha256"] for r in await conn.fetch(QUERIES["known_blobs"], [f.sha256 for f in files])}
        new = {f.sha256: f for f in files if f.sha256 not in known}  # an edit sends only what it changed
        if new:
            await conn.execute(
                QUERIES["store_blobs"],
                list(new),
                [f.content for f in new.values()],
                [len(f.content) for f in new.values()],
            )
        number: int = await conn.fetchval(
            QUERIES["add_version"],
            claim.order_id,
            claim.generation_id,
            version.kind,
            version.instruction,
            version.rolled_back_to,
            version.plan,
            usage,
            version.quality,
            [f.path for f in files],
            [f.sha256 for f in files],
            [len(f.content) for f in files],
            [f.media_type for f in files],
            self.keep_versions,
        )
        return number

    async def live_site(self, order_id: int) -> LiveSite | None:
        """The order's live version with its files; None: the order has no version yet."""
        async with self.pool.acquire() as conn:
            live = await conn.fetchrow(QUERIES["live_version"], order_id)
            if live is None or live["number"] is None:
                return None
            rows = await conn.fetch(QUERIES["version_files"], order_id, live["number"])
        return LiveSite(live["number"], live["plan"], [OutputFile(r["path"], r["content"]) for r in rows])

    async def version_plan(self, order_id: int, number: int) -> dict[str, Any] | None:
        """The site plan a version was built from (None: none stored, or no such version)."""
        async with self.pool.acquire() as conn:
            plan: dict[str, Any] | None = await conn.fetchval(QUERIES["version_plan"], order_id, number)
        return plan

    async def version_files(self, order_id: int, number: int) -> list[OutputFile]:
        """The files of one version of the order's site, by path (empty: no such version)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(QUERIES["version_files"], order_id, number)
        return [OutputFile(r["path"], r["content"]) for r in rows]

    async def _as_owner(self, query: str, claim: Claim, lost: str, *args: Any) -> asyncpg.Record:
        """Run a statement that only acts while `claim` still holds its generation; ClaimLost when it does not."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(QUERIES[query], claim.generation_id, claim.token, *args)
        if row is None:
            raise ClaimLost(f"generation {claim.generation_id} {lost}")
        return row

    async def fail_generation(self, claim: Claim, error: dict[str, Any]) -> None:
        """End the generation `failed` with its error; a minimal error if PostgreSQL refuses the full one."""
        await self._with_error("fail_generation", claim, error)

    async def release_generation(
        self, claim: Claim, error: dict[str, Any] | None, *, retry_in_s: float = 0, spare: bool = False
    ) -> bool:
        """Hand the generation back; its job is retried in `retry_in_s` (the sweeper waits for that). Whether
        it was handed back: False when the claim was no longer this run's (another replica took it over).

        `spare`: not the generation's fault (a wait for budget, a draining replica): this attempt does
        not count towards `worker.max_attempts`.
        """
        return await self._with_error("release_generation", claim, error, retry_in_s, spare)

    async def _with_error(self, query: str, claim: Claim, error: dict[str, Any] | None, *args: Any) -> bool:
        """Run `query` for the claim with `error`; whether it changed the run (the claim still held it)."""
        try:
            async with self.pool.acquire() as conn:
                status = await conn.execute(QUERIES[query], claim.generation_id, claim.token, error, *args)
                return bool(status == "UPDATE 1")
        except Exception as refused:
            if error is None:
                raise
            logger.opt(exception=refused).error(
                "generation {}: PostgreSQL refused its error, storing a minimal one: {}",
                claim.generation_id,
                message_of(refused),
            )
            async with self.pool.acquire() as conn:
                status = await conn.execute(
                    QUERIES[query], claim.generation_id, claim.token, minimal_error(error, refused), *args
                )
                return bool(status == "UPDATE 1")

    async def settle_assembled(self, claim: Claim) -> bool:
        """Mark a claimed generation whose every phase is committed succeeded; whether it was."""
        async with self.pool.acquire() as conn:
            status: str = await conn.execute(QUERIES["settle_assembled"], claim.generation_id, claim.token)
        return status == "UPDATE 1"

    async def request_cancel(self, order_id: int, reason: str) -> dict[str, Any] | None:
        """Ask the order's active run to stop; waiting and queued ones are cancelled at once, and edits and
        rollbacks sent before now and still in the queue end cancelled when they come. The running run (else
        the first cancelled one) as {id, status, kind, job_id}; None: nothing was active. A running run's
        job_id is the arq job to abort, to interrupt its model call in flight (an edit's is its own)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(QUERIES["request_cancel"], order_id, reason)
            for row in rows:
                if row["status"] == "cancelled":
                    # No replica holds a waiting or queued run to log its end: its progress row says it here.
                    what = "generation" if row["kind"] == "generation" else row["kind"]
                    await conn.execute(
                        QUERIES["announce_cancelled"],
                        order_id,
                        row["id"],
                        f"{what} cancelled: {reason}",
                        self.replica_id,
                        f"{what}.cancelled",
                    )
        return dict(rows[0]) if rows else None

    async def lapse_own_claim(self, generation_id: int, live: Collection[uuid.UUID]) -> bool:
        """End the lease of the generation's claim if this process issued it and no run of it holds it
        (`live`): a run whose hand-back PostgreSQL did not take (a restart) left it. Whether it did."""
        async with self.pool.acquire() as conn:
            token = await conn.fetchval(QUERIES["running_claim"], generation_id, self.replica_id)
            if token is None or token not in self.issued or token in live:
                return False
            return await conn.fetchval(QUERIES["lapse_claim"], generation_id, token) is not None

    async def counted_attempts(self, order_id: int) -> int:
        """The counted attempts of the order's latest generation (0: it has none yet)."""
        async with self.pool.acquire() as conn:
            return int(await conn.fetchval(QUERIES["counted_attempts"], order_id) or 0)

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
            try:
                async with conn.transaction():  # a savepoint: a refused error leaves the lock held
                    generation_id: int = await conn.fetchval(
                        QUERIES["record_failed_generation"], order_id, error, job_id, self.replica_id
                    )
            except asyncpg.PostgresError as refused:
                logger.error("order {}: PostgreSQL refused the job's error, storing a minimal one", order_id)
                generation_id = await conn.fetchval(
                    QUERIES["record_failed_generation"],
                    order_id,
                    minimal_error(error, refused),
                    job_id,
                    self.replica_id,
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
