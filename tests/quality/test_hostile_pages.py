"""Issue 20, section C: the hostile-page corpus, run in a real browser.

Every vector of hostile_vectors.toml goes into a valid page of the offline site and through the REAL
pipeline as the coding answer of the fake provider (one order each, all on one in-process worker). Every
page the pipeline publishes is then loaded in Chromium from the output directory over plain HTTP with no
CSP header, so the page's own markup is what is tested. Each vector tries to reach its beacon (a loopback
server of its own on 127.0.0.2), open a dialog or navigate away; the harness gives it the page's events, a
synthetic hover/key/focus/scroll of its elements and a click on each of them, and records:

- every request to an origin other than the site's own server (page.on("request") and the beacon's own
  connection log), but a top-level GET the harness caused by clicking a plain link is a visitor following
  that link (unless the page weakened the referrer policy, which the beacon sees in the Referer);
- every dialog (alert, confirm, prompt, beforeunload) and print();
- every popup and every navigation of the page that no click of a link caused;
- every script the page's own world parses (Chromium's debugger), so a script that talks to nobody counts.

A generation may fail instead (a site check refusing the page): then nothing may be written and the stored
error must name the file. The positive control serves the same pages unsanitized: each live vector must be
caught there, which proves the harness sees what it claims to (and keeps the corpus free of duds).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import http.server
import json
import mimetypes
import os
import threading
import time
import tomllib
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import asyncpg
import pytest
from arq import ArqRedis

from tests.helpers import SAMPLE_BRIEF, WorkerFactory, remote, wait_until, with_ai
from tests.quality.test_site_quality import CHROMIUM, CHROMIUM_ARGS, INSTALL_HINT
from worker import client
from worker.local.fake_server import TEXT_PREFIX, FakeProviderServer
from worker.local.offline_site import offline_code, offline_content, offline_plan
from worker.models import Brief
from worker.settings import Settings

VECTORS_FILE = Path(__file__).with_name("hostile_vectors.toml")
BEACON_ADDRESS = "127.0.0.2"  # not the site's 127.0.0.1: a different origin, and never an allowed host
ALLOWED_HOST = "allowed.example"  # output.allowed_embed_hosts: the host-confusion vectors pretend to be on it
PAGE = "about.html"  # the page every vector goes into
FIRST_ORDER = 20_000
CONTROL = "control"  # the order with no vector: its pages are what "not from the vector" means
#: Where `at` puts a vector in PAGE: (the text it goes next to, before or after it).
POSITIONS = {
    "body": ("</main>", "before"),
    "head": ("</head>", "before"),
    "head-start": ("<head>", "after"),
    "top": ("<body>", "after"),
    "end": ("</body>", "before"),
    "after-head": ("</head>", "after"),
}
#: Content types a browser renders as a document: the published files the harness loads.
DOCUMENT_TYPES = {
    "text/html",
    "application/xhtml+xml",
    "image/svg+xml",
    "text/xml",
    "application/xml",
    "application/xslt+xml",
    "text/xsl",
}
PARALLEL_PAGES = 6
QUIET_S = 0.2  # a page is settled once nothing happened for this long (network idle, as playwright's but shorter)
SETTLE_MAX_S = 4.0
PING_QUIET_S = 1.0  # after a click on a hyperlink with `ping`: Chromium sends the ping late, at low priority
LATE_S = 1.0  # after the last page, how long the beacons must stay quiet (a late ping)
MAX_CLICKS = 10
CHROMIUM_FLAGS = [
    *CHROMIUM_ARGS,
    # Belt and braces: whatever a vector names, Chromium resolves no host name; only loopback IPs are reachable.
    f"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE {BEACON_ADDRESS}",
]
HARNESS_INIT = (
    "(() => { window.print = () => console.debug('hostile-harness: print()'); })();\n//# sourceURL=hostile-harness.js"
)
#: Runs in an isolated world (never the page's own): synthetic events on every element the vector added,
#: scrolling, and the list of elements to click one at a time.
INTERACT = """(known) => {
  const base = new Set(known);
  const all = [];
  const walk = (root) => {
    for (const e of root.querySelectorAll('*')) { all.push(e); if (e.shadowRoot) walk(e.shadowRoot); }
  };
  walk(document);
  const fresh = all.filter((e) => !base.has(e.outerHTML));
  const mouse = ['pointerover', 'pointerenter', 'mouseover', 'mouseenter', 'pointermove', 'mousemove', 'pointerdown',
    'mousedown', 'pointerup', 'mouseup', 'dblclick', 'contextmenu', 'auxclick', 'pointerout', 'pointerleave',
    'mouseout', 'mouseleave'];
  const other = ['wheel', 'keydown', 'keypress', 'keyup', 'beforeinput', 'input', 'change', 'select', 'selectstart',
    'copy', 'cut', 'paste', 'dragstart', 'drag', 'dragenter', 'dragover', 'drop', 'dragend', 'focusin', 'focusout',
    'submit', 'reset', 'invalid', 'toggle', 'load', 'error', 'scroll', 'animationstart', 'transitionend',
    'close', 'cancel'];
  for (const e of fresh.slice(0, 200)) {
    try { e.focus(); } catch (x) {}
    const init = { bubbles: true, cancelable: true };
    for (const t of mouse) { try { e.dispatchEvent(new MouseEvent(t, init)); } catch (x) {} }
    for (const t of other) { try { e.dispatchEvent(new Event(t, init)); } catch (x) {} }
    try { e.scrollTop = 1e6; e.scrollLeft = 1e6; } catch (x) {}
  }
  for (const t of ['hashchange', 'popstate', 'pageshow', 'resize', 'scroll', 'message', 'focus', 'blur', 'online']) {
    try { window.dispatchEvent(new Event(t)); } catch (x) {}
  }
  window.scrollTo(0, 1e6);
  const activatable = (e) => ['a', 'area', 'button', 'input', 'summary', 'label', 'select'].includes(e.localName)
    || [...e.attributes].some((a) => a.name.toLowerCase().startsWith('on'));
  const clicks = fresh.filter(activatable).slice(0, MAX_CLICKS);
  window.__hostileClicks = clicks;
  return clicks.map((e) => (e.localName === 'a' || e.localName === 'area') && !e.hasAttribute('download')
    ? (e.href && e.href.baseVal !== undefined ? e.href.baseVal : String(e.href || '')) : '');
}""".replace("MAX_CLICKS", str(MAX_CLICKS))
CLICK = """(i) => { const e = window.__hostileClicks[i];
  const pinged = e.hasAttribute('ping');
  if (typeof e.click === 'function') e.click();
  else e.dispatchEvent(new MouseEvent('click', { bubbles: true, cancelable: true }));
  return pinged; }"""
SIGNATURES = """() => { const all = [];
  const walk = (root) => {
    for (const e of root.querySelectorAll('*')) { all.push(e.outerHTML); if (e.shadowRoot) walk(e.shadowRoot); }
  };
  walk(document); return all; }"""


# --------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Vector:
    id: str
    family: str
    html: str = ""
    at: str = "body"
    body: str = ""
    css: str = ""
    files: dict[str, str] = field(default_factory=dict)
    dead: str = ""
    safe: bool = False


def load_vectors() -> list[Vector]:
    return [Vector(**entry) for entry in tomllib.loads(VECTORS_FILE.read_text())["vector"]]


VECTORS = load_vectors()


@functools.cache
def base_files() -> tuple[tuple[str, str], ...]:
    """The offline site for SAMPLE_BRIEF: every order's coding answer starts from it."""
    brief = Brief.model_validate(SAMPLE_BRIEF)
    plan = offline_plan(brief)
    return tuple((f.path, f.content) for f in offline_code(plan, offline_content(brief, plan)).files)


def fill(text: str, vector: Vector, port: int) -> str:
    host = f"{BEACON_ADDRESS}:{port}"
    return (
        text.replace("{{BEACON}}", f"http://{host}/{vector.id}")
        .replace("{{BEACON_HOST}}", host)
        .replace("{{BEACON_PORT}}", str(port))
        .replace("{{ID}}", vector.id)
    )


def site_with(vector: Vector | None, port: int = 0) -> dict[str, str]:
    """The valid site's files with the vector in them (the plain site for None)."""
    files = dict(base_files())
    if vector is None:
        return files
    anchor, side = POSITIONS[vector.at]
    page = files[PAGE]
    assert anchor in page, f"{PAGE} has no {anchor}"
    html = fill(vector.html, vector, port)
    page = page.replace(anchor, anchor + html if side == "after" else html + anchor, 1)
    if vector.body:
        page = page.replace("</main>", fill(vector.body, vector, port) + "</main>", 1)
    files[PAGE] = page
    if vector.css:
        files["assets/style.css"] = fill(vector.css, vector, port) + "\n" + files["assets/style.css"]
    for path, content in vector.files.items():
        files[path] = fill(content, vector, port)
    return files


def test_the_corpus_is_large_and_names_every_case_of_finding_1() -> None:
    ids = [v.id for v in VECTORS]
    assert len(ids) == len(set(ids)), "vector ids are unique"
    hostile = [v for v in VECTORS if not v.safe]
    assert len(hostile) >= 200, len(hostile)
    assert all(v.at in POSITIONS for v in VECTORS)
    finding_1 = {v.id.removeprefix("f1-") for v in VECTORS if v.family == "finding-1"}
    for case in (
        "inline-script",
        "module-import",
        "script-builds-script-src",
        "js-file",
        "svg-file-script",
        "xml-file-xhtml-script",
        "iframe-srcdoc",
        "svg-xlink-href-javascript",
        "svg-set-href-javascript",
        "input-formaction",
        "form-action-outside",
        "meta-refresh-outside",
        "data-text-html-space-link",
        "data-svg-iframe",
        "meta-referrer-unsafe-url",
        "referrerpolicy-attribute",
        "noscript-title-mutation",
    ):
        assert case in finding_1, case


# --------------------------------------------------------------------------- servers


@dataclass
class Hit:
    vector: str
    request: str = ""  # the request line, or "" for a connection that sent none (a preconnect, say)
    referer: str = ""


class Beacons:
    """One loopback server per vector on 127.0.0.2: every connection is logged, every request answered 204
    (a navigation to it then leaves the page where it was, so the harness can go on clicking)."""

    def __init__(self) -> None:
        self.ports: dict[str, int] = {}
        self.hits: dict[str, list[Hit]] = defaultdict(list)
        self.last_activity: dict[str, float] = defaultdict(float)
        self._servers: list[asyncio.Server] = []

    async def start(self, ids: list[str]) -> None:
        for vector_id in ids:
            server = await asyncio.start_server(functools.partial(self._serve, vector_id), BEACON_ADDRESS, 0)
            self._servers.append(server)
            self.ports[vector_id] = server.sockets[0].getsockname()[1]

    async def _serve(self, vector_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hit = Hit(vector_id)
        self.hits[vector_id].append(hit)
        self.last_activity[vector_id] = time.monotonic()
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
            lines = head.decode("latin-1").split("\r\n")
            hit.request = lines[0]
            hit.referer = next((h.partition(":")[2].strip() for h in lines if h.lower().startswith("referer:")), "")
            writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as exc:
            partial = getattr(exc, "partial", b"")
            hit.request = hit.request or ("(not HTTP: TLS?)" if partial[:1] == b"\x16" else "")
        finally:
            self.last_activity[vector_id] = time.monotonic()
            writer.close()

    async def quiet(self, for_s: float) -> None:
        """Until no beacon saw a connection for `for_s`: a hyperlink's ping, say, goes out after its click, at the
        browser's leisure, and may reach its beacon after the page was closed."""
        while True:  # an absence is awaited by looking again: no event says "nothing more will come"
            since = time.monotonic() - max(self.last_activity.values(), default=0.0)
            if since >= for_s:
                return
            await asyncio.sleep(for_s - since)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    extensions_map: ClassVar[dict[str, str]] = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".xhtml": "application/xhtml+xml",
        ".xsl": "text/xsl",
        ".svg": "image/svg+xml",
        ".mjs": "text/javascript",
    }

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def static_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A plain static file server on loopback (no CSP, no other headers) over one folder."""
    root = tmp_path_factory.mktemp("served")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
async def beacons() -> AsyncIterator[Beacons]:
    running = Beacons()
    await running.start([v.id for v in VECTORS])
    yield running
    await running.stop()


@pytest.fixture
async def chromium() -> AsyncIterator[Any]:
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install -y chromium); {INSTALL_HINT}")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.skip(f"playwright is not installed (pip extra [quality]); {INSTALL_HINT}")
    async with async_playwright() as pw:
        browser = Chromium(pw)
        try:
            yield browser
        finally:
            await browser.close()


class Chromium:
    """The browser the harness loads pages in, launched again if it went away (a crashed browser process, seen
    once in CI under load, must cost one load's retry, not the run)."""

    def __init__(self, playwright: Any) -> None:
        self._playwright = playwright
        self._browser: Any = None
        self._launching = asyncio.Lock()
        self.relaunches = 0

    async def get(self) -> Any:
        async with self._launching:
            if self._browser is None or not self._browser.is_connected():
                if self._browser is not None:
                    self.relaunches += 1
                self._browser = await self._playwright.chromium.launch(
                    executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True
                )
            return self._browser

    async def close(self) -> None:
        if self._browser is not None and self._browser.is_connected():
            await self._browser.close()


# --------------------------------------------------------------------------- the harness


@dataclass
class Load:
    """One document to load: its URL, the vector it belongs to, and the page that says what is not the vector's."""

    vector: str
    url: str
    control: str  # URL of the same page without the vector ("" for a file of the vector's own)


@dataclass
class Seen:
    leaks: list[str] = field(default_factory=list)
    followed: list[str] = field(default_factory=list)  # outside URLs a clicked plain link was allowed to open
    loaded: bool = False


class Harness:
    def __init__(self, browser: Chromium, site: str, beacons: Beacons) -> None:
        self.browser = browser
        self.site = site
        self.beacons = beacons
        self.signatures: dict[str, list[str]] = {}

    async def signatures_of(self, url: str) -> list[str]:
        if url not in self.signatures:
            context = await (await self.browser.get()).new_context()
            try:
                page = await context.new_page()
                await page.goto(url, wait_until="load")
                context_id = await _isolated_world(await context.new_cdp_session(page))
                self.signatures[url] = await _evaluate(await context.new_cdp_session(page), context_id, SIGNATURES)
            finally:
                await context.close()
        return self.signatures[url]

    async def probe(self, load: Load) -> Seen:
        seen = Seen()
        known = await self.signatures_of(load.control) if load.control else []
        context = await (await self.browser.get()).new_context(viewport={"width": 1000, "height": 700})
        last = [time.monotonic()]
        inflight: set[Any] = set()
        dismissals: set[asyncio.Future[None]] = set()
        state = {"phase": "loading", "link": ""}
        #: Every plain link the harness clicked: a navigation to one of them is the visitor following it, whenever
        #: it arrives (an SVG link's, or a new tab's, may come after the harness moved on to the next click).
        clicked: set[str] = set()

        def activity() -> None:
            last[0] = time.monotonic()

        def outside(url: str) -> bool:
            return url.split(":", 1)[0] in ("http", "https", "ws", "wss", "ftp") and not url.startswith(self.site + "/")

        async def answer_outside(route: Any) -> None:  # never reaches the network; recorded by on_request
            await route.fulfill(status=204)

        async def on_site(route: Any) -> None:
            request = route.request
            if state["phase"] != "loading" and request.is_navigation_request():
                if state["phase"] == "auto" and request.frame == page.main_frame:
                    seen.leaks.append(f"navigated by itself to {request.url}")
                await route.fulfill(status=204)  # the page stays where it is
                return
            await route.continue_()

        def on_request(request: Any) -> None:
            activity()
            inflight.add(request)
            if not outside(request.url):
                return
            if (
                state["phase"] == "click"
                and request.is_navigation_request()
                and request.method == "GET"
                and request.url.split("#")[0] in clicked
            ):
                seen.followed.append(request.url)
                referer = request.headers.get("referer", "")
                if _path(referer) not in ("", "/"):  # the route answers it: the beacon never sees this Referer
                    seen.leaks.append(f"a followed link sent the page's address as Referer ({referer})")
                return
            seen.leaks.append(f"{request.method} {request.url} ({request.resource_type})")

        def done(request: Any) -> None:
            inflight.discard(request)
            activity()

        def on_dialog(dialog: Any) -> None:
            activity()
            seen.leaks.append(f"dialog {dialog.type}({dialog.message!r})")
            dismissals.add(asyncio.ensure_future(dialog.dismiss()))

        def on_console(message: Any) -> None:
            if message.text.startswith("hostile-harness: "):
                activity()
                seen.leaks.append(message.text.removeprefix("hostile-harness: "))

        def on_popup(popup: Any) -> None:
            activity()
            popup.on("dialog", on_dialog)
            if not (state["phase"] == "click" and state["link"]):
                seen.leaks.append(f"popup {popup.url}")

        def on_script(event: dict[str, Any]) -> None:
            aux = event.get("executionContextAuxData") or {}
            if aux.get("isDefault") and event.get("url") != "hostile-harness.js":
                activity()
                seen.leaks.append(f"script ran ({event.get('url') or 'eval'}, {event.get('length')} chars)")

        try:
            await context.add_init_script(HARNESS_INIT)
            await context.route(outside, answer_outside)
            await context.route(lambda url: url.startswith(self.site + "/"), on_site)
            context.on("request", on_request)
            context.on("requestfinished", done)
            context.on("requestfailed", done)
            page = await context.new_page()
            context.on("page", on_popup)
            page.on("dialog", on_dialog)
            page.on("console", on_console)
            page.on("websocket", lambda ws: seen.leaks.append(f"websocket {ws.url}"))
            cdp = await context.new_cdp_session(page)
            cdp.on("Debugger.scriptParsed", on_script)
            await cdp.send("Debugger.enable")
            await cdp.send("Debugger.setSkipAllPauses", {"skip": True})
            try:
                response = await page.goto(load.url, wait_until="load", timeout=15_000)
                seen.loaded = response is not None and response.status == 200
            except Exception as exc:  # a vector may break the load itself; what it did is still recorded
                seen.leaks.append(f"load failed: {str(exc).splitlines()[0]}")
            state["phase"] = "auto"
            activity()
            await self._settle(last, inflight, load.vector)
            state["phase"] = "interact"
            try:
                context_id = await _isolated_world(cdp)
                activity()
                links = await _evaluate(cdp, context_id, INTERACT, known)
                await self._settle(last, inflight, load.vector)
                state["phase"] = "click"
                for index, link in enumerate(links):
                    state["link"] = link
                    if link:
                        clicked.add(link.split("#")[0])
                    activity()
                    pinged = await _evaluate(cdp, context_id, CLICK, index)
                    await self._settle(last, inflight, load.vector, PING_QUIET_S if pinged else QUIET_S)
            except Exception as exc:  # the document went away under the harness: say so, it is not a pass
                gone = ("Execution context was destroyed", "Cannot find context", "has been closed")
                if not any(reason in str(exc) for reason in gone):
                    raise
                seen.leaks.append("the document was replaced or closed")
            await self._settle(last, inflight, load.vector)
            state["link"] = ""
        finally:
            await context.close()
        return seen

    async def _settle(self, last: list[float], inflight: set[Any], vector: str, quiet_s: float = QUIET_S) -> None:
        """Until nothing (request, dialog, script, beacon connection) happened for `quiet_s`, SETTLE_MAX_S at most."""
        started = time.monotonic()
        while time.monotonic() - started < SETTLE_MAX_S:
            newest = max(last[0], self.beacons.last_activity[vector])
            if not inflight and time.monotonic() - newest >= quiet_s:
                return
            await asyncio.sleep(0.05)


async def _isolated_world(cdp: Any) -> int:
    tree = await cdp.send("Page.getFrameTree")
    world = await cdp.send(
        "Page.createIsolatedWorld", {"frameId": tree["frameTree"]["frame"]["id"], "worldName": "hostile-harness"}
    )
    return int(world["executionContextId"])


async def _evaluate(cdp: Any, context_id: int, function: str, *args: Any) -> Any:
    expression = f"({function})(...{json.dumps(list(args))})"
    result = await cdp.send(
        "Runtime.evaluate",
        {"expression": expression, "contextId": context_id, "returnByValue": True, "awaitPromise": True},
    )
    if "exceptionDetails" in result:
        raise RuntimeError(f"harness script failed: {result['exceptionDetails'].get('text')}")
    return result["result"].get("value")


async def run_loads(harness: Harness, loads: list[Load]) -> dict[str, Seen]:
    """Every load, PARALLEL_PAGES at a time; what each vector did, over all its loads and its beacon."""
    gate = asyncio.Semaphore(PARALLEL_PAGES)
    by_vector: dict[str, Seen] = defaultdict(Seen)

    async def one(load: Load) -> None:
        async with gate:
            try:
                seen = await harness.probe(load)
            except Exception as exc:  # the browser went away under this load: once more, in a new one
                if "has been closed" not in str(exc):
                    raise
                seen = await harness.probe(load)
        into = by_vector[load.vector]
        into.loaded = into.loaded or seen.loaded
        into.leaks += [f"{load.url.rsplit('/', 1)[-1]}: {leak}" for leak in seen.leaks]
        into.followed += seen.followed

    await asyncio.gather(*(one(load) for load in loads))
    await harness.beacons.quiet(LATE_S)
    for vector_id, hits in harness.beacons.hits.items():
        into = by_vector[vector_id]
        followed = Counter(_path(url) for url in into.followed)
        for hit in hits:
            target = hit.request.split(" ")[1] if hit.request.count(" ") >= 2 else ""
            if target and followed[target] > 0:
                followed[target] -= 1
                if hit.referer and _path(hit.referer) not in ("", "/"):
                    into.leaks.append(f"beacon: a followed link sent the page's address as Referer ({hit.referer})")
                continue
            if not hit.request and into.followed:
                continue  # the browser preconnects to a link as it is clicked: no byte of the page went there
            into.leaks.append(f"beacon: {hit.request or 'a connection with no request'}")
    return by_vector


def _path(url: str) -> str:
    rest = url.split("://", 1)[-1]
    return "/" + rest.split("/", 1)[1].split("#")[0] if "/" in rest else "/"


def report(leaked: dict[str, list[str]]) -> str:
    family = {v.id: v.family for v in VECTORS}
    counts = Counter(family.get(v, "?") for v in leaked)
    lines = [f"{len(leaked)} vector(s) leaked; by family: " + ", ".join(f"{f} {n}" for f, n in counts.most_common())]
    for vector_id in sorted(leaked, key=lambda v: (family.get(v, ""), v)):
        shown = list(dict.fromkeys(leaked[vector_id]))
        lines.append(f"  {vector_id} [{family.get(vector_id, '?')}]: " + "; ".join(shown[:6]))
    return "\n".join(lines)


def write_site(root: Path, files: dict[str, str]) -> None:
    for path, content in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content, encoding="utf-8")


def documents(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and mimetypes.guess_type(p.name)[0] in DOCUMENT_TYPES)


# --------------------------------------------------------------------------- positive control


def control_sample() -> list[Vector]:
    """The vectors the positive control loads: in `make test`, every finding-1 case, every negative control and
    the first of each other family (loading all of them raw takes minutes: the published pages, which the
    sanitizer makes mostly identical, take seconds); HOSTILE_CORPUS_CONTROL=all loads every one, and
    HOSTILE_CORPUS_CONTROL=id,id... those vectors only (to study one)."""
    chosen = os.environ.get("HOSTILE_CORPUS_CONTROL", "")
    if chosen == "all":
        return VECTORS
    if chosen:
        return [v for v in VECTORS if v.id in chosen.split(",")]
    taken: Counter[str] = Counter()
    sample = []
    for vector in VECTORS:
        if vector.family in ("finding-1", "control") or taken[vector.family] < 1:
            sample.append(vector)
            taken[vector.family] += 1
    return sample


@pytest.mark.timeout(300)
async def test_the_harness_catches_every_live_vector_on_unsanitized_pages(
    chromium: Chromium, beacons: Beacons, static_root: tuple[Path, str]
) -> None:
    """Positive control: the corpus's pages served as the model wrote them, without the pipeline. Every vector
    not marked `dead` must be caught (else the harness, or the vector, proves nothing), no `dead` one may be
    caught (else its mark hides a live vector), and no negative control may be reported (no false alarms)."""
    root, site = static_root
    raw = root / "raw"
    write_site(raw / CONTROL, site_with(None))
    loads = []
    for vector in control_sample():
        files = site_with(vector, beacons.ports[vector.id])
        write_site(raw / vector.id, files)
        loads.append(Load(vector.id, f"{site}/raw/{vector.id}/{PAGE}", f"{site}/raw/{CONTROL}/{PAGE}"))
        loads += [
            Load(vector.id, f"{site}/raw/{vector.id}/{p}", "")
            for p in vector.files
            if mimetypes.guess_type(p)[0] in DOCUMENT_TYPES
        ]
    beacons.hits.clear()

    seen = await run_loads(Harness(chromium, site, beacons), loads)

    sample = control_sample()
    assert all(seen[v.id].loaded for v in sample), [v.id for v in sample if not seen[v.id].loaded]
    duds = [v.id for v in sample if not v.dead and not v.safe and not seen[v.id].leaks]
    live_dead = {v.id: seen[v.id].leaks for v in sample if v.dead and seen[v.id].leaks}
    false_alarms = {v.id: seen[v.id].leaks for v in sample if v.safe and seen[v.id].leaks}
    caught = sum(1 for v in sample if seen[v.id].leaks)
    print(f"positive control: {caught} of {len(sample)} vectors caught unsanitized")
    assert not duds, f"{len(duds)} vector(s) not caught on the unsanitized page: {duds}"
    assert not live_dead, "vector(s) marked dead are live:\n" + report(live_dead)
    assert not false_alarms, "negative controls reported:\n" + report(false_alarms)


# --------------------------------------------------------------------------- the corpus through the pipeline


def _coding_answer(files: dict[str, str]) -> str:
    return TEXT_PREFIX + json.dumps({"files": [{"path": p, "content": c} for p, c in files.items()]})


def _name(index: int) -> str:
    return f"Hostile corpus {index:04d}"


@pytest.mark.timeout(400)
@pytest.mark.usefixtures("provider_key")
async def test_published_pages_of_the_hostile_corpus_run_no_script_call_no_outside_host_and_stay_put(
    chromium: Chromium,
    beacons: Beacons,
    static_root: tuple[Path, str],
    fake: FakeProviderServer,
    settings: Settings,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
) -> None:
    """Regression: issue 20 finding 1 and section C. Every vector goes through the real pipeline (one order
    each, the model's coding answer); every page published is loaded in Chromium over HTTP with no CSP
    header: no beacon hit, no dialog, no navigation, no script of the model's. A generation that fails
    instead must have written nothing and stored an error naming the file."""
    root, site = static_root
    output = root / "sites"
    orders: dict[int, Vector | None] = {FIRST_ORDER: None}
    orders.update({FIRST_ORDER + 1 + i: v for i, v in enumerate(VECTORS)})
    for order_id, vector in orders.items():
        files = site_with(vector, beacons.ports[vector.id] if vector else 0)
        marker = f'"business_name":"{_name(order_id - FIRST_ORDER)}"'
        fake.script(
            *[_coding_answer(files)] * 3,
            api="anthropic",
            when=lambda body, m=marker: m in body["messages"][-1]["content"],
        )
    custom = with_ai(
        settings,
        {"plain": remote("openai", fake.url), "coder": remote("anthropic", fake.url)},
        routing={"planning": ["plain"], "content": ["plain"], "coding": ["coder"]},
        max_output_retries=0,
    )
    custom = custom.model_copy(
        update={
            "output": custom.output.model_copy(update={"dir": output, "allowed_embed_hosts": [ALLOWED_HOST]}),
            "worker": custom.worker.model_copy(update={"max_jobs": len(orders)}),
        }
    )
    await start_worker(custom)
    started = time.monotonic()
    for order_id in orders:
        await client.enqueue_generation(
            redis, order_id, {**SAMPLE_BRIEF, "business_name": _name(order_id - FIRST_ORDER)}
        )

    async def all_finished() -> bool:
        done = await db.fetchval("SELECT count(*) FROM site_generations WHERE status IN ('succeeded', 'failed')")
        return int(done) == len(orders)

    await wait_until(all_finished, timeout=300, interval=0.5, what="every corpus order to finish")
    print(f"pipeline: {len(orders)} orders in {time.monotonic() - started:.1f}s")
    coding = [r for r in fake.requests if r.api == "anthropic"]
    assert coding and all(r.fault.startswith(TEXT_PREFIX) for r in coding), "every coding answer was a vector's"

    rows = {r["order_id"]: r for r in await db.fetch("SELECT order_id, status, error FROM site_generations")}
    assert rows[FIRST_ORDER]["status"] == "succeeded", f"the plain site must pass: {rows[FIRST_ORDER]['error']}"
    unclear: dict[str, str] = {}
    refused: list[str] = []
    loads: list[Load] = []
    shared: dict[str, str] = {}  # content hash -> the first URL with it: identical pages are loaded once
    control = f"{site}/sites/{FIRST_ORDER}/{PAGE}"
    for order_id, vector in orders.items():
        row, folder = rows[order_id], output / str(order_id)
        vector_id = vector.id if vector else CONTROL
        if row["status"] == "failed":
            error = row["error"] or {}
            named = [PAGE, "assets/style.css", *(vector.files if vector else ())]
            if folder.exists() or not any(n in (error.get("message") or "") for n in named):
                unclear[vector_id] = f"{'wrote ' + str(folder) + '; ' if folder.exists() else ''}{error}"
            refused.append(vector_id)
            continue
        for path in documents(folder):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            url = f"{site}/sites/{order_id}/{path.relative_to(folder).as_posix()}"
            if digest in shared:
                continue
            shared[digest] = url
            loads.append(Load(vector_id, url, control if path.name == PAGE else ""))
    beacons.hits.clear()

    seen = await run_loads(Harness(chromium, site, beacons), loads)

    published = [v for v in VECTORS if v.id not in refused]
    print(
        f"corpus: {len(VECTORS)} vectors, {len(refused)} refused by the pipeline, {len(published)} published, "
        f"{len(loads)} documents loaded"
    )
    assert seen[CONTROL].loaded and not seen[CONTROL].leaks, f"the plain site itself: {seen[CONTROL].leaks}"
    leaked = {vid: s.leaks for vid, s in seen.items() if s.leaks}
    assert not unclear, "failed without a clear error naming the file, or wrote files anyway:\n" + "\n".join(
        f"  {k}: {v}" for k, v in unclear.items()
    )
    assert not leaked, report(leaked)
