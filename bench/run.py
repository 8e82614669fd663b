"""sitegen-worker benchmarks: real `arq worker.main.WorkerSettings` processes against their own throwaway
PostgreSQL, Redis and fake provider processes. `make bench`, or `python -m bench.run --help`.

Writes bench/results/RESULTS.md, results.json, the charts (PNG) and profile.txt. `--check` exits 1 when a
target of issue 6 is missed. Timings are measured here only; no test asserts on them.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil

from bench.stats import after_first_wave, steady_state
from worker import client
from worker.local.services import LocalServices
from worker.settings import ProviderSettings, WorkerSection

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("planning", "content", "coding")
#: Progress rows of a generation that runs straight through: started, each phase started and done, succeeded.
ROWS_PER_SITE = 10
CALLS_PER_SITE = 3  # plan, content, code; assemble calls no model
HEALTH_KEY = "site_generation:health-check:{}"
BRIEF = {
    "business_name": "Bench Bakery",
    "description": "A family bakery: sourdough, pastries and cakes made every morning.",
    "services": ["Bread", "Pastries", "Cakes"],
}
OLD = {  # the Celery + SQLAlchemy design, same machine (issue 6)
    "zero": "10.6 sites/s (2 processes), 157 ms/site, 237 MiB, 5 sessions/site",
    "200/8": "7.1 sites/s = 71% of 10, 710 MiB, 11 sessions",
    "200/32": "9.1 sites/s = 23% of 40, 2.6 GiB, 43 sessions",
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# ---------------------------------------------------------------------------------------------- processes


class Fake:
    """One fake provider process (bench/fake.py)."""

    def __init__(self, latency_s: float, log_path: Path, jitter: float = 0.0, *, rate_limit_rpm: int = 0) -> None:
        self.log_path = log_path
        spread = ["--latency", str(latency_s * (1 - jitter)), "--latency-max", str(latency_s * (1 + jitter))]
        # With a rate limit, the test server itself: it records every request (when, and whether it
        # answered 429), where bench.fake only counts them.
        module = ["bench.fake"]
        if rate_limit_rpm:
            module = ["worker.local.fake_server", "--rate-limit-rpm", str(rate_limit_rpm)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *module, *(spread if jitter and latency_s else ["--latency", str(latency_s)])],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log_path.open("ab"),
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        if not line.startswith("FAKE_PROVIDER_URL="):
            raise RuntimeError(f"fake provider did not start: {line!r}\n{log_path.read_text()[-2000:]}")
        self.url = line.split("=", 1)[1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Worker:
    """One replica: `python -m arq worker.main.WorkerSettings`, optionally under py-spy."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path, profile_to: Path | None = None) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "arq", "worker.main.WorkerSettings"],
            cwd=ROOT,
            env={**env, "SITEGEN_WORKER__REPLICA_ID": name},
            stdout=log_path.open("ab"),
            stderr=subprocess.STDOUT,
        )
        self.ps = psutil.Process(self.proc.pid)
        self.log_path = log_path
        self.spy: subprocess.Popen[bytes] | None = None
        self.profile_to = profile_to

    def start_profile(self, rate: int) -> None:
        assert self.profile_to is not None
        spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if spy is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        self.spy = subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(self.proc.pid),
                "--rate",
                str(rate),
                "--format",
                "raw",
                "--output",
                str(self.profile_to),
                "--threads",
                "--nonblocking",
                "--gil",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop_profile(self) -> None:
        if self.spy is not None:
            self.spy.send_signal(signal.SIGINT)
            try:
                self.spy.wait(20)
            except subprocess.TimeoutExpired:
                self.spy.kill()

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def sys_s(self) -> float:
        return float(self.ps.cpu_times().system)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class CpuMeter:
    """CPU seconds used by a set of processes (and their children, e.g. PostgreSQL backends) over a window."""

    def __init__(self, roots: list[psutil.Process], *, children: bool = True) -> None:
        self.roots = roots
        self.children = children
        self.start = self._snapshot()

    def _snapshot(self) -> dict[int, float]:
        seen: dict[int, float] = {}
        for root in self.roots:
            try:
                procs = [root, *(root.children(recursive=True) if self.children else [])]
            except psutil.Error:
                continue
            for p in procs:
                try:
                    t = p.cpu_times()
                    seen[p.pid] = t.user + t.system
                except psutil.Error:
                    pass
        return seen

    def used(self) -> float:
        end = self._snapshot()
        return sum(v - self.start.get(pid, 0.0) for pid, v in end.items())


class RssSampler(threading.Thread):
    """RSS (MiB) of each worker every `every_s`."""

    def __init__(self, workers: list[Worker], every_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.workers = workers
        self.every_s = every_s
        self.t0 = time.time()
        self.samples: list[tuple[float, list[float]]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            row = []
            for w in self.workers:
                try:
                    row.append(w.ps.memory_info().rss / 2**20)
                except psutil.Error:
                    row.append(0.0)
            self.samples.append((time.time() - self.t0, row))
            self._halt.wait(self.every_s)

    def stop(self) -> list[tuple[float, list[float]]]:
        self._halt.set()
        self.join(5)
        return self.samples

    def peak(self) -> float:
        return max((max(r) for _, r in self.samples if r), default=0.0)


# ---------------------------------------------------------------------------------------------- the bench


@dataclass
class Scenario:
    name: str
    label: str
    latency_s: float
    max_jobs: int
    sites: int
    replicas: int = 1
    rate: float = 0.0  # jobs/s when paced; 0 = all at once
    poll_delay_s: float = 0.05
    slow_log_ms: float = 0.0
    profile: bool = False
    fakes: int = 1
    extra_env: dict[str, str] = field(default_factory=dict)
    #: Leave `worker.max_jobs` and the provider's `max_concurrency` at their defaults (`max_jobs` above
    #: must then be the default, for the report).
    defaults: bool = False
    #: Jobs enqueued one by one (at `probe_rate`/s) once the first `sites` are all running: their
    #: enqueue-to-start is measured while the replica holds that many in flight (`inflight`).
    probes: int = 0
    probe_rate: float = 10.0


#: Where the sites go by default: memory, where the system has it (see `sites_parent`).
TMPFS = Path("/dev/shm")


def sites_parent(chosen: str | None) -> str | None:
    """The folder the replicas write the generated sites under: `--sites-dir`, else /dev/shm, else TMPDIR.

    Not the disk by default: ext4 skips every inode deleted in the last minute or more when it
    allocates one (`recently_deleted`, read from the inode table), and a run creates some 10,000
    files and deletes them at its end, as does `make test`. Back to back `zero` runs in one ext4
    folder went from 0.43 to 2.49 ms of kernel CPU per site (bench/README.md, finding 11): the
    benchmark would measure the file system's recent past, not the worker.
    """
    if chosen:
        return chosen
    if TMPFS.is_dir() and os.access(TMPFS, os.W_OK):
        return str(TMPFS)
    return None


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.work = Path(tempfile.mkdtemp(prefix="sitegen-bench-"))
        self.work.chmod(0o755)  # PostgreSQL runs as `nobody` when we are root and must reach its data dir
        # The generated sites: see `sites_parent` (ext4 makes file creation slow after mass deletions).
        self.sites = Path(tempfile.mkdtemp(prefix="sitegen-bench-sites-", dir=sites_parent(args.sites_dir)))
        self.services = LocalServices(base_dir=self.work / "services").start()
        self.db_url = self.services.database_url
        self.redis_url = self.services.redis_url
        self.results: list[dict[str, Any]] = []
        self.rss_series: dict[str, list[tuple[float, float]]] = {}
        self.migrated = False
        me = psutil.Process()
        kids = me.children(recursive=False)
        self.pg_roots = [p for p in kids if "postgres" in p.name()]
        self.redis_roots = [p for p in kids if "redis" in p.name()]
        if not self.pg_roots or not self.redis_roots:  # started through a wrapper: look one level down
            every = me.children(recursive=True)
            kid_pids = {k.pid for k in kids}
            self.pg_roots = self.pg_roots or [p for p in every if p.name() == "postgres" and p.ppid() in kid_pids]
            self.redis_roots = self.redis_roots or [p for p in every if "redis" in p.name()]

    def close(self) -> None:
        self.services.stop()
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.sites, ignore_errors=True)

    # -- environment

    def env(self, sc: Scenario, fakes: list[Fake]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SITEGEN_")}
        env.update(
            DATABASE_URL=self.db_url,
            REDIS_URL=self.redis_url,
            PYTHONPATH=str(ROOT),
            SITEGEN_OUTPUT__DIR=str(self.sites / sc.name),
            SITEGEN_LOG__LEVEL=self.args.log_level,
            SITEGEN_WORKER__POLL_DELAY_S=str(sc.poll_delay_s),
            SITEGEN_DATABASE__POOL_MAX_SIZE=str(self.args.pool_max),
            SITEGEN_DATABASE__PROGRESS_POOL_MAX_SIZE=str(self.args.progress_pool_max),
            BENCH_FAKE_KEY="bench-key-not-secret",
        )
        if not sc.defaults:
            env["SITEGEN_WORKER__MAX_JOBS"] = str(sc.max_jobs)
        for i, fake in enumerate(fakes):
            p = f"SITEGEN_AI__PROVIDERS__FAKE{i}__"
            env.update(
                {
                    p + "KIND": "openai",
                    p + "MODEL": "fake-gpt",
                    p + "BASE_URL": f"{fake.url}/v1",
                    p + "API_KEY_ENV": "BENCH_FAKE_KEY",
                    p + "READ_TIMEOUT_S": "30",
                }
            )
            if not sc.defaults:
                # The default (8 requests in flight per provider) would cap 200 ms calls at 40/s.
                # At latency 0 the default is kept: calls do not wait, so 8 at a time never limits.
                env[p + "MAX_CONCURRENCY"] = str(max(sc.max_jobs, 8) if sc.latency_s else 8)
        for i, task in enumerate(TASKS):
            env[f"SITEGEN_AI__ROUTING__{task.upper()}"] = f"fake{i % len(fakes)}"
        env.update(sc.extra_env)
        return env

    # -- database helpers

    async def connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.db_url, server_settings={"application_name": "sitegen-bench"})

    async def reset(self) -> None:
        redis = await client.connect(self.redis_url)
        try:
            await redis.flushdb()
        finally:
            await redis.aclose()
        if self.migrated:
            conn = await self.connect()
            try:
                await conn.execute(
                    # The blobs too: nothing references them from the orders' side, and a scenario's blob
                    # bytes (`edits`) must not be deduplicated against an earlier scenario's sites.
                    "TRUNCATE site_generation_logs, site_files, site_generation_phases, site_version_files, "
                    "site_versions, site_blobs, site_generations, site_orders RESTART IDENTITY CASCADE"
                )
                await conn.execute("DROP TRIGGER IF EXISTS bench_slow_log ON site_generation_logs")
                await conn.execute("VACUUM ANALYZE")
            finally:
                await conn.close()
        # Sites are not deleted between scenarios (each has its own folder; all go at the end): ext4
        # scans past inodes freed in the last seconds when it allocates new ones, so deleting the
        # previous scenario's thousands of files would bill the next one's file writes for it.

    async def wait_healthy(self, workers: list[Worker], timeout: float = 60) -> None:
        redis = await client.connect(self.redis_url)
        try:
            deadline = time.monotonic() + timeout
            for w in workers:
                while not await redis.exists(HEALTH_KEY.format(w.name)):
                    if w.proc.poll() is not None:
                        raise RuntimeError(f"worker {w.name} exited:\n{w.log_path.read_text()[-3000:]}")
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"worker {w.name} not healthy after {timeout}s")
                    await asyncio.sleep(0.1)
        finally:
            await redis.aclose()
        self.migrated = True

    # -- one scenario

    async def run(self, sc: Scenario) -> dict[str, Any]:
        log(f"{sc.name}: {sc.label}")
        await self.reset()
        fakes = [
            Fake(sc.latency_s, self.work / f"fake-{sc.name}-{i}.log", self.args.latency_jitter) for i in range(sc.fakes)
        ]
        env = self.env(sc, fakes)
        workers = [
            Worker(
                f"bench-{sc.name}-{i}",
                env,
                self.work / f"worker-{sc.name}-{i}.log",
                profile_to=self.out / "profile.raw" if sc.profile and i == 0 else None,
            )
            for i in range(sc.replicas)
        ]
        try:
            await self.wait_healthy(workers)
            if sc.slow_log_ms:
                await self._slow_log(sc.slow_log_ms)
            return await self._measure(sc, workers, fakes)
        finally:
            for w in workers:
                w.stop_profile()
                w.stop()
            for f in fakes:
                f.stop()

    async def _slow_log(self, ms: float) -> None:
        conn = await self.connect()
        try:
            await conn.execute(
                f"""CREATE OR REPLACE FUNCTION bench_slow_log() RETURNS trigger LANGUAGE plpgsql AS
                $$ BEGIN PERFORM pg_sleep({ms / 1000.0}); RETURN NEW; END $$;
                CREATE TRIGGER bench_slow_log BEFORE INSERT ON site_generation_logs
                FOR EACH ROW EXECUTE FUNCTION bench_slow_log();"""
            )
        finally:
            await conn.close()

    async def _measure(self, sc: Scenario, workers: list[Worker], fakes: list[Fake]) -> dict[str, Any]:
        conn = await self.connect()
        redis = await client.connect(self.redis_url)
        bound = sc.replicas * (self.args.pool_max + self.args.progress_pool_max)
        sessions0 = await self._sessions(conn)
        cmds0 = int((await redis.info("stats"))["total_commands_processed"])
        worker_cpu0 = [w.cpu_s() for w in workers]
        worker_sys0 = [w.sys_s() for w in workers]
        meters = {
            "fake": CpuMeter([psutil.Process(f.proc.pid) for f in fakes]),
            "postgres": CpuMeter(self.pg_roots),
            "redis": CpuMeter(self.redis_roots),
            "bench": CpuMeter([psutil.Process()], children=False),  # this driver only: the rest are its children
        }
        rss = RssSampler(workers)
        rss.start()
        if sc.profile:
            workers[0].start_profile(self.args.profile_rate)
        base = self.args.order_base
        order_ids = list(range(base, base + sc.sites))
        enqueued: dict[int, float] = {}
        poll: dict[str, Any] = {"conns": [], "running": [], "t": [], "rows": []}
        done = asyncio.Event()

        async def sample() -> None:
            mon = await self.connect()
            try:
                while not done.is_set():
                    row = await mon.fetchrow(
                        "SELECT (SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'sitegen-worker:%')"
                        " AS conns, (SELECT count(*) FROM site_generations WHERE status = 'running') AS running,"
                        " (SELECT count(*) FROM site_generation_logs) AS rows"
                    )
                    poll["t"].append(time.time())
                    poll["conns"].append(row["conns"])
                    poll["running"].append(row["running"])
                    poll["rows"].append(row["rows"])
                    await asyncio.sleep(0.1)
            finally:
                await mon.close()

        sampler = asyncio.create_task(sample())
        t_start = time.time()
        await self._enqueue(redis, order_ids, enqueued, sc.rate)
        t_enqueued = time.time()
        held: dict[str, Any] = {}
        if sc.probes:
            # Once every generation of the first wave runs, new jobs arrive one by one: how soon does a
            # replica holding that many in flight start them?
            while await conn.fetchval("SELECT count(*) FROM site_generations WHERE status = 'running'") < sc.sites:
                if time.time() - t_start > self.args.scenario_timeout:
                    raise RuntimeError(f"{sc.name}: fewer than {sc.sites} generations ran at once")
                await asyncio.sleep(0.1)
            # Every one of them waiting on its model call (the fakes have its request): the replica holds
            # them in flight, rather than still starting them (the start of 2,000 at once keeps the loop
            # busy for a second after the last claim, and new jobs queue behind that burst).
            async with aiohttp.ClientSession() as http:
                while True:
                    sent = 0
                    for fake in fakes:
                        async with http.get(f"{fake.url}/_fake/count") as answer:
                            sent += (await answer.json())["requests"]
                    if sent >= sc.sites:
                        break
                    if time.time() - t_start > self.args.scenario_timeout:
                        raise RuntimeError(f"{sc.name}: only {sent} of {sc.sites} model calls were made")
                    await asyncio.sleep(0.1)
            # What each generation in flight costs while it waits on its model call.
            memory = await redis.info("memory")
            held = {
                "generations": sc.sites,
                "worker_rss_mib": round(max(w.ps.memory_info().rss for w in workers) / 2**20, 1),
                "redis_keys": await redis.dbsize(),
                "redis_used_mib": round(int(memory["used_memory"]) / 2**20, 1),
                "pg_conns": await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'sitegen-worker:%'"
                ),
                "worker_open_fds": sum(w.ps.num_fds() for w in workers),
            }
            probe_ids = list(range(base + sc.sites, base + sc.sites + sc.probes))
            probed: dict[int, float] = {}
            await self._enqueue(redis, probe_ids, probed, sc.probe_rate)
            enqueued = probed  # enqueue-to-start is reported for the probes only
        timeout = self.args.scenario_timeout
        while True:
            row = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE status = 'succeeded') AS ok, "
                "count(*) FILTER (WHERE status = 'failed') AS failed FROM site_generations"
            )
            if row["failed"]:
                errors = await conn.fetch("SELECT order_id, error FROM site_generations WHERE status='failed' LIMIT 3")
                raise RuntimeError(f"{sc.name}: {row['failed']} generations failed: {[dict(e) for e in errors]}")
            if row["ok"] >= sc.sites + sc.probes:
                break
            if time.time() - t_start > timeout:
                raise RuntimeError(f"{sc.name}: only {row['ok']}/{sc.sites + sc.probes} sites after {timeout}s")
            for w in workers:
                if w.proc.poll() is not None:
                    raise RuntimeError(f"worker {w.name} died:\n{w.log_path.read_text()[-3000:]}")
            await asyncio.sleep(0.2)
        t_end = time.time()
        rows_at_end = await conn.fetchval("SELECT count(*) FROM site_generation_logs")
        # The progress log may lag the generations (a slow PostgreSQL): wait for its last rows, all
        # ROWS_PER_SITE of every site, or until none has come for 5 s (longer than a slow batch).
        t_drained, rows_final = t_end, rows_at_end
        while (
            rows_final < ROWS_PER_SITE * (sc.sites + sc.probes)
            and time.time() - t_drained < 5.0
            and time.time() - t_end < timeout
        ):
            await asyncio.sleep(0.05)
            rows = await conn.fetchval("SELECT count(*) FROM site_generation_logs")
            if rows != rows_final:
                t_drained, rows_final = time.time(), rows
        done.set()
        await sampler
        if sc.profile:
            workers[0].stop_profile()
        worker_cpu = sum(w.cpu_s() - c for w, c in zip(workers, worker_cpu0, strict=True))
        worker_sys = sum(w.sys_s() - c for w, c in zip(workers, worker_sys0, strict=True))
        other_cpu = {k: m.used() for k, m in meters.items()}
        samples = rss.stop()
        cmds = int((await redis.info("stats"))["total_commands_processed"]) - cmds0
        sessions = await self._sessions(conn) - sessions0
        gens = await conn.fetch(
            "SELECT order_id, extract(epoch FROM started_at)::float8 AS s, extract(epoch FROM finished_at)::float8 AS f"
            " FROM site_generations WHERE status = 'succeeded'"
        )
        logs = await conn.fetchrow(
            "SELECT count(*) AS n, extract(epoch FROM min(created_at))::float8 AS a, "
            "extract(epoch FROM max(created_at))::float8 AS b FROM site_generation_logs"
        )
        retries = await conn.fetchval("SELECT count(*) FROM site_generations WHERE attempt > 1")
        stored = await conn.fetchval(  # tables, TOAST and indexes of the checkpoints and the files
            "SELECT pg_total_relation_size('site_generation_phases') + pg_total_relation_size('site_files')"
        )
        phases = {
            r["phase"]: round(r["p50"], 1)
            for r in await conn.fetch(
                "SELECT phase, percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) AS p50"
                " FROM site_generation_phases GROUP BY phase"
            )
        }
        await redis.aclose()
        await conn.close()

        finished = sorted(g["f"] for g in gens)
        n = len(finished)
        slots = sc.replicas * sc.max_jobs
        steady_ll = steady_state([(g["s"], g["f"]) for g in gens], slots) if sc.latency_s else None
        if steady_ll:
            # With a model latency, sites that start together finish together: waves of `slots` sites,
            # which a count of finishes over a window cannot average out. Little's law over the window in
            # which the backlog kept every slot meant to be busy (bench/stats.py) can.
            steady = steady_ll.rate
        else:
            lo, hi = finished[int(n * 0.1)], finished[min(int(n * 0.9), n - 1)]
            steady = (int(n * 0.9) - int(n * 0.1)) / (hi - lo) if hi > lo else float("nan")
        wall = finished[-1] - t_start
        to_start = [(g["s"] - enqueued[g["order_id"]]) * 1000 for g in gens if g["order_id"] in enqueued]
        durations = [(g["f"] - g["s"]) * 1000 for g in gens]
        # The ideal is a steady rate: it needs a backlog (more sites than slots). With a model latency, one
        # wave of sites that all start at once also finishes at once, which no steady rate describes
        # (issue 15: a "366% of ideal"). At latency 0 the CPU spreads the finishes, and the rate is real.
        one_wave = sc.latency_s > 0 and sc.sites <= sc.replicas * sc.max_jobs
        ideal = sc.replicas * sc.max_jobs / (CALLS_PER_SITE * sc.latency_s) if sc.latency_s and not one_wave else None
        self.rss_series[sc.name] = [(t, max(r)) for t, r in samples if r]
        window = t_end - t_start
        result = {
            "name": sc.name,
            "label": sc.label,
            "latency_ms": sc.latency_s * 1000,
            "max_jobs": sc.max_jobs,
            "replicas": sc.replicas,
            "fakes": sc.fakes,
            "poll_delay_s": sc.poll_delay_s,
            "slow_log_ms": sc.slow_log_ms,
            "sites": n,
            "enqueue_s": round(t_enqueued - t_start, 2),
            "wall_s": round(wall, 2),
            "throughput": round(steady, 1) if not one_wave else None,
            "one_wave": one_wave,
            "throughput_overall": round(n / wall, 1),
            "ideal": round(ideal, 1) if ideal else None,
            "of_ideal": round(steady / ideal, 3) if ideal else None,
            # Little's law's two factors (bench/stats.py): the share of the slots that held a running
            # generation, and the model time over the mean site duration; their product is of_ideal.
            "occupancy": round(steady_ll.occupancy, 3) if steady_ll else None,
            "speed": round(CALLS_PER_SITE * sc.latency_s / steady_ll.mean_duration_s, 3) if steady_ll else None,
            "steady_window_s": round(steady_ll.window_s, 1) if steady_ll else None,
            # The former estimate, finishes after the first wave (biased low: bench/stats.py), for comparison.
            "throughput_after_first_wave": (
                round(after_first_wave(finished, slots), 1) if sc.latency_s and n > slots else None
            ),
            "worker_cpu_ms_per_site": round(worker_cpu / n * 1000, 2),
            "worker_sys_ms_per_site": round(worker_sys / n * 1000, 2),  # the kernel's share of it
            "worker_cpu_pct": round(worker_cpu / window / sc.replicas * 100, 1),  # of one core, per replica
            "cpu_ms_per_site": {k: round(v / n * 1000, 2) for k, v in other_cpu.items()},
            "machine_cpu_pct": round((worker_cpu + sum(other_cpu.values())) / window / psutil.cpu_count() * 100, 1),
            "peak_rss_mib": round(rss.peak(), 1),
            "peak_running": max(poll["running"], default=0),
            # Generations `running` in PostgreSQL over time (s since the first enqueue, count), every 0.1 s.
            "running_samples": [(round(t - t_start, 1), r) for t, r in zip(poll["t"], poll["running"], strict=True)],
            "peak_pg_conns": max(poll["conns"], default=0),
            "pg_conn_bound": bound,
            "pg_sessions_per_site": round(sessions / n, 3),
            "to_start_ms": {
                "p50": round(pct(to_start, 0.5), 1),
                "p95": round(pct(to_start, 0.95), 1),
                "max": round(max(to_start, default=float("nan")), 1),
            },
            "duration_ms": {"p50": round(pct(durations, 0.5), 1), "p95": round(pct(durations, 0.95), 1)},
            "phase_p50_ms": phases,
            "log_rows": logs["n"],
            # Written by PostgreSQL while the generations ran (not logged: `log` never waits).
            "log_rows_written_per_s": round(rows_at_end / window, 1),
            "log_lag_s": round(t_drained - t_end, 2),
            "log_rows_at_end": f"{rows_at_end}/{rows_final}",
            "log_rows_per_s": (
                round(logs["n"] / (logs["b"] - logs["a"]), 1) if logs["b"] and logs["b"] > logs["a"] else None
            ),
            "redis_cmds_per_site": round(cmds / n, 1),
            "retried_generations": retries,
            "stored_kib_per_site": round(stored / n / 1024, 1),
            "to_start_samples": [round(x, 2) for x in to_start] if sc.rate or sc.probes else [],
            "probe_enqueued_s": sorted(round(t - t_start, 2) for t in enqueued.values()) if sc.probes else [],
            "duration_samples": [round(x, 1) for x in durations[:5000]],
            "probes": sc.probes,
            "rss_start_mib": round(max(samples[0][1]), 1) if samples and samples[0][1] else None,
            "held": held,
            # Generations running over time (seconds from the first enqueue), at most ~400 points.
            "running_series": [
                (round(t - t_start, 2), r)
                for t, r in list(zip(poll["t"], poll["running"], strict=True))[:: max(1, len(poll["t"]) // 400)]
            ],
        }
        log(
            f"{sc.name}: {n} sites, "
            + (f"{result['throughput']}/s steady" if not one_wave else f"one wave, {result['throughput_overall']}/s")
            + (
                f" ({result['of_ideal']:.0%} of {result['ideal']}: slots busy {result['occupancy']:.1%}, model time"
                f" / site time {result['speed']:.1%})"
                if ideal and steady_ll
                else ""
            )
            + f", worker {result['worker_cpu_ms_per_site']} ms CPU/site"
            f" ({result['worker_sys_ms_per_site']} in the kernel, {result['worker_cpu_pct']}% of a core),"
            f" RSS {result['peak_rss_mib']} MiB, pg conns {result['peak_pg_conns']}/{bound},"
            f" to-start p50/p95 {result['to_start_ms']['p50']}/{result['to_start_ms']['p95']} ms,"
            f" machine {result['machine_cpu_pct']}%"
        )
        self.results.append(result)
        return result

    async def postgres_facts(self) -> dict[str, Any]:
        """The server's version and how the large columns are compressed (migration 0004: lz4 where it can)."""
        conn = await self.connect()
        try:
            version = await conn.fetchval("SHOW server_version")
            method = await conn.fetchval(
                "SELECT attcompression::text FROM pg_attribute WHERE attrelid = 'site_files'::regclass"
                " AND attname = 'content'"
            )
        finally:
            await conn.close()
        return {"version": version, "compression": "lz4" if method == "l" else "pglz"}

    async def _sessions(self, conn: asyncpg.Connection) -> int:
        try:
            return int(await conn.fetchval("SELECT sessions FROM pg_stat_database WHERE datname = current_database()"))
        except asyncpg.PostgresError:
            return 0

    async def _enqueue(self, redis: Any, order_ids: list[int], enqueued: dict[int, float], rate: float) -> None:
        if rate:
            t0 = time.time()
            for i, oid in enumerate(order_ids):
                delay = t0 + i / rate - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                enqueued[oid] = time.time()
                await client.enqueue_generation(redis, oid, BRIEF)
            return
        gate = asyncio.Semaphore(32)

        async def one(oid: int) -> None:
            async with gate:
                enqueued[oid] = time.time()
                await client.enqueue_generation(redis, oid, BRIEF)

        await asyncio.gather(*(one(o) for o in order_ids))

    async def progress_capacity(self, rows: int, slow_log_ms: float) -> dict[str, Any]:
        """Rows/s that `worker.progress.ProgressLog` (its own pool, one ordered writer) gets into PostgreSQL
        when rows come faster than it writes them: the log's ceiling, with and without a slow INSERT."""
        from loguru import logger

        from worker.migrate import migrate
        from worker.progress import ProgressLog
        from worker.settings import DatabaseSection
        from worker.store import create_pool

        if not self.migrated:  # the workers migrate when they start; this run has none
            await migrate(self.db_url, ROOT / "migrations")
            self.migrated = True
        await self.reset()
        if slow_log_ms:
            await self._slow_log(slow_log_ms)
        log(f"progress: {rows} rows through ProgressLog as fast as they come, INSERT +{slow_log_ms:g} ms per row")
        db = DatabaseSection(url=self.db_url)
        pool = await create_pool(db, max_size=self.args.progress_pool_max, min_size=1, name="progress")
        progress = ProgressLog(pool, replica_id="bench", buffer_size=rows)
        writer = asyncio.create_task(progress.run_writer())
        logger.disable("worker.progress")  # the rows' DEBUG echo, not what is measured
        try:
            t0 = time.perf_counter()
            for i in range(rows):
                await progress.log(
                    10_000 + i % 500,
                    "phase plan done",
                    generation_id=1 + i % 500,
                    phase="plan",
                    duration_ms=200,
                    tokens_in=900,
                    tokens_out=1200,
                )
                if i % 50 == 49:
                    await asyncio.sleep(0)  # let the writer run, as a worker's other coroutines do
            logged_s = time.perf_counter() - t0
            if not await progress.flush():
                raise RuntimeError("the progress log could not write its rows; see the log above")
            elapsed = time.perf_counter() - t0
        finally:
            logger.enable("worker.progress")
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            await pool.close()
        res = {
            "rows": rows,
            "slow_log_ms": slow_log_ms,
            "rows_per_s": round(rows / elapsed),
            "logged_per_s": round(rows / logged_s),
            "dropped": progress.dropped,
        }
        log(f"progress capacity: {res}")
        return res

    async def idle_poll_cost(self, poll_delay_s: float, seconds: float) -> dict[str, Any]:
        """Redis commands/s and worker CPU of one idle replica polling every `poll_delay_s`."""
        log(f"idle: one replica polling every {poll_delay_s}s for {seconds}s")
        await self.reset()
        fake = Fake(0, self.work / "fake-idle.log")
        sc = Scenario("idle", "idle", 0, 50, 0, poll_delay_s=poll_delay_s)
        w = Worker(f"bench-idle-{poll_delay_s}", self.env(sc, [fake]), self.work / "worker-idle.log")
        try:
            await self.wait_healthy([w])
            await asyncio.sleep(1.0)
            redis = await client.connect(self.redis_url)

            async def calls() -> dict[str, int]:  # per command, those a Lua script runs included
                stats = await redis.info("commandstats")
                return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}

            k0, c0 = await calls(), int((await redis.info("stats"))["total_commands_processed"])
            cpu0, t0 = w.cpu_s(), time.time()
            await asyncio.sleep(seconds)
            c1, cpu1, t1 = int((await redis.info("stats"))["total_commands_processed"]), w.cpu_s(), time.time()
            k1 = await calls()
            await redis.aclose()
        finally:
            w.stop()
            fake.stop()
        # This driver's own INFO calls (3 between the two counts) are not the replica's.
        k1["info"] = k1.get("info", 0) - 3
        rates = {c: round((n - k0.get(c, 0)) / (t1 - t0), 1) for c, n in sorted(k1.items())}
        by_command = {c: r for c, r in rates.items() if r > 0}
        res = {
            "poll_delay_s": poll_delay_s,
            "redis_cmds_per_s": round((c1 - c0 - 2) / (t1 - t0), 1),
            "redis_cmds_by_command_per_s": by_command,
            "worker_cpu_pct": round((cpu1 - cpu0) / (t1 - t0) * 100, 2),
        }
        log(f"idle poll {poll_delay_s}s: {res}")
        return res

    async def heartbeat_cost(self, lease_s: float, jobs: int, seconds: float) -> dict[str, Any]:
        """What the heartbeat of one replica holding `jobs` generations costs Redis and PostgreSQL at `lease_s`.

        The generations wait on model calls longer than the run, so all that touches the stores is the
        heartbeat (every lease_s/4), the idle poll and the health key: PEXPIRE calls come from the
        heartbeat alone, and so do the UPDATEs of site_generations.
        """
        log(f"heartbeat: one replica holding {jobs} generations, lease_s {lease_s}, for {seconds}s")
        await self.reset()
        fake = Fake(seconds + 120, self.work / "fake-heartbeat.log")
        sc = Scenario(
            "heartbeat", "heartbeat", seconds + 120, jobs, jobs, extra_env={"SITEGEN_WORKER__LEASE_S": str(lease_s)}
        )
        w = Worker(f"bench-heartbeat-{lease_s:g}", self.env(sc, [fake]), self.work / "worker-heartbeat.log")
        redis = await client.connect(self.redis_url)
        conn = await self.connect()
        try:
            await self.wait_healthy([w])
            for i in range(jobs):
                await client.enqueue_generation(redis, self.args.order_base + 900_000 + i, BRIEF)
            deadline = time.monotonic() + 60
            while await conn.fetchval("SELECT count(*) FROM site_generations WHERE status = 'running'") < jobs:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"heartbeat: fewer than {jobs} generations started within 60 s")
                await asyncio.sleep(0.1)

            async def counters() -> tuple[int, int, int, int]:
                stats = await redis.info("commandstats")
                await conn.execute("SELECT pg_stat_force_next_flush()")
                pg = await conn.fetchrow(
                    "SELECT n_tup_upd, (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database())"
                    " AS commits FROM pg_stat_user_tables WHERE relname = 'site_generations'"
                )
                total = int((await redis.info("stats"))["total_commands_processed"])
                return int(stats.get("cmdstat_pexpire", {}).get("calls", 0)), total, pg["n_tup_upd"], pg["commits"]

            await conn.execute("SELECT pg_stat_clear_snapshot()")
            pexpire0, redis0, upd0, commits0 = await counters()
            t0 = time.monotonic()
            await asyncio.sleep(seconds)
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            pexpire1, redis1, upd1, commits1 = await counters()
            elapsed = time.monotonic() - t0
        finally:
            await redis.aclose()
            await conn.close()
            w.stop()
            fake.stop()
        res = {
            "lease_s": lease_s,
            "generations": jobs,
            "beats_per_s": round(4 / lease_s, 2),
            "redis_pexpire_per_s": round((pexpire1 - pexpire0) / elapsed, 1),
            "redis_cmds_per_s": round((redis1 - redis0) / elapsed, 1),
            "pg_rows_updated_per_s": round((upd1 - upd0) / elapsed, 1),
            "pg_commits_per_s": round((commits1 - commits0) / elapsed, 1),
        }
        log(f"heartbeat lease {lease_s:g}s: {res}")
        return res

    async def ratelimit(self, replicas: int, rpm: int, sites: int, latency_s: float) -> dict[str, Any]:
        """`replicas` replicas sharing one provider that answers 429 beyond `rpm` requests a minute.

        The worker's shared limit is set 2% under the provider's (network jitter would otherwise put an
        occasional request just inside the provider's window). Reports what the provider saw: answered
        requests per 10 s window, the 429s it sent, and the budget waits the progress log recorded.
        """
        log(f"ratelimit: {replicas} replicas sharing a provider limited to {rpm} requests/min, {sites} sites")
        await self.reset()
        fake = Fake(latency_s, self.work / "fake-ratelimit.log", rate_limit_rpm=rpm)
        shared = int(rpm * 0.98)
        sc = Scenario(
            "ratelimit",
            "ratelimit",
            latency_s,
            max(4, sites // replicas),
            sites,
            replicas=replicas,
            extra_env={
                "SITEGEN_AI__PROVIDERS__FAKE0__REQUESTS_PER_MINUTE": str(shared),
                "SITEGEN_AI__MAX_BUDGET_WAIT_S": "600",
            },
        )
        env = self.env(sc, [fake])
        workers = [
            Worker(f"bench-ratelimit-{i}", env, self.work / f"worker-ratelimit-{i}.log") for i in range(replicas)
        ]
        conn = await self.connect()
        redis = await client.connect(self.redis_url)
        try:
            await self.wait_healthy(workers)
            t0 = time.time()
            order_ids = list(range(self.args.order_base + 800_000, self.args.order_base + 800_000 + sites))
            await self._enqueue(redis, order_ids, {}, 0)
            deadline = t0 + sites * 3 * 60 / shared + 120
            while await conn.fetchval("SELECT count(*) FROM site_generations WHERE status = 'succeeded'") < sites:
                if time.time() > deadline:
                    raise RuntimeError("ratelimit: the sites did not all succeed in time")
                for w in workers:
                    if w.proc.poll() is not None:
                        raise RuntimeError(f"worker {w.name} died:\n{w.log_path.read_text()[-3000:]}")
                await asyncio.sleep(0.5)
            elapsed = time.time() - t0
            waits = await conn.fetch(
                "SELECT (details->>'wait_s')::float8 AS wait_s FROM site_generation_logs "
                "WHERE details->>'event' = 'model.budget_wait'"
            )
            async with aiohttp.ClientSession() as http, http.get(f"{fake.url}/_fake/requests") as answer:
                seen = await answer.json()
        finally:
            await redis.aclose()
            await conn.close()
            for w in workers:
                w.stop()
            fake.stop()
        calls = [r for r in seen if r["api"] != "control"]
        refused = sorted(r["wall"] for r in calls if r["fault"].startswith("rate-limited"))
        answered = sorted(r["wall"] for r in calls if not r["fault"].startswith("rate-limited"))
        start = answered[0] if answered else t0
        per_window = Counter(int((t - start) // 10) for t in answered)
        sliding = max((bisect.bisect_right(answered, t + 60) - i for i, t in enumerate(answered)), default=0)
        wait_s = [w["wait_s"] for w in waits if w["wait_s"] is not None]
        res = {
            "replicas": replicas,
            "provider_rpm": rpm,
            "shared_rpm": shared,
            "sites": sites,
            "elapsed_s": round(elapsed, 1),
            "sites_per_s": round(sites / elapsed, 3),
            "ideal_sites_per_s": round(shared / 60 / CALLS_PER_SITE, 3),
            "requests_answered": len(answered),
            "max_requests_per_10s": max(per_window.values(), default=0),
            "limit_per_10s": rpm / 6,
            "max_requests_in_any_60s": sliding,
            "requests_per_10s": [per_window.get(i, 0) for i in range(max(per_window, default=-1) + 1)],
            "429s_received": len(refused),
            "429s_after_the_first": max(len(refused) - 1, 0),
            "budget_waits_logged": len(wait_s),
            "budget_wait_s": {
                "p50": round(pct(wait_s, 0.5), 1),
                "p95": round(pct(wait_s, 0.95), 1),
                "max": round(max(wait_s, default=0.0), 1),
            },
        }
        log(f"ratelimit: {res}")
        return res


# ---------------------------------------------------------------------------------------------- profile


def summarize_profile(raw: Path, rate: int, sites: int) -> dict[str, Any]:
    """Top functions (self and inclusive) from py-spy's collapsed stacks."""
    if not raw.exists():
        return {}
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    bucket: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f and not f.startswith("thread ") and not f.startswith("process ")]
        if not frames:
            continue
        total += n
        self_c[_short(frames[-1])] += n
        for f in {_short(f) for f in frames}:
            incl[f] += n
        bucket[_bucket(frames)] += n
    ms = lambda c: round(c / rate / sites * 1000, 3)  # noqa: E731
    return {
        "samples": total,
        "rate": rate,
        "sites": sites,
        "cpu_ms_per_site": ms(total),
        "self": [(f, ms(c), round(c / total * 100, 1)) for f, c in self_c.most_common(25)],
        "inclusive_worker": [
            (f, ms(c), round(c / total * 100, 1))
            for f, c in incl.most_common(400)
            if "worker/" in f and "__main__" not in f
        ][:25],
        "buckets": [(b, ms(c), round(c / total * 100, 1)) for b, c in bucket.most_common()],
    }


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (pkg/file.py)"
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    path = path.lstrip("/").removeprefix(".11/").removeprefix(".12/").removeprefix(".13/")
    return f"{name} ({path})"


_BUCKETS = [
    ("json_repair", "json-repair"),
    ("pydantic", "pydantic (validation, dump, schema)"),
    ("selectolax", "selectolax (assemble's HTML checks)"),
    ("loguru", "loguru (logging)"),
    ("asyncpg", "asyncpg (PostgreSQL protocol)"),
    ("aiohttp", "aiohttp (model calls)"),
    ("yarl", "aiohttp (model calls)"),
    ("multidict", "aiohttp (model calls)"),
    ("arq/", "arq (queue)"),
    ("redis/", "redis-py (queue)"),
    ("json/", "json (stdlib)"),
    ("asyncio/", "asyncio event loop"),
    ("selectors", "asyncio event loop"),
    ("worker/", "worker code (own frames)"),
]


def _bucket(frames: list[str]) -> str:
    """Attribute a sample to the innermost frame that belongs to a known library or the worker."""
    for f in reversed(frames):
        for needle, name in _BUCKETS:
            if needle in f:
                return name
    return "other (stdlib, os, ssl, threads)"


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument(
        "--progress-rows",
        type=int,
        default=20_000,
        help="rows of the progress-log capacity run (a tenth of them with --slow-log-ms)",
    )
    p.add_argument(
        "--scenarios",
        default="zero,profile,latency,inflight,enqueue,slowlog,scale,scaleout,ratelimit,progress,idle,heartbeat,edits",
        help="which scenarios to run, comma-separated",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="write results.json from this run alone; without it, the sections of an earlier results.json in "
        "--out that this run did not measure are kept (so `--scenarios edits` leaves the other figures)",
    )
    p.add_argument("--check", action="store_true", help="exit 1 when a target of issue 6 is missed")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where results go")
    p.add_argument("--zero-sites", type=int, default=1500, help="sites in the latency-0 run")
    p.add_argument("--zero-max-jobs", type=int, default=50, help="max_jobs in the latency-0 runs")
    p.add_argument("--profile-sites", type=int, default=300, help="sites in the profiled latency-0 run")
    p.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--latency-ms", type=float, default=200, help="model latency of the latency scenarios")
    p.add_argument(
        "--latency-jitter",
        type=float,
        default=0.25,
        help="each call takes uniform(latency x (1 - j), latency x (1 + j)), same mean; 0: constant "
        "(then every generation runs in lockstep and all their commits land in the same ms)",
    )
    p.add_argument(
        "--max-jobs",
        type=ints,
        default=[25, 50, 200, 500],
        help="max_jobs values of the latency scenario (25: where one replica's CPU is not the limit)",
    )
    p.add_argument("--waves", type=float, default=2, help="latency scenario: sites = waves x max_jobs ...")
    p.add_argument(
        "--latency-min-sites",
        type=int,
        default=1500,
        help="... but at least this many: the max_jobs generations started at the same moment finish "
        "in waves for the first few rounds, which a short run's steady window cannot average out",
    )
    p.add_argument("--inflight-jobs", type=int, default=2000, help="generations in flight at once in the RSS run")
    p.add_argument(
        "--inflight-latency-s",
        type=float,
        default=10,
        help="model latency of the in-flight run: long enough that every generation is started at once",
    )
    p.add_argument("--enqueue-rate", type=float, default=10, help="jobs/s of the paced enqueue-to-start run")
    p.add_argument("--enqueue-sites", type=int, default=150, help="sites of the paced enqueue-to-start run")
    p.add_argument("--slow-log-ms", type=float, default=5, help="delay added to each progress-row INSERT")
    p.add_argument("--slowlog-max-jobs", type=int, default=50, help="max_jobs of the slow-progress-log run")
    p.add_argument(
        "--slowlog-sites",
        type=int,
        default=300,
        help="sites of the slow-progress-log run and of its baseline without the slow INSERT (few "
        "enough that the buffer, 10,000 rows, does not overflow while ~200 rows/s get written)",
    )
    p.add_argument("--replicas", type=ints, default=[1, 2, 4], help="replica counts of the scale run (latency 0)")
    p.add_argument(
        "--scaleout-replicas",
        type=ints,
        default=[1, 4, 10, 20],
        help="replica counts of the scaleout run (model latency, slots across replicas)",
    )
    p.add_argument("--scaleout-max-jobs", type=int, default=100, help="max_jobs of each scaleout replica")
    p.add_argument("--scaleout-latency-s", type=float, default=3.0, help="model latency of the scaleout run")
    p.add_argument("--scaleout-waves", type=float, default=3, help="scaleout sites = waves x replicas x max_jobs")
    p.add_argument(
        "--scaleout-long-latency-s",
        type=float,
        default=20.0,
        help="model latency of the scaleout run repeated with the most replicas, where the machine's CPU "
        "is not the limit (0: not run)",
    )
    p.add_argument("--scaleout-long-waves", type=float, default=2, help="its sites = waves x replicas x max_jobs")
    p.add_argument(
        "--inflight-probes",
        type=int,
        default=50,
        help="jobs enqueued one by one while the inflight run holds its generations",
    )
    p.add_argument("--inflight-probe-rate", type=float, default=10, help="jobs/s of the inflight probes")
    p.add_argument("--scale-sites", type=int, default=1500, help="sites of each scale-out run (latency 0)")
    p.add_argument("--window-replicas", type=int, default=10, help="replicas of the `window` run (issue 15 part 1)")
    p.add_argument("--window-max-jobs", type=int, default=20, help="max_jobs of each replica in the `window` run")
    p.add_argument("--window-latency-s", type=float, default=2, help="model latency of the `window` run")
    p.add_argument("--window-sites", type=int, default=400, help="sites of the `window` run (a backlog past the slots)")
    p.add_argument("--fakes", type=int, default=1, help="fake provider processes (tasks are spread over them)")
    p.add_argument(
        "--sites-dir",
        default=None,
        help="folder the generated sites are written under (default: /dev/shm if there, else TMPDIR)",
    )
    p.add_argument("--idle-seconds", type=float, default=4, help="how long the idle polling cost is measured")
    p.add_argument("--ratelimit-replicas", type=int, default=4, help="replicas of the ratelimit run")
    p.add_argument("--ratelimit-rpm", type=int, default=120, help="the fake provider's requests/min limit")
    p.add_argument("--ratelimit-sites", type=int, default=60, help="sites of the ratelimit run")
    p.add_argument("--ratelimit-latency-s", type=float, default=0.5, help="model latency of the ratelimit run")
    p.add_argument("--heartbeat-jobs", type=int, default=100, help="generations held while the heartbeat is measured")
    p.add_argument("--heartbeat-seconds", type=float, default=20, help="how long the heartbeat cost is measured")
    p.add_argument("--edits-pages", type=ints, default=[4, 12], help="edits: page counts of the sites edited")
    p.add_argument("--edits-latency-s", type=float, default=1.0, help="edits: model latency of generations and edits")
    p.add_argument(
        "--edits-kinds",
        type=lambda s: [k for k in s.split(",") if k],
        default=["colour", "phone", "phone-all", "page"],
        help="edits: the edits timed on each site, in order (bench/edits.py EDITS)",
    )
    p.add_argument("--edits-rollbacks", type=int, default=200, help="edits: rollbacks timed (latency 0)")
    p.add_argument("--edits-rollback-files", type=int, default=20, help="edits: files of the site rolled back")
    p.add_argument(
        "--edits-read-versions", type=int, default=1000, help="edits: versions of the order whose live read is timed"
    )
    p.add_argument("--edits-reads", type=int, default=2000, help="edits: live-file reads timed per case")
    p.add_argument(
        "--log-level",
        default="INFO",
        help="the workers' log level (INFO, the default, writes ~13 JSON lines per site to their log files)",
    )
    p.add_argument("--pool-max", type=int, default=10, help="SITEGEN_DATABASE__POOL_MAX_SIZE (worker default 10)")
    p.add_argument("--progress-pool-max", type=int, default=2, help="SITEGEN_DATABASE__PROGRESS_POOL_MAX_SIZE")
    p.add_argument("--order-base", type=int, default=100_001, help="first order id")
    p.add_argument("--scenario-timeout", type=float, default=300, help="seconds before a scenario is abandoned")
    return p.parse_args(argv)


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    wanted = set(args.scenarios.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    report: dict[str, Any] = {
        "runs": bench.results,
        "idle": [],
        "heartbeat": [],
        "ratelimit": None,
        "progress": [],
        "profile": {},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    began = time.time()
    try:
        lat = args.latency_ms / 1000
        zj = args.zero_max_jobs
        if "zero" in wanted or "scale" in wanted:
            await bench.run(
                Scenario("zero", f"latency 0, max_jobs {zj}, 1 replica", 0, zj, args.zero_sites, fakes=args.fakes)
            )
        if "profile" in wanted:
            (args.out / "profile.raw").unlink(missing_ok=True)
            r = await bench.run(
                Scenario(
                    "profile",
                    f"latency 0, max_jobs {zj}, under py-spy",
                    0,
                    zj,
                    args.profile_sites,
                    profile=True,
                    fakes=args.fakes,
                )
            )
            report["profile"] = summarize_profile(args.out / "profile.raw", args.profile_rate, r["sites"])
        if "latency" in wanted:
            for mj in args.max_jobs:
                await bench.run(
                    Scenario(
                        f"lat{mj}",
                        f"latency {args.latency_ms:g} ms, max_jobs {mj}",
                        lat,
                        mj,
                        max(args.latency_min_sites, int(args.waves * mj)),
                        fakes=args.fakes,
                    )
                )
        if "inflight" in wanted:
            n, slow, probes = args.inflight_jobs, args.inflight_latency_s, args.inflight_probes
            mj = n + probes
            await bench.run(
                Scenario(
                    "inflight",
                    f"{n} in flight: latency {slow:g} s, max_jobs {mj}, then {probes} "
                    f"jobs at {args.inflight_probe_rate:g}/s",
                    slow,
                    mj,
                    n,
                    fakes=args.fakes,
                    probes=probes,
                    probe_rate=args.inflight_probe_rate,
                )
            )
        if "scaleout" in wanted:
            mj = args.scaleout_max_jobs
            runs = [(f"scaleout{n}", n, args.scaleout_latency_s, args.scaleout_waves) for n in args.scaleout_replicas]
            if args.scaleout_long_latency_s:
                # The most replicas again at a latency whose ideal this machine's CPU can serve: what the
                # design does with the same slots once the 2 cores are not the limit.
                n = max(args.scaleout_replicas)
                runs.append((f"scaleout{n}long", n, args.scaleout_long_latency_s, args.scaleout_long_waves))
            for name, n, lat_s, waves in runs:
                # Waves of sites for a steady window; pools of 6 + 2 keep 20 replicas under the local
                # PostgreSQL's 200 connections (a replica holds one per statement, never across a call).
                await bench.run(
                    Scenario(
                        name,
                        f"latency {lat_s:g} s, {n} replicas x max_jobs {mj}",
                        lat_s,
                        mj,
                        int(waves * n * mj),
                        replicas=n,
                        fakes=max(args.fakes, -(-n * mj // 500)),
                        extra_env={"SITEGEN_DATABASE__POOL_MAX_SIZE": "6"},
                    )
                )
        if "enqueue" in wanted:
            # The worker's and the provider's defaults, read from worker.settings (the poll is the default too).
            mj = WorkerSection.model_fields["max_jobs"].default
            mc = ProviderSettings.model_fields["max_concurrency"].default
            await bench.run(
                Scenario(
                    "enqueue",
                    f"paced {args.enqueue_rate:g} jobs/s, latency {args.latency_ms:g} ms,"
                    f" default settings (max_jobs {mj}, max_concurrency {mc}, poll 0.05 s)",
                    lat,
                    mj,
                    args.enqueue_sites,
                    rate=args.enqueue_rate,
                    fakes=args.fakes,
                    defaults=True,
                )
            )
        if "slowlog" in wanted:
            # Compared with the same run (same max_jobs, same number of sites) without the slow INSERT.
            mj, n = args.slowlog_max_jobs, args.slowlog_sites
            await bench.run(
                Scenario(
                    "slowbase",
                    f"latency {args.latency_ms:g} ms, max_jobs {mj}, the slowlog run's baseline",
                    lat,
                    mj,
                    n,
                    fakes=args.fakes,
                )
            )
            await bench.run(
                Scenario(
                    "slowlog",
                    f"latency {args.latency_ms:g} ms, max_jobs {mj}, progress INSERT +{args.slow_log_ms:g} ms",
                    lat,
                    mj,
                    n,
                    slow_log_ms=args.slow_log_ms,
                    fakes=args.fakes,
                )
            )
        if "scale" in wanted:
            for n in args.replicas:
                if n == 1:
                    continue  # the `zero` run
                await bench.run(
                    Scenario(
                        f"scale{n}",
                        f"latency 0, max_jobs {zj}, {n} replicas",
                        0,
                        zj,
                        args.scale_sites,
                        replicas=n,
                        fakes=args.fakes,
                    )
                )
        if "window" in wanted:
            # Issue 15 part 1: more running jobs across the cluster than one poll reads (queue_read_limit,
            # max(5 x max_jobs, 100)) must not leave slots empty: peak_running should reach replicas x max_jobs.
            n, mj, slow = args.window_replicas, args.window_max_jobs, args.window_latency_s
            await bench.run(
                Scenario(
                    f"window{n}x{mj}",
                    f"{n} replicas x max_jobs {mj}, latency {slow:g} s: all {n * mj} slots busy?",
                    slow,
                    mj,
                    args.window_sites,
                    replicas=n,
                    fakes=args.fakes,
                )
            )
        if "progress" in wanted:
            report["progress"].append(await bench.progress_capacity(args.progress_rows, 0.0))
            # ~200 rows/s when each row costs 5 ms: a tenth of the rows keeps this run ~10 s.
            report["progress"].append(await bench.progress_capacity(args.progress_rows // 10, args.slow_log_ms))
        if "idle" in wanted:
            for pd in (0.05, 0.5):
                report["idle"].append(await bench.idle_poll_cost(pd, args.idle_seconds))
        if "ratelimit" in wanted:
            report["ratelimit"] = await bench.ratelimit(
                args.ratelimit_replicas, args.ratelimit_rpm, args.ratelimit_sites, args.ratelimit_latency_s
            )
        if "heartbeat" in wanted:
            # The default lease (8 s, SIGKILL recovery within 15 s) against the former default (20 s).
            for lease in (WorkerSection.model_fields["lease_s"].default, 20.0):
                report["heartbeat"].append(
                    await bench.heartbeat_cost(lease, args.heartbeat_jobs, args.heartbeat_seconds)
                )
        if "edits" in wanted:
            from bench.edits import run_edits

            report["edits"] = await run_edits(bench, args)
        report["postgres"] = await bench.postgres_facts()
    finally:
        bench.close()
    report["rss_series"] = bench.rss_series
    report["elapsed_s"] = round(time.time() - began, 1)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M")
    report["machine"] = {
        "cpus": psutil.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "mem_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "sites_dir": sites_parent(args.sites_dir) or tempfile.gettempdir(),
    }
    return report


#: Sections of results.json that one scenario (or a few) writes whole.
SECTIONS = ("idle", "heartbeat", "ratelimit", "progress", "profile", "edits")


def merged(earlier: dict[str, Any], report: dict[str, Any], scenarios: str) -> dict[str, Any]:
    """`earlier` (a previous results.json) with what this run measured in place of its own: runs by name,
    sections whole. The header (date, machine, arguments) stays the earlier run's unless this one made runs
    of the runs table; each merged run is listed in `merged_runs`, and a section carries its own date."""
    out = dict(earlier)
    names = {r["name"] for r in report["runs"]}
    out["runs"] = [r for r in earlier.get("runs", []) if r["name"] not in names] + report["runs"]
    out["rss_series"] = {**earlier.get("rss_series", {}), **report.get("rss_series", {})}
    for key in SECTIONS:
        if report.get(key):
            out[key] = report[key]
    # An earlier merged run whose every scenario ran again left nothing of its own: it is not listed any more.
    wanted = set(scenarios.split(","))
    out["merged_runs"] = [m for m in earlier.get("merged_runs", []) if not set(m["scenarios"].split(",")) <= wanted]
    if report["runs"]:
        for key in ("args", "elapsed_s", "finished", "machine", "postgres"):
            out[key] = report[key]
    else:
        out["merged_runs"].append(
            {"scenarios": scenarios, "finished": report["finished"], "elapsed_s": report["elapsed_s"]}
        )
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(amain(args))
    from bench.report import check_targets, write_report

    checks = check_targets(report, args)  # this run's: what --check and the log below judge
    report["checks"] = checks
    earlier = args.out / "results.json"
    written = report
    if earlier.exists() and not args.fresh:
        written = merged(json.loads(earlier.read_text()), report, args.scenarios)
        written["checks"] = check_targets(written, args)
    (args.out / "results.json").write_text(json.dumps(written, indent=1, default=str))
    write_report(written, args)
    log(f"done in {report['elapsed_s']} s; results in {args.out}/RESULTS.md")
    missed = [c for c in checks if c["status"] == "missed"]
    for c in checks:
        log(f"{c['status']:>7}: {c['target']} -> {c['measured']}")
    if args.check and missed:
        log(f"{len(missed)} target(s) missed")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
