"""The offline provider's site generator: deterministic, valid, navigable, safe and readable."""

from __future__ import annotations

import itertools
import re

import pytest

# selectolax 1.x removed the Modest `selectolax.parser` backend; lexbor is its drop-in replacement.
from selectolax.lexbor import LexborHTMLParser as HTMLParser

from worker.local.offline_site import (
    clip,
    contrast_ratio,
    offline_code,
    offline_content,
    offline_plan,
    site_palette,
)
from worker.models import Brief, PageRequest, SiteCode, page_file
from worker.pipeline.assemble import quality_report

HOSTILE_NAME = "<script>alert(1)</script>"
HOSTILE_TEXT = '"><img src=x onerror=alert(1)>'


def sample_brief(**overrides: object) -> Brief:
    data: dict[str, object] = {
        "business_name": "Rosa's Bakery",
        "description": (
            "Family bakery in Porto baking sourdough bread, pastel de nata and celebration cakes since 1998."
        ),
        "industry": "bakery",
        "location": "Rua das Flores 12, Porto",
        "services": ["Sourdough bread", "Pastries", "Custom cakes", "Coffee"],
        "contact": {
            "email": "hello@rosasbakery.pt",
            "phone": "+351 222 000 111",
            "address": "Rua das Flores 12, 4050-262 Porto",
            "hours": "Tue-Sun 7:00-19:00",
        },
    }
    data.update(overrides)
    return Brief.model_validate(data)


def minimal_brief() -> Brief:
    return Brief(business_name="Northside Plumbing", description="Emergency and planned plumbing for homes.")


def custom_pages_brief() -> Brief:
    return sample_brief(
        pages=[
            PageRequest(slug="menu", title="Our menu", purpose="Breads, pastries and cakes with prices"),
            PageRequest(slug="story", title="Our story"),
            PageRequest(slug="visit-us", title="Visit us", purpose="Address and opening hours"),
            PageRequest(slug="catering", title="Catering"),
        ]
    )


def generate(brief: Brief) -> SiteCode:
    plan = offline_plan(brief)
    return offline_code(plan, offline_content(brief, plan))


def files_of(code: SiteCode) -> dict[str, str]:
    return {f.path: f.content for f in code.files}


def pages_of(code: SiteCode) -> dict[str, HTMLParser]:
    return {f.path: HTMLParser(f.content) for f in code.files if f.path.endswith(".html")}


BRIEFS = {
    "sample": sample_brief(),
    "minimal": minimal_brief(),
    "custom": custom_pages_brief(),
    "one-page": sample_brief(pages=[PageRequest(slug="index", title="Welcome")]),
}


# --------------------------------------------------------------------------- determinism


def test_same_brief_gives_identical_output() -> None:
    brief = sample_brief()
    assert generate(brief) == generate(sample_brief())
    plan = offline_plan(brief)
    assert offline_plan(brief) == plan
    assert offline_content(brief, plan) == offline_content(brief, plan)


def test_different_businesses_get_different_palettes() -> None:
    assert site_palette(minimal_brief()) != site_palette(sample_brief())


# --------------------------------------------------------------------------- plan


def test_minimal_brief_gets_default_small_business_pages() -> None:
    plan = offline_plan(minimal_brief())
    slugs = [p.slug for p in plan.pages]
    assert slugs == ["index", "about", "services", "contact"]
    assert plan.nav == slugs
    assert plan.page("services").title == "What we do"
    assert plan.page("index").sections[0].kind == "hero"
    assert {s.kind for s in plan.page("contact").sections} >= {"contact", "hours"}
    assert plan.language == "en"
    assert plan.tone == minimal_brief().tone


def test_sample_plan_sections_follow_page_purpose() -> None:
    plan = offline_plan(sample_brief())
    home = [s.kind for s in plan.page("index").sections]
    assert home[0] == "hero" and home[-1] == "cta"
    assert "services" in home and "testimonials" in home
    assert plan.page("services").title == "Services"
    assert "faq" in [s.kind for s in plan.page("services").sections]
    assert plan.site_name == "Rosa's Bakery"


def test_custom_pages_without_index_get_a_home_page_first() -> None:
    brief = custom_pages_brief()
    plan = offline_plan(brief)
    assert [p.slug for p in plan.pages] == ["index", "menu", "story", "visit-us", "catering"]
    assert plan.nav == [p.slug for p in plan.pages]
    assert plan.page("menu").title == "Our menu"
    assert plan.page("visit-us").title == "Visit us"
    assert "services" in [s.kind for s in plan.page("menu").sections]
    assert "contact" in [s.kind for s in plan.page("visit-us").sections]
    assert "about" in [s.kind for s in plan.page("story").sections]


def test_custom_index_keeps_its_title_and_moves_first() -> None:
    pages = [PageRequest(slug="contact", title="Contact"), PageRequest(slug="index", title="Welcome")]
    brief = sample_brief(pages=pages)
    plan = offline_plan(brief)
    assert [p.slug for p in plan.pages] == ["index", "contact"]
    assert plan.page("index").nav_label == "Welcome"


def test_one_page_site_puts_contact_on_the_home_page() -> None:
    plan = offline_plan(BRIEFS["one-page"])
    assert [p.slug for p in plan.pages] == ["index"]
    assert "contact" in [s.kind for s in plan.page("index").sections]


def test_long_page_title_fits_nav_label() -> None:
    brief = sample_brief(pages=[PageRequest(slug="gallery", title="A very long page title " * 8)])
    plan = offline_plan(brief)
    assert all(len(p.nav_label) <= 40 for p in plan.pages)


# --------------------------------------------------------------------------- content


@pytest.mark.parametrize("name", sorted(BRIEFS))
def test_content_covers_the_plan(name: str) -> None:
    brief = BRIEFS[name]
    plan = offline_plan(brief)
    content = offline_content(brief, plan)
    content.check_against(plan)
    for page in content.pages:
        assert 0 < len(page.meta_description) <= 160
        assert page.meta_title


def test_content_is_written_from_the_brief() -> None:
    brief = sample_brief()
    plan = offline_plan(brief)
    content = offline_content(brief, plan)
    services = next(s for s in content.page("services").sections if s.section_id == "services")
    assert [i.title for i in services.items] == brief.services
    contact = next(s for s in content.page("contact").sections if s.section_id == "contact")
    texts = [i.text for i in contact.items]
    assert brief.contact.email in texts and brief.contact.phone in texts
    hero = content.page("index").sections[0]
    assert hero.body == brief.description
    assert hero.cta_target in plan.nav
    assert "lorem" not in content.model_dump_json().lower()


def test_meta_description_is_cut_on_a_word_boundary() -> None:
    words = ("Handmade furniture restored with patience and care " * 20).strip()
    brief = sample_brief(description=words)
    content = offline_content(brief, offline_plan(brief))
    for page in content.pages:
        assert len(page.meta_description) <= 160
        last = page.meta_description.split()[-1]
        assert last in words.split(), last


def test_clip_keeps_short_text_and_cuts_long_text_between_words() -> None:
    assert clip("Short text", 40) == "Short text"
    cut = clip("one two three four five six", 13)
    assert cut == "one two three"
    assert len(clip("x" * 300, 200)) == 200


# --------------------------------------------------------------------------- code


@pytest.mark.parametrize("name", sorted(BRIEFS))
def test_every_page_has_a_file_and_every_link_resolves(name: str) -> None:
    brief = BRIEFS[name]
    plan = offline_plan(brief)
    code = generate(brief)
    files = files_of(code)
    assert "assets/style.css" in files
    assert {page_file(p.slug) for p in plan.pages} <= set(files)
    for path, tree in pages_of(code).items():
        nav_links = [a.attributes.get("href") for a in tree.css("nav a")]
        assert nav_links == [page_file(s) for s in plan.nav]
        current = tree.css('nav a[aria-current="page"]')
        assert [a.attributes.get("href") for a in current] == [path]
        for node in tree.css("[href]"):
            href = node.attributes.get("href") or ""
            if href.startswith(("#", "tel:", "mailto:")):
                continue
            assert href.split("#")[0] in files, f"{path}: broken link {href}"


@pytest.mark.parametrize("name", sorted(BRIEFS))
def test_pages_are_well_formed_html5(name: str) -> None:
    brief = BRIEFS[name]
    for path, content in files_of(generate(brief)).items():
        if not path.endswith(".html"):
            continue
        assert content.startswith("<!DOCTYPE html>")
        tree = HTMLParser(content)
        html_node = tree.css_first("html")
        assert html_node is not None and html_node.attributes.get("lang") == brief.language
        assert tree.css_first('meta[charset="utf-8"]') is not None
        assert tree.css_first('meta[name="viewport"]') is not None
        assert tree.css_first("title") is not None and tree.css_first("title").text().strip()  # type: ignore[union-attr]
        assert tree.css_first('meta[name="description"]') is not None
        assert tree.css_first('link[rel="stylesheet"]').attributes.get("href") == "assets/style.css"  # type: ignore[union-attr]
        assert len(tree.css("h1")) == 1, path
        assert len(tree.css("main")) == 1
        assert tree.css_first("header nav") is not None
        assert tree.css("main section")
        footer = tree.css_first("footer")
        assert footer is not None and f"\u00a9 {brief.business_name}" in footer.text()


@pytest.mark.parametrize("name", sorted(BRIEFS))
def test_heading_levels_are_never_skipped(name: str) -> None:
    for path, tree in pages_of(generate(BRIEFS[name])).items():
        levels = [int((n.tag or "h0")[1]) for n in tree.css("h1, h2, h3, h4, h5, h6")]
        assert levels[0] == 1, path
        for before, after in itertools.pairwise(levels):
            assert after <= before + 1, f"{path}: h{before} followed by h{after}"
        for section in tree.css("main section"):
            assert section.css_first("h1, h2"), f"{path}: section without a heading"


def test_home_hero_has_a_call_to_action_to_a_planned_page() -> None:
    code = generate(sample_brief())
    tree = pages_of(code)["index.html"]
    button = tree.css_first("section.hero a.button")
    assert button is not None
    assert button.attributes.get("href") in files_of(code)
    assert tree.css_first("section.hero h1") is not None


def test_contact_details_become_links() -> None:
    tree = pages_of(generate(sample_brief()))["contact.html"]
    hrefs = [a.attributes.get("href") for a in tree.css("main a")]
    assert "tel:+351222000111" in hrefs
    assert "mailto:hello@rosasbakery.pt" in hrefs
    assert "Rua das Flores 12, 4050-262 Porto" in tree.css_first("main").text()  # type: ignore[union-attr]
    footer = tree.css_first("footer")
    assert footer is not None and "Tue-Sun" in footer.text()


@pytest.mark.parametrize("name", sorted(BRIEFS))
def test_no_external_resources_or_scripts(name: str) -> None:
    code = generate(BRIEFS[name])
    for path, content in files_of(code).items():
        if path.endswith(".css"):
            assert "url(" not in content and "@import" not in content
            continue
        tree = HTMLParser(content)
        assert tree.css("script") == [], path
        assert tree.css("iframe, img, object, embed") == []
        for node in tree.css("[src], [href]"):
            for attr in ("src", "href"):
                value = (node.attributes.get(attr) or "").strip().lower()
                assert not value.startswith(("http:", "https:", "//", "javascript:", "data:")), (path, value)
        assert not re.search(r"\son[a-z]+\s*=", content), path


def test_hostile_brief_text_is_escaped_everywhere() -> None:
    brief = sample_brief(
        business_name=HOSTILE_NAME,
        description=f"{HOSTILE_TEXT} We bake {HOSTILE_NAME}.",
        industry=HOSTILE_TEXT,
        location=HOSTILE_TEXT,
        audience=HOSTILE_NAME,
        services=[HOSTILE_NAME, HOSTILE_TEXT],
        pages=[PageRequest(slug="index", title=HOSTILE_TEXT), PageRequest(slug="menu", title=HOSTILE_NAME)],
        contact={"address": HOSTILE_TEXT, "hours": HOSTILE_NAME, "email": "a@b.pt"},
    )
    code = generate(brief)
    for path, content in files_of(code).items():
        assert "<script" not in content.lower(), path
        assert "<img" not in content.lower(), path
        assert HOSTILE_TEXT not in content and HOSTILE_NAME not in content
        assert "onerror=alert" not in content.replace("onerror=alert(1)&gt;", "")
        if path.endswith(".html"):
            tree = HTMLParser(content)
            assert tree.css("script, img") == []
            title = tree.css_first("title")
            assert title is not None and HOSTILE_NAME in title.text()  # shown as text, not run as markup
            assert "&lt;script&gt;" in content


# --------------------------------------------------------------------------- palette


def test_contrast_ratio_matches_wcag_reference_values() -> None:
    assert contrast_ratio("#000000", "#ffffff") == pytest.approx(21.0)
    assert contrast_ratio("#ffffff", "#000000") == pytest.approx(21.0)
    assert contrast_ratio("#777777", "#777777") == pytest.approx(1.0)
    assert contrast_ratio("#767676", "#ffffff") == pytest.approx(4.54, abs=0.01)


@pytest.mark.parametrize("brand", [None, "#ffff00", "#ffffff", "#000000", "#1e90ff", "#ff6600", "#00ff00", "#f6be51"])
def test_palette_is_readable(brand: str | None) -> None:
    palette = site_palette(sample_brief(brand_color=brand))
    assert contrast_ratio(palette.text, palette.background) >= 4.5
    assert contrast_ratio("#ffffff", palette.primary) >= 4.5
    assert contrast_ratio("#ffffff", palette.secondary) >= 4.5
    assert contrast_ratio(palette.primary, palette.background) >= 4.5
    assert contrast_ratio(palette.text, palette.accent) >= 4.5


def test_brand_colour_is_kept_when_already_readable() -> None:
    assert site_palette(sample_brief(brand_color="#1F4E79")).primary == "#1f4e79"


def test_stylesheet_uses_the_palette_and_is_responsive() -> None:
    brief = sample_brief()
    css = files_of(generate(brief))["assets/style.css"]
    palette = offline_plan(brief).palette
    for colour in (palette.primary, palette.secondary, palette.accent, palette.background, palette.text):
        assert colour in css
    assert "--primary:" in css and "@media" in css and ":focus-visible" in css
    assert "repeat(auto-fit, minmax(" in css and "position: sticky" in css
    assert "linear-gradient(" in css and "system-ui" in css


@pytest.mark.parametrize("name", [*BRIEFS, "hostile"])
def test_pages_pass_the_assemble_quality_checks(name: str) -> None:
    brief = BRIEFS.get(name) or sample_brief(
        business_name=HOSTILE_NAME, description=HOSTILE_TEXT, industry=HOSTILE_NAME
    )
    assert quality_report(generate(brief)) == {}
