"""Phase `code`: HTML and CSS for every page, from the plan and its copy."""

from __future__ import annotations

from worker.ai.base import Usage
from worker.models import Brief, SiteCode, SiteContent, SitePlan
from worker.pipeline import Ask
from worker.pipeline.assemble import Parsed, site_problems


def check_code(plan: SitePlan, code: SiteCode, parsed: Parsed | None = None) -> None:
    """Re-ask the model when its pages would fail the assemble phase's checks (`parsed`: see site_problems)."""
    problems = site_problems(plan, code, parsed)
    if problems:
        raise ValueError("; ".join(problems[:20]))


async def make_code(
    brief: Brief, plan: SitePlan, content: SiteContent, ask: Ask, parsed: Parsed | None = None
) -> tuple[SiteCode, Usage]:
    return await ask(
        "coding",
        {
            "brief": brief.model_dump(mode="json"),
            "plan": plan.model_dump(mode="json"),
            "content": content.model_dump(mode="json"),
        },
        SiteCode,
        check=lambda code: check_code(plan, code, parsed),
    )
