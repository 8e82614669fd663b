"""The chaos soak's parts: a seeded fault plan, a supervisor that restarts replicas as compose does, the
faults themselves, and the end-of-run checks that name the invariant, the order and the evidence.

Two kinds of faults:
- infrastructure faults on a schedule (one every few seconds, one at a time): a replica SIGKILLed or
  SIGTERMed (and restarted under the same replica id), Redis SIGKILLed and started again on its port a
  few seconds later (its AOF keeps the queue), PostgreSQL restarted or SIGKILLed and started again,
  Redis read-only for 5 s (REPLICAOF an absent primary: the old primary after a failover), Redis answering
  LOADING for seconds while it reloads its AOF, one replica cut off from Redis or from PostgreSQL for a few
  seconds (its own fault proxy blackholed, then healed);
- provider faults aimed at chosen orders (each at one model call of the order): 429 with hostile
  Retry-After / retry-after-ms values, a 500 whose body is NUL bytes and invalid UTF-8, a truncated JSON
  answer, a 429 whose x-ratelimit-reset-* headers say NaN or -5s; and every coding answer of a few
  "doomed" orders names a file `manifest.json`, the file name the assemble phase reserves for itself.
Every order must succeed except the doomed ones, which must fail with a stored error that is not
retried. The plan depends only on the seed, so SOAK_SEED replays the same faults against the same
orders (their timing against the replicas' work still varies from run to run).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio
import redis.exceptions

from tests.faults.harness import (
    ROOT,
    Cluster,
    Replica,
    _check_single_owner,
    brief_for,
    order_of_request,
    slow_next_aof_load,
    wait_until,
)
from worker import client
from worker.local.offline_site import offline_code, offline_content, offline_plan
from worker.models import Brief

INFRA_FAULTS = (
    "replica-sigkill",
    "replica-sigterm",
    "redis-sigkill",
    "postgres-restart",
    "redis-readonly",
    "redis-loading",
    "partition-redis",
    "partition-postgres",
)
#: How often each infrastructure fault is drawn once every kind has had its turn.
INFRA_WEIGHTS = (4, 2, 1, 1, 1, 1, 1, 1)
#: How long Redis answers READONLY in a `redis-readonly` fault (the old primary after a failover).
READONLY_S = 5.0
#: Faults a correct worker rides out: the order must still succeed.
PROVIDER_FAULTS = (
    "429:inf",
    "429:NaN",
    "429:-5",
    "429:1e12",
    "429ms:inf",
    "429ms:nan",
    "429ms:-5",
    "429ms:1e12",
    "junk:500",
    "truncated",
    # A gateway's hostile reset headers on a 429 (issue 21 defect 2: a NaN reached asyncio.sleep).
    'headers:429:{"x-ratelimit-reset-requests": "NaN"}',
    'headers:429:{"x-ratelimit-reset-tokens": "-5s", "x-ratelimit-reset": "nan"}',
)
#: The deterministic fault: every coding answer of the order adds a file the assemble phase writes itself.
RESERVED_NAME = "reserved-name:manifest.json"
#: The error types a doomed order fails with (the model keeps writing a file the pipeline refuses).
OWN_FAILURES = ("AIBadOutput", "SiteCheckFailed")
TASKS = ("planning", "content", "coding")
PHASE_OF_TASK = {"planning": "plan", "content": "content", "coding": "code"}
PHASES = ("plan", "content", "code", "assemble")
TERMINAL = ("succeeded", "failed", "cancelled")


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    seed: int
    soak_s: float
    orders: list[int]
    #: order -> seconds after the start when it is enqueued (in waves, so faults meet work in flight).
    arrivals: dict[int, float]
    #: (seconds after the start, infrastructure fault), in time order.
    schedule: list[tuple[float, str]]
    #: order -> (task, fault) for its first call of that task.
    provider: dict[int, tuple[str, str]]
    #: order -> why it must end `failed` (a deterministic fault).
    doomed: dict[int, str]

    def faults_of(self, order_id: int) -> str:
        if order_id in self.doomed:
            return self.doomed[order_id]
        if order_id in self.provider:
            task, fault = self.provider[order_id]
            return f"{fault} on its {task} call"
        return "no fault aimed at it"


def make_plan(seed: int, soak_s: float, n_orders: int, first_order: int = 1000) -> Plan:
    rng = random.Random(seed)
    orders = list(range(first_order, first_order + n_orders))
    # Waves of 5 over the first 70% of the soak; the rest of it hits the last waves still running.
    waves = [orders[i : i + 5] for i in range(0, n_orders, 5)]
    gap = 0.7 * soak_s / max(len(waves), 1)
    arrivals = {order: i * gap for i, wave in enumerate(waves) for order in wave}

    schedule: list[tuple[float, str]] = []
    at = rng.uniform(3, 6)
    kinds = list(INFRA_FAULTS)
    rng.shuffle(kinds)  # every kind once, in a random order, then drawn by weight
    while at < soak_s - 3:
        kind = kinds.pop(0) if kinds else rng.choices(INFRA_FAULTS, INFRA_WEIGHTS)[0]
        schedule.append((round(at, 1), kind))
        at += rng.uniform(5, 9)

    doomed_count = max(1, n_orders // 60)
    aimed = rng.sample(orders, min(n_orders, doomed_count + max(len(PROVIDER_FAULTS), n_orders // 3)))
    doomed = {order: RESERVED_NAME for order in aimed[:doomed_count]}
    # Each provider fault at least once, then drawn at random.
    provider = {
        order: (rng.choice(TASKS), PROVIDER_FAULTS[i] if i < len(PROVIDER_FAULTS) else rng.choice(PROVIDER_FAULTS))
        for i, order in enumerate(aimed[doomed_count:])
    }
    return Plan(seed, soak_s, orders, arrivals, schedule, provider, doomed)


def reserved_name_answer(order_id: int) -> str:
    """The coding answer the fake would give the order, plus a file named `manifest.json`."""
    brief = Brief.model_validate(brief_for(order_id))
    plan = offline_plan(brief)
    code = offline_code(plan, offline_content(brief, plan)).model_dump(mode="json")
    code["files"].append({"path": "manifest.json", "content": '{"files": []}'})
    return json.dumps(code)


def aim_provider_faults(cluster: Cluster, plan: Plan) -> None:
    def calls_of(order_id: int, task: str) -> Callable[[Any], bool]:
        return lambda body: order_of_request(body) == (order_id, task)

    for order_id, (task, fault) in plan.provider.items():
        cluster.fake.script(fault, when=calls_of(order_id, task))
    for order_id in plan.doomed:
        # Every coding call of the order, re-asks included: the model always answers the same way.
        cluster.fake.script(*[f"text:{reserved_name_answer(order_id)}"] * 30, when=calls_of(order_id, "coding"))


# --------------------------------------------------------------------------- supervisor and faults


@dataclass
class Exit:
    """A replica that stopped when the chaos did not stop it, or did not stop as asked."""

    replica: str
    at_s: float
    what: str
    log_tail: str

    def __str__(self) -> str:
        return f"replica {self.replica} at {self.at_s:.1f}s: {self.what}\n{self.log_tail}"


@dataclass
class Chaos:
    """Injects the planned faults one at a time, restarts what it stops, and watches the replicas: one that
    exits on its own is restarted too, as compose would, but recorded as a failure, and so is one that stays
    alive with its health key gone (wedged: `arq --check` fails for it)."""

    cluster: Cluster
    plan: Plan
    shutdown_grace_s: float
    started: float = field(default_factory=time.monotonic)
    injected: Counter[str] = field(default_factory=Counter)
    #: One line per fault: when, what, on which replica, how long the repair took.
    timeline: list[str] = field(default_factory=list)
    exits: list[Exit] = field(default_factory=list)
    #: (replica, time.time()) of every SIGKILL, to tell progress rows lost with a killed process.
    sigkills: list[tuple[str, float]] = field(default_factory=list)
    #: Redis is up (the enqueuer waits for it, as an upstream app retrying would).
    redis_up: asyncio.Event = field(default_factory=asyncio.Event)
    #: Replicas the chaos is stopping on purpose: the watcher leaves them alone.
    stopping: set[str] = field(default_factory=set)
    #: replica -> since when (monotonic) its health key has been missing while Redis was up.
    unhealthy_since: dict[str, float] = field(default_factory=dict)
    #: Processes already reported as wedged.
    wedged: set[int] = field(default_factory=set)
    #: Redis holds the keys that make a `redis-loading` fault's load slow (written at the first one).
    padded: bool = False
    rng: random.Random = field(init=False)

    #: A replica refreshes its health key every second (SITEGEN_WORKER__HEALTH_CHECK_INTERVAL_S=1).
    WEDGED_AFTER_S = 10.0
    #: Between the end of one fault and the start of the next, whatever the schedule says.
    MIN_GAP_S = 3.0

    def __post_init__(self) -> None:
        self.rng = random.Random(f"chaos:{self.plan.seed}")
        self.redis_up.set()

    def now(self) -> float:
        return time.monotonic() - self.started

    async def enqueue_all(self) -> None:
        for order_id in self.plan.orders:
            await asyncio.sleep(max(0.0, self.plan.arrivals[order_id] - self.now()))  # the arrival schedule
            while True:
                await self.redis_up.wait()
                try:
                    conn = await client.connect(self.cluster.redis_url)
                    try:
                        await client.enqueue_generation(conn, order_id, brief_for(order_id))
                    finally:
                        await conn.aclose()
                    break
                except (OSError, redis.exceptions.RedisError):
                    # Redis went away, or refused (READONLY, LOADING), under the call: the event says when it is
                    # back; the enqueue is one transaction with the order's job id, so sending it again is safe.
                    await asyncio.sleep(0.2)

    async def watch(self) -> None:
        """Every half second: replicas that exited though nobody stopped them, and replicas wedged."""
        conn = None
        try:
            while True:
                for replica in self.cluster.replicas:
                    if replica.name in self.stopping or replica.alive():
                        continue
                    code = replica.process.returncode if replica.process else None
                    self.exits.append(
                        Exit(replica.name, self.now(), f"exited on its own (code {code})", _tail(replica))
                    )
                    self.unhealthy_since.pop(replica.name, None)
                    replica.start()
                conn = await self._check_health(conn)
                await asyncio.sleep(0.5)
        finally:
            if conn is not None:
                await conn.aclose()

    async def _check_health(self, conn: Any) -> Any:
        if not self.redis_up.is_set():
            self.unhealthy_since.clear()  # no replica can refresh its key now
            return conn
        try:
            conn = conn or await client.connect(self.cluster.redis_url)
            for replica in self.cluster.replicas:
                if replica.name in self.stopping or not replica.alive() or replica.process is None:
                    continue
                if await conn.exists(f"site_generation:health-check:{replica.name}"):
                    self.unhealthy_since.pop(replica.name, None)
                    continue
                since = self.unhealthy_since.setdefault(replica.name, time.monotonic())
                pid = replica.process.pid
                if time.monotonic() - since >= self.WEDGED_AFTER_S and pid not in self.wedged:
                    self.wedged.add(pid)
                    self.exits.append(
                        Exit(
                            replica.name,
                            self.now(),
                            f"wedged: alive (pid {pid}) but its health key has been missing for "
                            f"{self.WEDGED_AFTER_S:.0f}s while Redis was up (arq --check fails for it)",
                            _tail(replica),
                        )
                    )
        except (OSError, redis.exceptions.RedisError):
            self.unhealthy_since.clear()
            if conn is not None:
                await conn.aclose()
            return None
        return conn

    async def run_schedule(self) -> None:
        ended = -self.MIN_GAP_S
        for index, (at, kind) in enumerate(self.plan.schedule):
            # The fault schedule: a fault that took long (a SIGTERM that hung) pushes the next ones back, but
            # none starts after the soak's time: those left are counted, not injected (the drain must start).
            start = max(at, ended + self.MIN_GAP_S)
            if start >= self.plan.soak_s:
                self.injected["skipped: the soak's time was up"] += len(self.plan.schedule) - index
                return
            await asyncio.sleep(max(0.0, start - self.now()))
            began = self.now()
            detail = await self.inject(kind)
            ended = self.now()
            self.timeline.append(f"{began:6.1f}s {kind}: {detail} ({ended - began:.1f}s)")

    async def inject(self, kind: str) -> str:
        """Inject one fault and repair it; returns what was done."""
        self.injected[kind] += 1
        if kind == "replica-sigkill":
            replica = self.rng.choice(self.cluster.replicas)
            await self._sigkill(replica)
            return f"{replica.name} killed and restarted"
        if kind == "replica-sigterm":
            replica = self.rng.choice(self.cluster.replicas)
            return await self._sigterm(replica)
        if kind == "redis-sigkill":
            self.redis_up.clear()
            services = self.cluster.services
            down_s = self.rng.uniform(2, 5)
            await asyncio.to_thread(services.redis.kill)
            await asyncio.sleep(down_s)  # the outage is the fault: it lasts this long
            await asyncio.to_thread(services.redis.start)
            self.redis_up.set()
            return f"Redis down {down_s:.1f}s, started again with its AOF"
        if kind == "postgres-restart":
            postgres = self.cluster.services.postgres
            if self.rng.random() < 0.5:
                self.injected["postgres-restart, of which graceful"] += 1
                await asyncio.to_thread(postgres.restart)
                return "PostgreSQL restarted (fast shutdown)"
            self.injected["postgres-restart, of which SIGKILL + start"] += 1
            await asyncio.to_thread(postgres.kill)
            await asyncio.to_thread(postgres.start)
            return "PostgreSQL SIGKILLed and started again"
        if kind == "redis-readonly":
            return await self._redis_refusing(self._read_only)
        if kind == "redis-loading":
            return await self._redis_refusing(self._loading)
        if kind in ("partition-redis", "partition-postgres"):
            return await self._partition(self.rng.choice(self.cluster.replicas), kind.removeprefix("partition-"))
        raise ValueError(f"unknown fault {kind!r}")

    async def _redis_refusing(self, fault: Callable[[redis.asyncio.Redis], Awaitable[str]]) -> str:
        """Redis up but refusing: the enqueuer, an upstream app, waits it out as for an outage."""
        self.redis_up.clear()
        try:
            async with self.cluster.redis_control() as control:
                return await fault(control)
        finally:
            self.redis_up.set()

    async def _read_only(self, control: redis.asyncio.Redis) -> str:
        """A failover seen from the old primary: REPLICAOF a primary that is not there (writes answer READONLY,
        reads are served), then back to a primary. Its data stays: a replica drops it only on a sync."""
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            await control.execute_command("REPLICAOF", "127.0.0.1", str(unused.getsockname()[1]))
            try:
                await asyncio.sleep(READONLY_S)  # the refusal is the fault: it lasts this long
            finally:
                await control.execute_command("REPLICAOF", "NO", "ONE")
        return f"Redis read-only (REPLICAOF an absent primary) for {READONLY_S:.0f}s, then a primary again"

    async def _loading(self, control: redis.asyncio.Redis) -> str:
        """Redis loading its AOF again (`DEBUG LOADAOF`), slowed so that it answers LOADING for seconds."""
        if not self.padded:
            await slow_next_aof_load(control)
            self.padded = True
        else:
            await control.config_set("key-load-delay", 10_000)
        began = time.monotonic()
        try:
            await control.execute_command("DEBUG", "LOADAOF")
        finally:
            await control.config_set("key-load-delay", 0)
        return f"Redis reloaded its AOF, answering LOADING, for {time.monotonic() - began:.1f}s"

    #: How long a replica may take to be healthy again once its partition healed (its Redis socket timeout,
    #: then its backoff between two tries to reach Redis, both 5 s at most, and a poll).
    PARTITION_RECOVERY_S = 30.0

    async def _partition(self, replica: Replica, server: str) -> str:
        """Blackhole one replica's path to `server` (redis or postgres) for 3-6 s while the others stay connected,
        then heal it: the replica must ride it out by itself, alive, and be healthy again without a restart."""
        proxy = replica.redis_proxy if server == "redis" else replica.pg_proxy
        assert proxy is not None, f"replica {replica.name} was not added with add_replica(..., proxied=True)"
        cut_s = self.rng.uniform(3, 6)
        # Its health key lapses while it cannot reach Redis: the watcher leaves it to this check meanwhile.
        self.stopping.add(replica.name)
        try:
            proxy.set("blackhole")
            await asyncio.sleep(cut_s)  # the partition is the fault: it lasts this long
            proxy.heal()
            what = f"{replica.name} cut off from {server} for {cut_s:.1f}s"
            try:
                back_s = await self.cluster.wait_healthy(replica, timeout=self.PARTITION_RECOVERY_S)
            except AssertionError as exc:  # it exited, or stayed unhealthy
                self.exits.append(Exit(replica.name, self.now(), f"after {what}: {exc}"[:300], _tail(replica)))
                if not replica.alive():
                    replica.start()
                return f"{what}; NOT healthy again"
            return f"{what}, healthy {back_s:.1f}s after the heal"
        finally:
            self.unhealthy_since.pop(replica.name, None)
            self.stopping.discard(replica.name)

    async def _sigkill(self, replica: Replica) -> None:
        self.stopping.add(replica.name)
        try:
            replica.kill()
            self.sigkills.append((replica.name, time.time()))
            await self._restart(replica)
        finally:
            self.stopping.discard(replica.name)

    async def _sigterm(self, replica: Replica) -> str:
        self.stopping.add(replica.name)
        try:
            replica.terminate()
            began = time.monotonic()
            limit = self.shutdown_grace_s + 20
            try:
                code = await replica.wait_exit(timeout=limit)
            except AssertionError:
                self.exits.append(
                    Exit(replica.name, self.now(), f"still running {limit:.0f}s after SIGTERM", _tail(replica))
                )
                replica.kill()
                self.sigkills.append((replica.name, time.time()))
                what = f"{replica.name} ignored SIGTERM for {limit:.0f}s, SIGKILLed"
            else:
                if code != 0:
                    self.exits.append(
                        Exit(replica.name, self.now(), f"exited with code {code} on SIGTERM", _tail(replica))
                    )
                what = f"{replica.name} stopped in {time.monotonic() - began:.1f}s (code {code})"
            await self._restart(replica)
            return what + " and restarted"
        finally:
            self.stopping.discard(replica.name)

    async def _restart(self, replica: Replica) -> None:
        """Start the replica again under the same replica id, as compose restarts a container."""
        self.unhealthy_since.pop(replica.name, None)
        # A SIGKILLed replica's health key lives on for a second or two: the new process must make its own.
        conn = await client.connect(self.cluster.redis_url)
        try:
            key = f"site_generation:health-check:{replica.name}"

            async def key_gone() -> bool:
                return not await conn.exists(key)

            await wait_until(key_gone, 15, interval=0.1, what=f"the health key of the stopped {replica.name} to expire")
        finally:
            await conn.aclose()
        replica.start()
        try:
            await self.cluster.wait_healthy(replica, timeout=60)
        except AssertionError as exc:
            self.exits.append(Exit(replica.name, self.now(), f"did not come back healthy: {exc}"[:300], _tail(replica)))
            if not replica.alive():
                replica.start()

    async def all_up(self) -> None:
        """After the schedule: both servers and every replica running (a fault cut short is repaired)."""
        services = self.cluster.services
        if not services.redis.is_running():
            await asyncio.to_thread(services.redis.start)
        self.redis_up.set()
        if not services.postgres.is_running():
            await asyncio.to_thread(services.postgres.start)
        for replica in self.cluster.replicas:
            if not replica.alive():
                replica.start()

    def summary(self) -> str:
        parts = [f"{kind} x{count}" for kind, count in sorted(self.injected.items())]
        return ", ".join(parts) or "none"


def _tail(replica: Replica, chars: int = 3000) -> str:
    return f"--- tail of {replica.log_path.name}:\n{_printable(replica.log()[-chars:])}"


def _printable(text: str) -> str:
    """Log text fit for a terminal: the junk bodies the provider sent are logged with their NUL bytes."""
    return text.replace("\x00", "\\x00")


def replica_lines(cluster: Cluster, order_id: int, limit: int = 6) -> str:
    """The last lines the replicas logged about an order (its job and its generation), oldest first."""
    marks = (f"order={order_id} ", f"generate_site:{order_id}:")
    found: list[str] = []
    for replica in cluster.replicas:
        found += [line for line in replica.log().splitlines() if any(m in line for m in marks)]
    found.sort()  # every line starts with its time of day
    return " | ".join(_printable(line)[:300] for line in found[-limit:]) or "none"


def progress_trouble(cluster: Cluster) -> list[str]:
    """What each replica logged about progress rows it could not write."""
    notes = []
    for replica in cluster.replicas:
        lines = [line for line in replica.log().splitlines() if "progress row" in line]
        if lines:
            notes.append(
                f"replica {replica.name} logged {len(lines)} progress-row warnings; last: {_printable(lines[-1])[:400]}"
            )
    return notes


# --------------------------------------------------------------------------- the checks


@dataclass
class Verdict:
    """Each invariant with the violations found (empty: it held)."""

    checks: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def check(self, name: str) -> list[str]:
        return self.checks.setdefault(name, [])

    @property
    def failed(self) -> dict[str, list[str]]:
        return {name: found for name, found in self.checks.items() if found}

    def report(self) -> str:
        lines = []
        for name, found in self.checks.items():
            lines.append(f"  [{'FAILED' if found else 'held'}] {name}" + (f" ({len(found)})" if found else ""))
        return "\n".join(lines)

    def details(self, limit: int = 12) -> str:
        out = [f"note: {note}" for note in self.notes]
        for name, found in self.failed.items():
            out.append(f"=== {name}: {len(found)} violation(s)")
            out.extend(f"- {v}" for v in found[:limit])
            if len(found) > limit:
                out.append(f"  ... and {len(found) - limit} more")
        return "\n".join(out)


async def latest_statuses(cluster: Cluster, orders: list[int]) -> dict[int, str] | None:
    """The status of each order's latest generation; None while PostgreSQL cannot answer."""
    try:
        return await cluster.statuses(orders)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return None


async def wait_terminal(cluster: Cluster, orders: list[int], timeout: float) -> tuple[float, bool]:
    """(seconds waited, whether every order's latest generation became terminal within `timeout`)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        statuses = await latest_statuses(cluster, orders)
        if statuses is not None and len(statuses) == len(orders) and all(s in TERMINAL for s in statuses.values()):
            return time.monotonic() - started, True
        await asyncio.sleep(0.5)
    return time.monotonic() - started, False


async def check_everything(cluster: Cluster, chaos: Chaos, files_before: set[str]) -> Verdict:
    plan = chaos.plan
    orders = plan.orders
    verdict = Verdict()
    conn = await cluster.connect()
    try:
        generations = await conn.fetch(
            "SELECT id, order_id, status, current_phase, attempt, error, replica_id, finished_at "
            "FROM site_generations WHERE order_id = ANY($1::bigint[]) ORDER BY order_id, id",
            orders,
        )
        phases = await conn.fetch(
            "SELECT p.generation_id, g.order_id, p.phase, p.completed_at FROM site_generation_phases p "
            "JOIN site_generations g ON g.id = p.generation_id WHERE g.order_id = ANY($1::bigint[])",
            orders,
        )
        logs = await conn.fetch(
            "SELECT order_id, generation_id, replica_id, phase, message, created_at FROM site_generation_logs "
            "WHERE order_id = ANY($1::bigint[]) ORDER BY order_id, created_at, id",
            orders,
        )
    finally:
        await conn.close()
    by_order: dict[int, list[asyncpg.Record]] = {}
    for g in generations:
        by_order.setdefault(g["order_id"], []).append(g)
    logs_of: dict[int, list[asyncpg.Record]] = {}
    for row in logs:
        logs_of.setdefault(row["order_id"], []).append(row)

    def evidence(order_id: int) -> str:
        rows = logs_of.get(order_id, [])[-8:]
        recent = "; ".join(f"{r['replica_id']}: {r['message'][:160]}" for r in rows)
        return f"last progress rows: {recent or 'none'}\n    replica log lines: {replica_lines(cluster, order_id)}"

    # 1. Every order ends terminal; 2. as expected: succeeded, or failed with a stored, final error if doomed.
    terminal = verdict.check("every order terminal (none missing, queued or running)")
    expected = verdict.check(
        "every order ends as expected (succeeded; doomed: failed with a stored, non-retryable error)"
    )
    succeeded: dict[int, asyncpg.Record] = {}
    for order_id in orders:
        mine = by_order.get(order_id, [])
        if not mine:
            terminal.append(
                f"order {order_id}: no generation at all (its job never ran: lost?); faults: {plan.faults_of(order_id)}"
            )
            continue
        latest = mine[-1]
        status, error = latest["status"], latest["error"]
        what = (
            f"order {order_id} (faults: {plan.faults_of(order_id)}): generation {latest['id']} {status} at phase "
            f"{latest['current_phase']}, attempt {latest['attempt']}, replica {latest['replica_id']}"
        )
        if status not in TERMINAL:
            terminal.append(f"{what}; last error: {_error_text(error)}; {evidence(order_id)}")
            continue
        if status == "succeeded":
            succeeded[order_id] = latest
        if order_id in plan.doomed:
            if status != "failed":
                expected.append(f"{what}: a doomed order must fail; {evidence(order_id)}")
            elif not error:
                expected.append(f"{what}: failed without a stored error")
            elif error.get("retryable"):
                expected.append(
                    f"{what}: failed with a retryable error (retried until its tries ran out): {_error_text(error)}"
                )
        elif status != "succeeded":
            expected.append(f"{what}: error {_error_text(error)}; {evidence(order_id)}")

    # 2b. A failure is the order's own (a deterministic fault), never the infrastructure's: no store's error, no
    #     attempts used up by faults that were not the job's, no provider outage the retries did not ride out.
    infra = verdict.check("no generation failed for an infrastructure cause")
    for g in generations:
        error = g["error"] if isinstance(g["error"], dict) else {}
        if g["status"] == "failed" and (error.get("type") not in OWN_FAILURES or g["order_id"] not in plan.doomed):
            infra.append(
                f"order {g['order_id']} (faults: {plan.faults_of(g['order_id'])}): generation {g['id']} failed: "
                f"{_error_text(g['error'])}; {evidence(g['order_id'])}"
            )

    # 3. One generation per order (each was enqueued once, never with regenerate), so never two succeeded.
    once = verdict.check("one generation per order, at most one succeeded (phases committed once)")
    for order_id, mine in by_order.items():
        if len(mine) > 1:
            listed = ", ".join(f"{g['id']}:{g['status']}@{g['current_phase']}" for g in mine)
            wins = sum(g["status"] == "succeeded" for g in mine)
            once.append(f"order {order_id}: {len(mine)} generations ({listed}); {wins} succeeded")

    # 4. Every succeeded site's files match its manifest.
    sites = verdict.check("every succeeded site matches its manifest")
    for order_id in succeeded:
        try:
            cluster._check_site_files(order_id)
        except (AssertionError, OSError, ValueError, KeyError) as exc:
            sites.append(f"order {order_id}: {type(exc).__name__}: {exc}")

    # 5. No model call for a phase once that phase was committed (in any generation of the order).
    committed: dict[tuple[int, str], float] = {}
    for p in phases:
        key = (p["order_id"], p["phase"])
        committed[key] = min(committed.get(key, float("inf")), p["completed_at"].timestamp())
    late = verdict.check("no model call for a phase after it committed")
    for request in cluster.fake.requests:
        try:
            order_id, task = order_of_request(request.body)
        except (KeyError, ValueError, TypeError, IndexError):
            continue
        done_at = committed.get((order_id, PHASE_OF_TASK[task]))
        if done_at is not None and request.wall > done_at + 0.5:
            late.append(
                f"order {order_id}: a {task} call at {request.wall:.3f} ({request.fault}) came "
                f"{request.wall - done_at:.1f}s after phase {PHASE_OF_TASK[task]} committed"
            )

    # 6. Every succeeded generation has progress rows for all four phases.
    rows = verdict.check('every succeeded generation has a "phase X done" row for plan, content, code and assemble')
    for order_id, g in succeeded.items():
        seen = {
            r["message"].split()[1]
            for r in logs_of.get(order_id, [])
            if r["generation_id"] == g["id"] and r["message"].startswith("phase ") and r["message"].endswith(" done")
        }
        missing = [p for p in PHASES if p not in seen]
        if not missing:
            continue
        done_at = {p["phase"]: p["completed_at"].timestamp() for p in phases if p["generation_id"] == g["id"]}
        lost = _lost_with_sigkill(cluster, chaos, missing, done_at)
        if lost:
            verdict.notes.append(f"order {order_id}: progress rows of {', '.join(missing)} {lost}")
            continue
        rows.append(
            f"order {order_id} generation {g['id']}: no progress row for {', '.join(missing)}; {evidence(order_id)}"
        )

    if rows:
        verdict.notes += progress_trouble(cluster)

    # 7. Only the claim holder wrote about a generation.
    owner = verdict.check("no order ran on two replicas at once")
    try:
        _check_single_owner(logs)
    except AssertionError as exc:
        owner.append(str(exc))

    # 8. No replica exited on its own, ignored a SIGTERM or wedged.
    verdict.check("no replica exited on its own, hung on SIGTERM or wedged").extend(str(e) for e in chaos.exits)

    # 9. Nothing written outside the output directory.
    outside = verdict.check("nothing written outside the output directory")
    ours = {f"{order_id}" for order_id in orders} | {f".{o}.{s}" for o in orders for s in ("build", "old")}
    for path in _walk(cluster.workdir):
        rel = path.relative_to(cluster.workdir)
        if rel.parts[0] == "sites":
            if len(rel.parts) > 1 and rel.parts[1] not in ours:
                outside.append(f"{rel}: in the output directory, but not an order's folder")
        elif not (len(rel.parts) == 1 and rel.suffix == ".log"):
            outside.append(f"{path}: outside the output directory")
    for path in sorted(repository_files() - files_before)[:20]:
        outside.append(f"{path}: new in the repository (the replicas' working directory)")
    return verdict


def _lost_with_sigkill(cluster: Cluster, chaos: Chaos, missing: list[str], done_at: dict[str, float]) -> str:
    """Why the rows of the `missing` phases may legitimately be absent, or "": a replica keeps progress rows in
    memory for the moment it takes to write them, and loses them if it is SIGKILLed in that moment. Only a
    kill at most 1.5 s after every missing phase committed, with no progress-row warning logged by that replica
    in between (rows held back by a failing writer are a defect, not bad luck), counts."""
    if any(phase not in done_at for phase in missing):
        return ""
    first, last = min(done_at[p] for p in missing), max(done_at[p] for p in missing)
    for name, killed_at in chaos.sigkills:
        if not 0 <= killed_at - last <= 1.5:
            continue
        replica = next(r for r in cluster.replicas if r.name == name)
        window = (_clock(first - 1), _clock(killed_at))
        warned = [
            line
            for line in replica.log().splitlines()
            if "progress row" in line and window[0] <= line[:12] <= window[1]
        ]
        if not warned:
            return f"lost with replica {name}, SIGKILLed {killed_at - last:.2f}s after the last of them committed"
    return ""


def _clock(at: float) -> str:
    """`at` (time.time()) as the replicas' log lines start: local time of day with milliseconds."""
    return time.strftime("%H:%M:%S", time.localtime(at)) + f".{int(at % 1 * 1000):03d}"


def _error_text(error: Any) -> str:
    if not error:
        return "none"
    return f"{error.get('type')}: {str(error.get('message'))[:300]} (retryable={error.get('retryable')})"


def _walk(root: Path) -> Iterator[Path]:
    for folder, _, files in os.walk(root):
        for name in files:
            yield Path(folder) / name


_SKIP = {".git", ".venv", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", "node_modules"}


def repository_files(root: Path | None = None) -> set[str]:
    """Every file of the repository outside caches: a replica's cwd is the repository."""
    base = root or ROOT
    found = set()
    for folder, dirs, files in os.walk(base):
        dirs[:] = [d for d in dirs if d not in _SKIP]
        found.update(str(Path(folder, name).relative_to(base)) for name in files)
    return found
