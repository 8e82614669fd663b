"""The aiohttp application of `sitegen serve`: its resources (pools, Redis, the fan-out), errors, auth and CORS.

Everything is created on the server's event loop in `on_startup` and closed in `on_cleanup`, as the
worker does in arq's hooks; handlers live in `worker.api.routes`.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import asyncpg
from aiohttp import web
from arq import ArqRedis
from loguru import logger
from redis.exceptions import RedisError

from worker import client
from worker.api.auth import Role, Tokens, is_loopback
from worker.api.fanout import ProgressFanout
from worker.api.metrics import ApiMetrics
from worker.errors import message_of
from worker.settings import Settings
from worker.store import Store, create_pool

SESSION_COOKIE = "sitegen_session"
SITE_COOKIE = "sitegen_site"
DASHBOARD_HEADER = "X-Sitegen-Dashboard"
CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type, Last-Event-ID"


class ApiError(Exception):
    """An error answered as JSON `{"error": {"type", "message"}}` with its HTTP status."""

    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.headers = headers or {}


def bad_request(message: str) -> NoReturn:
    raise ApiError(400, "bad_request", message)


def not_found(message: str) -> NoReturn:
    raise ApiError(404, "not_found", message)


def conflict(message: str) -> NoReturn:
    raise ApiError(409, "conflict", message)


def error_response(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"type": type_, "message": message}}, status=status, headers=headers)


@dataclass
class ApiOptions:
    """Tunables of the API that are not settings: tests shorten them."""

    keepalive_s: float = 15.0
    #: How long an SSE stream waits, after its generation's status turned terminal, for the row announcing it.
    end_wait_s: float = 5.0
    #: Rows a slow SSE client may have waiting before it is disconnected.
    client_queue: int = 1000
    poll_s: float = 1.0
    hole_grace_s: float = 1.0
    session_ttl_s: float = 12 * 3600


@dataclass
class Api:
    """What every handler reaches through `request.app[API]`."""

    settings: Settings
    tokens: Tokens
    options: ApiOptions
    metrics: ApiMetrics
    pool: asyncpg.Pool | None = None
    redis: ArqRedis | None = None
    fanout: ProgressFanout | None = None

    @property
    def store(self) -> Store:
        assert self.pool is not None
        return Store(self.pool, replica_id="sitegen-api", lease_s=self.settings.worker.lease_s)

    # -- auth

    def role(self, request: web.Request, *, allow_session: bool = True) -> Role | None:
        """The role of the request's bearer token (or dashboard session); None when it has neither."""
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise ApiError(401, "unauthorized", "expected `Authorization: Bearer <token>`", _challenge())
            if not self.tokens.configured:
                return "write"
            role = self.tokens.role_of(token.strip())
            if role is None:
                raise ApiError(401, "unauthorized", "unknown token", _challenge())
            return role
        cookie = request.cookies.get(SESSION_COOKIE) if allow_session else None
        if cookie:
            role = self.tokens.session_role(cookie)
            if role is not None:
                if request.method == "POST" and request.headers.get(DASHBOARD_HEADER) != "1":
                    # Only the dashboard's own scripts post with a session: no form of another page can.
                    raise ApiError(403, "forbidden", f"a session needs the {DASHBOARD_HEADER} header to post")
                return role
        if not self.tokens.configured:
            return "write"  # open mode: loopback only, see `check_bind`
        return None

    def require(self, request: web.Request, role: Role, *, order_id: int | None = None) -> Role | str:
        """Authorize the request for `role`; with `order_id`, a stream token for that order is accepted too."""
        got = self.role(request)
        if got is None and order_id is not None:
            token = request.query.get("token") or request.cookies.get(f"{SITE_COOKIE}_{order_id}")
            if token:
                grant = self.tokens.stream_grant(token)
                if grant is None:
                    raise ApiError(401, "unauthorized", "invalid or expired stream token", _challenge())
                if grant.order_id != order_id:
                    raise ApiError(403, "forbidden", "this stream token is for another order")
                return "stream"
        if got is None:
            raise ApiError(401, "unauthorized", "missing token: send `Authorization: Bearer <token>`", _challenge())
        if role == "write" and got != "write":
            raise ApiError(403, "forbidden", "this endpoint needs a write token")
        return got


def _challenge() -> dict[str, str]:
    return {"WWW-Authenticate": 'Bearer realm="sitegen"'}


API = web.AppKey("sitegen_api", Api)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def cors_headers(request: web.Request) -> dict[str, str]:
    """The CORS headers for a request from an allowed origin; none for other origins or same-origin calls."""
    origin = request.headers.get("Origin")
    if origin and origin.lower() in request.app[API].settings.api.cors_origins:
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin", "Access-Control-Expose-Headers": "*"}
    return {}


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
    from worker.api import dashboard, routes

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
    api.redis = await client.connect(api.settings.redis.url)
    api.fanout = ProgressFanout(
        db.url,
        api.pool,
        poll_s=api.options.poll_s,
        hole_grace_s=api.options.hole_grace_s,
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
