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
retried. Some orders, once their site is generated, are sent several edits at once (issue 22), a
rollback to version 1 after them for a few, and one an edit the provider refuses between two it carries
out: each must be applied exactly once, in the order sent (the refused one failed, with its error
stored), and each order's live version must be on disk exactly as PostgreSQL holds it. The plan depends
only on the seed, so SOAK_SEED replays the same faults against the same orders (their timing against the
replicas' work still varies from run to run).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
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
#: Edits the offline answers carry out (worker/local/offline_edits.py, which the fake provider answers with).
EDIT_INSTRUCTIONS = (
    "Make the header blue",
    "Change the phone number to 555-0199",
    "Add a pricing page",
    "Make the header green",
    "Change the phone number to +1 555 0100",
    "Add a gallery page",
)
#: An edit the offline answers refuse: it fails (EditFailed, not retried) and leaves the live version.
DOOMED_EDIT = "Write me a poem about the sea"
#: The error of a refused edit.
EDIT_FAILURE = "EditFailed"


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
    #: order -> the edits ("edit", instruction) and rollbacks ("rollback", version) sent at once, in this order,
    #: when its generation has succeeded.
    edits: dict[int, list[tuple[str, Any]]] = field(default_factory=dict)

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
    # Drawn last, so a seed's faults are those it drew before edits were planned. Orders that arrive in the first
    # half of the soak, so their edits meet the faults and end before the drain.
    early = [order for order in orders if arrivals[order] <= 0.5 * soak_s and order not in doomed]
    edited = rng.sample(early, min(len(early), max(4, n_orders // 8)))
    edits: dict[int, list[tuple[str, Any]]] = {}
    for i, order in enumerate(edited):
        count = 3 if i < 3 else rng.choice((1, 2, 3))
        sequence: list[tuple[str, Any]] = [("edit", text) for text in rng.sample(EDIT_INSTRUCTIONS, count)]
        if i == 0:
            sequence.insert(1, ("edit", DOOMED_EDIT))  # refused between two edits that are applied
        if i in (1, 2):
            sequence.append(("rollback", 1))
        edits[order] = sequence
    return Plan(seed, soak_s, orders, arrivals, schedule, provider, doomed, edits)


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
class SentEdit:
    """An edit or rollback job the soak sent: its job id, what it asks, and when (seconds into the soak)."""

    order_id: int
    job_id: str
    kind: str
    arg: Any
    at_s: float

    @property
    def doomed(self) -> bool:
        return self.kind == "edit" and self.arg == DOOMED_EDIT

    def __str__(self) -> str:
        what = f"edit {self.arg!r}" if self.kind == "edit" else f"rollback to version {self.arg}"
        return f"{what} (job {self.job_id}, sent at {self.at_s:.1f}s)"


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
    #: order -> the edits and rollbacks sent for it, in the order sent.
    sent_edits: dict[int, list[SentEdit]] = field(default_factory=dict)
    #: Orders whose edits are planned but not sent yet (their generation has not succeeded yet).
    edits_pending: set[int] = field(default_factory=set)
    rng: random.Random = field(init=False)

    #: A replica refreshes its health key every second (SITEGEN_WORKER__HEALTH_CHECK_INTERVAL_S=1).
    WEDGED_AFTER_S = 10.0
    #: Between the end of one fault and the start of the next, whatever the schedule says.
    MIN_GAP_S = 3.0

    def __post_init__(self) -> None:
        self.rng = random.Random(f"chaos:{self.plan.seed}")
        self.redis_up.set()
        self.edits_pending = set(self.plan.edits)

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

    async def send_edits(self) -> None:
        """Once an order's generation has succeeded, send its planned edits and rollbacks at once, in order, as an
        upstream app would (a generation that failed gets none: its own check reports it)."""
        while self.edits_pending:
            await asyncio.sleep(0.5)
            statuses = await generation_statuses(self.cluster, sorted(self.edits_pending))
            for order_id, status in (statuses or {}).items():
                if status == "succeeded":
                    for kind, arg in self.plan.edits[order_id]:
                        await self._send_edit(order_id, kind, arg)
                if status in TERMINAL:
                    self.edits_pending.discard(order_id)

    async def _send_edit(self, order_id: int, kind: str, arg: Any) -> None:
        # The job id is made here, as `client.enqueue_edit` makes it (its last part sorts by send time), so that an
        # enqueue sent again after Redis failed under it is the same job (arq drops the second), never a second edit.
        function = client.EDIT_FUNCTION if kind == "edit" else client.ROLLBACK_FUNCTION
        job_id = f"{function}:{order_id}:{client.send_key()}"
        kwargs: dict[str, Any] = {"base_version": None, "pages": None} if kind == "edit" else {}
        while True:
            await self.redis_up.wait()
            try:
                conn = await client.connect(self.cluster.redis_url)
                try:
                    await conn.enqueue_job(
                        function, order_id, arg, **kwargs, _job_id=job_id, _queue_name=client.QUEUE_NAME
                    )
                finally:
                    await conn.aclose()
                break
            except (OSError, redis.exceptions.RedisError):
                await asyncio.sleep(0.2)
        self.sent_edits.setdefault(order_id, []).append(SentEdit(order_id, job_id, kind, arg, self.now()))

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


def replica_lines(cluster: Cluster, order_id: int, limit: int = 10) -> str:
    """The last lines the replicas logged about an order (its job and its generation), oldest first."""
    marks = (f"order={order_id} ", *(f"{function}:{order_id}:" for function in client.JOB_FUNCTIONS))
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


async def generation_statuses(cluster: Cluster, orders: list[int]) -> dict[int, str] | None:
    """The status of each order's latest generation (not an edit or rollback); None while PostgreSQL cannot answer."""
    try:
        conn = await cluster.connect()
        try:
            rows = await conn.fetch(
                "SELECT DISTINCT ON (order_id) order_id, status FROM site_generations "
                "WHERE order_id = ANY($1::bigint[]) AND kind = 'generation' ORDER BY order_id, id DESC",
                orders,
            )
        finally:
            await conn.close()
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return None
    return {r["order_id"]: r["status"] for r in rows}


latest_statuses = generation_statuses


async def _edits_ended(cluster: Cluster, chaos: Chaos) -> bool:
    """Whether every edit the soak planned was sent, and every one sent has ended (its run is terminal)."""
    if chaos.edits_pending:
        return False
    job_ids = [e.job_id for sent in chaos.sent_edits.values() for e in sent]
    if not job_ids:
        return True
    try:
        conn = await cluster.connect()
        try:
            ended = await conn.fetchval(
                "SELECT count(*) FROM site_generations WHERE job_id = ANY($1::text[]) AND status = ANY($2::text[])",
                job_ids,
                list(TERMINAL),
            )
        finally:
            await conn.close()
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    return bool(ended == len(job_ids))


async def wait_terminal(
    cluster: Cluster, orders: list[int], timeout: float, chaos: Chaos | None = None
) -> tuple[float, bool]:
    """(seconds waited, whether every order's latest generation, and every edit and rollback `chaos` sent, became
    terminal within `timeout`)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        statuses = await generation_statuses(cluster, orders)
        if statuses is not None and len(statuses) == len(orders) and all(s in TERMINAL for s in statuses.values()):
            if chaos is None or await _edits_ended(cluster, chaos):
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
            "FROM site_generations WHERE order_id = ANY($1::bigint[]) AND kind = 'generation' ORDER BY order_id, id",
            orders,
        )
        phases = await conn.fetch(
            "SELECT p.generation_id, g.order_id, p.phase, p.completed_at FROM site_generation_phases p "
            "JOIN site_generations g ON g.id = p.generation_id "
            "WHERE g.order_id = ANY($1::bigint[]) AND g.kind = 'generation'",
            orders,
        )
        logs = await conn.fetch(
            "SELECT order_id, generation_id, replica_id, phase, message, created_at FROM site_generation_logs "
            "WHERE order_id = ANY($1::bigint[]) ORDER BY order_id, created_at, id",
            orders,
        )
        edit_runs = await conn.fetch(
            "SELECT id, order_id, kind, status, job_id, error, version, attempt, replica_id, current_phase, request, "
            "job_enqueued_at, created_at, started_at, finished_at "
            "FROM site_generations WHERE order_id = ANY($1::bigint[]) AND kind <> 'generation' ORDER BY id",
            orders,
        )
        versions = await conn.fetch(
            "SELECT order_id, number, parent, kind, generation_id, instruction, rolled_back_to FROM site_versions "
            "WHERE order_id = ANY($1::bigint[]) ORDER BY order_id, number",
            orders,
        )
        version_files = await conn.fetch(
            "SELECT order_id, number, path, sha256 FROM site_version_files WHERE order_id = ANY($1::bigint[])", orders
        )
        live = await conn.fetch(
            "SELECT o.id AS order_id, o.live_version, f.path, b.content FROM site_orders o "
            "LEFT JOIN site_version_files f ON f.order_id = o.id AND f.number = o.live_version "
            "LEFT JOIN site_blobs b ON b.sha256 = f.sha256 WHERE o.id = ANY($1::bigint[])",
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

    # 7. Only the claim holder wrote about a generation, an edit or a rollback.
    owner = verdict.check("no order ran on two replicas at once")
    edit_ids = {r["id"] for r in edit_runs}
    try:
        _check_single_owner([row for row in logs if row["generation_id"] not in edit_ids])
    except AssertionError as exc:
        owner.append(str(exc))
    owner.extend(_runs_owned_once([row for row in logs if row["generation_id"] in edit_ids]))

    _check_edits(verdict, cluster, chaos, edit_runs, versions, version_files, live, evidence)

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


def _check_edits(
    verdict: Verdict,
    cluster: Cluster,
    chaos: Chaos,
    runs: list[asyncpg.Record],
    versions: list[asyncpg.Record],
    version_files: list[asyncpg.Record],
    live: list[asyncpg.Record],
    evidence: Callable[[int], str],
) -> None:
    """The edits' and versions' invariants (issue 22)."""
    run_of_job = {r["job_id"]: r for r in runs}
    versions_of_run: dict[int, list[asyncpg.Record]] = {}
    for v in versions:
        versions_of_run.setdefault(v["generation_id"], []).append(v)

    # 10. Every edit and rollback sent ends exactly once: applied (one version made by its run), or, the refused one,
    #     failed with its error stored; never twice, never lost, never left waiting.
    once = verdict.check(
        "every edit and rollback ends exactly once: applied with one version (the refused one failed, error stored)"
    )
    sent_jobs = {e.job_id for sent in chaos.sent_edits.values() for e in sent}
    for order_id, sent in sorted(chaos.sent_edits.items()):
        for edit in sent:
            run = run_of_job.get(edit.job_id)
            made = versions_of_run.get(run["id"], []) if run is not None else []
            what = f"order {order_id}: {edit}"
            if run is None:
                once.append(f"{what}: never registered (its job was lost?); {evidence(order_id)}")
                continue
            what += f": run {run['id']} {run['status']} (attempt {run['attempt']}, replica {run['replica_id']})"
            if edit.doomed:
                error = run["error"] if isinstance(run["error"], dict) else {}
                if run["status"] != "failed" or error.get("type") != EDIT_FAILURE or made:
                    once.append(
                        f"{what}, error {_error_text(run['error'])}, versions {[v['number'] for v in made]}: "
                        f"a refused edit must fail with {EDIT_FAILURE} and make no version; {evidence(order_id)}"
                    )
            elif run["status"] != "succeeded" or len(made) != 1 or run["version"] != made[0]["number"]:
                once.append(
                    f"{what} at phase {run['current_phase']}, error {_error_text(run['error'])}, versions "
                    f"{[v['number'] for v in made]} (its run says {run['version']}); {evidence(order_id)}"
                )
    for run in runs:
        if run["job_id"] not in sent_jobs:
            once.append(f"order {run['order_id']}: run {run['id']} ({run['kind']}, job {run['job_id']}) was never sent")

    # 11. Versions are numbered 1..n, each the child of the one before; the edits and rollbacks of an order made theirs
    #     in the order they were sent; a rollback holds exactly the files of the version it went back to.
    order_check = verdict.check(
        "versions 1..n without gaps; edits and rollbacks applied in the order sent; a rollback has its version's files"
    )
    files_of: dict[tuple[int, int], dict[str, str]] = {}
    for f in version_files:
        files_of.setdefault((f["order_id"], f["number"]), {})[f["path"]] = f["sha256"]
    by_order: dict[int, list[asyncpg.Record]] = {}
    for v in versions:
        by_order.setdefault(v["order_id"], []).append(v)
    sent_index = {e.job_id: i for sent in chaos.sent_edits.values() for i, e in enumerate(sent)}
    sent_of_job = {e.job_id: e for sent in chaos.sent_edits.values() for e in sent}
    job_of_run = {r["id"]: r["job_id"] for r in runs}

    def timeline(order_id: int) -> str:
        """When each edit or rollback of the order was sent, registered (its first claim), started and ended."""
        lines = []
        for run in sorted((r for r in runs if r["order_id"] == order_id), key=lambda r: r["job_enqueued_at"]):
            edit = sent_of_job.get(run["job_id"])
            lines.append(
                f"#{sent_index.get(run['job_id'], -2) + 1} {edit or run['job_id']}: run {run['id']} "
                f"enqueued {_time(run['job_enqueued_at'])}, registered {_time(run['created_at'])}, "
                f"started {_time(run['started_at'])} by {run['replica_id']} (attempt {run['attempt']}), "
                f"ended {_time(run['finished_at'])} {run['status']}, version {run['version']}"
            )
        return "\n      ".join(lines)

    for order_id, mine in sorted(by_order.items()):
        numbers = [v["number"] for v in mine]
        parents = [v["parent"] for v in mine]
        if numbers != list(range(1, len(mine) + 1)) or parents != [None, *numbers[:-1]]:
            order_check.append(f"order {order_id}: versions {numbers} with parents {parents}")
        applied = [(v["number"], sent_index.get(job_of_run.get(v["generation_id"], ""), -1)) for v in mine[1:]]
        if [i for _, i in applied] != sorted(i for _, i in applied) or any(i < 0 for _, i in applied):
            listed = ", ".join(f"version {n}: sent #{i + 1}" for n, i in applied)
            order_check.append(
                f"order {order_id}: not in the order sent ({listed}):\n      {timeline(order_id)}\n    "
                f"{evidence(order_id)}"
            )
        for v in mine:
            if v["kind"] == "rollback" and files_of.get((order_id, v["number"])) != files_of.get(
                (order_id, v["rolled_back_to"])
            ):
                order_check.append(
                    f"order {order_id}: version {v['number']} (rollback) does not hold the files of version "
                    f"{v['rolled_back_to']}"
                )
        if mine[0]["kind"] != "generation" or any(v["kind"] == "generation" for v in mine[1:]):
            order_check.append(f"order {order_id}: versions made by {[v['kind'] for v in mine]}")

    # 12. The live version is the newest, and `<output.dir>/<order_id>/` holds exactly its files.
    on_disk = verdict.check("the live version is the newest, and exactly its files are on disk")
    live_files: dict[int, dict[str, bytes]] = {}
    live_number: dict[int, int | None] = {}
    for row in live:
        live_number[row["order_id"]] = row["live_version"]
        if row["path"] is not None:
            live_files.setdefault(row["order_id"], {})[row["path"]] = row["content"]
    for order_id, number in sorted(live_number.items()):
        newest = by_order[order_id][-1]["number"] if order_id in by_order else None
        if number != newest:
            on_disk.append(f"order {order_id}: live version {number}, newest {newest}")
        if number is None:
            continue
        site = cluster.output_dir / str(order_id)
        disk = {p.relative_to(site).as_posix(): p.read_bytes() for p in site.rglob("*") if p.is_file()}
        expected = live_files.get(order_id, {})
        if disk != expected:
            differ = sorted(p for p in disk.keys() | expected.keys() if disk.get(p) != expected.get(p))
            on_disk.append(
                f"order {order_id}: the files on disk are not those of live version {number}: {differ[:8]} differ "
                f"(on disk only: {sorted(disk.keys() - expected.keys())[:5]}, "
                f"missing: {sorted(expected.keys() - disk.keys())[:5]}); {evidence(order_id)}"
            )


#: Rows about an edit or rollback written by a replica that does not run it (it waits, found it ended, lost it).
_EDIT_BYSTANDER = ("edit waiting:", "rollback waiting:", "sweeper:", "could not start", "stopped: ")
_EDIT_LEFTOVER = re.compile(
    r"^((edit|rollback) \d+ already ended \w+: this job has nothing left to do|"
    r"(edit|rollback) was cancelled before this job could run: nothing to do)$"
)


def _runs_owned_once(logs: list[asyncpg.Record]) -> list[str]:
    """Each edit's or rollback's progress rows, in time order: only the replica that last started or resumed it
    writes about it until another one takes over."""
    owner: dict[int, str] = {}
    found = []
    for row in logs:
        message: str = row["message"]
        if message.startswith(_EDIT_BYSTANDER) or _EDIT_LEFTOVER.match(message):
            continue
        if re.match(r"^(edit|rollback) (started|resumed)", message):
            owner[row["generation_id"]] = row["replica_id"]
            continue
        expected = owner.get(row["generation_id"])
        if expected != row["replica_id"]:
            found.append(
                f"order {row['order_id']} run {row['generation_id']}: {row['replica_id']} wrote {message[:200]!r} at "
                f"{row['created_at']} while {expected} owned it"
            )
    return found


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


def _time(at: Any) -> str:
    """A PostgreSQL timestamp as the time of day the replicas' log lines start with (local time), or '-'."""
    return at.astimezone().strftime("%H:%M:%S.%f")[:-3] if at is not None else "-"


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


#: `.hypothesis`: the test process's own (test_claim_model.py, run beside the soak), not a replica's.
_SKIP = {
    ".git",
    ".venv",
    "__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".hypothesis",
    "node_modules",
}


def repository_files(root: Path | None = None) -> set[str]:
    """Every file of the repository outside caches: a replica's cwd is the repository."""
    base = root or ROOT
    found = set()
    for folder, dirs, files in os.walk(base):
        dirs[:] = [d for d in dirs if d not in _SKIP]
        found.update(str(Path(folder, name).relative_to(base)) for name in files)
    return found
