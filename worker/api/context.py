"""What the API's handlers share: the `Api` context each reaches through `request.app[API]`, its errors,
auth checks and CORS headers, and the small helpers that read rows for them.

`worker.api.routes` and `worker.api.dashboard` import this module and nothing of each other;
`worker.api.app`, the application factory, sits on top of all three.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, NoReturn

import asyncpg
import orjson
from aiohttp import web
from arq import ArqRedis
from yarl import URL

from worker.api.auth import AuthThrottle, Grant, Role, Tokens
from worker.api.fanout import ProgressFanout
from worker.api.metrics import ApiMetrics
from worker.settings import Settings
from worker.store import QUERIES, Store

TERMINAL = ("succeeded", "failed", "cancelled")
SESSION_COOKIE = "sitegen_session"
SECURE_SESSION_COOKIE = "__Host-sitegen_session"
#: The signed-out session ids among the current request's credentials, set by `app._guard` around
#: each handler (a context variable: the handler runs in the middleware's task and context).
SIGNED_OUT: ContextVar[frozenset[str]] = ContextVar("sitegen_signed_out", default=frozenset())
SITE_COOKIE = "sitegen_site"
DASHBOARD_HEADER = "X-Sitegen-Dashboard"


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
    #: One connection of its own for /healthz, so it never waits behind client traffic.
    health_pool: asyncpg.Pool | None = None
    redis: ArqRedis | None = None
    fanout: ProgressFanout | None = None
    throttle: AuthThrottle = field(default_factory=AuthThrottle)
    #: When the signing keys were last read from PostgreSQL (monotonic), if they come from there.
    keys_read_at: float = float("-inf")

    @property
    def store(self) -> Store:
        assert self.pool is not None
        return Store(self.pool, replica_id="sitegen-api", lease_s=self.settings.worker.lease_s)

    # -- auth

    def grant(self, request: web.Request, *, allow_session: bool = True) -> Grant | None:
        """What the request's bearer token (or dashboard session) allows; None when it has neither.

        In open mode (no token configured) a request without credentials may read, from a loopback
        Host name only (the middleware checks the Host), and nothing may write.
        """
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise ApiError(401, "unauthorized", "expected `Authorization: Bearer <token>`", _challenge())
            if not self.tokens.configured:
                raise ApiError(401, "unauthorized", "no API token is configured on this server", _challenge())
            grant = self.tokens.bearer_grant(token.strip())
            if grant is None:
                raise ApiError(401, "unauthorized", "unknown token", _challenge())
            return grant
        if allow_session:
            grant = session_grant(self, request)
            if grant is not None:
                if request.method == "POST" and request.headers.get(DASHBOARD_HEADER) != "1":
                    # Only the dashboard's own scripts post with a session: no form of another page can.
                    raise ApiError(403, "forbidden", f"a session needs the {DASHBOARD_HEADER} header to post")
                return grant
        if not self.tokens.configured:
            return Grant("read", None)
        return None

    def role(self, request: web.Request, *, allow_session: bool = True) -> Role | None:
        grant = self.grant(request, allow_session=allow_session)
        return None if grant is None else grant.role

    def require(self, request: web.Request, role: Role, *, order_id: int | None = None) -> Role | str:
        """Authorize the request for `role`; with `order_id`, a stream token for that order is accepted too."""
        got = self.grant(request)
        if order_id is not None and (got is None or got.token is None):
            token = request.query.get("token") or request.cookies.get(f"{SITE_COOKIE}_{order_id}")
            if token:
                stream = self.tokens.stream_grant(token)
                if stream is None or (stream.session_id is not None and stream.session_id in signed_out(request)):
                    raise ApiError(401, "unauthorized", "invalid or expired stream token", _challenge())
                if stream.order_id != order_id:
                    raise ApiError(403, "forbidden", "this stream token is for another order")
                return "stream"
        if got is None:
            raise ApiError(401, "unauthorized", "missing token: send `Authorization: Bearer <token>`", _challenge())
        if role == "write" and got.role != "write":
            if not self.tokens.configured:
                message = "no write token is configured: set SITEGEN_API_WRITE_TOKENS (open mode reads only)"
                raise ApiError(403, "forbidden", message)
            raise ApiError(403, "forbidden", "this endpoint needs a write token")
        return got.role


def _challenge() -> dict[str, str]:
    return {"WWW-Authenticate": 'Bearer realm="sitegen"'}


def session_cookie_name(request: web.Request) -> str:
    """`__Host-` (Secure, Path=/, no Domain: no sibling subdomain can set it) over https; plain over http."""
    return SECURE_SESSION_COOKIE if request.secure else SESSION_COOKIE


def signed_out_key(session_id: str) -> str:
    """The Redis key that says a session was signed out; it expires after whatever the session signed."""
    return f"sitegen-api:signed-out:{session_id}"


def signed_out(request: web.Request) -> frozenset[str]:
    """The session ids among the request's credentials that were signed out (looked up by the middleware)."""
    return SIGNED_OUT.get()


def session_grant(api: Api, request: web.Request) -> Grant | None:
    """The request's dashboard session, if valid, still bound to a configured token, and not signed out."""
    cookie = request.cookies.get(session_cookie_name(request))
    if not cookie or not api.tokens.configured:
        return None
    grant = api.tokens.session_grant(cookie)
    if grant is None or grant.session_id in signed_out(request):
        return None
    return grant


def same_origin(request: web.Request) -> bool:
    """Whether a browser says the request comes from a page of this site (login/logout CSRF).

    `Sec-Fetch-Site` (set by the browser, no page can forge it) decides when present; otherwise the
    `Origin` must be this site as the client sees it (scheme and host as forwarded by a trusted proxy).
    """
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site == "same-origin"
    origin = request.headers.get("Origin")
    if not origin or origin == "null":
        return False
    try:
        return URL(origin).origin() == request.url.origin()
    except ValueError:
        return False


API = web.AppKey("sitegen_api", Api)


def cors_headers(request: web.Request) -> dict[str, str]:
    """The CORS headers for a request from an allowed origin; none for other origins or same-origin calls."""
    origin = request.headers.get("Origin")
    if origin and origin.lower() in request.app[API].settings.api.cors_origins:
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin", "Access-Control-Expose-Headers": "*"}
    return {}


# --------------------------------------------------------------------------- helpers of the handlers


def order_id_of(request: web.Request) -> int:
    raw = request.match_info["order_id"]
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18 or int(raw) <= 0:
        bad_request(f"order_id must be a positive integer, got {raw[:40]!r}")
    return int(raw)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def fetch_rows(api: Api, query: str, *args: Any) -> list[dict[str, Any]]:
    """The rows of a named query; a pool busy past `api.pool_acquire_timeout_s` raises TimeoutError (503)."""
    assert api.pool is not None
    async with api.pool.acquire(timeout=api.settings.api.pool_acquire_timeout_s) as conn:
        return [dict(r) for r in await conn.fetch(QUERIES[query], *args)]


async def fetch_row(api: Api, query: str, *args: Any) -> dict[str, Any] | None:
    rows = await fetch_rows(api, query, *args)
    return rows[0] if rows else None


def generation_json(
    row: dict[str, Any], phases: list[dict[str, Any]] | None = None, *, whole_error: bool = False
) -> dict[str, Any]:
    """A generation as the API shows it; its error whole only with `whole_error` (write tokens)."""
    usage = row.get("usage") or {}
    out = {
        "generation_id": row["id"],
        "kind": row.get("kind", "generation"),
        "version": row.get("version"),
        "status": row["status"],
        "current_phase": row["current_phase"],
        "attempt": row["attempt"],
        "error": row["error"] if whole_error else public_error(row["error"]),
        "usage": {k: v for k, v in usage.items() if k != "by_phase"},
        "cost_usd": usage.get("cost_usd", 0),
        "pages": row.get("pages") or [],
        "replica_id": row.get("replica_id"),
        "created_at": row["created_at"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
    }
    if phases is not None:
        out["phases"] = phases
    return out


# --------------------------------------------------------------------------- errors as read tokens see them

#: Errors whose stored message is ours and says what to fix or why it stopped (a brief's field, a
#: budget, a cancel): shown as stored, first line only. Any other message may quote a provider's
#: answer, a SQL error or a host name, and is replaced by the sentence of its family below.
_OWN_MESSAGES = frozenset(
    {
        "JobArgumentsInvalid",
        "BriefInvalid",
        "OrderNotFound",
        "TokenBudgetExceeded",
        "SiteCheckFailed",
        "Cancelled",
        "Superseded",
        "Interrupted",
    }
)
_AI_MESSAGES = {
    "AIAuthError": "the AI provider refused the worker's credentials",
    "AIBadRequest": "the AI provider refused the request",
    "AIQuotaExhausted": "the AI provider's quota is used up",
    "AIRateLimited": "the AI provider is rate limiting requests",
    "AIUnavailable": "the AI provider did not answer or was unavailable",
    "AIBadOutput": "the model's answer could not be used",
    "BudgetWaitExceeded": "the AI provider's shared budget was busy",
    "AIError": "a model call failed",
}
_OTHER_MESSAGES = {
    "AttemptsExhausted": "gave up after the most attempts allowed",
    "AttemptLost": "an attempt stopped without storing an error",
    "OrderBusy": "another replica is working on this order",
}
PUBLIC_MESSAGE_CHARS = 500


def public_error(error: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a read or stream token sees of a stored error: `{type, message, phase, retryable}`.

    The whole error (traceback, provider request ids, body excerpts, SQL details, replica names) is
    for write tokens and the dashboard's write sessions.
    """
    if not error:
        return error
    kind = str(error.get("type") or "Error")[:200]
    if kind in _OWN_MESSAGES:
        message = str(error.get("message") or "").split("\n", 1)[0][:PUBLIC_MESSAGE_CHARS]
    else:
        message = (
            _AI_MESSAGES.get(kind) or _OTHER_MESSAGES.get(kind) or "an internal error (the operators have the details)"
        )
    phase = error.get("phase")
    return {
        "type": kind,
        "message": message,
        "phase": str(phase) if phase else None,
        "retryable": bool(error.get("retryable", False)),
    }


def public_row(row: dict[str, Any]) -> dict[str, Any]:
    """A progress row as a read or stream token sees it: an error in its details shaped by `public_error`,
    and that error's stored message replaced in the row's message."""
    details = row.get("details")
    if not isinstance(details, dict) or not isinstance(details.get("error"), dict):
        return row
    error = details["error"]
    shown = public_error(error)
    assert shown is not None
    message = str(row.get("message") or "")
    stored = str(error.get("message") or "")
    if stored and stored in message:
        message = message.replace(stored, shown["message"])
    elif stored:
        message = f"{message.split(':', 1)[0]}: {shown['type']}: {shown['message']}"
    return {**row, "message": message, "details": {**details, "error": shown}}
