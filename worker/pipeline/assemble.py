"""Phase `assemble`: check the generated site as a whole and turn it into files plus `manifest.json`.

Checks that fail the site (`site_problems`; the `code` phase re-asks the model on them first):
no generated file takes a name this phase writes itself (`RESERVED_PATHS`: `manifest.json`), every
planned page exists, each page has a title and exactly one <h1>, every internal link and asset
(srcset, media, CSS `url()` / `@import` included) resolves to a generated file, every page is
linked from the home page's nav, and nothing runs script through a `javascript:` URL or an inline
event handler.

Quality warnings (`quality_report`): a page without `<html lang>`, meta viewport or meta
description, or with an `<img>` lacking `alt`, is still published (a reader can use it), but
the manifest's `quality` lists the warnings per page and its `warnings` carry one line per page.

`.js`, `.xml` and `.svg` files fail the site too (`REFUSED_SUFFIXES`): they could run script.

Then every page is rebuilt by the sanitizer (`worker.pipeline.sanitize.clean_page`: an allow-list,
no script of the model's, nothing loaded from a host not in `output.allowed_embed_hosts`, a CSP
meta tag) and every stylesheet cleaned of such URLs (`clean_css`); what was removed is not a
failure, it is reported in the manifest's `warnings` (one line each). The checks above run again
on the site as published, and the sanitizer's serialisation is what is written: never the
model's bytes, so what was checked is what is published.
"""

from __future__ import annotations

import functools
import posixpath
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from selectolax.lexbor import LexborHTMLParser as HTMLParser
from selectolax.lexbor import LexborNode

from worker.errors import SiteCheckFailed
from worker.models import GeneratedFile, Manifest, ManifestFile, OutputFile, SiteCode, SitePlan, page_file
from worker.pipeline.sanitize import (
    ALLOWED_HOSTS_SETTING as ALLOWED_HOSTS_SETTING,
)
from worker.pipeline.sanitize import (
    clean_css,
    clean_page,
    normalize_hosts,
)
from worker.pipeline.sanitize import (
    host_allowed as host_allowed,
)

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
_LEADING_IN_URL = "".join(map(chr, range(33)))
_SCRIPT_SCHEMES = ("javascript:", "vbscript:", "data:text/html")

#: Files this phase writes itself: a generated file may not take their names (compared in lower case, as
#: a case-insensitive file system would, and as SiteCode compares paths for uniqueness).
MANIFEST_PATH = "manifest.json"
RESERVED_PATHS = frozenset({MANIFEST_PATH})
#: File types the model may write but that are never published, and why (the code phase re-asks on them).
REFUSED_SUFFIXES = {
    ".js": "script files are not published (a published page runs no script the model wrote); leave it out",
    ".xml": "XML files are not published (an XML document can run script); leave it out",
    ".svg": "SVG files are not published (an SVG document can run script); put the SVG inline in the page or use a PNG",
}
#: At most this many removal warnings are listed; the rest are counted in one last line.
MAX_WARNINGS = 50


def _clean_url(raw: str) -> str:
    """A URL attribute as browsers read it: tabs and newlines dropped, leading controls and spaces stripped."""
    return _IGNORED_IN_URL.sub("", raw).lstrip(_LEADING_IN_URL)


def _internal_target(page: str, url: str) -> str | None:
    """The site path a URL on `page` points to, or None for external/anchor/mailto/tel links."""
    return _target_from(posixpath.dirname(page), url)


#: Longest URL whose reading `_link` remembers (a data: URL can be any size).
_REMEMBERED_URL_CHARS = 300


def _link(folder: str, raw: str) -> tuple[bool, str | None]:
    """A URL attribute of a page in `folder`: (whether it is a script URL, the site path it points to)."""
    if len(raw) <= _REMEMBERED_URL_CHARS:
        return _remembered_link(folder, raw)
    return _read_link(folder, raw)


def _read_link(folder: str, raw: str) -> tuple[bool, str | None]:
    url = _clean_url(raw)
    if url.lower().startswith(_SCRIPT_SCHEMES):
        return True, None
    return False, _target_from(folder, url)


#: The same links come back on every page of a site (the nav, the footer) and on many sites.
_remembered_link = functools.lru_cache(maxsize=4096)(_read_link)


def _target_from(base: str, url: str) -> str | None:
    """The site path a URL on a page in folder `base` points to (None: external, anchor, mailto, tel)."""
    url = url.strip().replace("\\", "/")  # browsers read a backslash as '/' in http(s) URLs
    if url.startswith("//"):  # protocol-relative, however many slashes
        return None
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket: no file of the site, and no browser loads it
        return None
    if parts.scheme or parts.netloc or not parts.path:
        return None
    return posixpath.normpath(posixpath.join(base, unquote(parts.path)))


def _references(page: str, tree: HTMLParser | LexborNode, *, assets: bool = True) -> tuple[set[str], list[str]]:
    """Internal targets of a page (links, and with `assets` what it loads), and its script problems.

    One walk over the elements, each one's attributes read once: a query per tag and attribute
    cost as much again as the walk that finds inline event handlers, which has to see them all.
    """
    folder = posixpath.dirname(page)
    targets: set[str] = set()
    problems: list[str] = []
    asset_urls: list[str] = []
    if assets:
        for style in tree.css("style"):
            asset_urls += _css_urls(style.text(deep=True))
    for node in tree.css("*"):
        attributes = node.attributes
        if not attributes or attributes.keys() <= _INERT_ATTRIBUTES:  # most elements: class, id, aria-*...
            continue
        tag = node.tag or ""
        for attribute in _LINKING_BY_TAG.get(tag, ()):
            if attribute not in attributes:
                continue
            script, target = _link(folder, attributes[attribute] or "")
            if script:
                problems.append(f"{page}: <{tag} {attribute}> uses a script URL")
            elif target is not None:
                targets.add(target)
        if not attributes.keys() <= _PLAIN_ATTRIBUTES:  # only then can one of them be an event handler
            handlers: list[str] = []
            for name in attributes:  # plain loops, not comprehensions: this runs for many elements
                if name[:2].lower() == "on":
                    handlers.append(name)
            if handlers:
                problems.append(f"{page}: <{tag}> has inline event handler(s) {', '.join(sorted(handlers))}")
        if assets:
            for attribute in _ASSETS_BY_TAG.get(tag, ()):
                if attribute in attributes:
                    asset_urls.append(attributes[attribute] or "")
            if "srcset" in attributes and tag in ("img", "source"):
                asset_urls += _srcset_urls(attributes["srcset"] or "")
            if "style" in attributes:
                asset_urls += _css_urls(attributes["style"] or "")
    targets.update(t for u in asset_urls if (t := _target_from(folder, _clean_url(u))) is not None)
    return targets, problems


#: Elements whose URL attributes load a resource but cannot run script, so only their existence is checked.
_ASSETS = (
    ("video", "src"),
    ("video", "poster"),
    ("audio", "src"),
    ("track", "src"),
    ("input", "src"),
)
_LINKING_BY_TAG = {tag: tuple(a for t, a in _LINKING if t == tag) for tag, _ in _LINKING}
#: Attribute names that are not event handlers (none starts with "on"): an element with only these
#: skips the per-name check, which most elements would otherwise pay for their class or href.
_PLAIN_ATTRIBUTES = frozenset(
    "accept action alt aria-hidden aria-label aria-labelledby aria-current aria-describedby aria-expanded "
    "autocomplete charset class cols colspan content datetime decoding dir disabled download enctype for "
    "formaction height hidden href hreflang id itemprop itemscope itemtype label lang loading max maxlength "
    "media method min minlength multiple name pattern placeholder poster property rel required role rows "
    "rowspan scope selected sizes span src srcset start step style tabindex target title type value viewbox "
    "width xmlns".split()
)
_ASSETS_BY_TAG = {tag: tuple(a for t, a in _ASSETS if t == tag) for tag, _ in _ASSETS}
#: Plain attributes that name no URL either: an element with only these has nothing for `_references`.
_INERT_ATTRIBUTES = _PLAIN_ATTRIBUTES - {a for _, a in _LINKING + _ASSETS} - {"srcset", "style"}
_CSS_URL = re.compile(r"""url\(\s*(?:"([^"]*)"|'([^']*)'|([^)'"\s]*))\s*\)|@import\s+(?:"([^"]*)"|'([^']*)')""", re.I)


def _srcset_urls(srcset: str) -> list[str]:
    """The candidate URLs of a `srcset`: whitespace-free runs, so data: URLs with commas stay whole."""
    urls: list[str] = []
    for candidate in re.finditer(r"[\s,]*([^\s,][^\s]*)[^,]*", srcset):
        url = candidate.group(1).rstrip(",")
        if url:
            urls.append(url)
    return urls


def _css_urls(css: str) -> list[str]:
    lowered = css.lower()
    if "url(" not in lowered and "@import" not in lowered:  # the usual stylesheet or style attribute
        return []
    return [next(g for g in m.groups() if g is not None) for m in _CSS_URL.finditer(css)]


#: Pages parsed by `site_problems`, for `_publishable` to use: path -> (the HTML, its parse).
Parsed = dict[str, tuple[str, HTMLParser]]


def site_problems(plan: SitePlan, code: SiteCode, parsed: Parsed | None = None) -> list[str]:
    """Everything wrong with the generated site, one readable sentence each (empty: all good).

    `parsed`, when given, receives each page's parse (see `check_site`).
    """
    files = {f.path: f.content for f in code.files}
    problems = [
        f"{path}: this name is reserved for the file the assemble phase writes itself; "
        "give the file another name or leave it out"
        for path in files
        if path.lower() in RESERVED_PATHS
    ]
    problems += [
        f"{path}: {reason}"
        for path in files
        for suffix, reason in REFUSED_SUFFIXES.items()
        if path.lower().endswith(suffix)
    ]
    pages = [page_file(p.slug) for p in plan.pages]
    problems += [f"planned page {page} was not generated" for page in pages if page not in files]

    links: dict[str, set[str]] = {}
    nav_targets: set[str] = set()
    for path, content in files.items():
        if path.endswith(".css"):
            css_targets = {t for u in _css_urls(content) if (t := _internal_target(path, _clean_url(u))) is not None}
            problems += [
                f"{path}: url {t} does not resolve to a generated file" for t in sorted(css_targets - set(files))
            ]
            continue
        if not path.endswith(".html"):
            continue
        tree = HTMLParser(content)
        if parsed is not None:
            parsed[path] = (content, tree)
        title = tree.css_first("title")
        if title is None or not title.text(strip=True):
            problems.append(f"{path}: missing <title>")
        h1_count = len(tree.css("h1"))
        if h1_count != 1:
            problems.append(f"{path}: has {h1_count} <h1> elements, expected exactly one")
        targets, link_problems = _references(path, tree)
        problems += link_problems
        links[path] = targets
        problems += [f"{path}: link to {t} does not resolve to a generated file" for t in sorted(targets - set(files))]
        if path == "index.html":
            for nav in tree.css("nav"):
                nav_targets |= _references(path, nav, assets=False)[0]

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


def _meta_content(tree: HTMLParser, name: str) -> str | None:
    """The content of `<meta name=...>` (name matched case-insensitively), None when there is none."""
    for node in tree.css("meta[name]"):
        if (node.attributes.get("name") or "").strip().lower() == name:
            return (node.attributes.get("content") or "").strip()
    return None


def page_quality(tree: HTMLParser) -> list[str]:
    """A page's quality warnings: what search engines, phones and screen readers miss on it."""
    warnings: list[str] = []
    root = tree.css_first("html")
    if root is None or not (root.attributes.get("lang") or "").strip():
        warnings.append("missing <html lang>")
    viewport = _meta_content(tree, "viewport")
    if viewport is None:
        warnings.append("missing <meta name=viewport>")
    elif "width" not in viewport.lower():
        warnings.append("<meta name=viewport> does not set a width")
    description = _meta_content(tree, "description")
    if description is None:
        warnings.append("missing <meta name=description>")
    elif not description:
        warnings.append("empty <meta name=description>")
    # alt="" is right for a decorative image; only an absent alt is a problem.
    no_alt = [n for n in tree.css("img, input[type=image]") if "alt" not in n.attributes]
    if no_alt:
        warnings.append(f"{len(no_alt)} <img> without alt")
    return warnings


def quality_report(code: SiteCode) -> dict[str, list[str]]:
    """Quality warnings by page path, only for pages that have some (empty: every page is clean).

    Warnings, not problems: the page still works, so the site is published and they are reported.
    """
    report: dict[str, list[str]] = {}
    for file in code.files:
        if file.path.endswith(".html") and (warnings := page_quality(HTMLParser(file.content))):
            report[file.path] = warnings
    return report


def quality_warnings(report: dict[str, list[str]]) -> list[str]:
    """One progress-log line per page with quality warnings, capped like the removals."""
    lines = [f"{page}: quality: {'; '.join(warnings)}" for page, warnings in report.items()]
    if len(lines) <= MAX_WARNINGS:
        return lines
    return [*lines[:MAX_WARNINGS], f"... and {len(lines) - MAX_WARNINGS} more page(s) with quality warnings"]


# --------------------------------------------------------------------------- publishing


def _publish(code: SiteCode, allowed: frozenset[str], parsed: Parsed) -> tuple[SiteCode, list[str]]:
    """Every page as `clean_page` writes it, every stylesheet as `clean_css` does, and what they removed.

    A page's parse in `parsed` (from `site_problems`, for the same HTML) is used, and taken out of it.
    """
    files: list[GeneratedFile] = []
    warnings: list[str] = []
    for file in code.files:
        content = file.content
        if file.path.endswith(".html"):
            source, tree = parsed.pop(file.path, (None, None))
            page = clean_page(file.path, content, allowed, tree if source is content else None)
            content, removed = page.html, page.removed
        elif file.path.endswith(".css"):
            content, urls = clean_css(content, allowed)
            removed = [f"{file.path}: removed {url}" for url in urls]
        else:
            files.append(file)
            continue
        warnings += removed
        # Built without validation: a page re-serialized a few bytes longer must not fail the size limit here.
        files.append(
            file if content is file.content else GeneratedFile.model_construct(path=file.path, content=content)
        )
    return SiteCode.model_construct(files=files), warnings


def _publishable(
    plan: SitePlan, code: SiteCode, allowed: frozenset[str], parsed: Parsed | None = None
) -> tuple[list[str], tuple[SiteCode, list[str], dict[str, list[str]]] | None]:
    """The checks of the site as published, and when they pass: the published site, what the sanitizer
    removed (in page order) and the quality report (see `quality_report`) of the published pages."""
    published, warnings = _publish(code, allowed, parsed if parsed is not None else {})
    pages: Parsed = {}
    problems = site_problems(plan, published, pages)
    if problems:
        return [f"once sanitized, {problem}" for problem in problems], None
    quality = {path: found for path, (_, tree) in pages.items() if (found := page_quality(tree))}
    return [], (published, warnings, quality)


def sanitize_site(code: SiteCode, allowed_hosts: Iterable[str] = ()) -> tuple[SiteCode, list[str]]:
    """Every page and stylesheet as published (see `clean_page`), with the removals' warnings in page order."""
    return _publish(code, normalize_hosts(allowed_hosts), {})


@dataclass(frozen=True)
class Publishable:
    """What the assemble phase makes of a site's pages (`_publishable`), made by the code phase's check
    from the parse it already has. `source` is the code it was made from, `allowed` the hosts."""

    source: SiteCode
    allowed: frozenset[str]
    code: SiteCode
    warnings: list[str]
    quality: dict[str, list[str]]


def check_site(
    plan: SitePlan, code: SiteCode, allowed_hosts: Iterable[str] = ()
) -> tuple[list[str], Publishable | None]:
    """`site_problems` of the site as written, then of the site as published, and when there are none,
    the publishable site. Each page as written is parsed once, for its check and its cleaning.

    The parses are used at once and dropped, not kept for the assemble phase: they take about
    750 KiB per site, and a site waits for its code phase's commit in between.
    """
    parsed: Parsed = {}
    problems = site_problems(plan, code, parsed)
    if problems:
        return problems, None
    allowed = normalize_hosts(allowed_hosts)
    problems, published = _publishable(plan, code, allowed, parsed)
    if published is None:
        return problems, None
    return [], Publishable(code, allowed, *published)


def _capped(warnings: list[str]) -> list[str]:
    if len(warnings) <= MAX_WARNINGS:
        return warnings
    return [*warnings[:MAX_WARNINGS], f"... and {len(warnings) - MAX_WARNINGS} more removal(s) not listed"]


# --------------------------------------------------------------------------- assemble


def _raise_problems(problems: list[str]) -> None:
    if problems:
        raise SiteCheckFailed(f"the generated site failed {len(problems)} check(s): " + "; ".join(problems[:20]))


def assemble_site(
    order_id: int,
    generation_id: int,
    plan: SitePlan,
    code: SiteCode,
    *,
    allowed_hosts: frozenset[str] = frozenset(),
    publishable: Publishable | None = None,
) -> tuple[Manifest, list[OutputFile]]:
    """The files to write (manifest last) and the manifest, or SiteCheckFailed with every problem.

    Embeds from hosts not in `allowed_hosts` are removed from the pages; the manifest's
    `warnings` list each removal, then one line per page with quality warnings, which the
    manifest's `quality` holds in full. `publishable`: the code phase's check of this very code
    (`check_site`), used instead of checking and sanitizing the pages again.
    """
    if publishable is None or publishable.source is not code or publishable.allowed != normalize_hosts(allowed_hosts):
        problems, publishable = check_site(plan, code, allowed_hosts)
        _raise_problems(problems)
        assert publishable is not None  # no problems: check_site made it
    sanitized, warnings, quality = publishable.code, publishable.warnings, publishable.quality
    files = [OutputFile(f.path, f.content.encode()) for f in sorted(sanitized.files, key=lambda f: f.path)]
    return with_manifest(order_id, generation_id, plan, files, warnings, quality)


def with_manifest(
    order_id: int,
    run_id: int,
    plan: SitePlan,
    files: list[OutputFile],
    warnings: list[str],
    quality: dict[str, list[str]],
) -> tuple[Manifest, list[OutputFile]]:
    """The manifest of a site's files, and the files with `manifest.json` last (a generation's or an edit's)."""
    manifest = Manifest(
        order_id=order_id,
        generation_id=run_id,
        site_name=plan.site_name,
        pages=[page_file(p.slug) for p in plan.pages],
        files=[ManifestFile(path=f.path, sha256=f.sha256, bytes=len(f.content)) for f in files],
        warnings=[*_capped(warnings), *quality_warnings(quality)],
        quality=quality,
    )
    # pydantic's own serializer: the same text as json.dumps(indent=2, ensure_ascii=False), 8x faster.
    manifest_json = manifest.model_dump_json(indent=2) + "\n"
    return manifest, [*files, OutputFile(MANIFEST_PATH, manifest_json.encode())]
