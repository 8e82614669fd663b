"""worker/models.py: the brief, the plan and the content as validation boundaries."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from tests.helpers import SAMPLE_BRIEF
from worker.models import (
    Brief,
    ContentItem,
    GeneratedFile,
    PageContent,
    PagePlan,
    Palette,
    SectionContent,
    SectionPlan,
    SiteContent,
    SitePlan,
)


def brief_data(**overrides: Any) -> dict[str, Any]:
    data = copy.deepcopy(SAMPLE_BRIEF)
    data.update(overrides)
    return data


def error_locations(exc: ValidationError) -> list[str]:
    return [".".join(str(p) for p in e["loc"]) for e in exc.errors()]


# --------------------------------------------------------------------------- Brief


def test_valid_sample_brief_is_accepted() -> None:
    brief = Brief.model_validate(brief_data(pages=[{"slug": "menu", "title": "  Our menu  "}], brand_color="#AA3300"))
    assert brief.business_name == "Rosa's Bakery"
    assert brief.services == ["Sourdough bread", "Pastries", "Custom cakes"]
    assert brief.pages[0].title == "Our menu"  # whitespace stripped
    assert brief.contact.email == "hello@rosasbakery.example"
    assert brief.language == "en"
    assert brief.tone == "friendly and professional"


def test_missing_business_name_is_named() -> None:
    data = brief_data()
    del data["business_name"]
    with pytest.raises(ValidationError) as caught:
        Brief.model_validate(data)
    assert error_locations(caught.value) == ["business_name"]
    assert "business_name" in str(caught.value)


def test_blank_business_name_is_rejected() -> None:
    with pytest.raises(ValidationError) as caught:
        Brief.model_validate(brief_data(business_name="   "))
    assert error_locations(caught.value) == ["business_name"]


def test_description_over_5000_chars_is_named() -> None:
    Brief.model_validate(brief_data(description="x" * 5000))
    with pytest.raises(ValidationError) as caught:
        Brief.model_validate(brief_data(description="x" * 5001))
    assert error_locations(caught.value) == ["description"]
    assert "5000" in str(caught.value)


@pytest.mark.parametrize("slug", ["../../etc", "About", "a/b", "-menu", "menu-", "x" * 49, ""])
def test_path_like_or_malformed_page_slug_is_rejected(slug: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Brief.model_validate(brief_data(pages=[{"slug": slug, "title": "Page"}]))
    assert error_locations(caught.value) == ["pages.0.slug"]
    assert "pages" in str(caught.value)


def test_duplicate_page_slugs_are_rejected() -> None:
    pages = [{"slug": "menu", "title": "Menu"}, {"slug": "story", "title": "Story"}, {"slug": "menu", "title": "Again"}]
    with pytest.raises(ValidationError) as caught:
        Brief.model_validate(brief_data(pages=pages))
    assert error_locations(caught.value) == ["pages"]
    assert "repeated: menu" in str(caught.value)


def test_unknown_key_is_rejected() -> None:
    with pytest.raises(ValidationError) as caught:
        Brief.model_validate(brief_data(website_url="https://example.com"))
    assert error_locations(caught.value) == ["website_url"]
    assert "Extra inputs are not permitted" in str(caught.value)


def test_unknown_nested_key_is_rejected() -> None:
    with pytest.raises(ValidationError) as caught:
        Brief.model_validate(brief_data(contact={"email": "a@b.example", "fax": "123"}))
    assert error_locations(caught.value) == ["contact.fax"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("brand_color", "red"),
        ("language", "english"),
        ("services", ["x"] * 13),
        ("contact", {"email": "not-an-email"}),
        ("contact", {"phone": "call me"}),
    ],
)
def test_other_invalid_fields_are_named(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        Brief.model_validate(brief_data(**{field: value}))
    assert all(loc.startswith(field) for loc in error_locations(caught.value))


# --------------------------------------------------------------------------- SitePlan

PALETTE = Palette(primary="#aa3300", secondary="#332211", accent="#ffcc00", background="#ffffff", text="#111111")


def page_plan(slug: str) -> PagePlan:
    sections = [SectionPlan(id="intro", kind="hero", heading="Hi")]
    return PagePlan(slug=slug, title=slug.title(), nav_label=slug.title(), sections=sections)


def make_plan(slugs: list[str], nav: list[str] | None = None) -> SitePlan:
    return SitePlan(site_name="Rosa", palette=PALETTE, pages=[page_plan(s) for s in slugs], nav=nav or list(slugs))


def test_valid_plan() -> None:
    plan = make_plan(["index", "about"], nav=["about", "index"])
    assert plan.page("about").title == "About"
    assert [p.slug for p in plan.pages] == ["index", "about"]


def test_plan_must_include_index() -> None:
    with pytest.raises(ValidationError, match="slug 'index'"):
        make_plan(["home", "about"])


def test_nav_must_list_every_page() -> None:
    with pytest.raises(ValidationError, match="missing: about"):
        make_plan(["index", "about", "contact"], nav=["index", "contact"])


def test_nav_may_only_list_planned_pages() -> None:
    with pytest.raises(ValidationError, match="not planned: blog"):
        make_plan(["index", "about"], nav=["index", "about", "blog"])


def test_plan_page_slugs_must_be_unique() -> None:
    with pytest.raises(ValidationError, match="page slugs must be unique"):
        make_plan(["index", "about", "about"])


def test_plan_section_ids_must_be_unique_within_a_page() -> None:
    section = SectionPlan(id="intro", kind="text", heading="Hi")
    with pytest.raises(ValidationError, match="section ids must be unique"):
        PagePlan(slug="index", title="Home", nav_label="Home", sections=[section, section])


# --------------------------------------------------------------------------- SiteContent.check_against


def section(section_id: str = "intro", cta_target: str = "") -> SectionContent:
    return SectionContent(
        section_id=section_id,
        heading="Heading",
        body="Body",
        items=[ContentItem(title="t", text="x")],
        cta_label="Go" if cta_target else "",
        cta_target=cta_target,
    )


def page_content(slug: str, *sections: SectionContent) -> PageContent:
    written = list(sections or [section()])
    return PageContent(slug=slug, meta_title=slug, meta_description="About " + slug, sections=written)


def test_content_covering_the_plan_passes() -> None:
    plan = make_plan(["index", "about"])
    content = SiteContent(pages=[page_content("index", section(cta_target="about")), page_content("about")])
    content.check_against(plan)  # does not raise
    assert content.page("index").sections[0].cta_target == "about"


def test_missing_page_is_reported() -> None:
    plan = make_plan(["index", "about"])
    with pytest.raises(ValueError, match="page 'about' has no content"):
        SiteContent(pages=[page_content("index")]).check_against(plan)


def test_missing_section_is_reported() -> None:
    plan = SitePlan(
        site_name="Rosa",
        palette=PALETTE,
        pages=[
            PagePlan(
                slug="index",
                title="Home",
                nav_label="Home",
                sections=[
                    SectionPlan(id="intro", kind="hero", heading="Hi"),
                    SectionPlan(id="faq", kind="faq", heading="FAQ"),
                ],
            )
        ],
        nav=["index"],
    )
    with pytest.raises(ValueError, match="page 'index' section 'faq' has no content"):
        SiteContent(pages=[page_content("index")]).check_against(plan)


def test_unknown_cta_target_is_reported() -> None:
    plan = make_plan(["index", "about"])
    content = SiteContent(pages=[page_content("index", section(cta_target="pricing")), page_content("about")])
    with pytest.raises(ValueError, match="links to unknown page 'pricing'"):
        content.check_against(plan)


def test_page_not_in_the_plan_is_reported() -> None:
    plan = make_plan(["index"])
    with pytest.raises(ValueError, match="page 'blog' is not in the plan"):
        SiteContent(pages=[page_content("index"), page_content("blog")]).check_against(plan)


def test_every_problem_is_reported_at_once() -> None:
    plan = make_plan(["index", "about", "contact"])
    content = SiteContent(pages=[page_content("index", section("other", cta_target="nowhere"))])
    with pytest.raises(ValueError) as caught:
        content.check_against(plan)
    problems = str(caught.value).split("; ")
    assert sorted(problems) == sorted(
        [
            "page 'index' section 'intro' has no content",
            "page 'index' section 'other' links to unknown page 'nowhere'",
            "page 'about' has no content",
            "page 'contact' has no content",
        ]
    )


@pytest.mark.parametrize("path", ["PROMO.HTML", "pages/Offer.Html", "assets/STYLE.CSS", "x.hTmL"])
def test_a_file_type_in_upper_case_is_refused_naming_the_rule(path: str) -> None:
    """Regression: issue 20 finding 1, found by the hostile-page corpus (file-uppercase-html-file): a model-written
    PROMO.HTML passed the path check (case-insensitive) but not the page checks and the sanitizer, which read
    pages by their lower-case suffix, so it was published as the model wrote it and ran its script."""
    with pytest.raises(ValidationError, match="lower-case type"):
        GeneratedFile(path=path, content="<script>alert(1)</script>")
