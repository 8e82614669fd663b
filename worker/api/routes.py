"""The progress API's endpoints (docs/api.md): orders, generations, live events, commands, the site, tokens."""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix
from pydantic import ValidationError

from worker import client
from worker.api.context import (
    API,
    SESSION_COOKIE,
    SITE_COOKIE,
    TERMINAL,
    Api,
    ApiError,
    bad_request,
    conflict,
    cors_headers,
    fetch_row,
    fetch_rows,
    generation_json,
    json_response,
    not_found,
    order_id_of,
    public_row,
)
from worker.api.fanout import Subscriber
from worker.api.openapi import openapi_document
from worker.models import Brief, edit_request_problem
from worker.progress import END_EVENTS, event_of
from worker.settings import ApiSection
from worker.site_headers import site_headers
from worker.store import ACTIVE, QUERIES
from worker.versions import diff_versions

_SEGMENT = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=@-]+$")
REPLAY_PAGE = 1000
#: How often a stream whose generation ended asks again while a job for the order is still in Redis.
JOB_RECHECK_S = 0.25
EVENT_FIELDS = ("id", "order_id", "generation_id", "phase", "level", "message", "details", "created_at")
#: What a stream refused for a cap tells the client to wait before it tries again.
STREAM_RETRY_AFTER_S = 5
#: Longest /healthz waits for its own connection and `SELECT 1`.
HEALTH_TIMEOUT_S = 2.0


@dataclass
class StreamCaps:
    """The SSE streams open in this process, counted per token and per client address (settings api.max_streams*)."""

    total: int = 0
    by_token: Counter[str] = field(default_factory=Counter)
    by_client: Counter[str] = field(default_factory=Counter)

    def over(self, limits: ApiSection, token: str | None, client: str) -> str | None:
        """The cap one more stream would pass, as `setting = value`; None when it fits."""
        if self.total >= limits.max_streams:
            return f"api.max_streams = {limits.max_streams}"
        if self.by_client[client] >= limits.max_streams_per_client:
            return f"api.max_streams_per_client = {limits.max_streams_per_client}"
        if token is not None and self.by_token[token] >= limits.max_streams_per_token:
            return f"api.max_streams_per_token = {limits.max_streams_per_token}"
        return None

    def take(self, token: str | None, client: str) -> None:
        self.total += 1
        self.by_client[client] += 1
        if token is not None:
            self.by_token[token] += 1

    def give_back(self, token: str | None, client: str) -> None:
        self.total -= 1
        for counts, key in ((self.by_client, client), (self.by_token, token)):
            if key is not None:
                counts[key] -= 1
                if counts[key] <= 0:
                    del counts[key]


STREAMS = web.AppKey("sitegen_streams", StreamCaps)


def add_routes(app: web.Application) -> None:
    app[STREAMS] = StreamCaps()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_get("/v1/orders/{order_id}", order)
    app.router.add_get("/v1/orders/{order_id}/generations", generations)
    app.router.add_get("/v1/orders/{order_id}/events", events)
    app.router.add_post("/v1/orders/{order_id}/generate", generate)
    app.router.add_post("/v1/orders/{order_id}/cancel", cancel)
    app.router.add_post("/v1/orders/{order_id}/retry", retry)
    app.router.add_post("/v1/orders/{order_id}/stream-token", stream_token)
    app.router.add_get("/v1/orders/{order_id}/site.zip", site_zip)
    app.router.add_get("/v1/orders/{order_id}/site/{path:.*}", site_file)
    app.router.add_get("/v1/orders/{order_id}/versions", versions)
    app.router.add_get("/v1/orders/{order_id}/versions/{n}", version)
    app.router.add_get("/v1/orders/{order_id}/versions/{n}/diff", version_diff)
    app.router.add_get("/v1/orders/{order_id}/versions/{n}/site/{path:.*}", version_site_file)
    app.router.add_post("/v1/orders/{order_id}/edits", edit)
    app.router.add_post("/v1/orders/{order_id}/rollback", rollback)


def _api(request: web.Request) -> Api:
    return request.app[API]


async def _known_order(api: Api, order_id: int) -> dict[str, Any]:
    found = await fetch_row(api, "api_order", order_id)
    if found is None:
        not_found(f"order {order_id} not found")
    return found


# --------------------------------------------------------------------------- health, metrics, openapi


async def healthz(request: web.Request) -> web.Response:
    api = _api(request)
    checks: dict[str, Any] = {"listen": bool(api.fanout and api.fanout.listening)}
    try:
        assert api.health_pool is not None
        async with asyncio.timeout(HEALTH_TIMEOUT_S):  # its own connection: never behind client traffic
            async with api.health_pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
        checks["postgresql"] = True
    except Exception:
        checks["postgresql"] = False
    ok = all(checks.values())
    return json_response({"status": "ok" if ok else "unavailable", **checks}, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    api = _api(request)
    api.require(request, "read")
    return web.Response(body=api.metrics.exposition(), headers={"Content-Type": "text/plain; version=0.0.4"})


async def openapi(request: web.Request) -> web.Response:
    _api(request).require(request, "read")
    return json_response(openapi_document())


# --------------------------------------------------------------------------- orders and generations


async def order(request: web.Request) -> web.Response:
    api = _api(request)
    order_id = order_id_of(request)
    whole_error = api.require(request, "read") == "write"
    found = await _known_order(api, order_id)
    latest = await fetch_row(api, "api_generations", order_id, 1)
    body: dict[str, Any] = {"order_id": order_id, "has_brief": found["has_brief"], "created_at": found["created_at"]}
    if latest is None:
        body["generation"] = None
    else:
        phases = await fetch_rows(api, "api_phases", latest["id"])
        body["generation"] = generation_json(latest, phases, whole_error=whole_error)
    return json_response(body)


async def generations(request: web.Request) -> web.Response:
    api = _api(request)
    order_id = order_id_of(request)
    whole_error = api.require(request, "read") == "write"
    await _known_order(api, order_id)
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        bad_request("limit must be an integer")
    if not 1 <= limit <= 500:
        bad_request("limit must be between 1 and 500")
    rows = await fetch_rows(api, "api_generations", order_id, limit)
    return json_response(
        {"order_id": order_id, "generations": [generation_json(r, whole_error=whole_error) for r in rows]}
    )


# --------------------------------------------------------------------------- live events (SSE)


def _event_bytes(row: dict[str, Any]) -> bytes:
    data = {k: row[k] for k in EVENT_FIELDS}
    return b"id: %d\nevent: progress\ndata: %s\n\n" % (row["id"], orjson.dumps(data))


def _cursor(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID")
    what = "Last-Event-ID"
    if raw is None or not raw.strip():
        raw, what = request.query.get("after"), "after"
    if raw is None:
        return None
    raw = raw.strip()
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        bad_request(f"{what} must be a progress row id (a non-negative integer), got {raw[:40]!r}")
    return int(raw)


class _Stream:
    """One SSE client: replay from the table up to the fan-out's mark, then the fan-out's rows, then `end`."""

    def __init__(
        self,
        api: Api,
        response: web.StreamResponse,
        order_id: int,
        cursor: int,
        *,
        whole_errors: bool,
        expires_at: float | None,
    ) -> None:
        self.api = api
        self.response = response
        self.order_id = order_id
        self.cursor = cursor
        #: Write tokens see the errors in rows whole; read and stream tokens see `public_row`'s.
        self.whole_errors = whole_errors
        #: The stream token's expiry (Unix time): the stream ends then with `event: expired`.
        self.expires_at = expires_at
        self.expires_mono = None if expires_at is None else time.monotonic() + expires_at - time.time()
        #: When to ask again whether the generation ended without a row saying so (monotonic), if pending.
        self.end_check_at: float | None = None

    async def send(self, row: dict[str, Any], *, live: bool) -> bool:
        """Write one row (skipping what the client has); True when the stream must end after it."""
        if row["id"] <= self.cursor:
            return False
        await self.response.write(_event_bytes(row if self.whole_errors else public_row(row)))
        self.cursor = row["id"]
        self.api.metrics.sent(row, live=live)
        return event_of(row) in END_EVENTS and await self.ended()

    async def ended(self) -> bool:
        """Send `end` if the order's latest generation is terminal and every row announcing its end was sent."""
        state = await fetch_row(self.api, "api_stream_end", self.order_id, sorted(END_EVENTS))
        self.end_check_at = None
        if state is None or state["status"] not in TERMINAL:
            return False
        end_id = state["end_id"]
        if end_id is None:
            # The status changed and no row says so yet: the worker's buffered writer may still commit
            # it, or nobody will (a generation ended outside the runner): wait a bounded time for it.
            waited = state["finished_s_ago"] or 0.0
            if waited < self.api.options.end_wait_s:
                self.end_check_at = time.monotonic() + self.api.options.end_wait_s - waited
                return False
        elif end_id > self.cursor:
            return False  # the row is on its way (the fan-out delivers it)
        if await self._job_pending():
            # A job for the order is queued or running (a regenerate or retry just sent): its generation
            # is the one to follow, and it exists once a replica claims the job.
            self.end_check_at = time.monotonic() + JOB_RECHECK_S
            return False
        payload = orjson.dumps({"status": state["status"], "generation_id": state["id"]})
        await self.response.write(b"event: end\ndata: %s\n\n" % payload)
        return True

    async def _job_pending(self) -> bool:
        """Whether a job of the order is queued or running that has no run row yet: its generate_site job,
        or an edit or rollback (a replica registers one when it takes it)."""
        redis = self.api.redis
        assert redis is not None
        job = client.job_id(self.order_id)
        try:
            if await redis.exists(job_key_prefix + job, in_progress_key_prefix + job):
                return True
            return await client.change_in_queue(redis, self.order_id, queue_name=self.api.settings.worker.queue_name)
        except Exception:  # Redis away: PostgreSQL alone decides
            return False

    async def replay(self, upto: int) -> bool:
        while True:
            rows = await fetch_rows(self.api, "api_replay", self.order_id, self.cursor, upto, REPLAY_PAGE)
            for row in rows:
                if await self.send(row, live=False):
                    return True
            if len(rows) < REPLAY_PAGE:
                return await self.ended()

    async def expired(self) -> bool:
        """Send `expired` and end the stream once its stream token expired."""
        if self.expires_mono is None or time.monotonic() < self.expires_mono:
            return False
        await self.response.write(b"event: expired\ndata: %s\n\n" % orjson.dumps({"expires_at": self.expires_at}))
        return True

    async def live(self, subscriber: Subscriber) -> None:
        keepalive = self.api.options.keepalive_s
        last_write = time.monotonic()
        while not subscriber.overflowed:
            if await self.expired():
                return
            now = time.monotonic()
            deadline = last_write + keepalive
            if self.end_check_at is not None:
                deadline = min(deadline, self.end_check_at)
            if self.expires_mono is not None:
                deadline = min(deadline, self.expires_mono)
            try:
                async with asyncio.timeout(max(deadline - now, 0)):
                    await subscriber.wake.wait()
            except TimeoutError:
                if await self.expired():
                    return
                if self.end_check_at is not None and time.monotonic() >= self.end_check_at and await self.ended():
                    return
                if time.monotonic() - last_write >= keepalive:
                    await self.response.write(b": keep-alive\n\n")
                    last_write = time.monotonic()
                continue
            subscriber.wake.clear()
            while subscriber.rows and not subscriber.overflowed:
                row = subscriber.rows.popleft()
                if await self.send(row, live=True):
                    return
                last_write = time.monotonic()


STREAM_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",  # nginx: pass events on as they come
}


def _stream_token(request: web.Request, order_id: int) -> str | None:
    return request.query.get("token") or request.cookies.get(f"{SITE_COOKIE}_{order_id}")


def _credential(request: web.Request, granted: str, order_id: int) -> str | None:
    """A fingerprint of what authenticated the request (bearer, stream token, session), for the per-token cap."""
    raw = request.headers.get("Authorization")
    if raw is None and granted == "stream":
        raw = _stream_token(request, order_id)
    if raw is None:
        raw = request.cookies.get(SESSION_COOKIE)
    return None if not raw else hashlib.sha256(raw.encode()).hexdigest()[:32]


async def events(request: web.Request) -> web.StreamResponse:
    api = _api(request)
    order_id = order_id_of(request)
    granted = api.require(request, "read", order_id=order_id)
    cursor = _cursor(request)
    expires_at = None
    if granted == "stream":
        grant = api.tokens.stream_grant(_stream_token(request, order_id) or "")
        if grant is None:  # expired since `require` read it
            raise ApiError(401, "unauthorized", "invalid or expired stream token")
        expires_at = grant.expires_at
    if request.method == "HEAD":  # a monitor's probe: the stream's status and headers, and no stream held open
        await _known_order(api, order_id)
        return web.Response(headers={**STREAM_HEADERS, **cors_headers(request)})
    # The caps are checked before any query: refused streams cost PostgreSQL nothing.
    caps, token, client = request.app[STREAMS], _credential(request, granted, order_id), request.remote or "unknown"
    over = caps.over(api.settings.api, token, client)
    if over is not None:
        api.metrics.streams_refused.labels(over.split(" ", 1)[0]).inc()
        raise ApiError(
            429,
            "too_many_streams",
            f"too many open event streams ({over}): close one, or try again later",
            {"Retry-After": str(STREAM_RETRY_AFTER_S)},
        )
    caps.take(token, client)
    try:
        return await _follow(request, api, order_id, cursor, whole_errors=granted == "write", expires_at=expires_at)
    finally:
        caps.give_back(token, client)


async def _follow(
    request: web.Request, api: Api, order_id: int, cursor: int | None, *, whole_errors: bool, expires_at: float | None
) -> web.StreamResponse:
    await _known_order(api, order_id)
    assert api.fanout is not None
    subscriber, upto = api.fanout.subscribe(order_id, api.options.client_queue)
    response = web.StreamResponse()
    try:
        if cursor is None:
            start = (await fetch_row(api, "api_stream_start", order_id) or {}).get("start_after")
            cursor = upto if start is None else int(start)
        response.headers.update({**STREAM_HEADERS, **cors_headers(request)})
        transport = request.transport
        if transport is not None:
            # A client that cannot keep up is cut off, so its unread rows never hold memory or others up.
            subscriber.on_overflow = transport.abort
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        stream = _Stream(api, response, order_id, cursor, whole_errors=whole_errors, expires_at=expires_at)
        if not await stream.replay(upto):
            await stream.live(subscriber)
        return response
    except ConnectionError:  # the client went away (or was cut off for falling behind)
        return response
    finally:
        api.fanout.unsubscribe(subscriber)


# --------------------------------------------------------------------------- commands (write)


def _store_deadline(api: Api) -> asyncio.Timeout:
    """A bound on a `Store` call (whose acquire takes no timeout): its acquire's timeout and one statement's."""
    return asyncio.timeout(api.settings.api.pool_acquire_timeout_s + api.settings.database.command_timeout_s)


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    if request.content_type != "application/json":
        # A page of another site can post text/plain or a form without a preflight, never JSON.
        raise ApiError(415, "unsupported_media_type", "send the body as JSON with `Content-Type: application/json`")
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        bad_request(f"the body is not JSON: {exc}")
    if not isinstance(data, dict):
        bad_request("the body must be a JSON object")
    return data


def _valid_brief(raw: Any, max_bytes: int) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ApiError(400, "invalid_brief", "brief: must be a JSON object")
    size = len(orjson.dumps(raw))
    if size > max_bytes:
        raise ApiError(400, "invalid_brief", f"brief: {size:,} bytes, over the limit of {max_bytes:,}")
    if b"\\u0000" in orjson.dumps(raw):
        raise ApiError(400, "invalid_brief", "brief: a NUL character (\\u0000) is not allowed")
    try:
        return Brief.model_validate(raw).model_dump(mode="json")
    except ValidationError as exc:
        problems = [f"brief.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False)]
        raise ApiError(400, "invalid_brief", "; ".join(problems[:10])) from None


async def _enqueue(api: Api, order_id: int, brief: dict[str, Any] | None, regenerate: bool) -> dict[str, Any]:
    assert api.redis is not None
    job = await client.enqueue_generation(
        api.redis, order_id, brief, regenerate, queue_name=api.settings.worker.queue_name
    )
    return {"job_id": client.job_id(order_id), "queued": job is not None}


async def generate(request: web.Request) -> web.Response:
    api = _api(request)
    order_id = order_id_of(request)
    api.require(request, "write")
    body = await _body(request)
    unknown = sorted(set(body) - {"brief", "regenerate"})
    if unknown:
        bad_request(f"unknown field(s): {', '.join(unknown)} (expected brief, regenerate)")
    regenerate = body.get("regenerate", False)
    if not isinstance(regenerate, bool):
        bad_request("regenerate: must be true or false")
    brief = None
    if body.get("brief") is not None:
        brief = _valid_brief(body["brief"], api.settings.limits.max_brief_bytes)
        assert api.pool is not None
        # So the order's events can be followed at once.
        async with api.pool.acquire(timeout=api.settings.api.pool_acquire_timeout_s) as conn:
            await conn.execute(QUERIES["ensure_order"], order_id)
    else:
        found = await fetch_row(api, "api_order", order_id)
        if found is None:
            not_found(f"order {order_id} not found: send its brief with the first generate")
        if not found["has_brief"]:
            bad_request(f"brief: order {order_id} has no stored brief, send one")
    return json_response(await _enqueue(api, order_id, brief, regenerate), status=202)


async def cancel(request: web.Request) -> web.Response:
    api = _api(request)
    order_id = order_id_of(request)
    api.require(request, "write")
    await _known_order(api, order_id)
    async with _store_deadline(api):
        found = await api.store.request_cancel(order_id, "cancelled through the API")
    if found is None:
        conflict(f"order {order_id} has no queued or running generation")
    if found["status"] != "cancelled":
        assert api.redis is not None
        # Interrupts a model call in flight; the generation sees the request and ends `cancelled`.
        await api.redis.zadd(abort_jobs_ss, {found["job_id"] or client.job_id(order_id): int(time.time() * 1000)})
    status = "cancelled" if found["status"] == "cancelled" else "cancel_requested"
    return json_response({"order_id": order_id, "generation_id": found["id"], "status": status}, status=202)


async def retry(request: web.Request) -> web.Response:
    api = _api(request)
    order_id = order_id_of(request)
    api.require(request, "write")
    async with _store_deadline(api):
        overview = await api.store.order_overview(order_id)
    if overview is None:
        not_found(f"order {order_id} not found")
    if not overview["has_brief"]:
        conflict(f"order {order_id} has no stored brief: generate it with a brief")
    if overview["status"] == "succeeded":
        conflict(
            f"the latest generation of order {order_id} ({overview['generation_id']}) succeeded: nothing to retry "
            "(generate with regenerate=true for a fresh site)"
        )
    queued = await _enqueue(api, order_id, None, False)
    resumes = overview["status"] in ACTIVE
    return json_response(
        {
            **queued,
            "previous_generation_id": overview["generation_id"],
            "previous_status": overview["status"],
            "resumes": resumes,
        },
        status=202,
    )


# --------------------------------------------------------------------------- stream tokens and the site


async def stream_token(request: web.Request) -> web.Response:
    api = _api(request)
    order_id = order_id_of(request)
    api.require(request, "read")
    await _known_order(api, order_id)
    # Bound to the token (and session) that asked: it ends when that token is removed or the session signs out.
    token, expires = api.tokens.stream_token(order_id, api.settings.api.stream_token_ttl_s, api.grant(request))
    return json_response({"token": token, "expires_at": expires, "order_id": order_id})


def _site_path(request: web.Request) -> str:
    """The site path asked for, or 404 for anything that is not a plain relative path inside the site."""
    raw = request.raw_path.split("?", 1)[0]
    marker = "/site/"
    tail = raw[raw.index(marker) + len(marker) :] if marker in raw else ""
    lowered = tail.lower()
    if any(bad in lowered for bad in ("%2e", "%2f", "%5c", "%00", "\\", "//")) or tail.startswith("/"):
        not_found("no such file")
    path = unquote(tail) or "index.html"
    if path.endswith("/"):
        path += "index.html"
    segments = path.split("/")
    if any(s in ("", ".", "..") or not _SEGMENT.match(s) for s in segments):
        not_found("no such file")
    return path


async def site_file(request: web.Request) -> web.Response:
    api = _api(request)
    order_id = order_id_of(request)
    granted = api.require(request, "read", order_id=order_id)
    path = _site_path(request)
    found = await fetch_row(api, "api_site_file", order_id, path)
    if found is None:
        not_found("no such file")
    return _site_response(request, api, order_id, granted, found, f"/v1/orders/{order_id}/site/")


def _site_response(
    request: web.Request, api: Api, order_id: int, granted: str, found: dict[str, Any], cookie_path: str
) -> web.Response:
    """A file of a site with the site headers; with a stream token, its cookie for the site's relative links."""
    response = web.Response(
        body=found["content"],
        headers={
            "Content-Type": found["media_type"],
            **site_headers(api.settings.output.allowed_embed_hosts),  # the same as `sitegen preview` sends
            "ETag": f'"{found["sha256"]}"',
        },
    )
    token = request.query.get("token")
    if granted == "stream" and token:
        # The page's relative links and assets carry no ?token=: a cookie for this order's site path does.
        response.set_cookie(
            f"{SITE_COOKIE}_{order_id}",
            token,
            path=cookie_path,
            httponly=True,
            samesite="Strict",
            secure=request.secure,
            max_age=max(int(api.tokens.stream_grant(token).expires_at - time.time()), 1),  # type: ignore[union-attr]
        )
    return response


async def site_zip(request: web.Request) -> web.Response:
    api = _api(request)
    order_id = order_id_of(request)
    api.require(request, "read", order_id=order_id)
    files = await fetch_rows(api, "api_site_files", order_id)
    if not files:
        not_found(f"order {order_id} has no succeeded site")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for f in files:
            archive.writestr(f"order-{order_id}/{f['path']}", f["content"])
    return web.Response(
        body=buffer.getvalue(),
        headers={
            "Content-Type": "application/zip",
            "Content-Disposition": f'attachment; filename="order-{order_id}-site.zip"',
            "X-Content-Type-Options": "nosniff",
        },
    )


# --------------------------------------------------------------------------- versions and edits (issue 22)

VERSION_FIELDS = ("number", "parent", "kind", "generation_id", "instruction", "rolled_back_to", "created_at", "live")


def _version_number(raw: str | None, name: str) -> int:
    """A version number given as path or query parameter `name`, or 400 naming it."""
    if raw is None or not raw.isascii() or not raw.isdigit() or len(raw) > 9 or int(raw) <= 0:
        bad_request(f"{name} must be a version number (a positive integer), got {(raw or '')[:40]!r}")
    return int(raw)


def _usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (usage or {}).items() if k != "by_phase"}


def version_json(row: dict[str, Any]) -> dict[str, Any]:
    """A version as the API shows it (the list's and the detail's common fields)."""
    usage = _usage(row.get("usage"))
    return {**{k: row[k] for k in VERSION_FIELDS}, "usage": usage, "cost_usd": usage.get("cost_usd", 0)}


async def _known_version(api: Api, order_id: int, number: int, name: str) -> dict[str, Any]:
    found = await fetch_row(api, "version_detail", order_id, number)
    if found is None:
        not_found(f"{name}: order {order_id} has no version {number}")
    return found


async def versions(request: web.Request) -> web.Response:
    api = _api(request)
    order_id = order_id_of(request)
    api.require(request, "read")
    await _known_order(api, order_id)
    raw = request.query.get("limit", "100")
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= 1000:
        bad_request(f"limit must be an integer between 1 and 1000, got {raw[:40]!r}")
    rows = await fetch_rows(api, "versions_for_order", order_id, int(raw))
    state = await fetch_row(api, "api_version_state", order_id) or {}
    return json_response(
        {
            "order_id": order_id,
            "live_version": state.get("live_version"),
            "versions": [{**version_json(r), "files": r["files"], "bytes": r["bytes"]} for r in rows],
        }
    )


async def version(request: web.Request) -> web.Response:
    api = _api(request)
    order_id = order_id_of(request)
    api.require(request, "read")
    number = _version_number(request.match_info["n"], "n")
    await _known_order(api, order_id)
    found = await _known_version(api, order_id, number, "n")
    files = await fetch_rows(api, "version_manifest", order_id, number)
    return json_response(
        {
            "order_id": order_id,
            **version_json(found),
            "quality": found["quality"],
            "files": files,
            "bytes": sum(f["bytes"] for f in files),
        }
    )


async def version_diff(request: web.Request) -> web.Response:
    api = _api(request)
    order_id = order_id_of(request)
    api.require(request, "read")
    number = _version_number(request.match_info["n"], "n")
    raw_against = request.query.get("against")
    against = None if raw_against is None else _version_number(raw_against, "against")
    await _known_order(api, order_id)
    found = await _known_version(api, order_id, number, "n")
    if against is not None:
        await _known_version(api, order_id, against, "against")
    elif found["parent"] is not None and await fetch_row(api, "version_detail", order_id, found["parent"]):
        against = found["parent"]
    # Else version 1, or a version whose parent was pruned (output.keep_versions): compared with no site at all.
    new = await fetch_rows(api, "version_files", order_id, number)
    old = [] if against is None else await fetch_rows(api, "version_files", order_id, against)
    body = diff_versions(old, new, old_label=f"v{against}" if against else "empty", new_label=f"v{number}")
    return json_response({"order_id": order_id, "version": number, "against": against, **body})


async def version_site_file(request: web.Request) -> web.Response:
    api = _api(request)
    order_id = order_id_of(request)
    granted = api.require(request, "read", order_id=order_id)
    number = _version_number(request.match_info["n"], "n")
    path = _site_path(request)
    found = await fetch_row(api, "version_file", order_id, number, path)
    if found is None:
        not_found("no such file")
    return _site_response(request, api, order_id, granted, found, f"/v1/orders/{order_id}/versions/{number}/site/")


def edit_request(body: dict[str, Any]) -> tuple[str, int | None, list[str] | None]:
    """The instruction, base_version and pages of an edit's body, or 400 naming the field."""
    unknown = sorted(set(body) - {"instruction", "base_version", "pages"})
    if unknown:
        bad_request(f"unknown field(s): {', '.join(unknown)} (expected instruction, base_version, pages)")
    instruction, base, pages = body.get("instruction"), body.get("base_version"), body.get("pages")
    problem = edit_request_problem(instruction, base, pages)
    if problem is not None:
        bad_request(": ".join(problem))
    assert isinstance(instruction, str)
    return instruction.strip(), base, pages


async def _site_state(api: Api, order_id: int, what: str) -> dict[str, Any]:
    """The order's version state; 404 for an unknown order, 409 when it has no site to `what` yet."""
    state = await fetch_row(api, "api_version_state", order_id)
    if state is None:
        not_found(f"order {order_id} not found")
    if state["live_version"] is None and not state["has_generated_site"]:
        conflict(f"order {order_id} has no site to {what} yet: generate it first")
    return state


async def edit(request: web.Request) -> web.Response:
    api = _api(request)
    order_id = order_id_of(request)
    api.require(request, "write")
    instruction, base, pages = edit_request(await _body(request))
    state = await _site_state(api, order_id, "edit")
    if base is not None and await fetch_row(api, "version_detail", order_id, base) is None:
        not_found(f"base_version: order {order_id} has no version {base}")
    assert api.redis is not None
    job = await client.enqueue_edit(
        api.redis,
        order_id,
        instruction,
        base_version=base,
        pages=pages,
        queue_name=api.settings.worker.queue_name,
    )
    return json_response(
        {
            "job_id": None if job is None else job.job_id,
            "queued": job is not None,
            "order_id": order_id,
            "base_version": base,
            "live_version": state["live_version"],
        },
        status=202,
    )


async def rollback(request: web.Request) -> web.Response:
    api = _api(request)
    order_id = order_id_of(request)
    api.require(request, "write")
    body = await _body(request)
    unknown = sorted(set(body) - {"version"})
    if unknown:
        bad_request(f"unknown field(s): {', '.join(unknown)} (expected version)")
    number = body.get("version")
    if isinstance(number, bool) or not isinstance(number, int) or not 0 < number < 2**31:
        bad_request("version: required, a version number (a positive integer)")
    state = await _site_state(api, order_id, "roll back")
    if await fetch_row(api, "version_detail", order_id, number) is None:
        not_found(f"version: order {order_id} has no version {number}")
    assert api.redis is not None
    job = await client.enqueue_rollback(api.redis, order_id, number, queue_name=api.settings.worker.queue_name)
    return json_response(
        {
            "job_id": None if job is None else job.job_id,
            "queued": job is not None,
            "order_id": order_id,
            "version": number,
            "live_version": state["live_version"],
        },
        status=202,
    )
