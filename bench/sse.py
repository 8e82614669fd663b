"""The `sse` scenario: many SSE clients on one `sitegen serve` process while generations run.

`make bench-sse`, or `python -m bench.sse --help`. Starts its own PostgreSQL and Redis, one real
`sitegen serve` process and one worker replica (offline provider with a latency), opens `--clients`
SSE streams (each following its own order), enqueues `--generations` of those orders, and measures:
the event delay (the row's `created_at`, set by the worker when it logs the row, before its buffered
writer commits it, to the event read by the client: an upper bound of commit -> client), the LISTEN
connections of the serve process, its peak RSS, and whether every client got every row of its order
once, in order. Writes bench/results/sse.json and SSE.md. Goals (issue 16): p95 < 100 ms, one LISTEN
connection, RSS < 300 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil

from bench.run import BRIEF, ROOT, log, pct
from worker import client
from worker.local.services import LocalServices, free_port
from worker.migrate import migrate

GOALS = {"p95_ms": 100.0, "listen_connections": 1, "rss_mib": 300.0}


class Follower:
    """One SSE client following one order until `end`."""

    def __init__(self, order_id: int) -> None:
        self.order_id = order_id
        self.ids: list[int] = []
        self.delays_ms: list[float] = []
        self.ended = asyncio.Event()
        self.connected = asyncio.Event()
        self.error: str | None = None

    async def run(self, http: aiohttp.ClientSession, url: str, token: str) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        try:
            async with http.get(f"{url}/v1/orders/{self.order_id}/events", headers=headers) as response:
                if response.status != 200:
                    self.error = f"HTTP {response.status}"
                    return
                self.connected.set()
                event: dict[str, str] = {}
                async for raw in response.content:
                    line = raw.decode().rstrip("\n")
                    if line:
                        name, _, value = line.partition(":")
                        event[name] = value.lstrip(" ")
                        continue
                    if event.get("event") == "progress":
                        row = json.loads(event["data"])
                        received = datetime.now(UTC)
                        self.ids.append(row["id"])
                        created = datetime.fromisoformat(row["created_at"])
                        self.delays_ms.append((received - created).total_seconds() * 1000)
                    elif event.get("event") == "end":
                        self.ended.set()
                        return
                    event = {}
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.connected.set()


async def scrape(http: aiohttp.ClientSession, url: str, token: str, name: str) -> float:
    async with http.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}) as response:
        for line in (await response.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return float("nan")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="sitegen-bench-sse-"))
    work.chmod(0o755)
    services = LocalServices(base_dir=work / "services").start()
    token = secrets.token_hex(16)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        await migrate(services.database_url, ROOT / "migrations")
        conn = await asyncpg.connect(services.database_url)
        orders = list(range(args.order_base, args.order_base + args.clients))
        await conn.executemany(
            "INSERT INTO site_orders (id, brief) VALUES ($1, $2::jsonb)", [(o, json.dumps(BRIEF)) for o in orders]
        )
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SITEGEN_")}
        env.update(
            DATABASE_URL=services.database_url,
            REDIS_URL=services.redis_url,
            PYTHONPATH=str(ROOT),
            SITEGEN_LOG__LEVEL="WARNING",
            SITEGEN_OUTPUT__DIR=str(work / "sites"),
            SITEGEN_API_WRITE_TOKENS=token,
            SITEGEN_API__PORT=str(port),
            SITEGEN_WORKER__MAX_JOBS=str(args.max_jobs),
            SITEGEN_WORKER__RUN_MIGRATIONS="false",
            SITEGEN_AI__PROVIDERS__OFFLINE__LATENCY_S=str(args.latency_ms / 1000),
        )
        # Started once, before anything is measured: blocking for the fork does not matter here.
        serve_log = (work / "serve.log").open("wb")
        serve_cmd = [sys.executable, "-m", "worker.cli", "serve"]
        serve = subprocess.Popen(serve_cmd, cwd=ROOT, env=env, stdout=serve_log, stderr=subprocess.STDOUT)  # noqa: ASYNC220
        procs.append(serve)
        worker_log = (work / "worker.log").open("wb")
        worker_cmd = [sys.executable, "-m", "arq", "worker.main.WorkerSettings"]
        worker_env = {**env, "SITEGEN_WORKER__REPLICA_ID": "bench-sse"}
        worker = subprocess.Popen(worker_cmd, cwd=ROOT, env=worker_env, stdout=worker_log, stderr=subprocess.STDOUT)  # noqa: ASYNC220
        procs.append(worker)
        url = f"http://127.0.0.1:{port}"
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with http.get(f"{url}/healthz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline or serve.poll() is not None:
                    raise RuntimeError(f"sitegen serve did not come up:\n{(work / 'serve.log').read_text()[-3000:]}")
                await asyncio.sleep(0.2)
            log(f"sse: serve up; opening {args.clients} streams")
            followers = [Follower(o) for o in orders]
            tasks = [asyncio.create_task(f.run(http, url, token)) for f in followers]
            for f in followers:
                await f.connected.wait()
            while await scrape(http, url, token, "sitegen_api_sse_clients") < args.clients:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            serve_ps = psutil.Process(serve.pid)
            rss_before = serve_ps.memory_info().rss
            peak_rss = rss_before
            listeners: set[int] = set()
            stop = asyncio.Event()

            async def sample() -> None:
                nonlocal peak_rss
                while not stop.is_set():
                    peak_rss = max(peak_rss, serve_ps.memory_info().rss)
                    count = await conn.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'sitegen-api:listen'"
                    )
                    listeners.add(int(count))
                    await asyncio.sleep(0.25)

            sampler = asyncio.create_task(sample())
            followed = followers[: args.generations]
            redis = await client.connect(services.redis_url)
            started = time.monotonic()
            for f in followed:
                await client.enqueue_generation(redis, f.order_id)
            await redis.aclose()
            log(f"sse: {len(followed)} generations enqueued; waiting for their `end`")
            await asyncio.wait_for(asyncio.gather(*(f.ended.wait() for f in followed)), args.timeout)
            elapsed = time.monotonic() - started
            stop.set()
            await sampler
            cpu = serve_ps.cpu_times()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        rows = await conn.fetch(
            "SELECT order_id, array_agg(id ORDER BY id) AS ids FROM site_generation_logs"
            " WHERE order_id = ANY($1::bigint[]) GROUP BY order_id",
            [f.order_id for f in followed],
        )
        table = {r["order_id"]: list(r["ids"]) for r in rows}
        await conn.close()
        wrong = [f.order_id for f in followed if f.ids != table.get(f.order_id, [])]
        delays = [d for f in followed for d in f.delays_ms]
        return {
            "clients": args.clients,
            "generations": len(followed),
            "latency_ms": args.latency_ms,
            "max_jobs": args.max_jobs,
            "events": len(delays),
            "elapsed_s": round(elapsed, 1),
            "delay_ms": {q: round(pct(delays, v), 1) for q, v in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))}
            | {"max": round(max(delays), 1) if delays else None},
            "listen_connections": sorted(listeners),
            "rss_mib": {"idle_with_clients": round(rss_before / 2**20, 1), "peak": round(peak_rss / 2**20, 1)},
            "serve_cpu_s": round(cpu.user + cpu.system, 1),
            "clients_with_wrong_rows": wrong,
            "client_errors": [f.error for f in followers if f.error][:5],
        }
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        services.stop()
        shutil.rmtree(work, ignore_errors=True)


def report(result: dict[str, Any]) -> tuple[str, list[str]]:
    d, rss = result["delay_ms"], result["rss_mib"]
    missed = []
    if not d["p95"] < GOALS["p95_ms"]:
        missed.append(f"event delay p95 {d['p95']} ms >= {GOALS['p95_ms']:g} ms")
    if result["listen_connections"] != [1]:
        missed.append(f"LISTEN connections seen: {result['listen_connections']}")
    if not rss["peak"] < GOALS["rss_mib"]:
        missed.append(f"peak RSS {rss['peak']} MiB >= {GOALS['rss_mib']:g} MiB")
    if result["clients_with_wrong_rows"]:
        missed.append(f"{len(result['clients_with_wrong_rows'])} client(s) missed or repeated rows")
    text = f"""# SSE: {result["clients"]:,} clients on one `sitegen serve` process

Measured {time.strftime("%Y-%m-%d %H:%M")} on {psutil.cpu_count()} CPUs by `python -m bench.sse` (`make bench-sse`):
{result["clients"]:,} SSE streams, each following its own order, while {result["generations"]} of those
orders were generated by one replica (max_jobs {result["max_jobs"]}, offline provider at
{result["latency_ms"]:g} ms per model call), all on this machine.

| measure | result | goal |
|---|---|---|
| event delay p50 / p95 / p99 / max (row `created_at` -> client) | {d["p50"]} / {d["p95"]} / {d["p99"]} / \
{d["max"]} ms | p95 < 100 ms |
| LISTEN connections of the serve process (every sample) | {result["listen_connections"]} | 1 |
| serve RSS with every client connected / peak | {rss["idle_with_clients"]} / {rss["peak"]} MiB | < 300 MiB |
| progress events delivered | {result["events"]:,} in {result["elapsed_s"]} s | |
| clients that missed or repeated a row (checked against the table) | {len(result["clients_with_wrong_rows"])} | 0 |
| serve CPU for the whole run | {result["serve_cpu_s"]} s | |

The delay is measured from the moment the worker logged the row (before its buffered writer committed
it), so it bounds commit -> client from above. The bench process itself runs the {result["clients"]:,}
clients on the same 2 cores, so the figures include their CPU contention.

{"All goals met." if not missed else "Missed: " + "; ".join(missed)}
"""
    return text, missed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--generations", type=int, default=200, help="orders of the clients that get generated")
    p.add_argument("--max-jobs", type=int, default=50)
    p.add_argument("--latency-ms", type=float, default=200, help="offline provider latency per model call")
    p.add_argument("--order-base", type=int, default=900_001)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    text, missed = report(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sse.json").write_text(json.dumps(result, indent=1))
    (args.out / "SSE.md").write_text(text)
    log(f"sse: {json.dumps(result)}")
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
