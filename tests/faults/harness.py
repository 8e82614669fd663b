"""A small cluster for fault tests: real `arq worker.main.WorkerSettings` replicas as processes, their own
PostgreSQL and Redis, and the fake provider, with ways to kill, restart and wait on them."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import redis.asyncio
from arq.jobs import Job

from tests.faults.proxy import FaultProxy
from tests.helpers import wait_until
from worker import client
from worker.local.fake_server import FakeProviderServer
from worker.local.services import LocalServices

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("planning", "content", "coding")


def brief_for(order_id: int) -> dict[str, Any]:
    """A brief whose business name identifies the order in every prompt the fake provider sees."""
    return {
        "business_name": f"Order {order_id} Bakery",
        "description": f"Bakery number {order_id}: sourdough, pastries and cakes made every morning.",
        "services": ["Bread", "Pastries", "Cakes"],
    }


def order_of_request(body: Any) -> tuple[int, str]:
    """(order id, task) of a request the fake provider saw."""
    prompt = body["messages"][-1]["content"]
    inputs = json.loads(prompt[prompt.rindex("<input>") + 7 : prompt.index("</input>")])
    order_id = int(inputs["brief"]["business_name"].split()[1])
    task = "coding" if "content" in inputs else "content" if "plan" in inputs else "planning"
    return order_id, task


@dataclass
class Replica:
    name: str
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    #: With `Cluster.add_replica(..., proxied=True)`: this replica's own path to Redis and to PostgreSQL, to
    #: partition it alone (`blackhole`), slow it, reset or half-close its connections while the others stay connected.
    redis_proxy: FaultProxy | None = None
    pg_proxy: FaultProxy | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "arq", "worker.main.WorkerSettings"],
            cwd=ROOT,
            env={**self.env, "SITEGEN_WORKER__REPLICA_ID": self.name},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the process stays, silent, as a replica stalled by its host (swapping, a VM paused)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def terminate(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    async def wait_exit(self, timeout: float) -> int:
        assert self.process is not None
        process = self.process
        await wait_until(lambda: _exited(process), timeout, what=f"replica {self.name} to exit")
        return process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _proxy_for(url: str, name: str) -> FaultProxy:
    """A started FaultProxy to the host and port `url` names."""
    parts = urlsplit(url)
    assert parts.hostname and parts.port, f"{name}: {url!r} names no host and port to proxy"
    return FaultProxy(parts.hostname, parts.port, name=name).start()


async def _exited(process: subprocess.Popen[bytes]) -> bool:
    return process.poll() is not None


@dataclass
class Cluster:
    services: LocalServices
    fake: FakeProviderServer
    workdir: Path
    settings_env: dict[str, str] = field(default_factory=dict)
    replicas: list[Replica] = field(default_factory=list)
    #: Override the services' URLs (e.g. with credentials in them).
    database_url: str = ""
    redis_url: str = ""

    def __post_init__(self) -> None:
        self.database_url = self.database_url or self.services.database_url
        self.redis_url = self.redis_url or self.services.redis_url

    @property
    def output_dir(self) -> Path:
        return self.workdir / "sites"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SITEGEN_")}
        env.update(
            DATABASE_URL=self.database_url,
            REDIS_URL=self.redis_url,
            PYTHONPATH=str(ROOT),
            SITEGEN_OUTPUT__DIR=str(self.output_dir),
            SITEGEN_WORKER__HEALTH_CHECK_INTERVAL_S="1",
            SITEGEN_WORKER__RETRY_BACKOFF_S="0.2",
            SITEGEN_WORKER__RETRY_BACKOFF_MAX_S="2",
            SITEGEN_WORKER__JOB_TIMEOUT_S="1800",
            SITEGEN_WORKER__POLL_DELAY_S="0.05",
            SITEGEN_DATABASE__PROGRESS_WAIT_S="5",  # results are read with their progress rows
            SITEGEN_AI__PROVIDERS__FAKE__KIND="openai",
            SITEGEN_AI__PROVIDERS__FAKE__MODEL="fake-gpt",
            SITEGEN_AI__PROVIDERS__FAKE__BASE_URL=f"{self.fake.url}/v1",
            SITEGEN_AI__PROVIDERS__FAKE__API_KEY_ENV="FAULTS_FAKE_KEY",
            SITEGEN_AI__PROVIDERS__FAKE__READ_TIMEOUT_S="10",
            SITEGEN_AI__PROVIDERS__FAKE__MAX_RETRY_WAIT_S="5",
            FAULTS_FAKE_KEY="faults-key-not-secret",
            **{f"SITEGEN_AI__ROUTING__{task.upper()}": "fake" for task in TASKS},
        )
        env.update(self.settings_env)
        return env

    def add_replica(self, name: str, *, proxied: bool = False, **env: str) -> Replica:
        """Start a replica; `env` adds to (or overrides) the cluster's environment for this one only.

        `proxied`: its REDIS_URL and DATABASE_URL go through FaultProxies of its own (`replica.redis_proxy`,
        `replica.pg_proxy`), so a test can cut this replica off while the others stay connected."""
        settings = {**self.env(), **env}
        redis_proxy = pg_proxy = None
        if proxied:
            redis_proxy = _proxy_for(settings["REDIS_URL"], f"{name}-redis")
            pg_proxy = _proxy_for(settings["DATABASE_URL"], f"{name}-pg")
            settings.update(
                REDIS_URL=redis_proxy.url(settings["REDIS_URL"]), DATABASE_URL=pg_proxy.url(settings["DATABASE_URL"])
            )
        replica = Replica(name, settings, self.workdir / f"{name}.log", redis_proxy=redis_proxy, pg_proxy=pg_proxy)
        replica.start()
        self.replicas.append(replica)
        return replica

    async def wait_healthy(self, replica: Replica, timeout: float = 30) -> float:
        redis = await client.connect(self.redis_url)
        key = f"site_generation:health-check:{replica.name}"
        try:

            async def up() -> bool:
                if not replica.alive():
                    raise AssertionError(f"replica {replica.name} exited:\n{replica.log()[-3000:]}")
                return bool(await redis.exists(key))

            return await wait_until(up, timeout, what=f"replica {replica.name} to be healthy")
        finally:
            await redis.aclose()

    def stop_all(self) -> None:
        for replica in self.replicas:
            if replica.alive():
                replica.kill()
            for proxy in (replica.redis_proxy, replica.pg_proxy):
                if proxy is not None:
                    proxy.stop()

    async def enqueue(self, order_ids: list[int]) -> None:
        redis = await client.connect(self.redis_url)
        try:
            for order_id in order_ids:
                await client.enqueue_generation(redis, order_id, brief_for(order_id))
        finally:
            await redis.aclose()

    async def connect(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self.database_url)
        await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
        return conn

    @contextlib.asynccontextmanager
    async def redis_control(self) -> AsyncIterator[redis.asyncio.Redis]:
        """A connection of the test's own to the replicas' Redis (never through a replica's proxy), to make it
        refuse and recover."""
        conn = redis.asyncio.Redis.from_url(self.redis_url)
        try:
            yield conn
        finally:
            await conn.aclose()

    async def arq_check(self, replica: str) -> int:
        """`arq --check` for one replica, as ops probe it (with the cluster's own Redis URL: from outside any
        partition of that replica's); its exit code."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "arq",
            "--check",
            "worker.main.WorkerSettings",
            cwd=ROOT,
            env={**self.env(), "SITEGEN_WORKER__REPLICA_ID": replica},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return await process.wait()

    async def statuses(self, order_ids: list[int]) -> dict[int, str]:
        conn = await self.connect()
        try:
            rows = await conn.fetch(
                "SELECT DISTINCT ON (order_id) order_id, status FROM site_generations "
                "WHERE order_id = ANY($1::bigint[]) ORDER BY order_id, id DESC",
                order_ids,
            )
        finally:
            await conn.close()
        return {r["order_id"]: r["status"] for r in rows}

    async def wait_all_succeeded(self, order_ids: list[int], timeout: float) -> None:
        async def done() -> bool:
            try:
                statuses = await self.statuses(order_ids)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                return False  # PostgreSQL restarting
            failed = {o: s for o, s in statuses.items() if s == "failed"}
            if failed:
                raise AssertionError(f"orders failed: {failed}\n{await self.errors(list(failed))}")
            return len(statuses) == len(order_ids) and set(statuses.values()) == {"succeeded"}

        started = time.monotonic()
        try:
            await wait_until(done, timeout, interval=0.5, what=f"{len(order_ids)} orders to succeed")
        except AssertionError as exc:
            statuses = await self.statuses(order_ids)
            logs = "\n".join(f"--- replica {r.name}:\n{r.log()[-20_000:]}" for r in self.replicas)
            raise AssertionError(f"{exc}; statuses {statuses}\n{logs}") from None
        # A generation is `succeeded` a moment before its job returns: the job still waits for its
        # progress rows, which are in PostgreSQL by the time its result is in Redis.
        redis = await client.connect(self.redis_url)
        try:
            for order_id in order_ids:
                left = max(timeout - (time.monotonic() - started), 1.0)
                job = Job(
                    client.job_id(order_id), redis, _queue_name=client.QUEUE_NAME, _deserializer=client.deserialize
                )
                await job.result(timeout=left, poll_delay=0.05)
        finally:
            await redis.aclose()

    async def errors(self, order_ids: list[int]) -> list[Any]:
        conn = await self.connect()
        try:
            return [
                dict(r)
                for r in await conn.fetch(
                    "SELECT order_id, error FROM site_generations WHERE order_id = ANY($1::bigint[])", order_ids
                )
            ]
        finally:
            await conn.close()

    async def check_invariants(self, order_ids: list[int]) -> None:
        """Every site matches its manifest, each phase committed once, no model call after its phase committed,
        and no order ran on two replicas at once."""
        conn = await self.connect()
        try:
            for order_id in order_ids:
                self._check_site_files(order_id)
            committed = {
                (r["order_id"], r["phase"]): r["completed_at"].timestamp()
                for r in await conn.fetch(
                    "SELECT g.order_id, p.phase, p.completed_at FROM site_generation_phases p "
                    "JOIN site_generations g ON g.id = p.generation_id WHERE g.status = 'succeeded'"
                )
            }
            phase_of_task = {"planning": "plan", "content": "content", "coding": "code"}
            for request in self.fake.requests:
                order_id, task = order_of_request(request.body)
                done_at = committed.get((order_id, phase_of_task[task]))
                assert done_at is not None and request.wall <= done_at + 0.5, (
                    f"order {order_id}: a {task} call at {request.wall:.3f} came after its phase committed at {done_at}"
                )
            logs = await conn.fetch(
                "SELECT order_id, replica_id, message, created_at FROM site_generation_logs "
                "WHERE order_id = ANY($1::bigint[]) ORDER BY order_id, created_at, id",
                order_ids,
            )
        finally:
            await conn.close()
        _check_single_owner(logs)

    def _check_site_files(self, order_id: int) -> None:
        site = self.output_dir / str(order_id)
        manifest = json.loads((site / "manifest.json").read_text())
        on_disk = {p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file()} - {"manifest.json"}
        assert on_disk == {f["path"] for f in manifest["files"]}, f"order {order_id}: files differ from manifest"
        for entry in manifest["files"]:
            assert hashlib.sha256((site / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]


#: Rows written by a replica that does not run the generation (it found the order busy, or lost it).
_BYSTANDER = ("waiting:", "sweeper:", "already generated", "could not start", "stopped: generation")
#: A job that outlived its generation in Redis (its end could not be recorded) runs again and does nothing:
#: "generation N already ended <status>: this job has nothing left to do" (worker/pipeline/runner.py).
_LEFTOVER = re.compile(r"^generation \d+ already ended \w+: this job has nothing left to do$")


def _check_single_owner(logs: list[asyncpg.Record]) -> None:
    """Walk each order's progress rows in time order: only the replica that last started or resumed the
    generation may write about it until another one takes over."""
    owner: dict[int, str] = {}
    for row in logs:
        message: str = row["message"]
        if message.startswith(_BYSTANDER) or _LEFTOVER.match(message):
            continue
        if message.startswith(("generation started", "generation resumed")):
            owner[row["order_id"]] = row["replica_id"]
            continue
        expected = owner.get(row["order_id"])
        assert expected == row["replica_id"], (
            f"order {row['order_id']}: {row['replica_id']} wrote {message!r} at {row['created_at']} while "
            f"{expected} owned the generation"
        )


async def slow_next_aof_load(control: redis.asyncio.Redis, keys: int = 300) -> None:
    """Make the next load of the AOF (`DEBUG LOADAOF`, a restart) take about 3 s, Redis answering LOADING
    meanwhile: `keys` keys of 64 KiB after an AOF rewrite (its RDB preamble is where `key-load-delay`
    applies, 10 ms a key), so that Redis 6, which serves clients once per 2 MB loaded, answers every 0.3 s.
    The delay is a runtime setting: a restarted Redis loads at full speed again."""
    async with control.pipeline(transaction=False) as pipe:
        for i in range(keys):
            pipe.set(f"faults:pad:{i}", b"x" * 65536)
        await pipe.execute()
    await control.bgrewriteaof()

    async def rewritten() -> bool:
        persistence = await control.info("persistence")
        return not (persistence["aof_rewrite_in_progress"] or persistence["aof_rewrite_scheduled"])

    await wait_until(rewritten, 30, interval=0.1, what="the AOF rewrite")
    await control.config_set("key-load-delay", 10_000)
