"""`sitegen`: the command line for people: migrate, enqueue, status, logs (live) and the demo."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import asyncpg
import typer
from arq.constants import abort_jobs_ss
from rich.console import Console
from rich.table import Table

from worker import client
from worker.follow import follow_logs
from worker.logs import setup_logging
from worker.migrate import migrate as run_migrations
from worker.settings import LogSection, Settings, SettingsError, load_settings, redact_url
from worker.store import QUERIES, Store, create_pool

app = typer.Typer(help="sitegen-worker: AI site generation on arq, with live progress.", no_args_is_help=True)
console = Console(highlight=False, soft_wrap=True)
T = TypeVar("T")

LEVEL_STYLE = {"debug": "dim", "info": "", "warning": "yellow", "error": "bold red"}
PHASE_STYLE = {"plan": "cyan", "content": "magenta", "code": "blue", "assemble": "green"}
FINAL_MESSAGES = ("generation succeeded", "generation failed", "job rejected", "already generated")

SAMPLE_BRIEF: dict[str, Any] = {
    "business_name": "Rosa's Bakery",
    "description": "Family bakery in Porto baking sourdough bread, pastel de nata and celebration cakes "
    "since 1998. Everything is made by hand every morning with local flour.",
    "industry": "bakery",
    "location": "Porto, Portugal",
    "audience": "Neighbours, coffee lovers and families planning a celebration",
    "tone": "warm and welcoming",
    "services": ["Sourdough bread", "Pastries", "Custom cakes", "Coffee and breakfast"],
    "contact": {
        "email": "hello@rosasbakery.example",
        "phone": "+351 222 000 111",
        "address": "Rua das Flores 12, 4050-262 Porto",
        "hours": "Tue-Sun 7:00-19:00",
    },
}


@app.callback()
def _setup() -> None:
    # Before settings are read (they may be what is wrong), so only the level comes from the env.
    setup_logging(LogSection(level=os.environ.get("SITEGEN_LOG__LEVEL", "INFO")), replica="sitegen")


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        console.print(f"[bold red]invalid settings:[/] {exc}")
        raise typer.Exit(2) from None


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except (OSError, asyncpg.PostgresError) as exc:
        console.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None


def _print_row(row: dict[str, Any]) -> None:
    created = row["created_at"].astimezone().strftime("%H:%M:%S")
    phase = row["phase"] or ""
    details = row.get("details") or {}
    extra = ""
    if "duration_ms" in details:
        tokens = details.get("input_tokens", 0) + details.get("output_tokens", 0)
        extra = f"  [dim]{details['duration_ms']} ms, {tokens} tokens[/]"
    style = LEVEL_STYLE.get(row["level"], "")
    message = f"[{style}]{row['message']}[/]" if style else row["message"]
    console.print(
        f"[dim]{created}[/] [{PHASE_STYLE.get(phase, 'white')}]{phase:<8}[/] {message}{extra}", soft_wrap=True
    )


@app.command()
def migrate() -> None:
    """Apply pending database migrations (safe to run from several replicas at once).

    Example: sitegen migrate
    """
    settings = _settings()
    applied = _run(run_migrations(settings.database.url, settings.database.migrations_dir))
    console.print(f"applied: {', '.join(applied)}" if applied else "database is up to date")


@app.command()
def enqueue(
    order_id: int,
    brief: Annotated[Path | None, typer.Option(help="JSON file with the brief ('-' for stdin)")] = None,
    regenerate: Annotated[bool, typer.Option(help="Start a fresh generation even if one succeeded")] = False,
) -> None:
    """Enqueue the generation of an order.

    Example: sitegen enqueue 42 --brief examples/brief.json
    """
    settings = _settings()
    data = None
    if brief is not None:
        data = json.loads(sys.stdin.read() if str(brief) == "-" else brief.read_text())

    async def go() -> str:
        redis = await client.connect(settings.redis.url)
        try:
            job = await client.enqueue_generation(
                redis, order_id, data, regenerate, queue_name=settings.worker.queue_name
            )
        finally:
            await redis.aclose()
        return f"enqueued job {job.job_id}" if job else f"a job for order {order_id} is already queued or running"

    console.print(_run(go()))


@app.command()
def status(
    order_id: Annotated[int | None, typer.Argument(help="Order id; all recent generations if omitted")] = None,
    limit: int = 20,
) -> None:
    """Show recent generations (of one order, or of all).

    Example: sitegen status 42
    """
    settings = _settings()

    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(settings.database.url)
        try:
            if order_id is None:
                rows: list[asyncpg.Record] = await conn.fetch(QUERIES["recent_generations"], limit)
            else:
                rows = await conn.fetch(QUERIES["generations_for_order"], order_id, limit)
            return rows
        finally:
            await conn.close()

    rows = _run(go())
    table = Table("order", "generation", "status", "phase", "attempt", "duration", "tokens", "error")
    for r in rows:
        usage = json.loads(r["usage"]) if r["usage"] else {}
        error = json.loads(r["error"]) if r["error"] else None
        table.add_row(
            str(r.get("order_id", order_id)),
            str(r["id"]),
            r["status"],
            r["current_phase"] or "",
            str(r["attempt"]),
            f"{r['duration_s']:.1f}s" if r["duration_s"] is not None else "",
            str(usage.get("input_tokens", 0) + usage.get("output_tokens", 0)),
            f"{error['type']}: {error['message'][:80]}" if error else "",
        )
    console.print(table if rows else f"no generations{'' if order_id is None else f' for order {order_id}'}")


@app.command()
def logs(
    order_id: int, follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new rows live")] = False
) -> None:
    """Print an order's progress log; --follow streams it live (LISTEN/NOTIFY).

    Example: sitegen logs 42 --follow
    """
    settings = _settings()

    async def go() -> None:
        stop = asyncio.Event()
        if not follow:
            stop.set()  # one pass over the stored rows
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        async for row in follow_logs(settings.database.url, order_id, stop=stop):
            _print_row(row)
        if not follow:
            return

    _run(go())


@app.command()
def cancel(order_id: int) -> None:
    """Cancel an order's active generation: it ends `cancelled` at its next safe point, committed phases kept.

    A queued generation is cancelled at once; a running one is interrupted (arq abort) and
    stops without committing the phase it was in.

    Example: sitegen cancel 42
    """
    settings = _settings()
    found = _run(_cancel(settings, order_id))
    if found is None:
        console.print(f"order {order_id} has no queued or running generation")
        raise typer.Exit(1)
    console.print(
        f"generation {found['id']} of order {order_id}: "
        + ("cancelled" if found["status"] == "cancelled" else "cancel requested; it stops at a safe point")
    )


async def _cancel(settings: Settings, order_id: int) -> dict[str, Any] | None:
    pool = await create_pool(settings.database, max_size=1, name="cli")
    try:
        found = await Store(pool, replica_id="sitegen-cli", lease_s=settings.worker.lease_s).request_cancel(
            order_id, "cancelled with sitegen cancel"
        )
    finally:
        await pool.close()
    if found is None or found["status"] == "cancelled":
        return found
    redis = await client.connect(settings.redis.url)
    try:
        # Interrupts a model call in flight; the generation sees the request and ends `cancelled`.
        await redis.zadd(abort_jobs_ss, {client.job_id(order_id): int(time.time() * 1000)})
    finally:
        await redis.aclose()
    return found


@app.command()
def config() -> None:
    """Print the effective settings, secrets masked.

    Example: SITEGEN_WORKER__MAX_JOBS=20 sitegen config
    """
    settings = _settings()
    data = settings.model_dump(mode="json")
    data["database"]["url"] = redact_url(settings.database.url)
    data["redis"]["url"] = redact_url(settings.redis.url)
    for provider in data["ai"]["providers"].values():
        # Custom headers may carry credentials (e.g. an Authorization header for a proxy).
        provider["headers"] = {name: "***" for name in provider["headers"]}
    console.print_json(json.dumps(data))


@app.command()
def demo(
    order_id: Annotated[int, typer.Option(help="Order id for the sample order")] = 1001,
    latency: Annotated[float, typer.Option(help="Seconds each model answer takes, to watch progress")] = 0.5,
    brief: Annotated[Path | None, typer.Option(help="JSON file with a brief instead of the sample")] = None,
    provider: Annotated[
        str,
        typer.Option(
            help="offline: templates in-process; fake: a local OpenAI-compatible server that "
            "answers one request with 429 and one with 500, so you watch the retries"
        ),
    ] = "offline",
) -> None:
    """Generate a real site end to end: local PostgreSQL and Redis (unless DATABASE_URL/REDIS_URL are set),
    migrations, a worker, one sample order, live progress.

    Example: sitegen demo --provider fake --order-id 7
    """
    from worker.services import LocalServices, ServicesUnavailable

    if provider not in ("offline", "fake"):
        console.print(f"[bold red]--provider must be offline or fake, not {provider!r}[/]")
        raise typer.Exit(2)
    data = json.loads(brief.read_text()) if brief else SAMPLE_BRIEF
    fake = None
    if provider == "fake":
        from worker.ai.fake_server import FakeProviderServer

        fake = FakeProviderServer(latency_s=latency).start()
        fake.script("429:1", "status:500")
        os.environ.update(_fake_provider_env(fake.url))
        console.print(f"fake OpenAI-compatible provider at {fake.url}/v1 (one 429, one 500 on the way)")
    services: LocalServices | None = None
    if not (os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL")):
        console.print("[bold]starting local PostgreSQL and Redis[/] (set DATABASE_URL and REDIS_URL to use yours)")
        try:
            services = LocalServices()
            services.start()
        except ServicesUnavailable as exc:
            console.print(f"[bold red]cannot start local services:[/] {exc}")
            raise typer.Exit(1) from None
        os.environ["DATABASE_URL"] = services.database_url
        os.environ["REDIS_URL"] = services.redis_url
    worker_proc: subprocess.Popen[bytes] | None = None
    log_path = Path(services.base_dir if services else tempfile.mkdtemp(prefix="sitegen-demo-")) / "demo-worker.log"
    try:
        settings = _settings()
        console.print(f"database {redact_url(settings.database.url)}  redis {redact_url(settings.redis.url)}")
        applied = _run(run_migrations(settings.database.url, settings.database.migrations_dir))
        console.print(f"migrations applied: {', '.join(applied) or 'none needed'}")
        with log_path.open("wb") as log_file:
            worker_proc = subprocess.Popen(
                [sys.executable, "-m", "arq", "worker.main.WorkerSettings"],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={
                    **os.environ,
                    "SITEGEN_WORKER__RUN_MIGRATIONS": "false",
                    "SITEGEN_AI__PROVIDERS__OFFLINE__LATENCY_S": str(latency),
                },
            )
        console.print(f"worker started (pid {worker_proc.pid}, log {log_path})")
        result = _run(_demo_run(settings, order_id, data, worker_proc))
        if result is None or result.get("status") != "succeeded":
            console.print(f"[bold red]the generation did not succeed[/]: {result}; worker log: {log_path}")
            raise typer.Exit(1)
        site = Path(result["output_dir"])
        console.print(f"\n[bold green]site ready:[/] {site / 'index.html'}")
        console.print(
            f"pages: {', '.join(result['pages'])}   tokens: {result['usage']['input_tokens']} in, "
            f"{result['usage']['output_tokens']} out   model calls: {result['usage']['calls']}"
        )
    finally:
        if worker_proc is not None and worker_proc.poll() is None:
            worker_proc.send_signal(signal.SIGTERM)
            try:
                worker_proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker_proc.kill()
        if services is not None:
            services.stop()
        if fake is not None:
            fake.stop()


def _fake_provider_env(url: str) -> dict[str, str]:
    """Settings (as env vars, for this process and the worker's) routing every task to the fake server."""
    env = {
        "SITEGEN_AI__PROVIDERS__FAKE__KIND": "openai",
        "SITEGEN_AI__PROVIDERS__FAKE__MODEL": "fake-gpt",
        "SITEGEN_AI__PROVIDERS__FAKE__BASE_URL": f"{url}/v1",
        "SITEGEN_AI__PROVIDERS__FAKE__API_KEY_ENV": "SITEGEN_DEMO_FAKE_KEY",
        "SITEGEN_AI__PROVIDERS__FAKE__MAX_RETRY_WAIT_S": "5",
        "SITEGEN_DEMO_FAKE_KEY": "demo-key-not-a-secret",
    }
    env.update({f"SITEGEN_AI__ROUTING__{task.upper()}": "fake" for task in ("planning", "content", "coding")})
    return env


async def _demo_run(
    settings: Settings, order_id: int, brief: dict[str, Any], worker_proc: subprocess.Popen[bytes]
) -> dict[str, Any] | None:
    redis = await client.connect(settings.redis.url)
    try:
        job = await client.enqueue_generation(
            redis, order_id, brief, regenerate=True, queue_name=settings.worker.queue_name
        )
        console.print(f"enqueued order {order_id} as job {job.job_id if job else '(already queued)'}\n")
        stop = asyncio.Event()
        result: dict[str, Any] | None = None
        started = time.monotonic()

        async def watch() -> None:
            async for row in follow_logs(settings.database.url, order_id, stop=stop, poll_s=0.5):
                _print_row(row)
                if row["message"].startswith(FINAL_MESSAGES):
                    stop.set()

        async def guard() -> None:
            while not stop.is_set():
                if worker_proc.poll() is not None:
                    console.print(f"[bold red]the worker exited with code {worker_proc.returncode}[/]")
                    stop.set()
                    return
                await asyncio.sleep(0.5)

        await asyncio.gather(watch(), guard())
        if job is not None and worker_proc.poll() is None:
            result = await job.result(timeout=30)
        console.print(f"[dim]done in {time.monotonic() - started:.1f}s[/]")
        return result
    finally:
        await redis.aclose()


if __name__ == "__main__":
    app()
