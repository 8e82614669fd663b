"""A stateful model of the generation state machine, run by simulated replicas against real PostgreSQL.

Hypothesis interleaves what replicas do to an order's generation (claim, commit a phase, finish,
fail, hand back, cancel, heartbeat, sweep) with what the world does to them (a lease that lapses,
a new job for the order), and checks after every step that the state machine's guarantees hold.
One rule reproduces how claims race in production: a replica's write runs inside an open
transaction, holding its row lock, while another replica's claim of the same order runs and
blocks on that lock; then the write commits and the claim goes on.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from tests.helpers import SAMPLE_BRIEF
from worker.errors import AttemptsExhausted, ClaimLost, OrderBusy
from worker.local.services import LocalServices
from worker.settings import DatabaseSection
from worker.store import PHASES, QUERIES, Claim, OutputFile, Store, create_pool

ORDERS = (1, 2)
REPLICAS = ("r0", "r1", "r2")
LEASE_S = 30.0
MAX_ATTEMPTS = 3
TERMINAL = ("succeeded", "failed", "cancelled")
FILES = [OutputFile("index.html", b"<!doctype html><title>x</title>")]
APP = "sitegen-worker:model"


@dataclass
class Held:
    """A claim as the replica that made it sees it: what it believes it may still write."""

    replica: str
    order_id: int
    claim: Claim
    committed: list[str] = field(default_factory=list)
    cancel_seen: bool = False

    @property
    def next_phase(self) -> str | None:
        done = set(self.claim.checkpoints) | set(self.committed)
        remaining = [p for p in PHASES if p not in done]
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
                " WHERE order_id = $1 AND id < $2 ORDER BY id DESC LIMIT 1",
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
        async with self.pool.acquire() as conn:
            return await conn.fetchrow(
                "SELECT * FROM site_generations WHERE order_id = $1 ORDER BY id DESC LIMIT 1", order_id
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
                await store.finish_generation(
                    held.claim,
                    {"pages": ["index.html"]},
                    FILES,
                    usage={},
                    total_usage={},
                    duration_ms=1,
                    output_dir="/x",
                )
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
        tokens = [h.claim.token for h in self.held.values() if h.replica == replica and h.claim.token]
        if tokens:
            self.run(self.stores[replica].heartbeat(tokens))

    @rule()
    def sweep(self) -> None:
        for generation in self.run(self._stale()):
            if generation["status"] not in ("queued", "running"):
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

    async def _race(self, held: Held, other: str, write: str) -> None:
        await self._expire(held.order_id)
        async with self.pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            try:
                row = await self._write_in(conn, held, write)
                claim = asyncio.ensure_future(self._claim(other, held.order_id))
                await self._until_blocked_or_done(claim)
            except BaseException:
                await tx.rollback()
                raise
            await tx.commit()
        await claim
        self._after_write(held, write, row)

    async def _write_in(self, conn: asyncpg.Connection, held: Held, write: str) -> asyncpg.Record | None:
        """The statement the store runs for this write, on a connection whose transaction stays open."""
        c = held.claim

        def returning(name: str) -> str:
            return QUERIES[name].rstrip(";") + " RETURNING id"

        phase = held.next_phase
        if write == "advance" and held.cancel_seen:
            write = "cancel"
        if write == "advance" and phase == "assemble":
            return await conn.fetchrow(
                QUERIES["finish_generation"],
                c.generation_id,
                c.token,
                {},
                "/x",
                {"pages": []},
                {},
                1,
                [f.path for f in FILES],
                [f.content for f in FILES],
                [f.sha256 for f in FILES],
                [len(f.content) for f in FILES],
                [f.media_type for f in FILES],
            )
        if write == "advance" and phase is not None:
            next_phase = PHASES[PHASES.index(phase) + 1]
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
        key = (held.replica, held.order_id)
        ends = {"fail": "failed", "cancel": "cancelled"}.get(write)
        if write == "advance":
            ends = "cancelled" if held.cancel_seen else "succeeded" if held.next_phase == "assemble" else None
        if row is not None and ends is not None:
            self.ended[held.claim.generation_id] = ends  # committed terminal: it must stay so
        if row is None or write != "advance" or held.next_phase in (None, "assemble") or held.cancel_seen:
            if self.held.get(key) is held:
                self.held.pop(key)
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
        for held in self.held.values():
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

    def teardown(self) -> None:
        """Run every order to completion: each ends terminal (or under a live claim, which this drives on)."""
        try:
            self.run(self._complete())
        finally:
            self.held.clear()

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


def test_the_generation_state_machine_keeps_its_guarantees(services: LocalServices, migrated: None) -> None:
    """Regression: issue 14 defect 2 (and the guarantees of defects 4 and 10): a stateful model, 3 replicas."""
    loop = asyncio.new_event_loop()
    try:
        pool = loop.run_until_complete(
            create_pool(DatabaseSection(url=services.database_url), max_size=8, name="model")
        )
        GenerationModel.loop = loop
        GenerationModel.pool = pool
        try:
            run_state_machine_as_test(
                GenerationModel,
                settings=settings(
                    max_examples=120,
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


pytestmark = pytest.mark.timeout(120)
