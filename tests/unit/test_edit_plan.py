"""The edit plan's check (worker/pipeline/edit_plan.py) and the offline provider's plans, without a model."""

from __future__ import annotations

import pytest

from worker.local import offline_edits
from worker.local.offline_site import offline_plan
from worker.models import MAX_PAGES, Brief, EditPlan, NewPage, SitePlan, page_file
from worker.pipeline.edit_plan import check_edit_plan


def site_plan(pages: int) -> SitePlan:
    slugs = ["index", *(f"page-{i}" for i in range(1, pages))]
    brief = Brief.model_validate(
        {
            "business_name": "Rosa's Bakery",
            "description": "A family bakery.",
            "pages": [{"slug": slug, "title": slug.title()} for slug in slugs],
        }
    )
    return offline_plan(brief)


def test_an_edit_cannot_add_pages_past_the_most_a_site_has() -> None:
    """Regression (bench `edits`): adding a page to a 12-page site stored a 13-page plan, which the plan's own
    model refuses (at most MAX_PAGES pages): every later edit of that version failed loading it."""
    plan = site_plan(MAX_PAGES)
    paths = [page_file(p.slug) for p in plan.pages]
    edit = EditPlan(
        summary="add a pricing page", add_pages=[NewPage(slug="pricing", title="Pricing", nav_label="Pricing")]
    )
    with pytest.raises(ValueError, match=f"a site has at most {MAX_PAGES} pages: this one has {MAX_PAGES}"):
        check_edit_plan(edit, plan, paths, None)
    check_edit_plan(edit, site_plan(MAX_PAGES - 1), paths[:-1], None)  # one under the limit: fine


def test_the_offline_provider_refuses_a_page_the_site_has_no_room_for() -> None:
    plan = site_plan(MAX_PAGES)
    files = [{"path": page_file(p.slug), "content": "<html></html>"} for p in plan.pages]
    answer = offline_edits.edit_plan({"instruction": "Add a pricing page", "plan": plan.model_dump(), "files": files})
    assert answer.refuse is not None and "the most a site can have" in answer.refuse
    assert not answer.add_pages
