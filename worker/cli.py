"""`sitegen`: the command line for people: migrate, enqueue, status, logs (live), retry, cancel, preview,
check and the demo."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, TypeVar

import aiohttp
import asyncpg
import redis.asyncio
import redis.exceptions
import typer
from arq import ArqRedis
from arq.constants import abort_jobs_ss
from arq.jobs import Job
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table
from rich.text import Text

from worker import client
from worker.ai.http import env_proxy
from worker.ai.limits import read_budget
from worker.follow import follow_logs, follow_position
from worker.local.screenshot import screenshot
from worker.logs import setup_logging
from worker.migrate import MigrationError, pending_migrations
from worker.migrate import migrate as run_migrations
from worker.progress import END_EVENTS, event_of
from worker.settings import LogSection, Settings, SettingsError, load_settings, redact_url, url_secrets
from worker.site_headers import site_headers
from worker.store import ACTIVE, PHASES, QUERIES, Store, create_pool

app = typer.Typer(help="sitegen-worker: AI site generation on arq, with live progress.", no_args_is_help=True)
# No emoji codes either: `:warning:` in a model's text is printed as written.
console = Console(highlight=False, soft_wrap=True, emoji=False)
T = TypeVar("T")

LEVEL_STYLE = {"debug": "dim", "info": "", "warning": "yellow", "error": "bold red"}
PHASE_STYLE = {"plan": "cyan", "content": "magenta", "code": "blue", "assemble": "green"}
#: Kinds of progress rows after which the demo stops following: its one job has ended.
DEMO_FINAL_EVENTS = END_EVENTS | {"generation.already_done"}
STATUS_STYLE = {
    "queued": "blue",
    "running": "cyan",
    "succeeded": "green",
    "failed": "bold red",
    "cancelled": "yellow",
}

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


#: Characters that move the cursor, start an escape sequence (ESC, C1 CSI/OSC), end a line or reorder
#: text (bidi controls): printed escaped, so text from outside cannot rewrite or fake what a terminal shows.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def visible(value: object) -> str:
    """`value` as text with every control character escaped (ESC as `\\x1b`, CR as `\\r`), tabs kept."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(
        c
        if c == "\t" or (c.isprintable() and c not in _BIDI)
        else (repr(c)[1:-1] if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        for c in text
    )


def shown(value: object) -> str:
    """Text from outside (the model, a brief, a driver's error, a request line) inside our Rich markup:
    control characters escaped and markup escaped, so `[/bold]` or `[link=...]` is printed as written."""
    return escape(visible(value))


def _text(value: object, style: str = "") -> Text:
    """Text from outside as a Rich `Text` (never parsed as markup), control characters escaped."""
    return Text(visible(value), style=style)


@app.callback()
def _setup() -> None:
    # Before settings are read (they may be what is wrong), so only the level comes from the env.
    setup_logging(LogSection(level=os.environ.get("SITEGEN_LOG__LEVEL", "INFO")), replica="sitegen")


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        console.print(f"[bold red]invalid settings:[/] {shown(exc)}")
        raise typer.Exit(2) from None


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except (OSError, asyncpg.PostgresError, redis.exceptions.RedisError) as exc:
        console.print(f"[bold red]error:[/] {type(exc).__name__}: {shown(exc)}")
        raise typer.Exit(1) from None


def _print_row(row: dict[str, Any]) -> None:
    """One progress row as a line; its message (often carrying the model's text) is printed as written."""
    created = row["created_at"].astimezone().strftime("%H:%M:%S")
    phase = row["phase"] or ""
    details = row.get("details") or {}
    line = Text.assemble((created, "dim"), " ", _text(f"{phase:<8}", PHASE_STYLE.get(phase, "white")), " ")
    line.append_text(_text(row["message"], LEVEL_STYLE.get(row["level"], "")))
    if "duration_ms" in details:
        tokens = details.get("input_tokens", 0) + details.get("output_tokens", 0)
        line.append_text(_text(f"  {details['duration_ms']} ms, {tokens} tokens", "dim"))
    console.print(line, soft_wrap=True)


@app.command()
def migrate() -> None:
    """Apply pending database migrations (safe to run from several replicas at once).

    Example: sitegen migrate
    """
    settings = _settings()
    applied = _run(run_migrations(settings.database.url, settings.database.migrations_dir))
    console.print(_text(f"applied: {', '.join(applied)}") if applied else "database is up to date")


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

    console.print(_text(_run(go())))


@app.command()
def status(
    order_id: Annotated[int | None, typer.Argument(help="Order id; all recent generations if omitted")] = None,
    limit: int = 20,
) -> None:
    """Show recent generations (of one order, or of all): status, phase, attempt, duration, tokens, cost, error.

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
    table = Table("order", "generation", "status", "phase", "attempt", "duration", "tokens", "cost", "waiting", "error")
    for r in rows:
        usage = json.loads(r["usage"]) if r["usage"] else {}
        error = json.loads(r["error"]) if r["error"] else None
        cost = usage.get("cost_usd")
        waiting = _waiting(r["status"], r["last_message"], error)
        table.add_row(
            str(r.get("order_id", order_id)),
            str(r["id"]),
            _text(r["status"], STATUS_STYLE.get(r["status"], "white")),
            _text(r["current_phase"] or ""),
            str(r["attempt"]),
            f"{r['duration_s']:.1f}s" if r["duration_s"] is not None else "",
            str(usage.get("input_tokens", 0) + usage.get("output_tokens", 0)),
            f"${cost:.4f}" if isinstance(cost, int | float) else "",
            _text(waiting, "yellow"),
            _text("" if waiting else _error_summary(error)),
        )
    console.print(table if rows else f"no generations{'' if order_id is None else f' for order {order_id}'}")
    budgets = _run(_provider_budgets(settings))
    if budgets is not None:
        console.print(budgets)


def _waiting(status: str, last_message: str | None, error: dict[str, Any] | None) -> str:
    """What an active generation waits for: a provider's budget in its phase, or after handing back for it."""
    if status not in ACTIVE:
        return ""
    if last_message and last_message.startswith("waiting for "):
        return last_message.removeprefix("waiting for ")
    if error and error.get("type") == "BudgetWaitExceeded":
        details = error.get("details") or {}
        return f"{details.get('provider', 'a provider')}'s {details.get('budget', '')} budget (handed back)"
    return ""


async def _provider_budgets(settings: Settings) -> Table | None:
    """The shared budget of each routed provider with limits, as Redis holds it now (None: nothing to show)."""
    routed = dict.fromkeys(name for names in settings.ai.routing.values() for name in names)
    providers = {name: settings.ai.providers[name] for name in routed if settings.ai.providers[name].kind != "offline"}
    if not providers:
        return None
    table = Table(
        "provider", "limits", "requests booked", "tokens booked", "cluster calls", "paused", title="providers"
    )
    try:
        redis_ = redis.asyncio.Redis.from_url(settings.redis.url, socket_connect_timeout=2, socket_timeout=2)
        try:
            states = {name: await read_budget(redis_, name) for name in providers}
        finally:
            await redis_.aclose()
    except (OSError, redis.exceptions.RedisError) as exc:
        console.print(
            _text(f"provider budgets unknown: Redis {redact_url(settings.redis.url)}: {_failure(exc)}", "dim")
        )
        return None
    for name, config in providers.items():
        state = states[name]
        limits = [
            f"{config.requests_per_minute} req/min" if config.requests_per_minute else "",
            f"{config.tokens_per_minute:,} tok/min" if config.tokens_per_minute else "",
            f"{config.cluster_max_concurrency} at once" if config.cluster_max_concurrency else "",
        ]
        table.add_row(
            _text(name),
            ", ".join(x for x in limits if x) or "none",
            f"{state.requests_backlog_s:.1f}s ahead" if config.requests_per_minute else "",
            f"{state.tokens_backlog_s:.1f}s ahead" if config.tokens_per_minute else "",
            f"{state.calls_in_flight}/{config.cluster_max_concurrency}" if config.cluster_max_concurrency else "",
            f"[yellow]{state.paused_s:.1f}s left[/]" if state.paused_s else "",
        )
    return table


def _error_summary(error: dict[str, Any] | None) -> str:
    if not error:
        return ""
    text = f"{error.get('type', 'Error')}: {error.get('message', '')}"
    if error.get("phase"):
        text += f" (phase {error['phase']})"
    return text if len(text) <= 100 else text[:99] + "…"


@app.command()
def logs(
    order_id: int,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new rows live")] = False,
    keep: Annotated[
        bool, typer.Option("--keep", help="With --follow: keep following after the generation ends (Ctrl-C stops)")
    ] = False,
) -> None:
    """Print an order's progress log; --follow streams it live (LISTEN/NOTIFY) with a phase progress bar.

    --follow stops by itself when the order's generation ends (succeeded, failed or cancelled);
    if none is queued or running, it waits for the next one. It survives PostgreSQL restarts.

    Example: sitegen logs 42 --follow
    """
    settings = _settings()
    dsn = settings.database.url

    async def go() -> None:
        stop = asyncio.Event()
        if not follow:
            stop.set()  # one pass over the stored rows
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        watch_end = follow and not keep
        history_end = 0
        if watch_end:
            history_end, active = await follow_position(dsn, order_id)
            if not active:
                console.print(
                    f"[dim]order {order_id} has no queued or running generation: following until the next one "
                    "ends (Ctrl-C stops)[/]"
                )
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
            disable=not follow or not console.is_terminal,
        )
        bar = progress.add_task("phases", total=len(PHASES))
        with progress:
            async for row in follow_logs(dsn, order_id, stop=stop):
                _print_row(row)
                _advance(progress, bar, row)
                if (
                    watch_end
                    and not stop.is_set()
                    and row["id"] > history_end
                    and event_of(row) in END_EVENTS
                    and await _generation_ended(dsn, order_id, stop)
                ):
                    stop.set()

    _run(go())


def _advance(progress: Progress, bar: TaskID, row: dict[str, Any]) -> None:
    """Move the phase bar on rows of kind generation.started, phase.started and phase.done."""
    event, phase = event_of(row), row["phase"]
    if event == "generation.started":
        progress.update(bar, completed=0, description="generation started")
    elif event in ("phase.started", "phase.done") and phase in PHASES:
        index = PHASES.index(phase)
        if event == "phase.done":
            progress.update(bar, completed=index + 1, description=f"phase {phase} done")
        else:
            progress.update(bar, completed=index, description=f"phase {phase}")


async def _generation_ended(dsn: str, order_id: int, stop: asyncio.Event, wait_s: float = 60) -> bool:
    """True when no generation of the order is queued or running (asked again while PostgreSQL is away)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            _, active = await follow_position(dsn, order_id)
            return not active
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            if stop.is_set() or time.monotonic() > deadline:
                return False
            await asyncio.sleep(1)


@app.command()
def retry(order_id: int) -> None:
    """Run a failed or cancelled generation again: a fresh generation with the order's stored brief.

    A queued or running generation is left alone (the job is deduplicated); a succeeded one is not
    redone (use `sitegen enqueue ORDER --regenerate` for a new site).

    Example: sitegen retry 42 && sitegen logs 42 --follow
    """
    settings = _settings()
    overview = _run(_order_overview(settings, order_id))
    if overview is None or not overview["has_brief"]:
        reason = "does not exist" if overview is None else "has no stored brief"
        console.print(
            f"[bold red]order {order_id} {reason}[/]: enqueue it with a brief: "
            f"sitegen enqueue {order_id} --brief brief.json"
        )
        raise typer.Exit(1)
    status_ = overview["status"]
    if status_ == "succeeded":
        console.print(
            f"the latest generation of order {order_id} ({overview['generation_id']}) succeeded: nothing to retry. "
            f"For a fresh site: sitegen enqueue {order_id} --regenerate"
        )
        raise typer.Exit(1)

    async def go() -> str | None:
        redis_ = await client.connect(settings.redis.url)
        try:
            job = await client.enqueue_generation(redis_, order_id, None, False, queue_name=settings.worker.queue_name)
        finally:
            await redis_.aclose()
        return job.job_id if job else None

    job_id = _run(go())
    if job_id is None:
        console.print(f"a job for order {order_id} is already queued or running; follow it: sitegen logs {order_id} -f")
        raise typer.Exit(1)
    if status_ in ACTIVE:
        what = f"generation {overview['generation_id']} ({status_}) resumes after its last committed phase"
    elif status_ is None:
        what = "a first generation starts with the stored brief"
    else:
        error = overview["error"]
        summary = _error_summary(json.loads(error) if isinstance(error, str) else error)
        what = (
            f"a fresh generation starts with the stored brief (generation {overview['generation_id']} ended "
            f"{status_}{': ' + summary if summary else ''})"
        )
    console.print(
        Text.assemble(f"enqueued job {job_id}: ", _text(what), f"\nfollow it: sitegen logs {order_id} --follow")
    )


async def _order_overview(settings: Settings, order_id: int) -> dict[str, Any] | None:
    pool = await create_pool(settings.database, max_size=1, name="cli")
    try:
        return await Store(pool, replica_id="sitegen-cli", lease_s=settings.worker.lease_s).order_overview(order_id)
    finally:
        await pool.close()


class _SiteHandler(SimpleHTTPRequestHandler):
    """The site folder over HTTP with the API's site headers (worker.site_headers); nothing outside the folder
    (symlinks included) and no folder listings."""

    def __init__(self, *args: Any, directory: str, headers: dict[str, str], **kwargs: Any) -> None:
        self.site_headers = headers
        self.root = Path(directory).resolve()
        super().__init__(*args, directory=directory, **kwargs)

    def end_headers(self) -> None:
        for name, value in self.site_headers.items():  # every answer, errors and redirects too
            self.send_header(name, value)
        super().end_headers()

    def send_head(self) -> Any:
        path = Path(self.translate_path(self.path))
        # A folder is answered with its index.html (or index.htm): that file must be inside too.
        candidates = [path, path / "index.html", path / "index.htm"] if path.is_dir() else [path]
        try:
            inside = all(c.resolve().is_relative_to(self.root) for c in candidates if c == path or c.exists())
        except (OSError, RuntimeError, ValueError):
            inside = False
        if not inside:
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return None
        return super().send_head()

    def list_directory(self, path: str | os.PathLike[str]) -> None:
        self.send_error(HTTPStatus.NOT_FOUND, "File not found")

    def log_message(self, format: str, *args: Any) -> None:
        # The request line is whatever a client sent (a page's link can carry `[/bold]` or an escape sequence).
        console.print(_text(f"{self.address_string()} {format % args}", "dim"))


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@app.command()
def preview(
    order_id: int,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: any free port)")] = 0,
) -> None:
    """Serve an order's generated site on 127.0.0.1 until Ctrl-C, and print its URL.

    Example: sitegen preview 42 --port 8000   (then open http://127.0.0.1:8000/)
    """
    settings = _settings()
    site = settings.output.dir / str(order_id)
    if not (site / "index.html").is_file():
        console.print(
            f"[bold red]no site for order {order_id}[/] ({shown(site.absolute())}/index.html does not exist): "
            f"see `sitegen status {order_id}`; generate it with `sitegen enqueue {order_id}`"
        )
        raise typer.Exit(1)
    headers = site_headers(settings.output.allowed_embed_hosts)
    handler = functools.partial(_SiteHandler, directory=str(site.absolute()), headers=headers)
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as exc:
        console.print(f"[bold red]cannot listen on 127.0.0.1:{port}:[/] {shown(exc)}")
        raise typer.Exit(1) from None
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    console.print(f"serving {shown(site.absolute())} at [bold]{url}[/] (Ctrl-C stops)")
    screenshot = settings.output.dir / f"{order_id}.png"
    if screenshot.is_file():
        console.print(_text(f"screenshot: {screenshot.absolute()}"))
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    console.print("stopped")


@app.command()
def check(
    timeout: Annotated[float, typer.Option(help="Seconds each check may take")] = 5.0,
) -> None:
    """Check every dependency: Redis, PostgreSQL, migrations and each routed AI provider; exit 1 if any fails.

    A provider is reachable when its API root answers HTTP at all (no key is sent).

    Example: sitegen check
    """
    settings = _settings()
    results = asyncio.run(_checks(settings, timeout))
    table = Table("check", "result", "detail")
    for name, ok, detail in results:
        table.add_row(_text(name), "[green]ok[/]" if ok else "[bold red]FAIL[/]", _text(_scrub(detail, settings)))
    console.print(table)
    failed = [name for name, ok, _ in results if not ok]
    if failed:
        console.print(f"[bold red]{len(failed)} check(s) failed:[/] {shown(', '.join(failed))}")
        raise typer.Exit(1)
    console.print("[green]all checks passed[/]")


def _scrub(text: str, settings: Settings) -> str:
    """Never echo a password from the URLs, whatever a driver put in its message (an invalid-URL error quotes
    the whole URL)."""
    urls = [settings.database.url, settings.redis.url, *(p.api_root for p in settings.ai.providers.values())]
    for url in urls:
        for secret in url_secrets(url):  # as written in the URL, and percent-decoded as drivers use it
            text = text.replace(secret, "***")
    return text


def _failure(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _checks(settings: Settings, limit_s: float) -> list[tuple[str, bool, str]]:
    results: list[tuple[str, bool, str]] = []
    redis_url = redact_url(settings.redis.url)
    try:
        conn = redis.asyncio.Redis.from_url(settings.redis.url, socket_connect_timeout=limit_s, socket_timeout=limit_s)
        try:
            await asyncio.wait_for(conn.ping(), limit_s)
        finally:
            await conn.aclose()
        results.append(("redis", True, f"PING answered by {redis_url}"))
    except Exception as exc:
        results.append(("redis", False, f"{redis_url}: {_failure(exc)}"))

    db_url = redact_url(settings.database.url)
    postgres_ok = False
    try:
        pg = await asyncpg.connect(settings.database.url, timeout=limit_s)
        try:
            await asyncio.wait_for(pg.fetchval("SELECT 1"), limit_s)
        finally:
            await pg.close()
        postgres_ok = True
        results.append(("postgresql", True, f"SELECT 1 on {db_url}"))
    except Exception as exc:
        results.append(("postgresql", False, f"{db_url}: {_failure(exc)}"))

    if not postgres_ok:
        results.append(("migrations", False, "not checked: PostgreSQL is unreachable"))
    else:
        try:
            pending = await asyncio.wait_for(
                pending_migrations(settings.database.url, settings.database.migrations_dir), limit_s
            )
            if pending:
                # The first and the last when there are many: a fresh database has them all pending.
                shown = ", ".join(pending) if len(pending) <= 3 else f"{pending[0]} ... {pending[-1]}"
                results.append(("migrations", False, f"pending: {shown} ({len(pending)}; run `sitegen migrate`)"))
            else:
                results.append(("migrations", True, "up to date"))
        except (MigrationError, OSError, asyncpg.PostgresError, TimeoutError) as exc:
            results.append(("migrations", False, _failure(exc)))

    routed = list(dict.fromkeys(name for names in settings.ai.routing.values() for name in names))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=limit_s)) as http:
        for name in routed:
            provider = settings.ai.providers[name]
            label = f"provider {name} ({provider.kind})"
            if provider.kind == "offline":
                results.append((label, True, "offline templates, no network"))
                continue
            url = redact_url(provider.api_root)
            try:
                # Any HTTP answer (even 401/404) proves the host is reachable; no key or header is sent.
                # Through the environment's proxy, as the worker's calls go (env_proxy: an unusable one fails here).
                proxy = env_proxy(provider.api_root)
                async with http.get(provider.api_root, allow_redirects=False, proxy=proxy) as response:
                    results.append((label, True, f"HTTP {response.status} from {url}"))
            except Exception as exc:
                results.append((label, False, f"{url}: {_failure(exc)}"))
    return results


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
        await redis.zadd(abort_jobs_ss, {found["job_id"] or client.job_id(order_id): int(time.time() * 1000)})
    finally:
        await redis.aclose()
    return found


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on (default: setting api.host)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: setting api.port; 0: any free port)")] = None,
) -> None:
    """Run the progress API and the dashboard (aiohttp) until Ctrl-C or SIGTERM.

    Tokens come from the environment only: SITEGEN_API_READ_TOKENS and SITEGEN_API_WRITE_TOKENS
    (comma-separated, at least 32 characters each). Without any, it is read-only and answers loopback
    addresses and host names only. SITEGEN_API_SIGNING_KEY (optional, 32 bytes or more) signs sessions
    and stream tokens; without it a random key is kept in PostgreSQL.

    Example: SITEGEN_API_WRITE_TOKENS=$(openssl rand -hex 24) sitegen serve --host 0.0.0.0
    """
    from worker.api.app import ServeRefused
    from worker.api.app import serve as run_api
    from worker.api.auth import AuthConfigError, Tokens

    settings = _settings()
    updates = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    if updates:
        settings = settings.model_copy(update={"api": settings.api.model_copy(update=updates)})
    setup_logging(settings.log, replica="sitegen-api")
    try:
        run_api(settings, Tokens.from_env(), print_url=lambda url: console.print(f"serving on [bold]{url}[/]"))
    except (ServeRefused, AuthConfigError) as exc:
        console.print(str(exc), style="bold red", markup=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        console.print(f"[bold red]cannot serve on {settings.api.host}:{settings.api.port}:[/] {exc}")
        raise typer.Exit(1) from None


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
    serve: Annotated[
        bool,
        typer.Option("--serve", help="Then keep the dashboard and API running on the demo's services until Ctrl-C"),
    ] = False,
    port: Annotated[int, typer.Option(help="With --serve: port on 127.0.0.1 (0: any free port)")] = 8000,
) -> None:
    """Generate a real site end to end: local PostgreSQL and Redis (unless DATABASE_URL/REDIS_URL are set),
    migrations, a worker, one sample order, live progress. With --serve, the dashboard and API stay up
    (with a demo token, printed) until Ctrl-C.

    Example: sitegen demo --provider fake --order-id 7
    """
    from worker.local.services import LocalServices, ServicesUnavailable

    if provider not in ("offline", "fake"):
        console.print(f"[bold red]--provider must be offline or fake, not {shown(repr(provider))}[/]")
        raise typer.Exit(2)
    data = json.loads(brief.read_text()) if brief else SAMPLE_BRIEF
    fake = None
    if provider == "fake":
        from worker.local.fake_server import FakeProviderServer

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
            console.print(f"[bold red]cannot start local services:[/] {shown(exc)}")
            raise typer.Exit(1) from None
        os.environ["DATABASE_URL"] = services.database_url
        os.environ["REDIS_URL"] = services.redis_url
    worker_proc: subprocess.Popen[bytes] | None = None
    log_path = Path(services.base_dir if services else tempfile.mkdtemp(prefix="sitegen-demo-")) / "demo-worker.log"
    try:
        settings = _settings()
        console.print(_text(f"database {redact_url(settings.database.url)}  redis {redact_url(settings.redis.url)}"))
        applied = _run(run_migrations(settings.database.url, settings.database.migrations_dir))
        console.print(_text(f"migrations applied: {', '.join(applied) or 'none needed'}"))
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
        console.print(_text(f"worker started (pid {worker_proc.pid}, log {log_path})"))
        result = _run(_demo_run(settings, order_id, data, worker_proc))
        if result is None or result.get("status") != "succeeded":
            console.print(
                f"[bold red]the generation did not succeed[/]: {shown(result)}; worker log: {shown(log_path)}"
            )
            raise typer.Exit(1)
        site = Path(result["output_dir"])
        console.print(f"\n[bold green]site ready:[/] {shown(site / 'index.html')}")
        console.print(
            _text(
                f"pages: {', '.join(result['pages'])}   tokens: {result['usage']['input_tokens']} in, "
                f"{result['usage']['output_tokens']} out   model calls: {result['usage']['calls']}"
            )
        )
        shot = site.parent / f"{order_id}.png"
        if screenshot(site / "index.html", shot):
            console.print(f"[bold green]screenshot:[/] {shown(shot)}")
        else:
            console.print("[yellow]no screenshot: Chromium is not installed (make quality-tools installs it)[/]")
        _run(_demo_edit(settings, order_id, log_path))
        console.print(f"[dim]browse it: sitegen preview {order_id}; its history: sitegen versions {order_id}[/]")
        if serve:
            _demo_serve(settings, order_id, port)
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


def _demo_serve(settings: Settings, order_id: int, port: int) -> None:
    """The dashboard and API on the demo's services, with a write token made for this run, until Ctrl-C."""
    import secrets

    from worker.api.app import serve as run_api
    from worker.api.auth import Tokens

    token = secrets.token_urlsafe(24)  # shown once, here, for the person running the demo; never logged
    settings = settings.model_copy(update={"api": settings.api.model_copy(update={"host": "127.0.0.1", "port": port})})

    def show(url: str) -> None:
        console.print(
            f"\n[bold green]dashboard:[/] {url}   (sign in with the demo token below; Ctrl-C stops everything)\n"
            f"demo token (write): [bold]{token}[/]\n"
            f"order page (progress, version history, diffs): {url}orders/{order_id}\n"
            f"events: curl -N -H 'Authorization: Bearer <token>' {url}v1/orders/{order_id}/events"
        )

    run_api(settings, Tokens(write=(token,)), print_url=show)


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


#: The edit `make demo` ends with: one the offline provider (and the fake one) carries out on any site.
DEMO_EDIT = "Make the header blue"
#: How long the demo waits for its edit (a few model calls at the demo's latency).
DEMO_EDIT_WAIT_S = 120.0


async def _demo_edit(settings: Settings, order_id: int, log_path: Path) -> None:
    """Apply DEMO_EDIT to the demo's site, with its progress, then print what it changed (exit 1 if it fails)."""
    console.print(f"\n[bold]editing the site:[/] {DEMO_EDIT!r}")
    after_id = (await follow_position(settings.database.url, order_id))[0]
    redis_ = await client.connect(settings.redis.url)
    try:
        job = await client.enqueue_edit(redis_, order_id, DEMO_EDIT, queue_name=settings.worker.queue_name)
    finally:
        await redis_.aclose()
    if job is None:
        console.print("[bold red]the demo's edit was not enqueued[/] (a job with its id exists)")
        raise typer.Exit(1)
    try:
        async with asyncio.timeout(DEMO_EDIT_WAIT_S):
            run = await _follow_job(settings, order_id, job.job_id, after_id)
    except TimeoutError:
        run = None
    if run is None or run["status"] != "succeeded":
        why = f"no end within {DEMO_EDIT_WAIT_S:.0f} s" if run is None else _error_summary(run["error"])
        console.print(Text.assemble(("the demo's edit did not succeed", "bold red"), ": ", _text(why)))
        console.print(f"worker log: {shown(log_path)}")
        raise typer.Exit(1)
    console.print(f"[bold green]edit applied:[/] version {run['version']} of order {order_id} is live\n")
    _print_diff(order_id, run["version"], *await _version_diff(settings, order_id, run["version"], None))


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
                if event_of(row) in DEMO_FINAL_EVENTS:
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


# --------------------------------------------------------------------------- versions and edits (issue 22)

KIND_STYLE = {"generation": "blue", "edit": "magenta", "rollback": "yellow"}
DIFF_STYLE = {"+": "green", "-": "red", "@": "cyan", "\\": "dim"}
#: How long `--follow` waits, after the row announcing its run's end, for the run's status to say so.
END_STATUS_WAIT_S = 5.0


async def _cli_pool(settings: Settings) -> asyncpg.Pool:
    return await create_pool(settings.database, max_size=1, name="cli")


async def _site_to_change(pool: asyncpg.Pool, order_id: int, what: str, version: int | None, name: str) -> None:
    """Exit 1, saying why, unless the order has a site to `what` and (if given) version `version` exists."""
    state = await pool.fetchrow(QUERIES["api_version_state"], order_id)
    if state is None:
        console.print(f"[bold red]order {order_id} not found[/]")
        raise typer.Exit(1)
    if state["live_version"] is None and not state["has_generated_site"]:
        console.print(f"[bold red]order {order_id} has no site to {what} yet[/]: generate it first")
        raise typer.Exit(1)
    if version is not None and await pool.fetchrow(QUERIES["version_detail"], order_id, version) is None:
        console.print(
            f"[bold red]{name}: order {order_id} has no version {version}[/] (see: sitegen versions {order_id})"
        )
        raise typer.Exit(1)


async def _run_of_job(dsn: str, order_id: int, job_id: str) -> dict[str, Any] | None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        row = await conn.fetchrow(QUERIES["cli_edit_run"], order_id, job_id)
    finally:
        await conn.close()
    if row is None:
        return None
    run = dict(row)
    run["error"] = json.loads(run["error"]) if isinstance(run["error"], str) else run["error"]
    return run


async def _follow_job(settings: Settings, order_id: int, job_id: str, after_id: int) -> dict[str, Any] | None:
    """Print the order's progress rows after `after_id` until the run of job `job_id` ends (Ctrl-C stops):
    the run as it ended, or None when stopped."""
    dsn = settings.database.url
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
    ended: dict[str, Any] | None = None
    async for row in follow_logs(dsn, order_id, after_id=after_id, stop=stop, poll_s=0.5):
        _print_row(row)
        if stop.is_set() or event_of(row) not in END_EVENTS:
            continue
        run = await _run_of_job(dsn, order_id, job_id)
        if run is None or run["id"] != row["generation_id"]:
            continue  # another run of the order ended (the one this job waited for)
        deadline = time.monotonic() + END_STATUS_WAIT_S
        while run is not None and run["status"] not in ("succeeded", "failed", "cancelled"):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
            run = await _run_of_job(dsn, order_id, job_id)
        ended = run
        stop.set()
    return ended


def _report_run(order_id: int, run: dict[str, Any] | None) -> None:
    if run is None:
        return
    if run["status"] == "succeeded":
        console.print(f"[green]{run['kind']} succeeded[/]: version {run['version']} of order {order_id} is live")
        return
    console.print(
        Text.assemble((f"{run['kind']} {run['status']}", "bold red"), ": ", _text(_error_summary(run["error"])))
    )
    raise typer.Exit(1)


@app.command()
def edit(
    order_id: int,
    instruction: Annotated[str, typer.Argument(help="What to change, in words (up to 2,000 characters)")],
    base: Annotated[int | None, typer.Option("--base", help="Version to edit (default: the live one)")] = None,
    page: Annotated[
        list[str] | None, typer.Option("--page", help="Limit the edit to this page's slug (repeatable)")
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Print its progress until it ends")] = False,
) -> None:
    """Enqueue an edit of an order's live site: a new version, made from one instruction.

    Edits of one order run one at a time, in the order they were sent, after any generation.

    Example: sitegen edit 42 "Change the phone number to +351 222 999 888" --follow
    """
    from worker.api.context import ApiError
    from worker.api.routes import edit_request

    settings = _settings()
    try:
        text, base_version, pages = edit_request(
            {"instruction": instruction, "base_version": base, "pages": page or None}
        )
    except ApiError as exc:
        console.print(f"[bold red]invalid edit:[/] {shown(exc.message)}")
        raise typer.Exit(2) from None

    def send(redis_: ArqRedis) -> Awaitable[Job | None]:
        return client.enqueue_edit(
            redis_, order_id, text, base_version=base_version, pages=pages, queue_name=settings.worker.queue_name
        )

    _run(
        _send_change(
            settings,
            order_id,
            ("edit", "edit", base_version, "--base"),
            send,
            follow=follow,
            sent="",
            hint=f"follow it: sitegen logs {order_id} --follow; then: sitegen diff {order_id} <new version>",
        )
    )


@app.command()
def rollback(
    order_id: int,
    version: Annotated[int, typer.Argument(help="The version to make live again")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Print its progress until it ends")] = False,
) -> None:
    """Make an earlier version of an order's site live again, as a new version (no model call).

    Example: sitegen rollback 42 3
    """
    settings = _settings()
    if version <= 0:
        console.print(f"[bold red]version must be a positive integer[/], got {version}")
        raise typer.Exit(2)

    def send(redis_: ArqRedis) -> Awaitable[Job | None]:
        return client.enqueue_rollback(redis_, order_id, version, queue_name=settings.worker.queue_name)

    _run(
        _send_change(
            settings,
            order_id,
            ("rollback", "roll back", version, "version"),
            send,
            follow=follow,
            sent=f": version {version} of order {order_id} becomes live again",
            hint=None,
        )
    )


async def _send_change(
    settings: Settings,
    order_id: int,
    change: tuple[str, str, int | None, str],
    send: Callable[[ArqRedis], Awaitable[Job | None]],
    *,
    follow: bool,
    sent: str,
    hint: str | None,
) -> None:
    """Enqueue an edit or rollback (`send`) once the order has a site and the version it names exists, then
    follow the job's run to its end or print `hint`. `change`: (its name, its verb, the version it names,
    the option or argument naming it)."""
    name, verb, version, field = change
    pool = await _cli_pool(settings)
    try:
        await _site_to_change(pool, order_id, verb, version, field)
    finally:
        await pool.close()
    after_id = (await follow_position(settings.database.url, order_id))[0] if follow else 0
    redis_ = await client.connect(settings.redis.url)
    try:
        job = await send(redis_)
    finally:
        await redis_.aclose()
    if job is None:
        console.print(f"[bold red]the {name} of order {order_id} was not enqueued[/] (a job with its id exists)")
        raise typer.Exit(1)
    console.print(f"enqueued job {job.job_id}{sent}")
    if follow:
        _report_run(order_id, await _follow_job(settings, order_id, job.job_id, after_id))
    elif hint:
        console.print(hint)


@app.command()
def versions(
    order_id: int,
    limit: Annotated[int, typer.Option(help="How many versions, newest first")] = 50,
) -> None:
    """List the versions of an order's site: what made each one, its instruction, size, tokens and cost.

    Example: sitegen versions 42
    """
    settings = _settings()

    async def go() -> tuple[asyncpg.Record | None, list[asyncpg.Record]]:
        pool = await _cli_pool(settings)
        try:
            order = await pool.fetchrow(QUERIES["api_order"], order_id)
            return order, await pool.fetch(QUERIES["versions_for_order"], order_id, limit)
        finally:
            await pool.close()

    order, rows = _run(go())
    if order is None:
        console.print(f"[bold red]order {order_id} not found[/]")
        raise typer.Exit(1)
    if not rows:
        console.print(f"order {order_id} has no versions yet")
        return
    table = Table("version", "kind", "parent", "instruction", "files", "size", "tokens", "cost", "created")
    for r in rows:
        usage = r["usage"] or {}
        kind = r["kind"] + (f" to {r['rolled_back_to']}" if r["rolled_back_to"] else "")
        instruction = r["instruction"] or ""
        cost = usage.get("cost_usd")
        table.add_row(
            Text.assemble(str(r["number"]), (" live", "bold green") if r["live"] else ""),
            _text(kind, KIND_STYLE.get(r["kind"], "")),
            "" if r["parent"] is None else str(r["parent"]),
            _text(instruction if len(instruction) <= 60 else instruction[:59] + "…"),
            str(r["files"]),
            f"{r['bytes']:,} B",
            str(usage.get("input_tokens", 0) + usage.get("output_tokens", 0)),
            f"${cost:.4f}" if isinstance(cost, int | float) else "",
            r["created_at"].astimezone().strftime("%Y-%m-%d %H:%M:%S"),
        )
    console.print(table)


@app.command()
def diff(
    order_id: int,
    version: Annotated[int, typer.Argument(help="The version to show")],
    against: Annotated[int | None, typer.Argument(help="The version to compare with (default: its parent)")] = None,
) -> None:
    """Show what changed in a version of an order's site, as a coloured unified diff per changed file.

    Example: sitegen diff 42 3        (version 3 against its parent)
             sitegen diff 42 3 1      (version 3 against version 1)
    """
    settings = _settings()
    _print_diff(order_id, version, *_run(_version_diff(settings, order_id, version, against)))


async def _version_diff(
    settings: Settings, order_id: int, version: int, against: int | None
) -> tuple[int | None, dict[str, Any]]:
    """(the version compared with: `against`, else the parent if it is kept, else None; what changed).
    Exit 1, saying why, if either version does not exist."""
    from worker.versions import diff_versions

    pool = await _cli_pool(settings)
    try:
        found = await pool.fetchrow(QUERIES["version_detail"], order_id, version)
        if found is None:
            console.print(f"[bold red]order {order_id} has no version {version}[/] (see: sitegen versions {order_id})")
            raise typer.Exit(1)
        old_number = against
        if old_number is not None:
            if await pool.fetchrow(QUERIES["version_detail"], order_id, old_number) is None:
                console.print(f"[bold red]order {order_id} has no version {old_number}[/] to compare with")
                raise typer.Exit(1)
        elif found["parent"] is not None and await pool.fetchrow(QUERIES["version_detail"], order_id, found["parent"]):
            old_number = found["parent"]
        new = [dict(r) for r in await pool.fetch(QUERIES["version_files"], order_id, version)]
        old = (
            []
            if old_number is None
            else [dict(r) for r in await pool.fetch(QUERIES["version_files"], order_id, old_number)]
        )
    finally:
        await pool.close()
    label = f"v{old_number}" if old_number is not None else "empty"
    return old_number, diff_versions(old, new, old_label=label, new_label=f"v{version}")


def _print_diff(order_id: int, version: int, old_number: int | None, changes: dict[str, Any]) -> None:
    base = "no earlier version" if old_number is None else f"version {old_number}"
    console.print(f"[bold]order {order_id}: version {version} against {base}[/]")
    for changed in changes["changed"]:
        if changed["diff"] is None:
            console.print(
                _text(
                    f"binary file changed: {changed['path']} ({changed['from_bytes']:,} B -> "
                    f"{changed['to_bytes']:,} B)",
                    "yellow",
                )
            )
            continue
        for line in changed["diff"].splitlines():
            style = "bold" if line.startswith(("--- ", "+++ ")) else DIFF_STYLE.get(line[:1], "")
            console.print(_text(line, style), soft_wrap=True)
    for added in changes["added"]:
        console.print(_text(f"added: {added['path']} ({added['bytes']:,} B)", "green"))
    for removed in changes["removed"]:
        console.print(_text(f"removed: {removed['path']} ({removed['bytes']:,} B)", "red"))
    console.print(
        f"[dim]{len(changes['changed'])} changed, {len(changes['added'])} added, {len(changes['removed'])} removed, "
        f"{changes['unchanged']} unchanged[/]"
    )


if __name__ == "__main__":
    app()
