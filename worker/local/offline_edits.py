"""The offline provider's edits: a deterministic answer to each edit task, with no model.

It understands a colour change ("make the header blue", "primary colour #1d4ed8"), a phone number
("change the phone number to +1 555 0100"), a text change (`change "A" to "B"`), adding a page ("add a
pricing page") and removing a section ("remove the testimonials section"). Anything else is refused
with a message listing these, which is what a model that cannot carry out an edit answers too.

Pure functions (no I/O, clock or randomness): the same inputs always give the same answer.
"""

from __future__ import annotations

import html
import re
from typing import Any

from worker.models import MAX_SITE_PAGES, EditPlan, FileEdit, FileRewrite, NewPage, SearchReplace, SitePlan, page_file

STYLESHEET = "assets/style.css"
UNDERSTOOD = (
    "the offline provider understands: a colour change ('make the header blue', 'primary colour #1d4ed8'), "
    "a phone number ('change the phone number to +1 555 0100'), a text change ('change \"A\" to \"B\"'), "
    "adding a page ('add a pricing page') and removing a section ('remove the testimonials section')"
)
#: Named colours, dark enough for links and buttons on white (WCAG AA).
COLOURS = {
    "blue": "#1d4ed8",
    "navy": "#1e3a8a",
    "green": "#15803d",
    "red": "#b91c1c",
    "purple": "#7e22ce",
    "orange": "#c2410c",
    "teal": "#0f766e",
    "pink": "#be185d",
    "brown": "#92400e",
    "black": "#111827",
    "grey": "#4b5563",
    "gray": "#4b5563",
}
_HEX = re.compile(r"#[0-9a-fA-F]{6}\b")
_COLOUR_WORDS = re.compile(r"\b(colou?rs?|header|primary|theme|brand|buttons?|links?)\b", re.I)
_PHONE = re.compile(r"\+?\d[\d ().-]{4,}\d")
_QUOTED = re.compile(
    r"""(?:change|replace)\s+["“'](?P<old>[^"”']+)["”']\s+(?:to|with|by)\s+["“'](?P<new>[^"”']+)["”']""", re.I
)
_ADD_PAGE = re.compile(r"\badd (?:a |an |the )?(?:new )?(?P<name>[a-z][a-z0-9 -]{0,38}?) page\b", re.I)
_REMOVE_SECTION = re.compile(r"\b(?:remove|delete|drop) (?:the )?(?P<name>[a-z][a-z0-9 -]{0,38}?) section\b", re.I)
_SECTION = re.compile(r"<section\b[^>]*>.*?</section>", re.S)
_TEL = re.compile(r'<a href="tel:(?P<digits>[^"]*)">(?P<text>[^<]*)</a>')
_PRIMARY = re.compile(r"--primary:\s*(#[0-9a-fA-F]{3,8})")


def _colour(instruction: str) -> str | None:
    hex_colour = _HEX.search(instruction)
    if hex_colour and _COLOUR_WORDS.search(instruction):
        return hex_colour.group(0).lower()
    words = {w.lower() for w in re.findall(r"[A-Za-z]+", instruction)}
    named = [c for c in COLOURS if c in words]
    if named and (_COLOUR_WORDS.search(instruction) or "make" in words):
        return COLOURS[named[0]]
    return None


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "page"


def _pages(inputs: dict[str, Any]) -> list[str]:
    """The pages an edit may change: those the job names, else every page of the site."""
    files = [f["path"] for f in inputs["files"]]
    if inputs.get("pages"):
        return [page_file(slug) for slug in inputs["pages"] if page_file(slug) in files]
    return [p for p in files if p.endswith(".html")]


def edit_plan(inputs: dict[str, Any]) -> EditPlan:
    instruction: str = inputs["instruction"]
    plan = SitePlan.model_validate(inputs["plan"])
    pages = _pages(inputs)
    if (colour := _colour(instruction)) is not None:
        return EditPlan(summary=f"set the primary colour to {colour}", change=[STYLESHEET])
    if "phone" in instruction.lower() and _PHONE.search(instruction):
        return EditPlan(summary="change the phone number on every page", change=pages)
    if (quoted := _QUOTED.search(instruction)) is not None:
        return EditPlan(summary=f"replace {quoted['old']!r} with {quoted['new']!r}", change=pages)
    if (added := _ADD_PAGE.search(instruction)) is not None:
        name = added["name"].strip()
        slug = _slug(name)
        if any(p.slug == slug for p in plan.pages):
            return EditPlan(refuse=f"the site has a {name} page already")
        if len(plan.pages) >= MAX_SITE_PAGES:
            return EditPlan(refuse=f"the site has {len(plan.pages)} pages, the most a site can have: remove one first")
        title = name[:1].upper() + name[1:]
        page = NewPage(slug=slug, title=title, nav_label=title[:40], purpose=instruction[:500])
        return EditPlan(summary=f"add a {name} page", add_pages=[page])
    if (removed := _REMOVE_SECTION.search(instruction)) is not None:
        return EditPlan(summary=f"remove the {removed['name']} section", change=pages, shrinks=pages)
    return EditPlan(refuse=UNDERSTOOD)


def _blocks(instruction: str, path: str, content: str) -> list[SearchReplace]:
    """The search/replace blocks that carry out `instruction` on one file (none: nothing to change here)."""
    if (colour := _colour(instruction)) is not None:
        found = _PRIMARY.search(content)
        return [SearchReplace(search=found.group(0), replace=f"--primary: {colour}")] if found else []
    if "phone" in instruction.lower() and (phone := _PHONE.search(instruction)) is not None:
        number = phone.group(0)
        link = f'<a href="tel:{re.sub(r"[^0-9+]", "", number)}">{html.escape(number)}</a>'
        return [
            block
            for old in dict.fromkeys(m.group(0) for m in _TEL.finditer(content))
            for block in _everywhere(content, old, link)
        ]
    if (quoted := _QUOTED.search(instruction)) is not None:
        old, new = html.escape(quoted["old"], quote=False), html.escape(quoted["new"], quote=False)
        return _everywhere(content, old, new)
    if (removed := _REMOVE_SECTION.search(instruction)) is not None:
        name = removed["name"].strip().lower()
        return [
            SearchReplace(search=m.group(0), replace="")
            for m in _SECTION.finditer(content)
            if name in m.group(0)[: m.group(0).find(">") + 1].lower() or name in _heading(m.group(0)).lower()
        ]
    return []


def _everywhere(content: str, old: str, new: str) -> list[SearchReplace]:
    """Blocks that replace every `old` in `content` with `new`, each matching one place only (as the editing
    prompt asks): a block is the fewest whole lines from a line holding `old` that occur once in `content`."""
    if content.count(old) <= 1:
        return [SearchReplace(search=old, replace=new)] if old in content else []
    lines = content.splitlines(keepends=True)
    blocks: list[SearchReplace] = []
    start = 0
    while start < len(lines):
        if old not in lines[start]:
            start += 1
            continue
        end = start + 1
        while end < len(lines) and content.count("".join(lines[start:end])) > 1:
            end += 1
        text = "".join(lines[start:end])
        if content.count(text) > 1:  # no run of lines from here is unique: the rest of the file, whole
            text = "".join(lines[start:])
        blocks.append(SearchReplace(search=text, replace=text.replace(old, new)))
        start = end
    return blocks


def _heading(section: str) -> str:
    found = re.search(r"<h[1-3][^>]*>(.*?)</h[1-3]>", section, re.S)
    return found.group(1) if found else ""


def file_edit(inputs: dict[str, Any]) -> FileEdit:
    return FileEdit(path=inputs["path"], blocks=_blocks(inputs["instruction"], inputs["path"], inputs["content"]))


def _applied(instruction: str, path: str, content: str) -> str:
    for block in _blocks(instruction, path, content):
        content = content.replace(block.search, block.replace, 1)
    return content


def new_page(inputs: dict[str, Any]) -> str:
    """A new page in the look of the home page: its header, navigation and footer, a banner and one section."""
    page = NewPage.model_validate(inputs["page"])
    template: str = inputs["template"]
    title, label = html.escape(page.title), html.escape(page.nav_label)
    body = html.escape(page.purpose or page.title)
    text = re.sub(r' aria-current="page"', "", template)
    text = re.sub(
        r"<title>(.*?)</title>",
        lambda m: f"<title>{title} | {m.group(1).split(' | ')[0]}</title>",
        text,
        count=1,
        flags=re.S,
    )
    text = re.sub(
        r'<meta name="description" content="[^"]*">', f'<meta name="description" content="{title}">', text, count=1
    )
    main = (
        f'<main id="main">\n<div class="page-banner"><div class="container"><h1>{title}</h1></div></div>\n'
        f'<section class="section section-text" id="main-section" aria-labelledby="main-section-title">'
        f'<div class="container"><h2 id="main-section-title">{label}</h2><p>{body}</p></div></section>\n</main>'
    )
    return re.sub(r"<main\b.*?</main>", lambda _: main, text, count=1, flags=re.S)


def answer(inputs: dict[str, Any]) -> str | None:
    """The JSON answer to an edit task's inputs; None when the inputs are not an edit task's."""
    if "instruction" not in inputs:
        return None
    if "files" in inputs:
        return edit_plan(inputs).model_dump_json()
    if "template" in inputs:
        return FileRewrite(path=inputs["path"], content=new_page(inputs)).model_dump_json()
    if inputs.get("whole"):
        content = _applied(inputs["instruction"], inputs["path"], inputs["content"])
        return FileRewrite(path=inputs["path"], content=content).model_dump_json()
    return file_edit(inputs).model_dump_json()
