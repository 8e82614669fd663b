"""The edit plan's check (worker/pipeline/edit_plan.py) and the offline provider's plans, without a model."""

from __future__ import annotations

import pytest

from worker.local import offline_edits
from worker.local.offline_site import offline_plan
from worker.models import MAX_PAGES, MAX_SITE_PAGES, Brief, EditPlan, NewPage, SitePlan, page_file
from worker.pipeline.edit_plan import check_edit_plan
from worker.pipeline.plan import check_plan


def site_plan(pages: int) -> SitePlan:
    """A site plan of `pages` pages: a generated one (at most MAX_PAGES), grown as edits adding pages grow it."""
    slugs = ["index", *(f"page-{i}" for i in range(1, pages))]
    brief = Brief.model_validate(
        {
            "business_name": "Rosa's Bakery",
            "description": "A family bakery.",
            "pages": [{"slug": slug, "title": slug.title()} for slug in slugs[:MAX_PAGES]],
        }
    )
    plan = offline_plan(brief)
    more = [plan.pages[-1].model_copy(update={"slug": slug, "title": slug.title()}) for slug in slugs[MAX_PAGES:]]
    dumped = plan.model_dump()
    return SitePlan.model_validate(
        {
            **dumped,
            "pages": [*dumped["pages"], *(p.model_dump() for p in more)],
            "nav": [*dumped["nav"], *slugs[MAX_PAGES:]],
        }
    )


def test_a_generated_plan_keeps_to_the_generation_limit() -> None:
    brief = Brief.model_validate({"business_name": "Rosa's Bakery", "description": "A family bakery."})
    with pytest.raises(ValueError, match=f"a generated site has at most {MAX_PAGES}"):
        check_plan(brief, site_plan(MAX_PAGES + 1))
    check_plan(brief, site_plan(MAX_PAGES))


def test_an_edit_cannot_add_pages_past_the_most_a_site_has() -> None:
    """Regression (bench `edits`): adding a page to a 12-page site stored a 13-page plan, which the plan's own
    model refused (at most 12 pages then): every later edit of that version failed loading it. A site now
    grows by edits up to MAX_SITE_PAGES, and an edit past that is refused by the plan check."""
    plan = site_plan(MAX_SITE_PAGES)
    paths = [page_file(p.slug) for p in plan.pages]
    edit = EditPlan(
        summary="add a pricing page", add_pages=[NewPage(slug="pricing", title="Pricing", nav_label="Pricing")]
    )
    with pytest.raises(ValueError, match=f"a site has at most {MAX_SITE_PAGES} pages: this one has {MAX_SITE_PAGES}"):
        check_edit_plan(edit, plan, paths, None)
    check_edit_plan(edit, site_plan(MAX_SITE_PAGES - 1), paths[:-1], None)  # one under the limit: fine


def test_the_offline_provider_refuses_a_page_the_site_has_no_room_for() -> None:
    plan = site_plan(MAX_SITE_PAGES)
    files = [{"path": page_file(p.slug), "content": "<html></html>"} for p in plan.pages]
    answer = offline_edits.edit_plan({"instruction": "Add a pricing page", "plan": plan.model_dump(), "files": files})
    assert answer.refuse is not None and "the most a site can have" in answer.refuse
    assert not answer.add_pages
