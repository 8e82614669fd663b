"""A stateful model of the generation state machine, run by simulated replicas against real PostgreSQL.

Hypothesis interleaves what replicas do to an order's generation (claim, commit a phase, finish,
fail, hand back, cancel, heartbeat, sweep) with what the world does to them (a lease that lapses,
a new job for the order), and checks after every step that the state machine's guarantees hold.
One rule reproduces how claims race in production: a replica's write runs inside an open
transaction, holding its row lock, while another replica's claim of the same order runs and
blocks on that lock; then the write commits and the claim goes on.

Edits and rollbacks (issue 22) are jobs of their own, each with its job id and enqueue time. The model
keeps what Redis knows of them (arq's queue: each job's score, the replica whose run holds it) so that a
claim is given the jobs ahead of it as `worker.ordering.jobs_ahead` reads them, and the replicas run
them through the store calls the runner makes (`claim_edit`, `commit_phase`, `finish_run`). After every
step: the live version of each order is one complete version, no version ever changes, at most one run
of an order is live; at the end every edit and rollback sent has ended once, in the order sent.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from arq import ArqRedis
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix
from arq.jobs import Job
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from tests.helpers import SAMPLE_BRIEF
from worker import client, polling
from worker.errors import AttemptsExhausted, ClaimLost, EditInvalid, OrderBusy, OrderNotFound
from worker.local.services import LocalServices
from worker.ordering import jobs_ahead
from worker.settings import DatabaseSection
from worker.store import PHASES, QUERIES, Claim, NewVersion, OutputFile, Store, create_pool

ORDERS = (1, 2)
REPLICAS = ("r0", "r1", "r2")
LEASE_S = 30.0
MAX_ATTEMPTS = 3
TERMINAL = ("succeeded", "failed", "cancelled")
FILES = [OutputFile("index.html", b"<!doctype html><title>x</title>")]
APP = "sitegen-worker:model"
#: At most this many edits and rollbacks are sent in one run of the model (each is a few steps to end).
MAX_SENT = 8
#: The file an edit of the model appends its job id to: the live version's copy lists the edits it holds.
EDITS_TXT = "edits.txt"
#: A claim that could not reach PostgreSQL is retried this much later (`worker.retry_backoff_s`).
BACKOFF_MS = 200


def generation_files(generation_id: int) -> list[OutputFile]:
    """A generation's site: its own index page (a regenerated site differs from the one before)."""
    return [OutputFile("index.html", f"<!doctype html><title>generation {generation_id}</title>".encode())]


async def generate(store: Store, order_id: int, enqueued_at: dt.datetime | None = None) -> list[OutputFile]:
    """Generate the order's site as a replica does (its version 1 made live); the files of that version."""
    claim = await store.claim_generation(
        order_id, SAMPLE_BRIEF, regenerate=False, job_id=f"job-{order_id}", enqueued_at=enqueued_at
    )
    for phase in PHASES[:-1]:
        await store.commit_phase(claim, phase, {"phase": phase}, usage={}, total_usage={}, duration_ms=1)
    files = generation_files(claim.generation_id)
    number = await store.finish_generation(
        claim,
        {"pages": ["index.html"]},
        files,
        usage={},
        total_usage={},
        duration_ms=1,
        output_dir="/x",
        version=NewVersion("generation", files, plan={"pages": ["index"]}, quality={}),
    )
    assert number == 1
    return files


def ms(at: dt.datetime) -> float:
    """A time as arq scores its queue: milliseconds since the epoch."""
    return at.timestamp() * 1000


@dataclass
class Sent:
    """An edit or rollback job as the sender and Redis know it: arq's queue holds it until a run of it ends it."""

    job_id: str
    order_id: int
    kind: str
    request: dict[str, Any]
    #: When it was sent: arq's `enqueue_time` (kept across retries), the claim's `enqueued_at`.
    enqueued_at: dt.datetime
    seq: int
    #: Its score in arq's queue (ms): its enqueue time, a deferred retry's due time, or, while a run holds it,
    #: the end of that run's lease (`worker.polling`), when no poll and no `jobs_ahead` reads it.
    score: float = 0.0
    #: The replica whose run holds the job in Redis (its in-progress key), or None: it waits in the queue.
    taken_by: str | None = None
    #: Its score before a run took it, put back if the run's lease lapses (`worker.polling`).
    queued_score: float = 0.0
    #: How the job ended, once a run that held it ended it: "applied", "failed" or "cancelled".
    outcome: str | None = None

    @property
    def label(self) -> str:
        return f"{self.kind} {self.job_id} (sent #{self.seq}, order {self.order_id})"


@dataclass
class Held:
    """A claim as the replica that made it sees it: what it believes it may still write."""

    replica: str
    order_id: int
    claim: Claim
    committed: list[str] = field(default_factory=list)
    cancel_seen: bool = False
    #: The edit or rollback job this run carries (None: a generation).
    job: Sent | None = None

    @property
    def next_phase(self) -> str | None:
        done = set(self.claim.checkpoints) | set(self.committed)
        remaining = [p for p in self.claim.phases if p not in done]
        return remaining[0] if remaining else None


class Violation(AssertionError):
    pass


class GenerationModel(RuleBasedStateMachine):
    # Set by the test before the machine runs: its own loop and pool, against the session's PostgreSQL.
    loop: asyncio.AbstractEventLoop
    pool: asyncpg.Pool

    def __init__(self) -> None:
        super().__init__()
        self.stores = {r: self._store(r) for r in REPLICAS}
        self.held: dict[tuple[str, int], Held] = {}
        #: When the order's pending job was enqueued (PostgreSQL's clock).
        self.job_at: dict[int, dt.datetime] = {}
        #: Snapshots of terminal generations and of committed phases: neither may ever change.
        self.terminal: dict[int, tuple[Any, ...]] = {}
        self.phases: dict[tuple[int, str], dt.datetime] = {}
        #: Generations a write ended, with the status it committed.
        self.ended: dict[int, str] = {}
        #: Edit and rollback jobs sent, by job id; the runs replicas hold of them, by (replica, job id).
        self.sent: dict[str, Sent] = {}
        self.edits_held: dict[tuple[str, str], Held] = {}
        #: (order, number) -> {path: sha256} of every version a replica made, as it sent them.
        self.made: dict[tuple[int, int], dict[str, str]] = {}
        #: (order, number) -> the version's row and files when first seen: a version never changes.
        self.versions: dict[tuple[int, int], tuple[Any, ...]] = {}
        self.run(self._reset())

    def _store(self, replica: str) -> Store:
        return Store(self.pool, replica_id=replica, lease_s=LEASE_S)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def _reset(self) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "TRUNCATE site_version_files, site_versions, site_blobs, site_files, site_generation_phases,"
                " site_generation_logs, site_generations, site_orders"
                " RESTART IDENTITY"
            )
            now = await conn.fetchval("SELECT clock_timestamp()")
        self.job_at = dict.fromkeys(ORDERS, now)

    async def _generated(self, order_id: int) -> None:
        """The order's site generated, as a replica does it (version 1 live): its edits have a site to change."""
        files = await generate(self.stores["r0"], order_id, self.job_at[order_id])
        self._made(order_id, 1, files)

    # ------------------------------------------------------------------------------- the replicas

    async def _claim(self, replica: str, order_id: int, regenerate: bool = False) -> Claim | None:
        store = self.stores[replica]
        try:
            claim = await store.claim_generation(
                order_id,
                SAMPLE_BRIEF,
                regenerate=regenerate,
                job_id=f"job-{order_id}",
                enqueued_at=self.job_at[order_id],
                max_attempts=MAX_ATTEMPTS,
            )
        except OrderBusy:
            return None
        except AttemptsExhausted as exc:
            event("claim: attempts exhausted")
            latest = await self._latest(order_id)
            if latest is None or latest["status"] != "failed" or latest["attempt"] != MAX_ATTEMPTS:
                raise Violation(f"the claim gave up ({exc}) but left the generation {latest}") from exc
            return None
        event(f"claim: {claim.kind}")
        if claim.kind == "cancelled":
            latest = await self._latest(order_id)
            if latest is None or latest["id"] != claim.generation_id or latest["status"] != "cancelled":
                raise Violation(f"a claim said generation {claim.generation_id} was cancelled; the latest is {latest}")
            return claim
        if claim.kind == "started":
            await self._check_cancel_sticks(order_id, claim)
        if claim.kind in ("started", "resumed"):
            if claim.kind == "resumed" and not [p for p in PHASES if p not in claim.checkpoints]:
                raise Violation(
                    f"{replica} resumed generation {claim.generation_id} with every phase committed "
                    f"(checkpoints {sorted(claim.checkpoints)}): a finished generation was reopened"
                )
            self.held[(replica, order_id)] = Held(replica, order_id, claim, cancel_seen=claim.cancel_requested)
        return claim

    async def _check_cancel_sticks(self, order_id: int, claim: Claim) -> None:
        """A fresh generation after a cancelled one comes from a job sent after the cancel, never before it."""
        async with self.pool.acquire() as conn:
            previous = await conn.fetchrow(
                "SELECT id, status, cancel_requested_at FROM site_generations"
                " WHERE order_id = $1 AND id < $2 AND kind = 'generation' ORDER BY id DESC LIMIT 1",
                order_id,
                claim.generation_id,
            )
        if previous is None or previous["status"] != "cancelled" or previous["cancel_requested_at"] is None:
            return
        if self.job_at[order_id] < previous["cancel_requested_at"]:
            raise Violation(
                f"a job enqueued at {self.job_at[order_id]} started generation {claim.generation_id} after "
                f"generation {previous['id']} was cancelled at {previous['cancel_requested_at']}: "
                "the cancel did not stick"
            )

    async def _latest(self, order_id: int) -> asyncpg.Record | None:
        """The order's latest generation (not an edit or rollback)."""
        async with self.pool.acquire() as conn:
            return await conn.fetchrow(
                "SELECT * FROM site_generations WHERE order_id = $1 AND kind = 'generation' ORDER BY id DESC LIMIT 1",
                order_id,
            )

    async def _advance(self, held: Held) -> None:
        """What the runner does next with a claim it holds: cancel if asked, else commit or finish the next phase."""
        store = self.stores[held.replica]
        phase = held.next_phase
        try:
            if held.cancel_seen:
                await store.cancel_generation(held.claim, "model: cancelled", phase)
                self.held.pop((held.replica, held.order_id), None)
            elif phase == "assemble":
                files = generation_files(held.claim.generation_id)
                number = await store.finish_generation(
                    held.claim,
                    {"pages": ["index.html"]},
                    files,
                    usage={},
                    total_usage={},
                    duration_ms=1,
                    output_dir="/x",
                    version=NewVersion("generation", files, plan={"pages": ["index"]}, quality={}),
                )
                assert number is not None
                self._made(held.order_id, number, files)
                self.held.pop((held.replica, held.order_id), None)
            elif phase is not None:
                held.cancel_seen = await store.commit_phase(
                    held.claim, phase, {"phase": phase}, usage={}, total_usage={}, duration_ms=1
                )
                held.committed.append(phase)
        except ClaimLost:
            self.held.pop((held.replica, held.order_id), None)
        except asyncpg.UniqueViolationError as exc:
            raise Violation(f"phase {phase} of generation {held.claim.generation_id} was committed again") from exc

    # ------------------------------------------------------------------------------------ rules

    @rule(replica=st.sampled_from(REPLICAS), order_id=st.sampled_from(ORDERS), regenerate=st.booleans())
    def claim(self, replica: str, order_id: int, regenerate: bool) -> None:
        if regenerate and order_id % 2:  # regenerate now and then, not half the time
            regenerate = False
        if regenerate:  # regenerate=true comes with a new request
            self.new_job(order_id)
        self.run(self._claim(replica, order_id, regenerate))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def advance(self, data: st.DataObject) -> None:
        held = data.draw(st.sampled_from(sorted(self.held.values(), key=lambda h: (h.replica, h.order_id))))
        self.run(self._advance(held))

    @precondition(lambda self: self.held)
    @rule(data=st.data(), how=st.sampled_from(["fail", "release"]))
    def give_up(self, data: st.DataObject, how: str) -> None:
        held = data.draw(st.sampled_from(sorted(self.held.values(), key=lambda h: (h.replica, h.order_id))))
        store = self.stores[held.replica]
        error = {"type": "ModelError", "message": f"model: {how}"}
        if how == "fail":
            self.run(store.fail_generation(held.claim, error))
        else:
            self.run(store.release_generation(held.claim, error))
        self.held.pop((held.replica, held.order_id), None)

    @rule(order_id=st.sampled_from(ORDERS))
    def cancel(self, order_id: int) -> None:
        self.run(self.stores["r0"].request_cancel(order_id, "model: cancel"))

    @rule(order_id=st.sampled_from(ORDERS))
    def new_job(self, order_id: int) -> None:
        """The order's job ended; a new one (a new request) is sent."""
        self.job_at[order_id] = self.run(self._now())

    async def _now(self) -> dt.datetime:
        async with self.pool.acquire() as conn:
            now: dt.datetime = await conn.fetchval("SELECT clock_timestamp()")
            return now

    @rule(order_id=st.sampled_from(ORDERS))
    def lease_lapses(self, order_id: int) -> None:
        """The controllable clock: the order's running claim (and any due retry) is a lease in the past."""
        self.run(self._expire(order_id))

    async def _expire(self, order_id: int) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE site_generations SET lease_expires_at = now() - interval '1 second',"
                " heartbeat_at = now() - make_interval(secs => $2 + 1)"
                " WHERE order_id = $1 AND status = 'running'",
                order_id,
                LEASE_S,
            )

    @rule(order_id=st.sampled_from(ORDERS))
    def kills_its_replicas(self, order_id: int) -> None:
        """The generation kills every replica that runs it (out of memory): claimed, lease lapses, again."""
        self.run(self._crash_loop(order_id))

    async def _crash_loop(self, order_id: int) -> None:
        for replica in REPLICAS:
            await self._expire(order_id)
            self.held.pop((replica, order_id), None)
            await self._claim(replica, order_id)
            self.held.pop((replica, order_id), None)  # the replica died with its claim

    @rule(replica=st.sampled_from(REPLICAS))
    def heartbeat(self, replica: str) -> None:
        runs = [*self.held.values(), *self.edits_held.values()]
        tokens = [h.claim.token for h in runs if h.replica == replica and h.claim.token]
        if tokens:
            self.run(self.stores[replica].heartbeat(tokens))

    @rule()
    def sweep(self) -> None:
        for generation in self.run(self._stale()):
            if generation["status"] not in ("queued", "running", "waiting"):
                raise Violation(f"the sweeper found a finished generation stale: {generation}")

    async def _stale(self) -> list[dict[str, Any]]:
        return [g async for g in self.stores["r1"].stale_generations(page_size=2)]

    @precondition(lambda self: self.held)
    @rule(data=st.data(), write=st.sampled_from(["advance", "fail", "release", "cancel"]))
    def write_races_a_claim(self, data: st.DataObject, write: str) -> None:
        """A replica's write holds its row lock, uncommitted, while another replica's claim runs; then commits.

        The writer's lease has lapsed (it is slow, not dead), so the other claim may take the order over.
        """
        held = data.draw(st.sampled_from(sorted(self.held.values(), key=lambda h: (h.replica, h.order_id))))
        other = data.draw(st.sampled_from([r for r in REPLICAS if r != held.replica]))
        self.run(self._race(held, other, write))

    async def _race(self, held: Held, other: str, write: str, claimer: str = "generation") -> None:
        """`claimer`: the claim that runs meanwhile: the order's generation job, or (for an edit) the same job run
        again by `other` (its lease in Redis lapsed too, and another replica's poll took it)."""
        await self._expire(held.order_id)
        version = await self._version_of(held) if write == "advance" and not held.cancel_seen else None
        made: list[tuple[int, int, list[OutputFile]]] = []
        async with self.pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            try:
                row = await self._write_in(conn, held, write, version, made)
                if claimer == "same job" and held.job is not None:
                    self._take(held.job, other)
                    claim = asyncio.ensure_future(self._claim_edit(other, held.job))
                else:
                    claim = asyncio.ensure_future(self._claim(other, held.order_id))
                await self._until_blocked_or_done(claim)
            except BaseException:
                await tx.rollback()
                raise
            await tx.commit()
        for order_id, number, files in made:
            self._made(order_id, number, files)
        await claim
        self._after_write(held, write, row)

    async def _write_in(
        self,
        conn: asyncpg.Connection,
        held: Held,
        write: str,
        version: NewVersion | None,
        made: list[tuple[int, int, list[OutputFile]]],
    ) -> asyncpg.Record | None:
        """The statements the store runs for this write, on a connection whose transaction stays open; a version
        made is added to `made` (it is recorded once the transaction commits)."""
        c = held.claim
        store = self.stores[held.replica]

        def returning(name: str) -> str:
            return QUERIES[name].rstrip(";") + " RETURNING id"

        phase = held.next_phase
        if write == "advance" and held.cancel_seen:
            write = "cancel"
        if write == "advance" and phase == "assemble" and c.job == "generation":
            assert version is not None
            files = version.files
            row = await conn.fetchrow(
                QUERIES["finish_generation"],
                c.generation_id,
                c.token,
                {},
                "/x",
                {"pages": []},
                {},
                1,
                [f.path for f in files],
                [f.content for f in files],
                [f.sha256 for f in files],
                [len(f.content) for f in files],
                [f.media_type for f in files],
            )
            if row is not None:
                made.append((held.order_id, await store._add_version(conn, c, version, {}), files))
            return row
        if write == "advance" and phase in ("assemble", "publish"):  # the last phase of an edit or rollback
            assert version is not None
            row = await conn.fetchrow(QUERIES["finish_run"], c.generation_id, c.token, {}, "/x", phase, {}, {}, 1)
            if row is not None:
                made.append((held.order_id, await store._add_version(conn, c, version, {}), version.files))
            return row
        if write == "advance" and phase is not None:
            next_phase = c.phases[c.phases.index(phase) + 1]
            return await conn.fetchrow(
                QUERIES["commit_phase"],
                c.generation_id,
                c.token,
                next_phase,
                {},
                LEASE_S,
                phase,
                {"phase": phase},
                {},
                1,
            )
        if write == "fail":
            return await conn.fetchrow(
                returning("fail_generation"), c.generation_id, c.token, {"type": "ModelError", "message": "model: fail"}
            )
        if write == "release":
            return await conn.fetchrow(
                returning("release_generation"),
                c.generation_id,
                c.token,
                {"type": "ModelError", "message": "model: release"},
                0,
                False,  # an attempt that counts towards max_attempts
            )
        return await conn.fetchrow(returning("cancel_generation"), c.generation_id, c.token, "model: cancelled", phase)

    def _after_write(self, held: Held, write: str, row: asyncpg.Record | None) -> None:
        runs: dict[Any, Held] = self.edits_held if held.job is not None else self.held  # type: ignore[assignment]
        key = (held.replica, held.job.job_id) if held.job is not None else (held.replica, held.order_id)
        last = held.claim.phases[-1]
        ends = {"fail": "failed", "cancel": "cancelled"}.get(write)
        if write == "advance":
            ends = "cancelled" if held.cancel_seen else "succeeded" if held.next_phase == last else None
        if row is not None and ends is not None:
            self.ended[held.claim.generation_id] = ends  # committed terminal: it must stay so
        if held.job is not None and row is not None:  # how the runner's job ends after this write
            if ends is not None:
                self._end(held.job, held.replica, {"succeeded": "applied"}.get(ends, ends))
            elif write == "release":
                self._retry(held.job, held.replica, 0)
        if row is None or write != "advance" or held.next_phase in (None, last) or held.cancel_seen:
            if runs.get(key) is held:
                runs.pop(key)
            return
        held.committed.append(held.next_phase)  # type: ignore[arg-type]
        held.cancel_seen = bool(row["cancel_requested"])

    async def _until_blocked_or_done(self, claim: asyncio.Future[Any]) -> None:
        """Wait until the claim ends or waits for a lock (pg_stat_activity's wait event), never a fixed sleep."""
        async with self.pool.acquire() as watcher:
            while not claim.done():
                waiting = await watcher.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND application_name = $1 AND query LIKE '%sitegen_claim%'",
                    APP,
                )
                if waiting:
                    event("a claim waited for the row lock of an uncommitted write")
                    return
                await asyncio.wait([claim], timeout=0.002)

    # ------------------------------------------------------------------------- edits and rollbacks

    def _made(self, order_id: int, number: int, files: list[OutputFile]) -> None:
        """A replica's commit made version `number` of the order with these files."""
        if (order_id, number) in self.made:
            raise Violation(f"version {number} of order {order_id} was made twice")
        self.made[(order_id, number)] = {f.path: f.sha256 for f in files}

    def _ahead(self, sent: Sent) -> list[str]:
        """What `worker.ordering.jobs_ahead` reads in Redis for this job: the order's jobs sent before it (by enqueue
        time, then by `client.sent_order`) that Redis still holds, whatever their score (waiting, taken by a run,
        or retried with a delay)."""
        mine = round(ms(sent.enqueued_at))
        return [
            s.job_id
            for s in self.sent.values()
            if s.order_id == sent.order_id
            and s is not sent
            and s.outcome is None
            and (round(ms(s.enqueued_at)), client.sent_order(s.job_id)) < (mine, client.sent_order(sent.job_id))
        ]

    def _take(self, sent: Sent, replica: str) -> None:
        """A poll of `replica` takes the job: its score becomes the end of the run's lease."""
        if sent.taken_by is None:
            sent.queued_score = sent.score
        sent.taken_by = replica
        sent.score = float("inf")

    def _end(self, sent: Sent, replica: str, outcome: str) -> None:
        """The run of `replica` ends the job: arq's finish, which only the run holding the job in Redis makes."""
        if sent.taken_by == replica:
            sent.outcome = outcome
            sent.taken_by = None

    def _retry(self, sent: Sent, replica: str, defer_ms: float) -> None:
        """The run of `replica` asks arq for a retry (`Retry(defer)`): due again at Redis's now + the delay."""
        if sent.taken_by == replica:
            sent.taken_by = None
            sent.score = ms(dt.datetime.now(dt.UTC)) + defer_ms

    def _lapse(self, sent: Sent) -> None:
        """The job's lease in Redis lapsed (its run is dead or stalled): due again at its original score."""
        if sent.taken_by is not None:
            sent.taken_by = None
            sent.score = sent.queued_score

    async def _claim_edit(self, replica: str, sent: Sent) -> None:
        """What `run_edit` does with the job it took: claim it, then hold the run, end the job or retry it."""
        try:
            claim = await self.stores[replica].claim_edit(
                sent.order_id,
                sent.kind,  # type: ignore[arg-type]
                sent.request,
                job_id=sent.job_id,
                enqueued_at=sent.enqueued_at,
                max_attempts=MAX_ATTEMPTS,
                ahead=self._ahead(sent),
            )
        except OrderBusy as busy:
            event(f"{sent.kind} claim: busy")
            self._retry(sent, replica, busy.retry_after_s * 1000)
            return
        except (OrderNotFound, EditInvalid, AttemptsExhausted) as exc:
            event(f"{sent.kind} claim: {type(exc).__name__}")
            self._end(sent, replica, "failed")
            return
        event(f"{sent.kind} claim: {claim.kind}")
        if claim.kind in ("cancelled", "ended"):
            status = "cancelled" if claim.kind == "cancelled" else str(claim.status)
            self._end(sent, replica, {"succeeded": "applied"}.get(status, status))
            return
        if claim.kind == "started":
            await self._check_turn(sent, claim)
        self.edits_held[(replica, sent.job_id)] = Held(
            replica, sent.order_id, claim, cancel_seen=claim.cancel_requested, job=sent
        )

    async def _check_turn(self, sent: Sent, claim: Claim) -> None:
        """An edit starts on the live version, once every edit and rollback of the order sent before it ended."""
        before = [s for s in self.sent.values() if s.order_id == sent.order_id and s.seq < sent.seq]
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT job_id, status FROM site_generations WHERE job_id = ANY($1::text[])", [s.job_id for s in before]
            )
            live = await conn.fetchval("SELECT live_version FROM site_orders WHERE id = $1", sent.order_id)
        status = {r["job_id"]: r["status"] for r in rows}
        early = [s.label for s in before if s.outcome is None and status.get(s.job_id) not in TERMINAL]
        if early:
            raise Violation(
                f"{sent.label} started (generation {claim.generation_id}) before {', '.join(early)}, sent before it, "
                f"ended ({[status.get(s.job_id, 'unregistered') for s in before]}): edits must run in the order sent"
            )
        if claim.request.get("live_version") != live:
            raise Violation(f"{sent.label} started on version {claim.request.get('live_version')}; {live} is live")

    async def _version_of(self, held: Held) -> NewVersion | None:
        """The version the run's last phase makes, as the runner builds it (None: its next phase is not the last)."""
        claim = held.claim
        if held.next_phase != claim.phases[-1]:
            return None
        store = self.stores[held.replica]
        if claim.job == "generation":
            files = generation_files(claim.generation_id)
            return NewVersion("generation", files, plan={"pages": ["index"]}, quality={})
        if claim.job == "rollback":
            number = int(claim.request["version"])
            files = await store.version_files(held.order_id, number)
            plan = await store.version_plan(held.order_id, number)
            return NewVersion("rollback", files, plan=plan, quality={}, rolled_back_to=number)
        live = await store.live_site(held.order_id)
        started_on = claim.request.get("live_version")
        if live is None or live.number != started_on:
            async with self.pool.acquire() as conn:
                token = await conn.fetchval(
                    "SELECT claim_token FROM site_generations WHERE id = $1", claim.generation_id
                )
            if token == claim.token:  # the run still holds its claim: nothing else of the order may have run
                raise Violation(
                    f"{held.job.label if held.job else claim.generation_id} started on version {started_on}, and "
                    f"version {live.number if live else None} is live when it is applied: another run made a version"
                )
        contents = {f.path: f.content for f in (live.files if live else [])}
        contents[EDITS_TXT] = contents.get(EDITS_TXT, b"") + f"{held.job.job_id if held.job else '?'}\n".encode()
        edited = [OutputFile(path, content) for path, content in sorted(contents.items())]
        return NewVersion(
            "edit", edited, plan=live.plan if live else None, quality={}, instruction=claim.request["instruction"]
        )

    async def _advance_edit(self, held: Held) -> None:
        """What the runner does next with an edit or rollback it holds: cancel if asked, else its next phase."""
        store = self.stores[held.replica]
        sent = held.job
        assert sent is not None
        key = (held.replica, sent.job_id)
        phase = held.next_phase
        try:
            if held.cancel_seen:
                await store.cancel_generation(held.claim, "model: cancelled", phase)
                self.edits_held.pop(key, None)
                self._end(sent, held.replica, "cancelled")
            elif phase == held.claim.phases[-1]:
                version = await self._version_of(held)
                assert version is not None
                number = await store.finish_run(
                    held.claim,
                    phase,
                    {"phase": phase},
                    version,
                    usage={},
                    total_usage={},
                    duration_ms=1,
                    output_dir="/x",
                )
                self._made(held.order_id, number, version.files)
                self.edits_held.pop(key, None)
                self._end(sent, held.replica, "applied")
            elif phase is not None:
                held.cancel_seen = await store.commit_phase(
                    held.claim, phase, {"phase": phase}, usage={}, total_usage={}, duration_ms=1
                )
                held.committed.append(phase)
        except ClaimLost:
            self.edits_held.pop(key, None)  # superseded: the job's end is its new run's to make
        except asyncpg.UniqueViolationError as exc:
            raise Violation(f"phase {phase} of {sent.label} was committed again") from exc

    def _queued(self) -> list[Sent]:
        return sorted((s for s in self.sent.values() if s.outcome is None and s.taken_by is None), key=lambda s: s.seq)

    def _taken(self) -> list[Sent]:
        """Jobs a replica's poll took whose run has not claimed them yet (Redis holds them; PostgreSQL may not)."""
        held = {job_id for _, job_id in self.edits_held}
        return sorted(
            (s for s in self.sent.values() if s.taken_by is not None and s.job_id not in held), key=lambda s: s.seq
        )

    # ------------------------------------------------------------------------------- invariants

    @invariant()
    def guarantees_hold(self) -> None:
        self.run(self._check())

    async def _check(self) -> None:
        async with self.pool.acquire() as conn:
            generations = await conn.fetch("SELECT * FROM site_generations ORDER BY id")
            phases = await conn.fetch("SELECT generation_id, phase, completed_at FROM site_generation_phases")
            now = await conn.fetchval("SELECT now()")
        live: dict[int, list[int]] = {}
        for g in generations:
            if g["status"] == "running" and g["lease_expires_at"] and g["lease_expires_at"] > now:
                live.setdefault(g["order_id"], []).append(g["id"])
            snapshot = (g["status"], g["attempt"], g["claim_token"], g["finished_at"], g["current_phase"])
            if g["id"] in self.terminal and self.terminal[g["id"]] != snapshot:
                raise Violation(f"terminal generation {g['id']} changed: {self.terminal[g['id']]} -> {snapshot}")
            if g["id"] in self.ended and g["status"] != self.ended[g["id"]]:
                raise Violation(
                    f"generation {g['id']} was committed {self.ended[g['id']]}, and is now {g['status']} "
                    f"(attempt {g['attempt']}, replica {g['replica_id']}): a claim reopened a finished generation"
                )
            if g["status"] in TERMINAL:
                self.terminal.setdefault(g["id"], snapshot)
                if g["claim_token"] is not None:
                    raise Violation(f"terminal generation {g['id']} still carries a claim")
        for order_id, ids in live.items():
            if len(ids) > 1:
                raise Violation(f"order {order_id} has {len(ids)} live claims: {ids}")
        # At most one holder: of the claims replicas believe they hold on a generation, one at most
        # is the one its row names (the others' writes change nothing).
        tokens = {g["id"]: g["claim_token"] for g in generations if g["status"] == "running"}
        holders: dict[int, list[str]] = {}
        for held in [*self.held.values(), *self.edits_held.values()]:
            if held.claim.token is not None and tokens.get(held.claim.generation_id) == held.claim.token:
                holders.setdefault(held.claim.generation_id, []).append(held.replica)
        for generation_id, replicas in holders.items():
            if len(replicas) > 1:
                raise Violation(f"generation {generation_id} is held by {replicas}")
        for p in phases:
            key = (p["generation_id"], p["phase"])
            if key in self.phases and self.phases[key] != p["completed_at"]:
                raise Violation(f"phase {p['phase']} of generation {p['generation_id']} was committed again")
            self.phases[key] = p["completed_at"]
        await self._check_versions({g["id"]: g for g in generations})

    async def _check_versions(self, runs: dict[int, asyncpg.Record]) -> None:
        """Every order's live version is one complete version; versions never change; each run made one at most;
        the edits and rollbacks of an order made their versions in the order they were sent."""
        async with self.pool.acquire() as conn:
            versions = await conn.fetch("SELECT * FROM site_versions ORDER BY order_id, number")
            files = await conn.fetch(
                "SELECT f.order_id, f.number, f.path, f.sha256, f.bytes, f.media_type, b.content"
                " FROM site_version_files f LEFT JOIN site_blobs b ON b.sha256 = f.sha256 ORDER BY 1, 2, 3"
            )
            orders = {r["id"]: r["live_version"] for r in await conn.fetch("SELECT id, live_version FROM site_orders")}
            live_files = {o: await conn.fetch(QUERIES["api_site_files"], o) for o in orders}
        files_of: dict[tuple[int, int], list[asyncpg.Record]] = {}
        for f in files:
            files_of.setdefault((f["order_id"], f["number"]), []).append(f)
            if f["content"] is None or hashlib.sha256(f["content"]).hexdigest() != f["sha256"]:
                raise Violation(
                    f"file {f['path']} of version {f['number']} of order {f['order_id']}: blob missing or wrong"
                )
        seen: set[tuple[int, int]] = set()
        made_by: dict[int, int] = {}
        for v in versions:
            key = (v["order_id"], v["number"])
            seen.add(key)
            snapshot = (tuple(v.items()), tuple(tuple(f.items()) for f in files_of.get(key, [])))
            if self.versions.setdefault(key, snapshot) != snapshot:
                raise Violation(
                    f"version {v['number']} of order {v['order_id']} changed: {self.versions[key]} -> {snapshot}"
                )
            sent_files = self.made.get(key)
            if sent_files is not None and sent_files != {f["path"]: f["sha256"] for f in files_of.get(key, [])}:
                raise Violation(
                    f"version {v['number']} of order {v['order_id']} does not hold the files it was made with"
                )
            run = runs.get(v["generation_id"])
            if run is None or run["kind"] != v["kind"] or run["status"] != "succeeded" or run["version"] != v["number"]:
                raise Violation(
                    f"version {v['number']} of order {v['order_id']} was made by {dict(run) if run else None}"
                )
            if v["generation_id"] in made_by:
                raise Violation(
                    f"run {v['generation_id']} made versions {made_by[v['generation_id']]} and {v['number']} of order "
                    f"{v['order_id']}: applied twice"
                )
            made_by[v["generation_id"]] = v["number"]
            started_on = (run["request"] or {}).get("live_version")
            if v["kind"] != "generation" and v["parent"] != started_on:
                raise Violation(
                    f"version {v['number']} of order {v['order_id']} ({v['kind']}) has parent {v['parent']}, but "
                    f"its run started on version {started_on}: another version was made meanwhile"
                )
        if missing := sorted(set(self.versions) - seen):
            raise Violation(f"versions {missing} (order, number) disappeared (the model keeps every version)")
        for order_id, live in orders.items():
            numbers = [v["number"] for v in versions if v["order_id"] == order_id]
            if numbers != list(range(1, len(numbers) + 1)) or live != (numbers[-1] if numbers else None):
                raise Violation(f"order {order_id}: versions {numbers}, live version {live}")
            if live is not None:
                expected = {f["path"]: f["content"] for f in files_of.get((order_id, live), [])}
                if not expected or {r["path"]: r["content"] for r in live_files[order_id]} != expected:
                    raise Violation(
                        f"order {order_id}: its live files are not exactly those of its live version {live}"
                    )
        # The edits and rollbacks of an order made their versions in the order they were sent.
        by_job = {s.job_id: s for s in self.sent.values()}
        for order_id in orders:
            applied = [
                (v["number"], by_job[runs[v["generation_id"]]["job_id"]])
                for v in versions
                if v["order_id"] == order_id and v["kind"] != "generation"
            ]
            sent_order = [s.seq for _, s in applied]
            if sent_order != sorted(sent_order):
                raise Violation(
                    f"order {order_id}: versions {[n for n, _ in applied]} were made by the jobs sent #{sent_order}: "
                    "not in the order they were sent"
                )
        # A job that ended in Redis ended so in PostgreSQL.
        status_of = {r["job_id"]: r for r in runs.values() if r["kind"] != "generation"}
        for sent in self.sent.values():
            row = status_of.get(sent.job_id)
            if sent.outcome is None:
                continue
            expected_status = {"applied": "succeeded"}.get(sent.outcome, sent.outcome)
            if row is None and sent.outcome == "failed":
                continue  # its order did not exist: nothing to store it on
            if row is None or row["status"] != expected_status:
                raise Violation(
                    f"{sent.label} ended {sent.outcome} (its job left Redis), but its run is "
                    f"{dict(row) if row else 'not registered'}: lost"
                )

    def teardown(self) -> None:
        """Run every order to completion: each ends terminal (or under a live claim, which this drives on); then
        every edit and rollback sent, and each must end exactly once."""
        try:
            self.run(self._complete())
            self.run(self._drain_edits())
        finally:
            self.held.clear()
            self.edits_held.clear()

    async def _drain_edits(self) -> None:
        for _ in range(3 * MAX_SENT):
            pending = [s for s in sorted(self.sent.values(), key=lambda s: s.seq) if s.outcome is None]
            if not pending:
                break
            for order_id in ORDERS:
                await self._expire(order_id)
            self.edits_held.clear()  # every replica died: a run of each job resumes it
            for sent in pending:
                self._lapse(sent)
                self._take(sent, "r0")
                await self._claim_edit("r0", sent)
                held = self.edits_held.get(("r0", sent.job_id))
                while held is not None and self.edits_held.get(("r0", sent.job_id)) is held:
                    await self._advance_edit(held)
                self._lapse(sent)  # retried: back in the queue
        await self._check()
        lost = [s.label for s in self.sent.values() if s.outcome is None]
        if lost:
            raise Violation(f"never ended: {lost}")

    async def _complete(self) -> None:
        for order_id in ORDERS:
            for _ in range(MAX_ATTEMPTS + 6):
                latest = await self._latest(order_id)
                if latest is None or latest["status"] in TERMINAL:
                    break
                await self._expire(order_id)
                self.held.clear()
                claim = await self._claim("r0", order_id)
                held = self.held.get(("r0", order_id))
                if claim is None or held is None:
                    continue
                while self.held.get(("r0", order_id)) is held:
                    await self._advance(held)
            latest = await self._latest(order_id)
            if latest is not None and latest["status"] not in TERMINAL:
                raise Violation(f"order {order_id} ended {latest['status']} with no replica to finish it")
        await self._check()


class EditModel(GenerationModel):
    """The model with edits and rollbacks sent for the orders, which have their sites already: its replicas run them
    (and regenerate now and then) while leases lapse, replicas die, writes race claims and a cancel comes."""

    # The generation's own crash loop, failures, races, heartbeats and sweeps are the model's above; here the rules
    # that meet edits: regenerations (a claim with regenerate=true), leases that lapse, one cancel.
    kills_its_replicas = None  # type: ignore[assignment]
    give_up = None  # type: ignore[assignment]
    write_races_a_claim = None  # type: ignore[assignment]
    heartbeat = None  # type: ignore[assignment]
    sweep = None  # type: ignore[assignment]

    def new_job(self, order_id: int) -> None:  # not a rule here: a regeneration (`claim`) sends its own job
        GenerationModel.new_job(self, order_id)

    #: Whether the order's jobs were cancelled once (`sitegen cancel` ends every edit sent before it: once is enough).
    cancelled = False

    async def _reset(self) -> None:
        await super()._reset()
        for order_id in ORDERS:
            await self._generated(order_id)

    @precondition(lambda self: not self.cancelled)
    @rule(order_id=st.sampled_from(ORDERS))
    def cancel(self, order_id: int) -> None:
        self.cancelled = True
        self.run(self.stores["r0"].request_cancel(order_id, "model: cancel"))

    @precondition(lambda self: len(self.sent) < MAX_SENT)
    @rule(
        order_id=st.sampled_from(ORDERS), kind=st.sampled_from(["edit", "edit", "rollback"]), version=st.integers(1, 3)
    )
    def send_edit(self, order_id: int, kind: str, version: int) -> None:
        """An upstream app sends an edit (or a rollback to `version`) of the order: a job with its own id."""
        seq = len(self.sent) + 1
        function = "edit_site" if kind == "edit" else "rollback_site"
        request: dict[str, Any] = (
            {"instruction": f"model edit {seq}", "base_version": None, "pages": None}
            if kind == "edit"
            else {"version": version}
        )
        at = self.run(self._now())
        job_id = f"{function}:{order_id}:{seq:03d}"
        self.sent[job_id] = Sent(job_id, order_id, kind, request, at, seq, score=ms(at))

    @precondition(lambda self: self._queued())
    @rule(replica=st.sampled_from(REPLICAS), data=st.data(), claim_now=st.booleans())
    def poll_edit(self, replica: str, data: st.DataObject, claim_now: bool) -> None:
        """A replica's poll takes a queued edit or rollback; its run claims it now or in a later step."""
        sent = data.draw(st.sampled_from(self._queued()))
        self._take(sent, replica)
        if claim_now:
            self.run(self._claim_edit(replica, sent))

    @precondition(lambda self: self._taken())
    @rule(data=st.data(), reaches=st.sampled_from([True, True, False]))
    def claim_taken_edit(self, data: st.DataObject, reaches: bool) -> None:
        """The run of a taken job claims it; or its claim cannot reach PostgreSQL, and the job is retried later."""
        sent = data.draw(st.sampled_from(self._taken()))
        assert sent.taken_by is not None
        if reaches:
            self.run(self._claim_edit(sent.taken_by, sent))
        else:
            self._retry(sent, sent.taken_by, BACKOFF_MS)

    @precondition(lambda self: self.edits_held)
    @rule(data=st.data())
    def advance_edit(self, data: st.DataObject) -> None:
        held = data.draw(st.sampled_from(sorted(self.edits_held.values(), key=lambda h: (h.replica, h.job.seq))))  # type: ignore[union-attr]
        self.run(self._advance_edit(held))

    @precondition(lambda self: self.edits_held)
    @rule(data=st.data(), how=st.sampled_from(["fail", "release"]))
    def edit_gives_up(self, data: st.DataObject, how: str) -> None:
        """The edit fails for good (a model that cannot do it), or is handed back for a later try."""
        held = data.draw(st.sampled_from(sorted(self.edits_held.values(), key=lambda h: (h.replica, h.job.seq))))  # type: ignore[union-attr]
        assert held.job is not None
        store = self.stores[held.replica]
        error = {"type": "ModelError", "message": f"model: {how}"}
        self.edits_held.pop((held.replica, held.job.job_id), None)
        if how == "fail":
            self.run(store.fail_generation(held.claim, error))
            self._end(held.job, held.replica, "failed")
        else:
            self.run(store.release_generation(held.claim, error))
            self._retry(held.job, held.replica, 0)

    @precondition(lambda self: any(s.taken_by is not None for s in self.sent.values()))
    @rule(data=st.data(), dies=st.booleans())
    def edit_job_lease_lapses(self, data: st.DataObject, dies: bool) -> None:
        """A taken job's lease in Redis lapses: its replica died (its runs go with it), or is only stalled."""
        sent = data.draw(st.sampled_from(sorted((s for s in self.sent.values() if s.taken_by), key=lambda s: s.seq)))
        replica = sent.taken_by
        self._lapse(sent)
        if dies:
            self.edits_held.pop((replica, sent.job_id), None)  # type: ignore[arg-type]
            self.run(self._expire(sent.order_id))

    @precondition(lambda self: self.edits_held)
    @rule(
        data=st.data(),
        write=st.sampled_from(["advance", "fail", "release", "cancel"]),
        claimer=st.sampled_from(["same job", "generation"]),
    )
    def edit_write_races_a_claim(self, data: st.DataObject, write: str, claimer: str) -> None:
        """An edit's write holds its locks, uncommitted, while another replica claims the same job (its lease in
        Redis lapsed too: the writer is slow, not dead) or the order's generation; then the write commits."""
        held = data.draw(st.sampled_from(sorted(self.edits_held.values(), key=lambda h: (h.replica, h.job.seq))))  # type: ignore[union-attr]
        other = data.draw(st.sampled_from([r for r in REPLICAS if r != held.replica]))
        self.run(self._race(held, other, write, claimer))


def run_model(machine: type[GenerationModel], services: LocalServices, *, max_examples: int) -> None:
    """Run a model on an event loop and pool of its own, against the session's PostgreSQL."""
    loop = asyncio.new_event_loop()
    try:
        pool = loop.run_until_complete(
            create_pool(DatabaseSection(url=services.database_url), max_size=8, name="model")
        )
        machine.loop = loop
        machine.pool = pool
        try:
            run_state_machine_as_test(
                machine,
                settings=settings(
                    max_examples=max_examples,
                    stateful_step_count=30,
                    deadline=None,
                    suppress_health_check=[HealthCheck.too_slow],
                    derandomize=False,
                ),
            )
        finally:
            loop.run_until_complete(pool.close())
    finally:
        loop.close()


def test_the_generation_state_machine_keeps_its_guarantees(services: LocalServices, migrated: None) -> None:
    """Regression: issue 14 defect 2 (and the guarantees of defects 4 and 10): a stateful model, 3 replicas."""
    run_model(GenerationModel, services, max_examples=120)


def test_edits_and_rollbacks_keep_their_guarantees(services: LocalServices, migrated: None) -> None:
    """Issue 22: edits and rollbacks sent at any time, run by 3 replicas, end once each, in the order sent, and
    the live version is always one whole, unchanged version."""
    run_model(EditModel, services, max_examples=50)


# ------------------------------------------------------------- the defects the edit model found (issue 22)

EDIT_REQUEST = {"instruction": "Make the header blue", "base_version": None, "pages": None}


@pytest.fixture
async def store(services: LocalServices, db: asyncpg.Connection) -> AsyncIterator[Store]:
    """A replica's store on an empty database, order 1 generated (version 1 live)."""
    pool = await create_pool(DatabaseSection(url=services.database_url), max_size=4, name="model")
    try:
        replica = Store(pool, replica_id="r0", lease_s=LEASE_S)
        await generate(replica, 1)
        yield replica
    finally:
        await pool.close()


async def waits_for(store: Store, redis: ArqRedis, first: Job, second: Job) -> None:
    """Edit `second`, sent after `first`, finds `first` ahead of it and waits (its claim: busy)."""
    info = await second.info()
    assert info is not None
    ahead = await jobs_ahead(redis, client.QUEUE_NAME, 1, second.job_id, info.enqueue_time)
    assert ahead == [first.job_id]
    with pytest.raises(OrderBusy):
        await store.claim_edit(
            1,
            "edit",
            {**EDIT_REQUEST, "instruction": "Make the header green"},
            job_id=second.job_id,
            enqueued_at=info.enqueue_time,
            max_attempts=MAX_ATTEMPTS,
            ahead=ahead,
        )


async def test_an_edit_sent_second_waits_for_one_a_poll_took_before_its_claim(store: Store, redis: ArqRedis) -> None:
    """Defect 1a the edit model found (fixed in cfaf7d6): replica A's poll takes edit 1; before A's claim registers
    it, replica B claims edit 2, sent after it. B waits."""
    first = await client.enqueue_edit(redis, 1, "Make the header blue")
    await asyncio.sleep(0.005)  # a later enqueue time (milliseconds): sent second
    second = await client.enqueue_edit(redis, 1, "Make the header green")
    assert first is not None and second is not None
    poll = redis.register_script(polling.POLL)
    taken, _ = await polling.claim(
        poll, client.QUEUE_NAME, free=1, read_limit=100, lease_ms=8000, token=polling.new_token("A"), read_aborts=False
    )
    assert [t.decode() for t in taken[::2]] == [first.job_id]
    await waits_for(store, redis, first, second)


async def test_an_edit_sent_second_waits_for_one_whose_claim_could_not_reach_postgresql(
    store: Store, redis: ArqRedis
) -> None:
    """Defect 1b the edit model found (fixed in bfb1bd9): replica A takes edit 1; its claim cannot reach PostgreSQL,
    so the job is retried in 2 s (what `run_edit` asks for an infrastructure error), scored at its retry and leased no
    more; meanwhile replica B claims edit 2, sent after it. B waits."""
    first = await client.enqueue_edit(redis, 1, "Make the header blue")
    await asyncio.sleep(0.005)
    second = await client.enqueue_edit(redis, 1, "Make the header green")
    assert first is not None and second is not None
    token = polling.new_token("A")
    poll = redis.register_script(polling.POLL)
    taken, _ = await polling.claim(
        poll, client.QUEUE_NAME, free=1, read_limit=100, lease_ms=8000, token=token, read_aborts=False
    )
    assert [t.decode() for t in taken[::2]] == [first.job_id]
    queue = client.QUEUE_NAME
    retried = await redis.register_script(polling.FINISH)(
        keys=[
            in_progress_key_prefix + first.job_id,
            job_key_prefix + first.job_id,
            retry_key_prefix + first.job_id,
            result_key_prefix + first.job_id,
            queue,
            abort_jobs_ss,
            polling.leases_key(queue),
            polling.original_scores_key(queue),
        ],
        args=[token, first.job_id, "leave", "", "", taken[1].decode(), 2000, ""],
    )
    assert retried == 1
    await waits_for(store, redis, first, second)


async def test_a_claim_that_waited_for_a_failing_write_leaves_the_edit_failed(store: Store) -> None:
    """Defect 2 the edit model found (fixed in bfb1bd9): replica r0's lease lapsed (it is slow, not dead); its write
    that fails the edit holds the row lock while replica r1 claims the same job; r0 commits, and r1's claim goes on.
    It finds the edit failed (it reopened it: `running`, attempt 2)."""
    now = dt.datetime.now(dt.UTC)
    job = {"job_id": "edit_site:1:a", "enqueued_at": now, "max_attempts": MAX_ATTEMPTS, "ahead": []}
    claim = await store.claim_edit(1, "edit", EDIT_REQUEST, **job)  # type: ignore[arg-type]
    assert claim.kind == "started"
    other = Store(store.pool, replica_id="r1", lease_s=LEASE_S)
    async with store.pool.acquire() as conn, store.pool.acquire() as watcher:
        await conn.execute("UPDATE site_generations SET lease_expires_at = now() WHERE id = $1", claim.generation_id)
        async with conn.transaction():
            failed = QUERIES["fail_generation"]
            await conn.execute(failed, claim.generation_id, claim.token, {"type": "ModelError", "message": "x"})
            racing = asyncio.ensure_future(other.claim_edit(1, "edit", EDIT_REQUEST, **job))  # type: ignore[arg-type]
            while not racing.done() and not await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%sitegen_claim%'"
            ):
                await asyncio.wait([racing], timeout=0.002)
        after = await racing
        status = await watcher.fetchval("SELECT status FROM site_generations WHERE id = $1", claim.generation_id)
    assert (after.kind, after.status, status) == ("ended", "failed", "failed")


pytestmark = pytest.mark.timeout(120)
