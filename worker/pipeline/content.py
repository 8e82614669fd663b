"""Phase `content`: the copy of every section of every planned page."""

from __future__ import annotations

from worker.ai.base import Usage
from worker.models import Brief, SiteContent, SitePlan
from worker.pipeline import Ask


async def make_content(brief: Brief, plan: SitePlan, ask: Ask) -> tuple[SiteContent, Usage]:
    return await ask(
        "content",
        {"brief": brief.model_dump(mode="json"), "plan": plan.model_dump(mode="json")},
        SiteContent,
        check=lambda content: content.check_against(plan),
    )
