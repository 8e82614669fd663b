"""What runs, and how: `arq worker.main.WorkerSettings` is the page ops read.

Settings are read once at import (plain data). Everything with a connection or a socket is
created in `startup` on the worker's own event loop, kept in arq's `ctx`, and closed in
`shutdown`; nothing pool- or client-like lives at module level.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import time
import uuid
from typing import Any

import arq.utils
from arq import Retry
from arq.connections import RedisSettings
from arq.cron import cron
from arq.worker import Worker, func
from loguru import logger

from worker import polling, redis_outage
from worker.ai import build_router, check_environment
from worker.ai.limits import SharedLimits
from worker.client import EDIT_FUNCTION, JOB_FUNCTION, ROLLBACK_FUNCTION, bound, deserialize, serialize
from worker.errors import SitegenError
from worker.logs import setup_logging
from worker.metrics import Metrics
from worker.migrate import migrate
from worker.output import clean_leftovers
from worker.pipeline.runner import RetryLater, Runtime, run_edit, run_generation, validate_edit_args, validate_job_args
from worker.progress import ProgressLog
from worker.settings import Settings, SettingsError, load_settings, redact_url
from worker.store import Store, close_pool, create_pool
from worker.sweeper import sweep
from worker.tasks import cancel_and_wait


async def generate_site(
    ctx: dict[str, Any], order_id: Any = None, brief: Any = None, regenerate: Any = False, *args: Any, **unknown: Any
) -> dict[str, Any]:
    """The job: generate (or resume, or return) the site of an order. See DESIGN.md, "Public contract"."""
    rt: Runtime = ctx["runtime"]
    try:
        return await _generate_site(rt, ctx, order_id, brief, regenerate, args, unknown)
    finally:
        # A job's progress rows are in PostgreSQL by the time its result is, unless PostgreSQL is
        # too slow to take them (see ProgressLog.settle): then the writer carries on alone.
        await rt.progress.settle(rt.settings.database.progress_wait_s)


async def _generate_site(
    rt: Runtime,
    ctx: dict[str, Any],
    order_id: Any,
    brief: Any,
    regenerate: Any,
    args: tuple[Any, ...],
    unknown: dict[str, Any],
) -> dict[str, Any]:
    job_try = int(ctx.get("job_try", 1))
    with logger.contextualize(order_id=order_id, job_try=job_try), rt.metrics.job() as job:
        try:
            checked_id = validate_job_args(order_id, brief, regenerate, unknown, args)
        except SitegenError as exc:
            await _rejected(rt, ctx, order_id, "job", exc)
            raise
        try:
            result = await run_generation(
                rt,
                checked_id,
                brief,
                regenerate,
                job_id=ctx.get("job_id"),
                job_try=job_try,
                enqueued_at=ctx.get("enqueue_time"),
            )
        except RetryLater as exc:
            # The one translation of our retry decision into arq's.
            raise Retry(defer=exc.defer_s) from exc.cause
        job.outcome = str(result["status"])
        return result


async def _rejected(
    rt: Runtime, ctx: dict[str, Any], order_id: Any, what: str, exc: SitegenError, **details: Any
) -> None:
    """A job whose arguments are wrong: its error in the order's progress log, if the order id is one."""
    if isinstance(order_id, int) and not isinstance(order_id, bool) and order_id > 0:
        await rt.progress.log(
            order_id,
            f"{what} rejected: {exc}",
            level="error",
            error={"type": type(exc).__name__, "message": str(exc), **exc.details},
            **details,
        )
    else:
        logger.error("job {} rejected: {}", ctx.get("job_id"), exc)


async def edit_site(
    ctx: dict[str, Any],
    order_id: Any = None,
    instruction: Any = None,
    base_version: Any = None,
    pages: Any = None,
    *args: Any,
    **unknown: Any,
) -> dict[str, Any]:
    """The job: change an order's live site as `instruction` says, making a new version. See README,
    "Versions and edits"."""
    request = {"instruction": instruction, "base_version": base_version, "pages": pages}
    return await _edit_job(ctx, "edit", order_id, request, args, unknown)


async def rollback_site(
    ctx: dict[str, Any], order_id: Any = None, version: Any = None, *args: Any, **unknown: Any
) -> dict[str, Any]:
    """The job: make version `version` of an order's site live again, as a new version (no model call)."""
    return await _edit_job(ctx, "rollback", order_id, {"version": version}, args, unknown)


async def _edit_job(
    ctx: dict[str, Any],
    kind: str,
    order_id: Any,
    request: dict[str, Any],
    args: tuple[Any, ...],
    unknown: dict[str, Any],
) -> dict[str, Any]:
    rt: Runtime = ctx["runtime"]
    job_try = int(ctx.get("job_try", 1))
    try:
        with logger.contextualize(order_id=order_id, job_try=job_try), rt.metrics.job() as job:
            try:
                checked_id, checked = validate_edit_args(kind, order_id, request, unknown, args)
            except SitegenError as exc:
                await _rejected(rt, ctx, order_id, kind, exc, event="job.rejected")
                raise
            try:
                result = await run_edit(
                    rt,
                    kind,
                    checked_id,
                    checked,
                    job_id=str(ctx.get("job_id") or f"{kind}:{checked_id}:{uuid.uuid4().hex}"),
                    job_try=job_try,
                    enqueued_at=ctx.get("enqueue_time"),
                )
            except RetryLater as exc:
                raise Retry(defer=exc.defer_s) from exc.cause
            job.outcome = str(result["status"])
            return result
    finally:
        await rt.progress.settle(rt.settings.database.progress_wait_s)


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    replica = settings.worker.replica
    # arq made its pool without a socket timeout: from here on no Redis command waits longer than this.
    bound(
        ctx["redis"],
        socket_timeout_s=settings.redis.socket_timeout_s,
        connect_timeout_s=settings.redis.connect_timeout_s,
    )
    logger.info(
        "starting replica {} (database {}, redis {})",
        replica,
        redact_url(settings.database.url),
        redact_url(settings.redis.url),
    )
    if settings.worker.run_migrations:
        await migrate(settings.database.url, settings.database.migrations_dir)
    db = settings.database
    pool = await create_pool(db, max_size=db.pool_max_size, min_size=db.pool_min_size, name="generation")
    progress_pool = await create_pool(db, max_size=db.progress_pool_max_size, min_size=1, name="progress")
    metrics = Metrics(replica)
    rt = Runtime(
        settings=settings,
        store=Store(
            pool, replica_id=replica, lease_s=settings.worker.lease_s, keep_versions=settings.output.keep_versions
        ),
        progress=ProgressLog(progress_pool, replica_id=replica, buffer_size=db.progress_buffer_rows),
        ai=build_router(
            settings.ai,
            SharedLimits(
                ctx["redis"],
                queue_name=settings.worker.queue_name,
                replica=replica,
                lease_s=settings.worker.lease_s,
                max_pause_s=settings.ai.max_retry_defer_s,
            ),
        ),
        redis=ctx["redis"],
        metrics=metrics,
    )
    ctx["runtime"] = rt
    await asyncio.to_thread(clean_leftovers, rt.output_root)  # what crashed site writes left behind
    rt.ai.observe(metrics)
    if rt.ai.limits is not None:  # the divisor of this replica's share of the provider limits, should Redis go away
        await rt.ai.limits.count_replicas()
    metrics.watch({"generation": pool, "progress": progress_pool}, rt.progress, rt.ai.slots(), rt.ai.limiters())
    if settings.metrics.port:
        await metrics.serve(settings.metrics.host, settings.metrics.port)
        metrics.sample_queue(ctx["redis"], settings.worker.queue_name, settings.metrics.queue_sample_every_s)
    ctx["progress_writer"] = asyncio.create_task(rt.progress.run_writer())
    ctx["heartbeat"] = asyncio.create_task(rt.heartbeat.run(rt))
    _drain_on_signals(rt)
    # What exists now (modules, schemas, pools) lives as long as the replica: keep it out of the
    # collector's full passes, which otherwise stall the event loop for tens of milliseconds.
    gc.freeze()


def _drain_on_signals(rt: Runtime) -> None:
    """Also tell running generations to stop at their next phase boundary when arq is told to stop.

    arq installs its own SIGTERM/SIGINT handlers (stop taking jobs, wait `shutdown_grace_s`,
    cancel the rest); asyncio keeps one handler per signal, so ours wraps arq's. This reads
    asyncio's handler table, the one private detail we rely on; without it, running generations
    are still handed back when arq cancels them at the end of the grace period.
    """
    loop = asyncio.get_running_loop()
    handlers: dict[int, asyncio.Handle] = getattr(loop, "_signal_handlers", {})
    for sig in (signal.SIGTERM, signal.SIGINT):
        original = handlers.get(sig)
        if original is None:
            continue

        def on_signal(original: asyncio.Handle = original, sig: signal.Signals = sig) -> None:
            logger.info("{}: finishing current phases, then handing generations back", sig.name)
            rt.draining.set()
            original._run()

        loop.add_signal_handler(sig, on_signal)


async def shutdown(ctx: dict[str, Any]) -> None:
    rt: Runtime | None = ctx.pop("runtime", None)
    if rt is None:
        return
    stopping: list[asyncio.Task[None]] = []
    for name in ("progress_writer", "heartbeat"):
        task: asyncio.Task[None] | None = ctx.pop(name, None)
        if task is not None:
            stopping.append(task)
    # The writer may be in the middle of a batch: its cancelled flush puts the batch back, in order,
    # before the last flush below takes the buffer.
    await cancel_and_wait(stopping, "replica shutdown")
    # PostgreSQL may be out of reach, or silent (a partition): the shutdown waits for it one bounded try at most.
    db = rt.settings.database
    bound_s = db.connect_timeout_s + db.command_timeout_s
    try:
        async with asyncio.timeout(bound_s):
            await rt.progress.flush()
    except TimeoutError:
        logger.warning("PostgreSQL did not answer within {:.0f}s: the last progress rows are not written", bound_s)
    rt.progress.abandon("the replica is shutting down")
    await rt.metrics.close()
    await rt.ai.aclose()
    await asyncio.gather(
        *(
            close_pool(pool, POOL_CLOSE_S, f"replica {rt.settings.worker.replica}")
            for pool in (rt.store.pool, rt.progress.pool)
        )
    )
    logger.info("replica {} stopped", rt.settings.worker.replica)


#: How long a pool's goodbye (asyncpg's Terminate, answered by PostgreSQL closing the socket) may take on shutdown.
POOL_CLOSE_S = 2.0


#: arq fails a job for good once its try count passes this: never, for `generate_site`.
UNLIMITED_TRIES = 2**31


def health_check_key(settings: Settings) -> str:
    """Per replica, so `arq --check` in one replica's container speaks for that replica only."""
    return f"{settings.worker.queue_name}:health-check:{settings.worker.replica}"


def worker_options(settings: Settings) -> dict[str, Any]:
    """The arq Worker's keyword arguments for these settings."""
    w = settings.worker
    return {
        # arq's own count would drop a job after max_tries whatever failed; the runner decides instead
        # (worker.max_tries for failures of the models, never for PostgreSQL or Redis out of reach).
        "functions": [
            func(job, name=name, max_tries=UNLIMITED_TRIES, keep_result=w.keep_result_s)
            for job, name in (
                (generate_site, JOB_FUNCTION),
                (edit_site, EDIT_FUNCTION),
                (rollback_site, ROLLBACK_FUNCTION),
            )
        ],
        "cron_jobs": [cron(sweep, name="sweep", second=set(range(0, 60, w.sweep_every_s)), run_at_startup=True)],
        "queue_name": w.queue_name,
        "redis_settings": _redis_settings(settings),
        "job_serializer": serialize,
        "job_deserializer": deserialize,
        "on_startup": startup,
        "on_shutdown": shutdown,
        "max_jobs": w.max_jobs,
        "poll_delay": w.poll_delay_s,
        "job_timeout": w.job_timeout_s,
        "keep_result": w.keep_result_s,
        "max_tries": w.max_tries,
        "health_check_interval": w.health_check_interval_s,
        "health_check_key": health_check_key(settings),
        "allow_abort_jobs": True,
        "job_completion_wait": w.shutdown_grace_s,
        "ctx": {"settings": settings},
    }


def _redis_settings(settings: Settings) -> RedisSettings:
    """arq's connection settings; it takes no socket timeout: `startup` gives its pool one (`worker.client.bound`)."""
    redis_settings = RedisSettings.from_dsn(settings.redis.url)
    redis_settings.conn_timeout = settings.redis.connect_timeout_s  # type: ignore[assignment]  # passed on as is
    return redis_settings


def create_worker(settings: Settings, **overrides: Any) -> Worker:
    """A worker for these settings (tests and `sitegen demo` use it; ops use WorkerSettings)."""
    return Worker(**{**worker_options(settings), **overrides})


def _settings_or_exit() -> Settings:
    try:
        settings = load_settings()
        check_environment(settings.ai)
    except SettingsError as exc:
        print(f"sitegen-worker: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    setup_logging(settings.log, replica=settings.worker.replica)
    return settings


#: Test hook of the fault suite (tests/faults/test_clock_skew.py): this process's wall clock, as arq reads it
#: (`arq.utils.timestamp_ms`: the enqueue times and scores arq computes), runs this many seconds off.
CLOCK_SKEW_ENV = "FAULTS_CLOCK_SKEW_S"


def skew_clock(offset_s: float) -> None:
    """Make arq's clock in this process run `offset_s` seconds ahead (negative: behind) of the host's."""
    arq.utils.time = lambda: time.time() + offset_s  # type: ignore[attr-defined]


if os.environ.get(CLOCK_SKEW_ENV):
    skew_clock(float(os.environ[CLOCK_SKEW_ENV]))

# Every Worker of this process (arq's CLI builds its own) polls with worker.polling (one Lua script per
# poll claims the due jobs; a running job leases its place in the queue, so polls never read it) and
# rides out Redis outages.
polling.install()
redis_outage.install()
SETTINGS = _settings_or_exit()
WorkerSettings = type("WorkerSettings", (), worker_options(SETTINGS))
