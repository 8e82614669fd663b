"""Phase `plan`: the brief becomes a site plan (pages, sections, palette, navigation)."""

from __future__ import annotations

from worker.ai.base import Usage
from worker.models import MAX_PAGES, Brief, SitePlan
from worker.pipeline import Ask


def check_plan(brief: Brief, plan: SitePlan) -> None:
    """The plan must keep every page the brief asked for, and make at most MAX_PAGES (edits may add more)."""
    if len(plan.pages) > MAX_PAGES:
        raise ValueError(f"the plan has {len(plan.pages)} pages: a generated site has at most {MAX_PAGES}")
    planned = {p.slug for p in plan.pages}
    missing = [p.slug for p in brief.pages if p.slug not in planned]
    if missing:
        raise ValueError(f"the brief asks for pages the plan lacks: {', '.join(missing)}")


async def make_plan(brief: Brief, ask: Ask) -> tuple[SitePlan, Usage]:
    return await ask(
        "planning", {"brief": brief.model_dump(mode="json")}, SitePlan, check=lambda plan: check_plan(brief, plan)
    )
