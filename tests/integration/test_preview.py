"""`sitegen preview` serves a site as the API does: the same CSP and security headers, nothing outside the
site folder (traversal, encodings, symlinks), and a request log that prints what was asked for literally."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer

from tests.helpers import cli_env, wait_until
from worker.api.app import create_app
from worker.api.auth import Tokens
from worker.local.services import LocalServices, free_port
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
ORDER = 4701
ALLOWED = ["CDN.Example.com.", "*.fonts.example", "https://maps.example:443/embed", "bad host; script-src *"]
SECRET = "outside-the-site-folder-0451"
INDEX = b"<!doctype html><title>Rosa's</title><h1>Rosa's Bakery</h1>"
#: The security headers of a served site file (Cache-Control aside, both send these).
POLICY = ("Content-Security-Policy", "X-Content-Type-Options", "Referrer-Policy")


@dataclass
class Preview:
    port: int
    site: Path
    output: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(self.output)


async def raw_get(port: int, target: bytes) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.0 request with `target` sent byte for byte (no client normalises it): status, headers, body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET " + target + b" HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("iso-8859-1").split("\r\n")
    if not lines[0]:
        return 0, {}, body  # the server closed without answering
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


@pytest.fixture(scope="module")
async def preview(services: LocalServices, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Preview]:
    base = tmp_path_factory.mktemp("preview")
    (base / "secret.txt").write_text(SECRET)
    (base / "secrets").mkdir()
    (base / "secrets" / "secret.txt").write_text(SECRET)
    site = base / "sites" / str(ORDER)
    (site / "assets").mkdir(parents=True)
    (site / "index.html").write_bytes(INDEX)
    (site / "assets" / "style.css").write_text("h1 { color: teal }")
    (site / "empty").mkdir()
    (site / "leak.txt").symlink_to(base / "secret.txt")
    (site / "leakdir").symlink_to(base / "secrets")
    (site / "sub").mkdir()
    (site / "sub" / "index.html").symlink_to(base / "secret.txt")
    (site / "sub2").mkdir()
    (site / "sub2" / "index.htm").symlink_to(base / "secret.txt")
    port = free_port()
    env = cli_env(
        services, SITEGEN_OUTPUT__DIR=str(base / "sites"), SITEGEN_OUTPUT__ALLOWED_EMBED_HOSTS=json.dumps(ALLOWED)
    )
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.cli",
        "preview",
        str(ORDER),
        "--port",
        str(port),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    running = Preview(port, site)

    async def read() -> None:
        assert server.stdout is not None
        while line := await server.stdout.readline():
            running.output.append(line.decode("utf-8", "replace"))

    reader = asyncio.create_task(read())

    async def serving() -> bool:
        assert server.returncode is None, f"sitegen preview exited early:\n{running.text()}"
        try:
            return (await raw_get(port, b"/"))[0] == 200
        except OSError:
            return False

    try:
        await wait_until(serving, 30, what="sitegen preview serves the site")
        yield running
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), 10)
        await reader


async def _api_site_headers(settings: Settings, db: asyncpg.Connection, path: str) -> dict[str, str]:
    """The headers the API sends with the order's site file `path` (a succeeded generation holding INDEX)."""
    await db.execute("INSERT INTO site_orders (id, brief) VALUES ($1, '{}')", ORDER)
    generation = await db.fetchval(
        "INSERT INTO site_generations (order_id, status, started_at, finished_at)"
        " VALUES ($1, 'succeeded', now(), now()) RETURNING id",
        ORDER,
    )
    await db.execute(
        "INSERT INTO site_files (generation_id, path, content, sha256, bytes, media_type)"
        " VALUES ($1, 'index.html', $2, $3, $4, 'text/html; charset=utf-8')",
        generation,
        INDEX,
        hashlib.sha256(INDEX).hexdigest(),
        len(INDEX),
    )
    output = settings.output.model_copy(update={"allowed_embed_hosts": ALLOWED})
    app = create_app(settings.model_copy(update={"output": output}), Tokens(read=("r" * 40,), write=("w" * 40,)))
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            url = server.make_url(f"/v1/orders/{ORDER}/site/{path}")
            async with http.get(url, headers={"Authorization": f"Bearer {'r' * 40}"}) as response:
                assert response.status == 200, await response.text()
                return dict(response.headers)
    finally:
        await server.close()


def _directives(csp: str) -> dict[str, list[str]]:
    return {d.split()[0]: d.split()[1:] for d in (part.strip() for part in csp.split(";")) if d}


async def test_preview_sends_the_apis_site_headers(
    preview: Preview, settings: Settings, db: asyncpg.Connection
) -> None:
    """Regression: issue 20 finding 2: `sitegen preview` served pages with no CSP and no nosniff."""
    api = await _api_site_headers(settings, db, "index.html")
    status, headers, body = await raw_get(preview.port, b"/")
    assert status == 200 and body == INDEX
    for name in POLICY:
        assert headers.get(name) == api[name], f"{name}: preview {headers.get(name)!r}, API {api[name]!r}"
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["Referrer-Policy"] == "no-referrer"
    for target in (b"/assets/style.css", b"/missing.html", b"/empty/", b"/../secret.txt"):
        status, other, _ = await raw_get(preview.port, target)
        assert status in (200, 404), target
        assert {name: other.get(name) for name in POLICY} == {name: api[name] for name in POLICY}, target


async def test_site_csp_lets_pages_load_from_the_site_and_allowed_hosts_only(
    preview: Preview, settings: Settings, db: asyncpg.Connection
) -> None:
    """Regression: issue 20 finding 3: img-src, font-src and media-src allowed any https: host, so opening an
    order's page in the dashboard told a host the model chose the operator's address."""
    allowed = ["cdn.example.com", "*.cdn.example.com", "fonts.example", "*.fonts.example"]
    allowed += ["maps.example", "*.maps.example"]
    api = await _api_site_headers(settings, db, "index.html")
    _, preview_headers, _ = await raw_get(preview.port, b"/")
    for csp in (api["Content-Security-Policy"], preview_headers["Content-Security-Policy"]):
        directives = _directives(csp)
        for name in ("img-src", "font-src", "media-src"):
            assert directives[name][:2] == ["'self'", "data:"], (name, csp)
            assert sorted(directives[name][2:]) == sorted(allowed), (name, csp)
        assert directives["style-src"][:2] == ["'self'", "'unsafe-inline'"], csp
        assert sorted(directives["style-src"][2:]) == sorted(allowed), csp
        assert directives["default-src"] == ["'none'"] and directives["script-src"] == ["'none'"], csp
        assert directives["form-action"] == ["'none'"] and directives["base-uri"] == ["'none'"], csp
        sources = [source for values in directives.values() for source in values]
        assert not {"https:", "http:", "*", "bad", "host"} & set(sources), csp
        assert "script-src *" not in csp, "a malformed host never adds a directive"


#: Request targets that try to leave the site folder; none may answer SECRET.
TRAVERSALS = [
    b"/../secret.txt",
    b"/../../secret.txt",
    b"../secret.txt",
    b"/%2e%2e/secret.txt",
    b"/%2E%2E%2Fsecret.txt",
    b"/..%2fsecret.txt",
    b"/..%5csecret.txt",
    b"/..\\secret.txt",
    b"/%252e%252e/secret.txt",
    b"//..//secret.txt",
    b"/./../secret.txt",
    b"/assets/../../secret.txt",
    b"/index.html/../../secret.txt",
    b"/..;/secret.txt",
    b"/%c0%ae%c0%ae/secret.txt",
    b"/%00/../secret.txt",
    b"/%00x.html",
    b"/index.html%00.txt",
    b"/sub/%00",
    b"/.%2e/secret.txt",
    b"/%2e./secrets/secret.txt",
    b"http://127.0.0.1/../secret.txt",
    b"/leak.txt",
    b"/leakdir/secret.txt",
    b"/leakdir/",
    b"/sub/",
    b"/sub",
    b"/sub/index.html",
    b"/sub2/",
    b"/empty/",
]


async def test_preview_serves_nothing_outside_the_site_folder(preview: Preview) -> None:
    """Regression: issue 20 finding 2: the preview's own traversal safety holds: `../`, encoded `..`,
    backslashes, absolute-form targets and symlinks that point out of the site folder all get 404, and a
    folder without index.html is not listed."""
    answers = {target: await raw_get(preview.port, target) for target in TRAVERSALS}
    for target, (status, _, body) in answers.items():
        assert SECRET.encode() not in body, f"{target!r} answered a file outside the site"
        assert status in (400, 404), (target, status, body[:200])
    absolute = str(preview.site.parent.parent / "secret.txt").encode()
    assert (await raw_get(preview.port, absolute))[0] == 404
    assert (await raw_get(preview.port, b"/assets/style.css"))[0] == 200


#: Request lines a page (or anyone on this machine) can make the preview log: markup, links, escapes.
HOSTILE_TARGETS = [
    b"/[/bold]x.html",
    b"/[link=https://evil.example/]click[/link].html",
    b"/\x1b]8;;https://evil.example/\x07link\x1b]8;;\x07.html",
    b"/\x1b[2J\x1b[31mred.html",
    b"/fake\rline.html",
    b"/\x9b31mc1.html",
]


async def test_preview_request_log_shows_the_request_literally(preview: Preview) -> None:
    """Regression: issue 20 finding 14: the preview's request log printed the request line as Rich markup:
    `[/bold]` crashed the handler, `[link=...]` made a terminal hyperlink, ESC sequences reached the terminal."""
    for target in HOSTILE_TARGETS:
        status, _, _ = await raw_get(preview.port, target)
        assert status in (400, 404), target
    marker = b"/last-of-the-hostile-requests.html"
    await raw_get(preview.port, marker)

    async def logged() -> bool:
        return marker.decode() in preview.text()

    await wait_until(logged, 10, what="the preview logs the requests")
    out = preview.text()
    assert "Traceback" not in out and "MarkupError" not in out, out
    assert "\x1b" not in out and "\x9b" not in out and "\x07" not in out and "\r" not in out, repr(out)
    assert "/[/bold]x.html" in out
    assert "/[link=https://evil.example/]click[/link].html" in out
    assert "/\\x1b]8;;https://evil.example/\\x07link\\x1b]8;;\\x07.html" in out
    assert "/\\x1b[2J\\x1b[31mred.html" in out and "/fake\\rline.html" in out and "/\\x9b31mc1.html" in out
