"""Edit phase `edit_plan`: from the instruction, the site's plan and its files, which files change and
which pages are added."""

from __future__ import annotations

from collections.abc import Collection

from worker.ai.base import Usage
from worker.models import MAX_SITE_PAGES, EditPlan, SitePlan, page_file
from worker.pipeline import Ask

#: Files an edit never changes itself: the assemble phase writes the manifest.
UNEDITABLE = frozenset({"manifest.json"})
#: The files an edit can change: those the edit_files phase is given as text (the runner's `base` for it). Any
#: other file of the site (a .webmanifest, a .json, an .ico) is published by the edit as it was.
EDITABLE_SUFFIXES = (".html", ".css", ".txt")


def check_edit_plan(edit: EditPlan, plan: SitePlan, paths: Collection[str], pages: list[str] | None) -> None:
    """Re-ask the model when its plan names files the site lacks, re-adds a page, or leaves `pages`."""
    if edit.refuse:
        return  # the model says it cannot: the edit fails with its reason, nothing to check
    problems: list[str] = []
    unknown = [p for p in edit.change if p not in paths or p in UNEDITABLE]
    if unknown:
        problems.append(f"change names files the site does not have (or that cannot be edited): {', '.join(unknown)}")
    other = [p for p in edit.change if p in paths and p not in UNEDITABLE and not p.endswith(EDITABLE_SUFFIXES)]
    if other:
        problems.append(
            f"change names files an edit cannot change (only {', '.join(EDITABLE_SUFFIXES)} files): {', '.join(other)}"
        )
    existing = {p.slug for p in plan.pages}
    # Compared in lower case, as SiteCode compares paths (and a case-insensitive file system would): a site may
    # have a page the plan does not name, `Promo.html`, or a folder `promo.html/`, which a new page `promo` would
    # clash with.
    taken = {"/".join(p.lower().split("/")[:i]) for p in paths for i in range(1, p.count("/") + 2)}
    again = [p.slug for p in edit.add_pages if p.slug in existing or page_file(p.slug) in taken]
    if again:
        problems.append(f"add_pages names pages the site has already: {', '.join(again)} (put them in change)")
    if len({p.slug for p in edit.add_pages}) != len(edit.add_pages):
        problems.append("add_pages names a page twice")
    if edit.add_pages and len(plan.pages) + len(edit.add_pages) > MAX_SITE_PAGES:
        problems.append(
            f"a site has at most {MAX_SITE_PAGES} pages: this one has {len(plan.pages)}, and add_pages adds "
            f"{len(edit.add_pages)} (refuse, or replace a page's content instead)"
        )
    if pages is not None:
        allowed = {page_file(slug) for slug in pages}
        outside = [p for p in edit.change if p.endswith(".html") and p not in allowed]
        if outside:
            problems.append(
                f"the edit is limited to the pages {', '.join(pages)}; change also names {', '.join(outside)}"
            )
    if not edit.change and not edit.add_pages:
        problems.append("the plan changes no file and adds no page: name the files to change, or refuse")
    if problems:
        raise ValueError("; ".join(problems))


async def make_edit_plan(
    instruction: str, plan: SitePlan, files: dict[str, int], pages: list[str] | None, ask: Ask
) -> tuple[EditPlan, Usage]:
    """`files`: path -> size in bytes of every file of the base version."""
    return await ask(
        "edit_planning",
        {
            "instruction": instruction,
            "plan": plan.model_dump(mode="json"),
            "files": [{"path": path, "bytes": size} for path, size in sorted(files.items())],
            "pages": pages,
        },
        EditPlan,
        check=lambda edit: check_edit_plan(edit, plan, files.keys(), pages),
    )
