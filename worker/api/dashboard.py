"""The operators' dashboard (`GET /`): server-rendered pages with a little plain JavaScript for the live parts.

Sign-in (from this site's pages only) exchanges an API token for a signed, HttpOnly, SameSite=Strict
session cookie (`__Host-` and Secure over https), bound to that token; sign-out revokes it. The pages then
call the same API as any frontend (the cookie authenticates them, and a write needs the dashboard's
own request header, so another page cannot make a signed-in browser post). Every asset is served
from `static/`: no CDN, no build step.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from aiohttp import web
from loguru import logger

from worker.api.context import (
    API,
    TERMINAL,
    Api,
    ApiError,
    fetch_row,
    fetch_rows,
    generation_json,
    order_id_of,
    same_origin,
    session_cookie_name,
    session_grant,
    signed_out_key,
)
from worker.polling import REPLICAS_MAX_AGE_S, leases_key, replicas_key
from worker.store import PHASES, PHASES_OF

STATIC = Path(__file__).parent / "static"
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'"
)
TASK_OF_PHASE = {"plan": "planning", "content": "content", "code": "coding"}
#: Replicas the overview lists at most (the most recently healthy first).
MAX_REPLICAS_SHOWN = 500
#: Versions an order page lists at most (the newest first).
MAX_VERSIONS_SHOWN = 100


@dataclass
class OverviewCache:
    """The rendered overview of each role in this process, reused for `api.overview_cache_s`."""

    #: role -> (when it was rendered, monotonic; the HTML).
    rendered: dict[str, tuple[float, str]] = field(default_factory=dict)
    #: One render at a time: the tabs asking while it runs get its result.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


OVERVIEW_CACHE = web.AppKey("sitegen_overview_cache", OverviewCache)


def add_routes(app: web.Application) -> None:
    app[OVERVIEW_CACHE] = OverviewCache()
    app.router.add_get("/", overview_page)
    app.router.add_get("/orders/{order_id}", order_page)
    app.router.add_post("/session", sign_in)
    app.router.add_post("/session/end", sign_out)
    app.router.add_get("/dashboard/overview", overview_fragment)
    app.router.add_get("/dashboard/orders/{order_id}", order_fragment)
    app.router.add_static("/static/", STATIC, append_version=True)


# --------------------------------------------------------------------------- pages and sessions


def _html(body: str, status: int = 200) -> web.Response:
    return web.Response(
        text=body,
        status=status,
        content_type="text/html",
        headers={
            "Content-Security-Policy": PAGE_CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "same-origin",
            "Cache-Control": "no-store",
        },
    )


def _page(title: str, main: str, *, role: str | None, page: str, data: str = "") -> str:
    nav = ""
    if role is not None:
        sign_out = (
            '<form method="post" action="/session/end" class="inline">'
            '<button type="submit" class="link">Sign out</button></form>'
        )
        nav = (
            f'<nav aria-label="Main"><a href="/">Overview</a>'
            f'<span class="role role-{role}">{escape(role)} access</span>{sign_out}</nav>'
        )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)} · sitegen</title>
<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/static/dashboard.css">
<script src="/static/dashboard.js" defer></script>
</head>
<body data-page="{page}" {data}>
<header class="top"><a class="brand" href="/">sitegen</a>{nav}</header>
<main id="main">
{main}
</main>
</body>
</html>
"""


def _session_role(api: Api, request: web.Request) -> str | None:
    if not api.tokens.configured:
        return "read"  # open mode: read-only, loopback host names only (see `app._guard`)
    grant = session_grant(api, request)
    return grant.role if grant is not None else None


def _sign_in_page(error: str = "") -> str:
    alert = f'<p class="alert" role="alert">{escape(error)}</p>' if error else ""
    main = f"""<section class="card narrow">
<h1>Sign in</h1>
<p>Paste a read or write API token (<code>SITEGEN_API_READ_TOKENS</code> or
<code>SITEGEN_API_WRITE_TOKENS</code>). It is exchanged for a session cookie and not stored.</p>
{alert}
<form method="post" action="/session">
<label for="token">API token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required>
<button type="submit">Sign in</button>
</form>
</section>"""
    return _page("Sign in", main, role=None, page="sign-in")


def _same_origin_only(request: web.Request) -> None:
    if not same_origin(request):
        # Login and logout CSRF: another site's form could sign the operator out, or into its own session.
        raise ApiError(403, "forbidden", "sign-in and sign-out are accepted from this site's own pages only")


async def sign_in(request: web.Request) -> web.Response:
    api = request.app[API]
    _same_origin_only(request)
    form = await request.post()
    token = str(form.get("token", "")).strip()
    session = api.tokens.session(token, api.options.session_ttl_s) if token and api.tokens.configured else None
    if session is None:
        logger.info("dashboard: a sign-in with an unknown token was refused")  # never the token itself
        return _html(_sign_in_page("That token is not valid."), status=401)
    response = web.HTTPSeeOther("/")
    # HttpOnly (no script reads it), SameSite=Strict (no other site's request carries it, not even a link:
    # the dashboard has no page another site needs to open signed in), Secure with the __Host- prefix
    # over https (as a trusted proxy forwarded it), so no subdomain can set or overwrite it.
    response.set_cookie(
        session_cookie_name(request),
        session,
        httponly=True,
        samesite="Strict",
        secure=request.secure,
        path="/",
        max_age=int(api.options.session_ttl_s),
    )
    raise response


async def sign_out(request: web.Request) -> web.Response:
    """End the session on the server too: its id is refused until whatever it signed has expired."""
    api = request.app[API]
    _same_origin_only(request)
    grant = session_grant(api, request)
    if grant is not None and grant.session_id is not None:
        assert api.redis is not None
        lives = (grant.expires_at or time.time()) - time.time() + api.settings.api.stream_token_ttl_s
        await api.redis.set(signed_out_key(grant.session_id), b"1", ex=max(int(lives) + 1, 1))
    response = web.HTTPSeeOther("/")
    response.del_cookie(session_cookie_name(request), path="/", secure=request.secure, httponly=True, samesite="Strict")
    raise response


def _signed_in(request: web.Request) -> str:
    role = _session_role(request.app[API], request)
    if role is None:
        raise web.HTTPSeeOther("/")
    return role


# --------------------------------------------------------------------------- formatting


def _when(value: datetime | None) -> str:
    if value is None:
        return "—"
    return f'<time datetime="{value.isoformat()}">{value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")} UTC</time>'


def _ago(value: datetime | None) -> str:
    if value is None:
        return "—"
    seconds = max((datetime.now(UTC) - value).total_seconds(), 0)
    text = (
        f"{seconds:.0f} s"
        if seconds < 90
        else f"{seconds / 60:.0f} min"
        if seconds < 5400
        else f"{seconds / 3600:.1f} h"
    )
    return f'<time datetime="{value.isoformat()}">{text} ago</time>'


def _status(status: str | None, *, live_id: str = "") -> str:
    status = status or "none"
    ident = f' id="{live_id}"' if live_id else ""
    return f'<span class="status status-{escape(status)}"{ident}>{escape(status)}</span>'


def _tokens(usage: dict[str, Any] | None) -> str:
    usage = usage or {}
    return f"{int(usage.get('input_tokens', 0)) + int(usage.get('output_tokens', 0)):,}"


def _cost(value: Any) -> str:
    return f"${float(value or 0):.4f}"


def _progress(done: int, total: int = len(PHASES)) -> str:
    return (
        f'<progress max="{total}" value="{done}" aria-label="phases done">{done} of {total}</progress>'
        f' <span class="muted">{done}/{total}</span>'
    )


def _table(caption: str, head: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{escape(empty)}</p>'
    header = "".join(f'<th scope="col">{escape(h)}</th>' for h in head)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return (
        f'<div class="scroll" tabindex="0" role="region" aria-label="{escape(caption)}">'
        f'<table><caption class="sr-only">{escape(caption)}</caption>'
        f"<thead><tr>{header}</tr></thead><tbody>{body}</tbody></table></div>"
    )


# --------------------------------------------------------------------------- overview


async def _overview(app: web.Application, role: str) -> str:
    """The overview for `role`, rendered at most once per `api.overview_cache_s` in this process."""
    api, cache = app[API], app[OVERVIEW_CACHE]
    ttl = api.settings.api.overview_cache_s
    if ttl <= 0:
        return await _render_overview(api, role)
    async with cache.lock:
        cached = cache.rendered.get(role)
        if cached is None or time.monotonic() - cached[0] >= ttl:
            cached = (time.monotonic(), await _render_overview(api, role))
            cache.rendered[role] = cached
        return cached[1]


async def _replica_health(api: Api) -> list[tuple[str, str]]:
    """(replica, health) of every replica whose health key is there, read by known keys (no SCAN)."""
    assert api.redis is not None
    queue = api.settings.worker.queue_name
    members = replicas_key(queue)
    now = time.time()
    await api.redis.zremrangebyscore(members, "-inf", now - REPLICAS_MAX_AGE_S)
    names = [
        m.decode() if isinstance(m, bytes) else str(m)
        for m in await api.redis.zrevrangebyscore(members, "+inf", "-inf", start=0, num=MAX_REPLICAS_SHOWN)
    ]
    if not names:
        return []
    values = await api.redis.mget([f"{queue}:health-check:{name}" for name in names])
    return [
        (name, value.decode() if isinstance(value, bytes) else str(value))
        for name, value in zip(names, values, strict=True)
        if value is not None
    ]


async def _render_overview(api: Api, role: str) -> str:
    assert api.redis is not None
    queue = api.settings.worker.queue_name
    now_ms = int(time.time() * 1000)
    replicas: list[tuple[str, str]] = []
    depth = deferred = 0
    redis_error = ""
    try:
        # A running job is scored at the end of its lease (worker.polling): the future scores less the
        # leases still running are the jobs deferred. One round trip.
        async with api.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(queue)
            pipe.zcount(queue, now_ms + 1, "+inf")
            pipe.zcount(leases_key(queue), now_ms + 1, "+inf")
            depth, later, leased = (int(n) for n in await pipe.execute())
        deferred = max(later - leased, 0)
        replicas = await _replica_health(api)
    except Exception as exc:
        redis_error = f"Redis did not answer: {type(exc).__name__}"
    active = await fetch_rows(api, "dashboard_active")
    failures = await fetch_rows(api, "dashboard_failures")
    usage = await fetch_rows(api, "dashboard_usage")

    running_by_replica: dict[str, list[str]] = {}
    for g in active:
        if g["status"] == "running" and g["replica_id"]:
            link = f'<a href="/orders/{g["order_id"]}">{g["order_id"]}</a>'
            running_by_replica.setdefault(g["replica_id"], []).append(link)
    replica_rows = [
        [escape(name), escape(health[:120]) or "—", ", ".join(running_by_replica.get(name, [])) or "—"]
        for name, health in sorted(replicas)
    ]
    active_rows = [
        [
            f'<a href="/orders/{g["order_id"]}">Order {g["order_id"]}</a>',
            _status(g["status"]),
            escape(g["current_phase"] or "—"),
            _progress(int(g["phases_done"])),
            str(g["attempt"]),
            escape(g["replica_id"] or "—"),
            _ago(g["started_at"] or g["created_at"]),
        ]
        for g in active
    ]
    failure_rows = [
        [
            escape(f["type"] or "Error"),
            str(f["count"]),
            _ago(f["last_at"]),
            f'<a href="/orders/{f["order_id"]}">{f["order_id"]}</a>',
        ]
        for f in failures
    ]
    routed = {phase: (api.settings.ai.routing.get(task) or ["?"])[0] for phase, task in TASK_OF_PHASE.items()}
    totals: dict[str, dict[str, float]] = {}
    for u in usage:
        provider = routed.get(u["phase"], "none")
        entry = totals.setdefault(provider, {"today_tokens": 0, "today_cost": 0.0, "week_tokens": 0, "week_cost": 0.0})
        entry["today_tokens"] += u["today_tokens"]
        entry["today_cost"] += u["today_cost"]
        entry["week_tokens"] += u["week_tokens"]
        entry["week_cost"] += u["week_cost"]
    usage_rows = [
        [
            escape(p),
            f"{int(t['today_tokens']):,}",
            _cost(t["today_cost"]),
            f"{int(t['week_tokens']):,}",
            _cost(t["week_cost"]),
        ]
        for p, t in sorted(totals.items())
    ]
    redis_note = f'<p class="alert" role="status">{escape(redis_error)}</p>' if redis_error else ""
    enqueue = _enqueue_form() if role == "write" else ""
    return f"""<h1>Overview</h1>
{redis_note}
<div class="stats">
<p class="stat"><span class="stat-value" id="replica-count">{len(replicas)}</span> replicas alive</p>
<p class="stat"><span class="stat-value">{depth}</span> jobs in the queue</p>
<p class="stat"><span class="stat-value">{deferred}</span> deferred</p>
<p class="stat"><span class="stat-value">{sum(1 for g in active if g["status"] == "running")}</span> running</p>
</div>
<section class="card" aria-labelledby="h-active"><h2 id="h-active">Queued and running generations</h2>
{
        _table(
            "Active generations",
            ["order", "status", "phase", "progress", "attempt", "replica", "since"],
            active_rows,
            "Nothing is queued or running.",
        )
    }
</section>
<section class="card" aria-labelledby="h-replicas"><h2 id="h-replicas">Replicas</h2>
{
        _table(
            "Replicas",
            ["replica", "health", "running orders"],
            replica_rows,
            "No replica is alive (no health key in Redis).",
        )
    }
</section>
<section class="card" aria-labelledby="h-failures"><h2 id="h-failures">Failures in the last 24 hours</h2>
{_table("Failures by error type", ["error type", "count", "last", "latest order"], failure_rows, "No failure.")}
</section>
<section class="card" aria-labelledby="h-usage"><h2 id="h-usage">Tokens and cost</h2>
{
        _table(
            "Tokens and cost by provider",
            ["provider (as routed)", "tokens today", "cost today", "tokens 7 days", "cost 7 days"],
            usage_rows,
            "No model calls in the last 7 days.",
        )
    }
</section>
{enqueue}"""


def _enqueue_form() -> str:
    return """<section class="card" aria-labelledby="h-enqueue"><h2 id="h-enqueue">Generate a site</h2>
<form id="enqueue" class="stack">
<label for="order-id">Order id</label>
<input id="order-id" name="order_id" type="number" min="1" required>
<label for="brief">Brief (JSON; leave empty to use the order's stored brief)</label>
<textarea id="brief" name="brief" rows="6" spellcheck="false"></textarea>
<label class="check"><input id="regenerate" name="regenerate" type="checkbox"> Regenerate even if it succeeded</label>
<button type="submit">Enqueue</button>
<p id="enqueue-result" role="status" aria-live="polite"></p>
</form>
</section>"""


async def overview_page(request: web.Request) -> web.Response:
    api = request.app[API]
    role = _session_role(api, request)
    if role is None:
        return _html(_sign_in_page())
    return _html(_page("Overview", await _overview(request.app, role), role=role, page="overview"))


async def overview_fragment(request: web.Request) -> web.Response:
    role = _signed_in(request)
    return _html(await _overview(request.app, role))


# --------------------------------------------------------------------------- order page


def _run_kind(g: dict[str, Any], phases: list[dict[str, Any]], versions: list[dict[str, Any]]) -> str:
    """What the latest run of an order is: a generation, an edit or a rollback. The run's row as the API
    reads it does not say: the version it made does, else the phases only an edit or a rollback has."""
    made = next((v["kind"] for v in versions if v["generation_id"] == g["generation_id"]), None)
    if made in PHASES_OF:
        return str(made)
    seen = {p["phase"] for p in phases} | {g["current_phase"]}
    for kind in ("edit", "rollback"):
        if seen & (set(PHASES_OF[kind]) - set(PHASES)):
            return kind
    return "generation"


def _made_by(v: dict[str, Any]) -> str:
    if v["kind"] == "rollback" and v["rolled_back_to"] is not None:
        return f"rollback to v{v['rolled_back_to']}"
    if v["kind"] == "edit" and v["parent"] is not None:
        return f"edit of v{v['parent']}"
    return escape(str(v["kind"]))


def _versions(order_id: int, versions: list[dict[str, Any]], role: str, *, editable: bool) -> str:
    """The order's versions, newest first, the live one marked; per version a link to its site and, for
    write sessions, a rollback button. The list rides along as JSON for the page's compare and preview forms,
    and whether the order has a site to edit (an order a previous release generated has no version yet)."""
    rows = []
    for v in versions:
        n = int(v["number"])
        actions = f'<a href="/v1/orders/{order_id}/versions/{n}/site/index.html">Open v{n}</a>'
        if role == "write" and not v["live"]:
            actions += f' <button type="button" class="small" data-rollback="{n}">Roll back to v{n}</button>'
        instruction = v["instruction"]
        rows.append(
            [
                f"v{n}",
                _made_by(v),
                f'<span class="instruction">{escape(instruction)}</span>' if instruction else "—",
                _tokens(v["usage"]),
                _cost((v["usage"] or {}).get("cost_usd")),
                _when(v["created_at"]),
                '<span class="status status-live">live</span>' if v["live"] else "—",
                actions,
            ]
        )
    listed = [{k: v[k] for k in ("number", "parent", "kind", "rolled_back_to", "live")} for v in versions]
    capped = len(versions) >= MAX_VERSIONS_SHOWN
    shown = f'<p class="muted">The newest {MAX_VERSIONS_SHOWN} are shown.</p>' if capped else ""
    table = _table(
        f"Versions of order {order_id}",
        ["version", "made by", "instruction", "tokens", "cost", "created", "live", "site"],
        rows,
        "No version yet: a generation that succeeds makes version 1.",
    )
    return (
        f'<section class="card" id="versions" aria-labelledby="h-versions" data-editable="{str(editable).lower()}" '
        f'data-versions="{escape(json.dumps(listed))}"><h2 id="h-versions">Versions</h2>{table}{shown}</section>'
    )


async def _order(api: Api, order_id: int, role: str) -> tuple[str, dict[str, Any] | None]:
    found = await fetch_row(api, "api_order", order_id)
    if found is None:
        raise web.HTTPNotFound()
    latest = await fetch_row(api, "api_generations", order_id, 1)
    if latest is None:
        return '<p class="muted">No generation yet: it appears here once a replica starts the job.</p>', None
    phases = await fetch_rows(api, "api_phases", latest["id"])
    versions = await fetch_rows(api, "versions_for_order", order_id, MAX_VERSIONS_SHOWN)
    state = await fetch_row(api, "api_version_state", order_id) or {}
    editable = state.get("live_version") is not None or bool(state.get("has_generated_site"))
    g = generation_json(latest, phases, whole_error=role == "write")
    kind = _run_kind(g, phases, versions)
    by_phase = {p["phase"]: p for p in phases}
    phase_rows = []
    for phase in PHASES_OF[kind]:
        p = by_phase.get(phase)
        phase_rows.append(
            [
                escape(phase),
                "done" if p else ("running" if g["current_phase"] == phase and g["status"] == "running" else "—"),
                f"{p['duration_ms']:,} ms" if p and p["duration_ms"] is not None else "—",
                _tokens(p["usage"]) if p else "—",
                _cost((p["usage"] or {}).get("cost_usd")) if p else "—",
            ]
        )
    error = ""
    if g["error"]:
        e = g["error"]
        trace = e.get("traceback") or ""
        folded = f"<details><summary>Traceback</summary><pre>{escape(str(trace))}</pre></details>" if trace else ""
        error = (
            f'<section class="card error" aria-labelledby="h-error"><h2 id="h-error">Error</h2>'
            f"<p><strong>{escape(str(e.get('type', 'Error')))}</strong>: {escape(str(e.get('message', '')))}"
            f"{' (phase ' + escape(str(e['phase'])) + ')' if e.get('phase') else ''}</p>{folded}</section>"
        )
    actions = ""
    if role == "write":
        buttons = ""
        if g["status"] in ("queued", "running"):
            buttons += '<button type="button" data-action="cancel">Cancel</button>'
        if g["status"] in ("failed", "cancelled") and kind == "generation":
            buttons += '<button type="button" data-action="retry">Retry</button>'
        actions = (
            f'<div class="actions">{buttons}<span id="action-result" role="status" aria-live="polite"></span></div>'
        )

    preview = ""
    if g["status"] == "succeeded" or any(v["live"] for v in versions):
        # A failed edit leaves the live version as it was: still worth showing.
        preview = (
            f'<section class="card" aria-labelledby="h-preview"><h2 id="h-preview">Preview</h2>'
            f'<p><a href="/v1/orders/{order_id}/site/">Open the site</a> · '
            f'<a href="/v1/orders/{order_id}/site.zip">Download it (zip)</a></p>'
            f'<iframe title="Preview of the site of order {order_id}" src="/v1/orders/{order_id}/site/" '
            f'sandbox="allow-same-origin" loading="lazy"></iframe></section>'
        )
    summary = f"""<dl class="facts" data-run="{kind}">
<div><dt>Status</dt><dd>{_status(g["status"], live_id="live-status")}</dd></div>
<div><dt>Phase</dt><dd id="live-phase">{escape(g["current_phase"] or "—")}</dd></div>
<div><dt>Progress</dt><dd id="live-progress">{_progress(len(phases), len(PHASES_OF[kind]))}</dd></div>
<div><dt>{kind.capitalize()}</dt><dd>{g["generation_id"]} (attempt {g["attempt"]})</dd></div>
<div><dt>Tokens</dt><dd>{_tokens(g["usage"])}</dd></div>
<div><dt>Cost</dt><dd>{_cost(g["cost_usd"])}</dd></div>
<div><dt>Started</dt><dd>{_when(g["started_at"])}</dd></div>
<div><dt>Finished</dt><dd>{_when(g["finished_at"])}</dd></div>
</dl>
{actions}
<section class="card" aria-labelledby="h-phases"><h2 id="h-phases">Phases</h2>
{_table("Phases", ["phase", "state", "duration", "tokens", "cost"], phase_rows, "")}
</section>
{error}
{preview}
{_versions(order_id, versions, role, editable=editable)}"""
    return summary, g


def _version_tools(order_id: int, role: str) -> str:
    """The forms beside the versions table, outside the refreshed summary so that what is typed or shown in
    them survives its refreshes: the edit box (write sessions), the diff of two versions, a version's preview.
    The page's script fills their version lists from the table and hides them while there is no version."""
    edit = ""
    if role == "write":
        edit = """<section class="card" id="edit" aria-labelledby="h-edit" hidden><h2 id="h-edit">Edit the site</h2>
<form id="edit-form" class="stack">
<label for="edit-instruction">Instruction</label>
<textarea id="edit-instruction" name="instruction" rows="3" maxlength="2000" required
 aria-describedby="edit-instruction-hint"></textarea>
<p id="edit-instruction-hint" class="hint">What to change, in plain words (“Make the header blue”). The edit
applies to the live version when it starts and makes a new version.</p>
<label for="edit-pages">Pages (optional)</label>
<input id="edit-pages" name="pages" type="text" autocomplete="off" spellcheck="false"
 aria-describedby="edit-pages-hint">
<p id="edit-pages-hint" class="hint">The page slugs the edit is limited to, separated by commas
(the home page is <code>index</code>); empty: every page.</p>
<button type="submit">Send the edit</button>
</form>
</section>"""
    return f"""<p id="versions-result" class="notice" role="status" aria-live="polite"></p>
{edit}
<section class="card" id="compare" aria-labelledby="h-compare" hidden><h2 id="h-compare">Compare versions</h2>
<form id="diff-form" class="controls">
<div class="field"><label for="diff-version">Version</label><select id="diff-version" name="version"></select></div>
<div class="field"><label for="diff-against">Against</label><select id="diff-against" name="against"></select></div>
<fieldset class="field"><legend>Show</legend>
<label class="check"><input type="radio" name="mode" value="unified" checked> Unified</label>
<label class="check"><input type="radio" name="mode" value="split"> Side by side</label>
</fieldset>
<button type="submit">Show the changes</button>
</form>
<p id="diff-state" class="muted" role="status" aria-live="polite"></p>
<div id="diff-output" class="diff-output"></div>
</section>
<section class="card" id="version-preview" aria-labelledby="h-version-preview" hidden>
<h2 id="h-version-preview">Preview a version</h2>
<form id="preview-form" class="controls">
<div class="field"><label for="preview-version">Version to preview</label>
<select id="preview-version" name="version"></select></div>
<button type="submit">Preview</button>
</form>
<p id="preview-link" hidden><a href="/v1/orders/{order_id}/site/">Open this version</a></p>
<iframe id="preview-frame" title="Preview of a version of order {order_id}" sandbox="allow-same-origin" hidden></iframe>
</section>"""


async def order_page(request: web.Request) -> web.Response:
    api = request.app[API]
    role = _session_role(api, request)
    if role is None:
        return _html(_sign_in_page())
    order_id = order_id_of(request)
    summary, g = await _order(api, order_id, role)
    terminal = "true" if g is not None and g["status"] in TERMINAL else "false"
    main = f"""<h1>Order {order_id}</h1>
<div id="summary">{summary}</div>
{_version_tools(order_id, role)}
<section class="card" aria-labelledby="h-timeline"><h2 id="h-timeline">Progress</h2>
<p id="stream-state" class="muted" role="status" aria-live="polite">Connecting…</p>
<ol id="timeline" class="timeline" tabindex="0" aria-label="Progress log"></ol>
</section>"""
    generation = g["generation_id"] if g is not None else ""
    data = f'data-order="{order_id}" data-terminal="{terminal}" data-generation="{generation}"'
    return _html(_page(f"Order {order_id}", main, role=role, page="order", data=data))


async def order_fragment(request: web.Request) -> web.Response:
    role = _signed_in(request)
    summary, _ = await _order(request.app[API], order_id_of(request), role)
    return _html(summary)
