"""Edit phase `assemble`: the base version with the edited files, checked and sanitised as a generation is.

A page the edit adds joins the plan and every page's navigation (a link appended to the first <nav>'s
list, or to the <nav> itself), so no page is unreachable whatever the model wrote. The files the edit
did not touch are published with their bytes unchanged; the changed ones are the sanitizer's output.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable

from worker.models import (
    EditedFiles,
    EditPlan,
    GeneratedFile,
    Manifest,
    OutputFile,
    PagePlan,
    SectionPlan,
    SiteCode,
    SitePlan,
    page_file,
)
from worker.pipeline.assemble import MANIFEST_PATH, _raise_problems, check_site, with_manifest

_NAV = re.compile(r"<nav\b[^>]*>(?P<inner>.*?)</nav\s*>", re.S | re.I)
_LIST_END = re.compile(r"</(?:ul|ol)\s*>", re.I)


def edited_plan(plan: SitePlan, edit: EditPlan) -> SitePlan:
    """`plan` with the edit's new pages, each in the navigation."""
    if not edit.add_pages:
        return plan
    added = [
        PagePlan(
            slug=p.slug,
            title=p.title,
            nav_label=p.nav_label,
            sections=[SectionPlan(id="main", kind="text", heading=p.title, goal=p.purpose[:500])],
        )
        for p in edit.add_pages
    ]
    return plan.model_copy(update={"pages": [*plan.pages, *added], "nav": [*plan.nav, *(p.slug for p in added)]})


def add_nav_links(page: str, links: Iterable[tuple[str, str]]) -> str:
    """`page` with a link to each (href, label) its first <nav> lacks."""
    nav = _NAV.search(page)
    if nav is None:
        return page
    inner = nav.group("inner")
    missing = [(href, label) for href, label in links if f'href="{href}"' not in inner]
    if not missing:
        return page
    ends = list(_LIST_END.finditer(inner))
    if ends:
        items = "".join(f'<li><a href="{href}">{html.escape(label)}</a></li>' for href, label in missing)
        at = nav.start("inner") + ends[-1].start()
    else:
        items = "".join(f' <a href="{href}">{html.escape(label)}</a>' for href, label in missing)
        at = nav.end("inner")
    return page[:at] + items + page[at:]


def assemble_edit(
    order_id: int,
    run_id: int,
    base: dict[str, bytes],
    plan: SitePlan,
    edit: EditPlan,
    edited: EditedFiles,
    *,
    allowed_hosts: Iterable[str] = (),
) -> tuple[Manifest, list[OutputFile], SitePlan, list[str]]:
    """The new version's files (manifest last), its manifest and plan, and the paths it changed; or
    SiteCheckFailed with every problem, the base version left as it is."""
    new_plan = edited_plan(plan, edit)
    texts = {path: content.decode() for path, content in base.items() if path != MANIFEST_PATH}
    changed = {f.path for f in edited.files}
    texts.update({f.path: f.content for f in edited.files})
    links = [(page_file(p.slug), p.nav_label) for p in edit.add_pages]
    if links:
        for path, text in texts.items():
            if path.endswith(".html"):
                linked = add_nav_links(text, links)
                if linked != text:
                    texts[path] = linked
                    changed.add(path)
    code = SiteCode(files=[GeneratedFile(path=p, content=t) for p, t in sorted(texts.items())])
    problems, publishable = check_site(new_plan, code, allowed_hosts)
    _raise_problems(problems)
    assert publishable is not None
    published = {f.path: f.content for f in publishable.code.files}
    files = [OutputFile(path, published[path].encode() if path in changed else base[path]) for path in sorted(texts)]
    removed = [w for w in publishable.warnings if any(w.startswith(p) or f" {p}" in w for p in changed)]
    manifest, published_files = with_manifest(order_id, run_id, new_plan, files, removed, publishable.quality)
    return manifest, published_files, new_plan, sorted(changed)
