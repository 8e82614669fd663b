"""The aiohttp application of `sitegen serve`: the factory on top of the routes and the dashboard, its
middleware (errors, CORS, metrics), its resources (pools, Redis, the fan-out) and `serve`.

Everything is created on the server's event loop in `on_startup` and closed in `on_cleanup`, as the
worker does in arq's hooks; handlers live in `worker.api.routes` and `worker.api.dashboard`, and what
they share in `worker.api.context`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from aiohttp import web
from aiohttp_remotes import XForwardedStrict
from loguru import logger
from redis.exceptions import RedisError

from worker import client
from worker.api import dashboard, routes
from worker.api.auth import AuthThrottle, Tokens, is_loopback, is_loopback_name, key_id, new_signing_key
from worker.api.context import (
    API,
    SIGNED_OUT,
    SITE_COOKIE,
    Api,
    ApiError,
    ApiOptions,
    cors_headers,
    error_response,
    session_cookie_name,
    signed_out_key,
)
from worker.api.fanout import ProgressFanout
from worker.api.metrics import ApiMetrics
from worker.errors import message_of
from worker.settings import Settings
from worker.store import QUERIES, close_pool, create_pool

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type, Last-Event-ID"
#: At most this often a process reads the signing keys again on seeing an unknown key id.
KEY_RELOAD_S = 10.0
#: Seconds the shutdown gives Redis and each pool to close gracefully before it terminates them.
POOL_CLOSE_S = 5.0
OPEN_MODE_HOSTS = (
    "no API token is configured, so this server answers loopback host names only (localhost, 127.0.0.1, "
    "[::1]); set SITEGEN_API_READ_TOKENS / SITEGEN_API_WRITE_TOKENS"
)


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
        kinds = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        kind = kinds.get(exc.status, "http_error")
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


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Throttled addresses, open mode's Host check and signed-out sessions, before any handler; every 401
    counts against the client's address (as a trusted proxy forwarded it)."""
    api = request.app[API]
    if request.path == "/healthz":
        return await handler(request)
    wait = api.throttle.retry_after(request.remote)
    if wait is not None:
        message = f"too many failed sign-ins or 401s from your address: retry in {wait} s"
        raise ApiError(429, "too_many_requests", message, {"Retry-After": str(wait)})
    if not api.tokens.configured and not is_loopback_name(request.host):
        raise ApiError(403, "forbidden", OPEN_MODE_HOSTS)
    values = _signed_values(request)
    if not api.tokens.explicit_keys and any(api.tokens.unknown_key(v) for v in values):
        await _reload_keys(api)
    reset = SIGNED_OUT.set(await _signed_out(api, values))
    try:
        response = await handler(request)
    except ApiError as exc:
        if exc.status == 401:
            api.throttle.failed(request.remote)
        raise
    finally:
        SIGNED_OUT.reset(reset)
    if response.status == 401:
        api.throttle.failed(request.remote)
    return response


def _signed_values(request: web.Request) -> list[str]:
    """The session cookie and stream tokens the request carries."""
    values = [request.cookies.get(session_cookie_name(request)), request.query.get("token")]
    order = request.match_info.get("order_id")
    if order is not None:
        values.append(request.cookies.get(f"{SITE_COOKIE}_{order}"))
    return [v for v in values if v]


async def _reload_keys(api: Api) -> None:
    """A value signed with a key id this process does not know: a key added to PostgreSQL since it started
    (a rotation). Read the keys again, at most every KEY_RELOAD_S, whatever unknown ids clients send."""
    now = time.monotonic()
    if api.pool is None or now < api.keys_read_at + KEY_RELOAD_S:
        return
    api.keys_read_at = now
    api.tokens.use_keys(await _signing_keys(api.pool))


async def _signed_out(api: Api, values: list[str]) -> frozenset[str]:
    """The session ids of the request's signed values that sign-out revoked (one Redis round trip)."""
    sessions = {s for v in values if (s := api.tokens.session_id_of(v)) is not None}
    if not sessions:
        return frozenset()
    assert api.redis is not None
    ordered = sorted(sessions)
    found = await api.redis.mget([signed_out_key(s) for s in ordered])
    return frozenset(s for s, hit in zip(ordered, found, strict=True) if hit is not None)


def _forwarded(trusted: list[str]) -> Any:
    """X-Forwarded-For/-Proto/-Host (aiohttp-remotes' strict parser, one hop) from a trusted proxy only;
    from anyone else, and from the proxy's host without them, they are not believed (nor needed)."""
    networks = [ipaddress.ip_network(t, strict=False) for t in trusted]
    strict = XForwardedStrict([networks])

    @web.middleware
    async def forwarded(request: web.Request, handler: Handler) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        try:
            address = ipaddress.ip_address(peer[0]) if peer else None
        except ValueError:
            address = None
        trusted_peer = address is not None and any(address in n for n in networks)
        if not trusted_peer or "X-Forwarded-For" not in request.headers:
            return await handler(request)
        return await strict.middleware(request, handler)

    return forwarded


def create_app(settings: Settings, tokens: Tokens, options: ApiOptions | None = None) -> web.Application:
    """The API and dashboard as an aiohttp application; its resources open when it starts."""
    middlewares: list[Any] = [_errors_cors_metrics]
    if settings.api.trusted_proxies:
        middlewares.append(_forwarded(settings.api.trusted_proxies))
    middlewares.append(_guard)
    app = web.Application(middlewares=middlewares, client_max_size=1024 * 1024)
    throttle = AuthThrottle(settings.api.auth_failures_per_minute)
    app[API] = Api(settings, tokens, options or ApiOptions(), ApiMetrics(), throttle=throttle)
    routes.add_routes(app)
    dashboard.add_routes(app)
    app.on_startup.append(_open)
    app.on_cleanup.append(close_resources)
    return app


async def _open(app: web.Application) -> None:
    api = app[API]
    db = api.settings.database
    api.pool = await create_pool(db, max_size=max(2, min(db.pool_max_size, 10)), min_size=1, name="api")
    api.health_pool = await create_pool(db, max_size=1, min_size=1, name="api-health")
    if not api.tokens.explicit_keys:
        api.tokens.use_keys(await _signing_keys(api.pool))
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


async def _signing_keys(pool: asyncpg.Pool) -> list[bytes]:
    """The keys in PostgreSQL, newest first; the first `serve` process of a deployment creates one."""
    try:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(QUERIES["api_signing_keys_lock"])
            keys = [bytes(r["key"]) for r in await conn.fetch(QUERIES["api_signing_keys"])]
            if not keys:
                key = new_signing_key()
                await conn.execute(QUERIES["api_signing_key_add"], key_id(key), key)
                keys = [key]
    except asyncpg.UndefinedTableError:
        raise ServeRefused(
            "table api_signing_keys is missing: run `sitegen migrate` first (or set SITEGEN_API_SIGNING_KEY)"
        ) from None
    return keys


async def close_resources(app: web.Application) -> None:
    """The server's cleanup: the fan-out, Redis and the pools, each closed once. A pool gets POOL_CLOSE_S to
    have its connections back (asyncpg's `Pool.close` waits for every one), then is terminated: a handler
    stuck on a connection must not hold the shutdown forever."""
    api = app[API]
    fanout, redis_, pools = api.fanout, api.redis, (api.pool, api.health_pool)
    api.fanout, api.redis, api.pool, api.health_pool = None, None, None, None
    if fanout is not None:
        await fanout.close()
    if redis_ is not None:
        try:
            async with asyncio.timeout(POOL_CLOSE_S):
                await redis_.aclose()
        except (TimeoutError, RedisError, OSError) as exc:
            logger.warning("progress API: closing Redis failed: {}", message_of(exc))
    for pool in pools:
        if pool is not None:
            await close_pool(pool, POOL_CLOSE_S, "progress API")


class ServeRefused(RuntimeError):
    """`sitegen serve` cannot start as configured; the message says what to fix."""


class BindRefused(ServeRefused):
    pass


def check_bind(host: str, tokens: Tokens) -> None:
    """Refuse a non-loopback address while no token is configured: the API would be open to the network."""
    if not tokens.configured and not is_loopback(host):
        raise BindRefused(
            f"refusing to listen on {host}: no API token is configured, so anyone who can reach it could read; "
            "set SITEGEN_API_READ_TOKENS and/or SITEGEN_API_WRITE_TOKENS, or listen on 127.0.0.1"
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
        mode = "tokens required" if tokens.configured else "open: no token configured, read-only, loopback only"
        logger.info("sitegen serve: API and dashboard at {} ({})", url, mode)
        if print_url is not None:
            print_url(url)
        await stop.wait()
        logger.info("sitegen serve: stopping")
    finally:
        await runner.cleanup()
