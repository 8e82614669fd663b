"""The aiohttp application of `sitegen serve`: the factory on top of the routes and the dashboard, its
middleware (errors, CORS, metrics), its resources (pools, Redis, the fan-out) and `serve`.

Everything is created on the server's event loop in `on_startup` and closed in `on_cleanup`, as the
worker does in arq's hooks; handlers live in `worker.api.routes` and `worker.api.dashboard`, and what
they share in `worker.api.context`.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from aiohttp import web
from loguru import logger
from redis.exceptions import RedisError

from worker import client
from worker.api import dashboard, routes
from worker.api.auth import Tokens, is_loopback
from worker.api.context import API, Api, ApiError, ApiOptions, cors_headers, error_response
from worker.api.fanout import ProgressFanout
from worker.api.metrics import ApiMetrics
from worker.errors import message_of
from worker.settings import Settings
from worker.store import create_pool

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type, Last-Event-ID"


@web.middleware
async def _errors_cors_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    api = request.app[API]
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    status = 500
    try:
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            response: web.StreamResponse = _preflight(request)
        else:
            response = await _answer(request, handler)
        status = response.status
        return response
    finally:
        api.metrics.requests.labels(route, request.method, str(status)).inc()


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except ApiError as exc:
        response = error_response(exc.status, exc.type, exc.message, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status, "http_error")
        message = "no such endpoint" if exc.status == 404 else exc.reason
        response = error_response(exc.status, kind, message, {k: v for k, v in exc.headers.items() if k == "Allow"})
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, RedisError) as exc:
        logger.warning("{} {}: a dependency did not answer: {}", request.method, request.path, message_of(exc))
        response = error_response(503, "unavailable", "PostgreSQL or Redis did not answer; try again")
    except Exception as exc:
        logger.opt(exception=exc).error("{} {} failed", request.method, request.path)
        response = error_response(500, "internal", f"{type(exc).__name__}: the server failed (see its log)")
    if not response.prepared:
        response.headers.update(cors_headers(request))
    return response


def _preflight(request: web.Request) -> web.Response:
    allowed = cors_headers(request)
    if not allowed:
        return error_response(403, "forbidden", "origin not allowed (setting api.cors_origins)")
    return web.Response(
        status=204,
        headers={
            **allowed,
            "Access-Control-Allow-Methods": CORS_METHODS,
            "Access-Control-Allow-Headers": CORS_HEADERS,
            "Access-Control-Max-Age": "600",
        },
    )


def create_app(settings: Settings, tokens: Tokens, options: ApiOptions | None = None) -> web.Application:
    """The API and dashboard as an aiohttp application; its resources open when it starts."""
    app = web.Application(middlewares=[_errors_cors_metrics], client_max_size=1024 * 1024)
    app[API] = Api(settings, tokens, options or ApiOptions(), ApiMetrics())
    routes.add_routes(app)
    dashboard.add_routes(app)
    app.on_startup.append(_open)
    app.on_cleanup.append(_close)
    return app


async def _open(app: web.Application) -> None:
    api = app[API]
    db = api.settings.database
    api.pool = await create_pool(db, max_size=max(2, min(db.pool_max_size, 10)), min_size=1, name="api")
    api.health_pool = await create_pool(db, max_size=1, min_size=1, name="api-health")
    api.redis = await client.connect(api.settings.redis.url)
    api.fanout = ProgressFanout(
        db.url,
        api.pool,
        poll_s=api.options.poll_s,
        hole_grace_s=api.options.hole_grace_s,
        acquire_timeout_s=api.settings.api.pool_acquire_timeout_s,
    )
    api.metrics.watch(api.fanout)
    await api.fanout.start()


async def _close(app: web.Application) -> None:
    api = app[API]
    if api.fanout is not None:
        await api.fanout.close()
    if api.redis is not None:
        await api.redis.aclose()
    if api.pool is not None:
        await api.pool.close()
    if api.health_pool is not None:
        await api.health_pool.close()


class BindRefused(RuntimeError):
    pass


def check_bind(host: str, tokens: Tokens) -> None:
    """Refuse a non-loopback address while no token is configured: the API would be open to the network."""
    if not tokens.configured and not is_loopback(host):
        raise BindRefused(
            f"refusing to listen on {host}: no API token is configured, so anyone who can reach it could read "
            "and write; set SITEGEN_API_READ_TOKENS and/or SITEGEN_API_WRITE_TOKENS, or listen on 127.0.0.1"
        )


def serve(settings: Settings, tokens: Tokens, *, print_url: Callable[[str], Any] | None = None) -> None:
    """Run the API until SIGINT or SIGTERM; `print_url` is called once it accepts connections."""
    check_bind(settings.api.host, tokens)
    asyncio.run(_serve(settings, tokens, print_url))


async def _serve(settings: Settings, tokens: Tokens, print_url: Callable[[str], Any] | None) -> None:
    host, port = settings.api.host, settings.api.port
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(create_app(settings, tokens), access_log=None, shutdown_timeout=5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{bound}/"
        mode = "tokens required" if tokens.configured else "open: no token configured, loopback only"
        logger.info("sitegen serve: API and dashboard at {} ({})", url, mode)
        if print_url is not None:
            print_url(url)
        await stop.wait()
        logger.info("sitegen serve: stopping")
    finally:
        await runner.cleanup()
