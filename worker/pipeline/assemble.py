"""Phase `assemble`: check the generated site as a whole and turn it into files plus `manifest.json`.

Checks: every planned page exists, each page has a title and exactly one <h1>, every internal
link and asset resolves to a generated file, every page is linked from the home page's nav,
and nothing runs script through a `javascript:` URL or an inline event handler.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections import deque
from urllib.parse import unquote, urlsplit

from selectolax.lexbor import LexborHTMLParser as HTMLParser
from selectolax.lexbor import LexborNode

from worker.errors import SiteCheckFailed
from worker.models import Manifest, ManifestFile, SiteCode, SitePlan, page_file
from worker.store import OutputFile

_LINKING = (
    ("a", "href"),
    ("area", "href"),
    ("link", "href"),
    ("img", "src"),
    ("script", "src"),
    ("source", "src"),
    ("iframe", "src"),
    ("embed", "src"),
    ("object", "data"),
    ("form", "action"),
    ("button", "formaction"),
)
# Browsers drop these anywhere in a URL and leading C0 controls/spaces, so "java\tscript:" still runs.
_IGNORED_IN_URL = re.compile(r"[\t\n\r]")
_SCRIPT_SCHEMES = ("javascript:", "vbscript:", "data:text/html")


def _internal_target(page: str, url: str) -> str | None:
    """The site path a URL on `page` points to, or None for external/anchor/mailto/tel links."""
    parts = urlsplit(url.strip())
    if parts.scheme or parts.netloc or not parts.path:
        return None
    base = posixpath.dirname(page)
    return posixpath.normpath(posixpath.join(base, unquote(parts.path)))


def _links(page: str, tree: HTMLParser | LexborNode) -> tuple[set[str], list[str]]:
    """Internal targets of a page, and its problems with script-bearing URLs or attributes."""
    targets: set[str] = set()
    problems: list[str] = []
    for tag, attribute in _LINKING:
        for node in tree.css(f"{tag}[{attribute}]"):
            url = _IGNORED_IN_URL.sub("", node.attributes.get(attribute) or "").lstrip("".join(map(chr, range(33))))
            if url.lower().startswith(_SCRIPT_SCHEMES):
                problems.append(f"{page}: <{tag} {attribute}> uses a script URL")
                continue
            target = _internal_target(page, url)
            if target is not None:
                targets.add(target)
    for node in tree.css("*"):
        handlers = [name for name in node.attributes if name.lower().startswith("on")]
        if handlers:
            problems.append(f"{page}: <{node.tag}> has inline event handler(s) {', '.join(sorted(handlers))}")
    return targets, problems


def site_problems(plan: SitePlan, code: SiteCode) -> list[str]:
    """Everything wrong with the generated site, one readable sentence each (empty: all good)."""
    files = {f.path: f.content for f in code.files}
    problems: list[str] = []
    pages = [page_file(p.slug) for p in plan.pages]
    problems += [f"planned page {page} was not generated" for page in pages if page not in files]

    links: dict[str, set[str]] = {}
    nav_targets: set[str] = set()
    for path, content in files.items():
        if not path.endswith(".html"):
            continue
        tree = HTMLParser(content)
        title = tree.css_first("title")
        if title is None or not title.text(strip=True):
            problems.append(f"{path}: missing <title>")
        h1_count = len(tree.css("h1"))
        if h1_count != 1:
            problems.append(f"{path}: has {h1_count} <h1> elements, expected exactly one")
        targets, link_problems = _links(path, tree)
        problems += link_problems
        links[path] = targets
        problems += [f"{path}: link to {t} does not resolve to a generated file" for t in sorted(targets - set(files))]
        if path == "index.html":
            for nav in tree.css("nav"):
                nav_targets |= _links(path, nav)[0]

    if "index.html" in files:
        problems += [f"page {page} is not linked from the home page's nav" for page in pages if page not in nav_targets]
        reached = {"index.html"}
        queue = deque(["index.html"])
        while queue:
            for target in links.get(queue.popleft(), set()):
                if target in files and target not in reached:
                    reached.add(target)
                    queue.append(target)
        problems += [
            f"page {page} cannot be reached from index.html" for page in pages if page in files and page not in reached
        ]
    return problems


def assemble_site(
    order_id: int, generation_id: int, plan: SitePlan, code: SiteCode
) -> tuple[Manifest, list[OutputFile]]:
    """The files to write (manifest last) and the manifest, or SiteCheckFailed with every problem."""
    problems = site_problems(plan, code)
    if problems:
        raise SiteCheckFailed(f"the generated site failed {len(problems)} check(s): " + "; ".join(problems[:20]))
    files = [OutputFile(f.path, f.content.encode()) for f in sorted(code.files, key=lambda f: f.path)]
    manifest = Manifest(
        order_id=order_id,
        generation_id=generation_id,
        site_name=plan.site_name,
        pages=[page_file(p.slug) for p in plan.pages],
        files=[ManifestFile(path=f.path, sha256=f.sha256, bytes=len(f.content)) for f in files],
    )
    manifest_json = json.dumps(manifest.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"
    return manifest, [*files, OutputFile("manifest.json", manifest_json.encode())]
