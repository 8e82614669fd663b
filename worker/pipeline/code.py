"""Phase `code`: HTML and CSS for every page, from the plan and its copy."""

from __future__ import annotations

from collections.abc import Iterable

from worker.ai.base import Usage
from worker.models import Brief, SiteCode, SiteContent, SitePlan
from worker.pipeline import Ask
from worker.pipeline.assemble import Publishable, check_site


def check_code(
    plan: SitePlan, code: SiteCode, allowed_hosts: Iterable[str] = (), ready: list[Publishable] | None = None
) -> None:
    """Re-ask the model when its pages would fail the assemble phase's checks.

    `ready`, when given, receives what the assemble phase would make of code that passes (see check_site).
    """
    problems, publishable = check_site(plan, code, allowed_hosts)
    if problems:
        raise ValueError("; ".join(problems[:20]))
    if ready is not None and publishable is not None:
        ready.append(publishable)


async def make_code(
    brief: Brief,
    plan: SitePlan,
    content: SiteContent,
    ask: Ask,
    allowed_hosts: Iterable[str] = (),
    ready: list[Publishable] | None = None,
) -> tuple[SiteCode, Usage]:
    return await ask(
        "coding",
        {
            "brief": brief.model_dump(mode="json"),
            "plan": plan.model_dump(mode="json"),
            "content": content.model_dump(mode="json"),
        },
        SiteCode,
        check=lambda code: check_code(plan, code, allowed_hosts, ready),
    )
