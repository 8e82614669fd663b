"""The offline provider's brain: a site plan, copy and HTML/CSS built from a brief alone, with no model.

Pure functions (no I/O, clock or randomness): the same brief always yields byte-identical files.
"""

from __future__ import annotations

import colorsys
import hashlib
import html
import re
from collections.abc import Iterable
from dataclasses import dataclass
from string import Template

from worker.models import (
    Brief,
    ContentItem,
    GeneratedFile,
    PageContent,
    PagePlan,
    Palette,
    SectionContent,
    SectionKind,
    SectionPlan,
    SiteCode,
    SiteContent,
    SitePlan,
    page_file,
)

STYLESHEET = "assets/style.css"
WHITE = "#ffffff"
#: WCAG AA for body text.
MIN_CONTRAST = 4.5

# --------------------------------------------------------------------------- text helpers


def _e(text: str) -> str:
    """Every brief-derived string goes through here: the brief is untrusted input."""
    return html.escape(text, quote=True)


def clip(text: str, limit: int) -> str:
    """`text` squeezed into `limit` characters, cut on a word boundary when possible."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[: limit + 1].rsplit(" ", 1)[0] if " " in text[: limit + 1] else ""
    if len(cut) > limit or len(cut) < limit // 2:
        cut = text[:limit]  # one huge word: a hard cut reads better than an empty string
    return cut.rstrip(" ,;:-\u2013\u2014(") or text[:limit]


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]


def _lower_first(text: str) -> str:
    # Keep acronyms ("SEO audits") intact; only lowercase a capitalised ordinary word.
    if len(text) > 1 and text[0].isupper() and text[1].islower():
        return text[0].lower() + text[1:]
    return text


def _city(location: str) -> str:
    return location.rsplit(",", 1)[-1].strip() if location else ""


def _join_words(words: list[str]) -> str:
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def _offer_sentence(services: list[str]) -> str:
    listed = _join_words([_lower_first(x) for x in services])
    return f"{listed[:1].upper()}{listed[1:]}."


# --------------------------------------------------------------------------- colour


def _rgb(color: str) -> tuple[float, float, float]:
    h = color.lstrip("#")
    return int(h[0:2], 16) / 255, int(h[2:4], 16) / 255, int(h[4:6], 16) / 255


def _hex(r: float, g: float, b: float) -> str:
    return "#" + "".join(f"{round(min(1.0, max(0.0, c)) * 255):02x}" for c in (r, g, b))


def relative_luminance(color: str) -> float:
    """WCAG 2.x relative luminance of a `#rrggbb` colour."""
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in _rgb(color)]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast_ratio(a: str, b: str) -> float:
    """WCAG contrast ratio between two `#rrggbb` colours, from 1 to 21."""
    la, lb = sorted((relative_luminance(a), relative_luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def _hls(h: float, lightness: float, s: float) -> str:
    return _hex(*colorsys.hls_to_rgb(h % 1.0, min(1.0, max(0.0, lightness)), min(1.0, max(0.0, s))))


def _mix(a: str, b: str, weight_b: float) -> str:
    return _hex(*(x + (y - x) * weight_b for x, y in zip(_rgb(a), _rgb(b), strict=True)))


def _shade_until(color: str, against: Iterable[str], minimum: float, step: float) -> str:
    """Step lightness (down for step<0, up for step>0) until `color` contrasts with all of `against`."""
    others = list(against)
    h, lightness, s = colorsys.rgb_to_hls(*_rgb(color))
    while min(contrast_ratio(color, o) for o in others) < minimum:
        if (step < 0 and lightness <= 0.0) or (step > 0 and lightness >= 1.0):
            break
        lightness = min(1.0, max(0.0, lightness + step))
        color = _hls(h, lightness, s)
    return color


def site_palette(brief: Brief) -> Palette:
    """Brand colour if given, else a hue from the business's name; always WCAG AA readable."""
    seed = hashlib.sha256(f"{brief.business_name}|{brief.industry}".lower().encode()).digest()
    if brief.brand_color:
        hue, light, sat = colorsys.rgb_to_hls(*_rgb(brief.brand_color))
        base = brief.brand_color.lower()
    else:
        hue = int.from_bytes(seed[:2], "big") % 360 / 360
        light, sat = 0.40, 0.45 + seed[2] / 255 * 0.25
        base = _hls(hue, light, sat)
    background = _hls(hue, 0.985, min(sat, 0.4))
    text = _shade_until(_hls(hue, 0.13, min(sat, 0.3)), [background, WHITE], 7.0, -0.02)
    # White text sits on primary and secondary (hero, buttons, current nav item), and
    # primary also colours links on the page background.
    primary = _shade_until(base, [WHITE, background], MIN_CONTRAST, -0.02)
    secondary = _shade_until(_hls(hue + 0.09, min(light, 0.45), sat), [WHITE], MIN_CONTRAST, -0.02)
    # The accent is a light warm amber carrying dark text (CTA buttons): it stands out on
    # almost any brand hue; a brand that is itself amber gets its complement instead.
    accent_hue = 0.11 if min(abs(hue - 0.11), 1 - abs(hue - 0.11)) > 0.08 else hue + 0.5
    accent = _shade_until(_hls(accent_hue, 0.64, 0.9), [text], MIN_CONTRAST, 0.02)
    return Palette(primary=primary, secondary=secondary, accent=accent, background=background, text=text)


# --------------------------------------------------------------------------- plan

_PAGE_KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("contact", ("contact", "visit", "find-us", "find us", "location", "reach")),
    ("about", ("about", "story", "who-we-are", "who we are", "history", "mission")),
    ("faq", ("faq", "question")),
    ("pricing", ("pric", "rates", "plans", "packages")),
    ("team", ("team", "staff", "people")),
    ("gallery", ("gallery", "portfolio", "photo", "projects", "our-work", "our work")),
    ("services", ("service", "menu", "product", "offer", "what-we-do", "what we do", "shop", "treatment")),
)


def _page_kind(slug: str, title: str, purpose: str) -> str:
    # The slug is the most deliberate signal; a purpose may mention several topics.
    for text in (slug, title.lower(), purpose.lower()):
        for kind, words in _PAGE_KEYWORDS:
            if any(w in text for w in words):
                return kind
    return "generic"


def _section(sid: str, kind: SectionKind, heading: str, goal: str) -> SectionPlan:
    return SectionPlan(id=sid, kind=kind, heading=clip(heading, 200), goal=clip(goal, 500))


def _sections_for(kind: str, brief: Brief, title: str, with_contact: bool) -> list[SectionPlan]:
    name = brief.business_name
    cta = _section("cta", "cta", "Ready to get started?", "Turn interest into a visit, call or message.")
    if kind == "home":
        sections = [_section("hero", "hero", name, "Say at a glance who we are and what we do.")]
        if brief.services:
            sections.append(_section("services", "services", "What we offer", "Show the main services."))
        sections += [
            _section("why-us", "features", f"Why choose {name}", "Give three reasons to pick us."),
            _section("testimonials", "testimonials", "What our customers say", "Build trust."),
        ]
        if with_contact:  # a one-page site still needs a way to reach the business
            sections += [
                _section("contact", "contact", "Get in touch", "Make contacting us effortless."),
                _section("hours", "hours", "Opening hours", "Say when we are available."),
            ]
        return [*sections, cta]
    if kind == "about":
        return [
            _section("about", "about", f"About {name}", "Tell the story behind the business."),
            _section("values", "features", "What we stand for", "Show the values customers can expect."),
            cta,
        ]
    if kind == "services":
        return [
            _section("services", "services", "What we offer", "Describe each service clearly."),
            _section("faq", "faq", "Frequently asked questions", "Answer the usual questions up front."),
            cta,
        ]
    if kind == "contact":
        return [
            _section("contact", "contact", "Get in touch", "Make contacting us effortless."),
            _section("hours", "hours", "Opening hours", "Say when we are available."),
        ]
    # Headings differ from the page title, which the page banner already shows as the h1.
    single: dict[str, tuple[SectionKind, str]] = {
        "faq": ("faq", "Your questions, answered"),
        "pricing": ("pricing", "Prices and quotes"),
        "team": ("team", "Meet the team"),
        "gallery": ("gallery", "Our work"),
    }
    if kind in single:
        own, heading = single[kind]
        return [_section(kind, own, heading, f"Cover {title.lower()}."), cta]
    return [_section("intro", "text", f"{title} at {name}", f"Introduce {title.lower()}."), cta]


def offline_plan(brief: Brief) -> SitePlan:
    """The site's structure, palette and navigation, derived from the brief alone."""
    requested = [(p.slug, p.title, p.purpose) for p in brief.pages]
    if not requested:
        requested = [
            ("index", "Home", ""),
            ("about", "About us", ""),
            ("services", "Services" if brief.services else "What we do", ""),
            ("contact", "Contact", ""),
        ]
    home = [r for r in requested if r[0] == "index"] or [("index", "Home", "")]
    requested = home + [r for r in requested if r[0] != "index"]
    kinds = ["home" if slug == "index" else _page_kind(slug, title, purpose) for slug, title, purpose in requested]
    pages = [
        PagePlan(
            slug=slug,
            title=clip(title, 200),
            nav_label=clip(title, 40),
            sections=_sections_for(kind, brief, clip(title, 200), with_contact="contact" not in kinds),
        )
        for (slug, title, _purpose), kind in zip(requested, kinds, strict=True)
    ]
    return SitePlan(
        site_name=brief.business_name,
        tagline=_tagline(brief),
        tone=brief.tone,
        language=brief.language,
        palette=site_palette(brief),
        pages=pages,
        nav=[p.slug for p in pages],
    )


def _tagline(brief: Brief) -> str:
    city = _city(brief.location)
    if brief.industry:
        industry = brief.industry.strip()
        return clip(f"{industry[:1].upper()}{industry[1:]}{f' in {city}' if city else ''}", 200)
    return clip(_sentences(brief.description)[0] if _sentences(brief.description) else "", 120)


# --------------------------------------------------------------------------- content


@dataclass(frozen=True)
class _Ctx:
    brief: Brief
    plan: SitePlan
    page: PagePlan
    contact_slug: str
    services_slug: str

    @property
    def name(self) -> str:
        return self.brief.business_name


def _meta_description(text: str) -> str:
    return clip(text, 160) or "Welcome"


def _service_text(i: int, service: str, ctx: _Ctx) -> str:
    trade = _lower_first(ctx.brief.industry) if ctx.brief.industry else "what they do"
    templates = (
        f"{service} from {ctx.name}, made with care and attention to detail.",
        f"Ask us about {_lower_first(service)}: we will help you choose what fits your needs.",
        f"{service} done properly, by people who know {trade}.",
        f"Reliable {_lower_first(service)} with a {_lower_first(ctx.brief.tone or 'friendly')} approach.",
    )
    return templates[i % len(templates)]


def _services(ctx: _Ctx) -> list[ContentItem]:
    if ctx.brief.services:
        return [ContentItem(title=s, text=_service_text(i, s, ctx)) for i, s in enumerate(ctx.brief.services)]
    return [
        ContentItem(title="Advice", text="A friendly first conversation to understand exactly what you need."),
        ContentItem(title="Tailored work", text=f"{ctx.name} shapes every job around you, not a template."),
        ContentItem(title="Ongoing support", text="We stay available after the work is done, for anything you need."),
    ]


def _contact_items(brief: Brief) -> list[ContentItem]:
    c = brief.contact
    rows = [("Address", c.address or brief.location), ("Phone", c.phone), ("Email", c.email)]
    return [ContentItem(title=t, text=v) for t, v in rows if v]


def _hours_items(hours: str) -> list[ContentItem]:
    items = []
    for part in re.split(r"[;\n]|,\s*(?=[A-Za-z])", hours):
        part = part.strip()
        if not part:
            continue
        m = re.match(r"^([A-Za-z][^0-9]*?)[\s:]+(\d.*)$", part)
        items.append(
            ContentItem(title=clip(m.group(1), 200), text=m.group(2)) if m else ContentItem(title=clip(part, 200))
        )
    return items[:24]


def _copy(ctx: _Ctx, section: SectionPlan) -> SectionContent:
    b, name, kind = ctx.brief, ctx.name, section.kind
    city = _city(b.location)
    body, cta_label, cta_target = "", "", ""
    items: list[ContentItem] = []
    if kind == "hero":
        body = clip(b.description, 600)
        if ctx.services_slug and ctx.services_slug != ctx.page.slug:
            label = _lower_first(ctx.plan.page(ctx.services_slug).nav_label)
            cta_label = clip(f"See {label}" if label.startswith("our ") else f"See our {label}", 60)
            cta_target = ctx.services_slug
        else:
            cta_label, cta_target = "Get in touch", ctx.contact_slug
    elif kind in ("services", "pricing"):
        body = f"Here is what {name} can do for you{f' in {city}' if city else ''}."
        items = _services(ctx)
        if kind == "pricing":
            body = "Every request is a little different, so we price it around what you need."
            items = [ContentItem(title=i.title, text="Ask us for a clear quote before anything starts.") for i in items]
    elif kind == "features":
        if section.id == "values":
            body = f"A few things {name} will not compromise on."
            items = [
                ContentItem(title="Quality first", text="We would rather do fewer things well than many things badly."),
                ContentItem(title="Honest advice", text="Clear prices and straight answers, always."),
                ContentItem(
                    title="Part of the community",
                    text=f"We are proud to serve our neighbours{f' in {city}' if city else ''}.",
                ),
            ]
        else:
            local = (
                f"We are based in {b.location} and know our customers by name."
                if b.location
                else ("A small team that treats every customer personally.")
            )
            made_for = (
                f"We work for {_lower_first(clip(b.audience, 300))}, so what you need comes first."
                if b.audience
                else "We listen first, then tailor what we do to what you actually need."
            )
            items = [
                ContentItem(title="Local and personal", text=local),
                ContentItem(title="Made for you", text=made_for),
                ContentItem(
                    title="Quality you can count on",
                    text="From the first hello to the last detail, we take pride in doing things properly.",
                ),
            ]
    elif kind == "testimonials":
        favourite = _lower_first(b.services[0]) if b.services else "service"
        items = [
            ContentItem(
                title="A regular customer",
                text=f"Always a warm welcome and great results. {name} is our first choice"
                f"{f' in {city}' if city else ''}.",
            ),
            ContentItem(title="A happy client", text=f"The {favourite} is excellent, exactly what we hoped for."),
            ContentItem(
                title="A local family",
                text="Professional, reliable and easy to talk to. We recommend them to friends and family.",
            ),
        ]
    elif kind in ("about", "text"):
        extra = []
        if kind == "text":
            extra.append(f"{ctx.page.title} is part of what {name} offers.")
        if kind == "about" and b.services:
            extra.append(f"Today we offer {_join_words([_lower_first(x) for x in b.services])}.")
        if b.audience:
            extra.append(f"We work for {_lower_first(clip(b.audience, 300))}.")
        if b.location:
            extra.append(f"You will find us at {b.location}.")
        if kind == "about":
            extra.append(
                f"Whether it is your first visit or your hundredth, expect a {_lower_first(b.tone)} welcome."
                if b.tone
                else "Whether it is your first visit or your hundredth, you are welcome here."
            )
        body = clip(b.description + ("\n\n" + " ".join(extra) if extra else ""), 5000)
    elif kind == "faq":
        c = b.contact
        where = c.address or b.location
        reach = [f"call {c.phone}" if c.phone else "", f"email {c.email}" if c.email else ""]
        items = [
            ContentItem(
                title="What do you offer?",
                text=(clip(_offer_sentence(b.services), 2000) if b.services else f"{name}: {clip(b.description, 300)}"),
            ),
            ContentItem(
                title="Where can I find you?",
                text=f"We are at {where}." if where else "Get in touch and we will tell you where to find us.",
            ),
            ContentItem(
                title="When are you open?", text=c.hours or "Get in touch and we will find a time that works for you."
            ),
            ContentItem(
                title="How do I get in touch?",
                text=(
                    f"You can {_join_words([r for r in reach if r])}, or visit our contact page."
                    if any(reach)
                    else "Use the details on our contact page."
                ),
            ),
        ]
    elif kind == "team":
        body = f"The people behind {name} are the reason customers come back."
        items = [
            ContentItem(title="The founders", text="They started the business and still look after every detail."),
            ContentItem(title="Our team", text="Friendly, experienced and always happy to help."),
        ]
    elif kind == "gallery":
        body = f"A look at the work of {name}."
        items = [ContentItem(title=s.title) for s in _services(ctx)]
    elif kind == "contact":
        body = "We would love to hear from you. Call, write or drop by, whichever suits you best."
        items = _contact_items(b)
    elif kind == "hours":
        body = (
            "Here is when you can find us."
            if b.contact.hours
            else ("Get in touch and we will find a time that works for you.")
        )
        items = _hours_items(b.contact.hours)
    elif kind == "cta":
        body = f"Tell {name} what you need and we will get back to you quickly."
        target = ctx.contact_slug if ctx.contact_slug != ctx.page.slug else ""
        cta_label, cta_target = ("Contact us", target) if target else ("", "")
    return SectionContent(
        section_id=section.id,
        heading=section.heading,
        body=body,
        items=items,
        cta_label=cta_label,
        cta_target=cta_target,
    )


def offline_content(brief: Brief, plan: SitePlan) -> SiteContent:
    """Copy for every planned section, written from the brief; satisfies `check_against(plan)`."""

    def first_with(kinds: tuple[str, ...]) -> str:
        return next((p.slug for p in plan.pages if p.slug != "index" and any(s.kind in kinds for s in p.sections)), "")

    contact_slug = first_with(("contact",)) or "index"
    services_slug = first_with(("services", "pricing"))
    pages = []
    for page in plan.pages:
        ctx = _Ctx(brief, plan, page, contact_slug, services_slug)
        if page.slug == "index":
            meta_title = f"{plan.site_name} | {plan.tagline}" if plan.tagline else plan.site_name
            meta_description = brief.description
        else:
            meta_title = f"{page.title} | {plan.site_name}"
            meta_description = f"{page.title} at {plan.site_name}. {brief.description}"
        pages.append(
            PageContent(
                slug=page.slug,
                meta_title=clip(meta_title, 70) if len(meta_title) > 70 else meta_title,
                meta_description=_meta_description(meta_description),
                sections=[_copy(ctx, s) for s in page.sections],
            )
        )
    return SiteContent(pages=pages)


# --------------------------------------------------------------------------- code

_EMAIL = re.compile(r"^[^@\s<>\"']+@[^@\s<>\"']+\.[^@\s<>\"']+$")
_PHONE = re.compile(r"^\+?[0-9().\- ]{6,40}$")
_ICON_CHECK = (
    '<svg viewBox="0 0 24 24" width="22" height="22" aria-hidden="true" focusable="false">'
    '<path d="M5 12.5l4.2 4.2L19 7" fill="none" stroke="currentColor" stroke-width="2.4" '
    'stroke-linecap="round" stroke-linejoin="round"/></svg>'
)
_ICON_QUOTE = (
    '<svg viewBox="0 0 32 32" width="32" height="32" aria-hidden="true" focusable="false">'
    '<path fill="currentColor" d="M6 18c0-6 3-10 9-11v4c-3 1-4 3-4 5h4v9H6v-7zm14 0c0-6 3-10 '
    '9-11v4c-3 1-4 3-4 5h4v9h-9v-7z"/></svg>'
)
_HERO_ART = (
    '<svg class="hero-art" viewBox="0 0 400 400" aria-hidden="true" focusable="false">'
    '<circle cx="300" cy="110" r="150" fill="currentColor" opacity=".10"/>'
    '<circle cx="130" cy="300" r="80" fill="currentColor" opacity=".08"/>'
    '<circle cx="330" cy="300" r="40" fill="currentColor" opacity=".12"/></svg>'
)
_TILE_ART = (
    '<svg viewBox="0 0 120 90" width="120" height="90" aria-hidden="true" focusable="false">'
    '<rect x="8" y="8" width="104" height="74" rx="10" fill="none" stroke="currentColor" stroke-width="4"/>'
    '<circle cx="40" cy="34" r="9" fill="currentColor"/>'
    '<path d="M14 76l30-28 18 16 16-12 30 24z" fill="currentColor" opacity=".7"/></svg>'
)


def _paragraphs(text: str, cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return "".join(f"<p{attr}>{_e(p)}</p>" for p in re.split(r"\n\s*\n|\n", text) if p.strip())


def _contact_value(text: str) -> str:
    if _EMAIL.fullmatch(text):
        return f'<a href="mailto:{_e(text)}">{_e(text)}</a>'
    if _PHONE.fullmatch(text) and sum(ch.isdigit() for ch in text) >= 6:
        return f'<a href="tel:{_e(re.sub(r"[^0-9+]", "", text))}">{_e(text)}</a>'
    return _e(text)


def _cta_href(sc: SectionContent, slugs: list[str]) -> str:
    # Only planned pages become links: a model-written target can never smuggle in a URL.
    return page_file(sc.cta_target) if sc.cta_target in slugs else ""


def _button(sc: SectionContent, slugs: list[str]) -> str:
    href = _cta_href(sc, slugs)
    if not href:
        return ""
    return f'<p class="actions"><a class="button" href="{_e(href)}">{_e(sc.cta_label or "Learn more")}</a></p>'


def _cards(items: list[ContentItem], icon: bool = True) -> str:
    cards = []
    for item in items:
        mark = f'<span class="card-icon">{_ICON_CHECK}</span>' if icon else ""
        title = f"<h3>{_e(item.title)}</h3>" if item.title else ""
        cards.append(f'<li class="card">{mark}{title}{_paragraphs(item.text)}</li>')
    return f'<ul class="cards" role="list">{"".join(cards)}</ul>' if cards else ""


def _section_inner(kind: str, sc: SectionContent, slugs: list[str]) -> str:
    intro = _paragraphs(sc.body, "section-intro")
    if kind == "testimonials":
        quotes = "".join(
            f'<figure class="quote">{_ICON_QUOTE}<blockquote>{_paragraphs(i.text)}</blockquote>'
            f"<figcaption>{_e(i.title)}</figcaption></figure>"
            for i in sc.items
        )
        return f'{intro}<div class="quotes">{quotes}</div>'
    if kind == "faq":
        qa = "".join(f"<details><summary>{_e(i.title)}</summary>{_paragraphs(i.text)}</details>" for i in sc.items)
        return f'{intro}<div class="faq">{qa}</div>'
    if kind == "gallery":
        tiles = "".join(
            f'<figure class="tile"><div class="tile-art">{_TILE_ART}</div>'
            f"<figcaption>{_e(i.title or i.text)}</figcaption></figure>"
            for i in sc.items
        )
        return f'{intro}<div class="gallery">{tiles}</div>'
    if kind == "contact":
        rows = "".join(
            f'<div class="contact-item"><dt>{_e(i.title)}</dt><dd>{_contact_value(i.text)}</dd></div>' for i in sc.items
        )
        return f'{intro}<address class="contact"><dl class="contact-grid">{rows}</dl></address>'
    if kind == "hours":
        rows = "".join(f"<div><dt>{_e(i.title)}</dt><dd>{_e(i.text)}</dd></div>" for i in sc.items)
        return intro + (f'<dl class="hours">{rows}</dl>' if rows else "")
    if kind in ("about", "text"):
        return f'<div class="prose">{_paragraphs(sc.body)}</div>{_cards(sc.items, icon=False)}'
    return intro + _cards(sc.items, icon=kind != "pricing")


def _render_section(sp: SectionPlan, sc: SectionContent, slugs: list[str], heading_tag: str, eyebrow: str) -> str:
    sid = _e(sp.id)
    if sp.kind == "hero":
        return (
            f'<section class="hero" id="{sid}" aria-labelledby="{sid}-title">{_HERO_ART}<div class="container">'
            f'{eyebrow}<{heading_tag} id="{sid}-title">{_e(sc.heading)}</{heading_tag}>'
            f"{_paragraphs(sc.body, 'lead')}{_button(sc, slugs)}</div></section>"
        )
    if sp.kind == "cta":
        return (
            f'<section class="section cta-band" id="{sid}" aria-labelledby="{sid}-title"><div class="container">'
            f'<div class="cta-box"><div><h2 id="{sid}-title">{_e(sc.heading)}</h2>{_paragraphs(sc.body)}</div>'
            f"{_button(sc, slugs)}</div></div></section>"
        )
    return (
        f'<section class="section section-{_e(sp.kind)}" id="{sid}" aria-labelledby="{sid}-title">'
        f'<div class="container"><h2 id="{sid}-title">{_e(sc.heading)}</h2>'
        f"{_section_inner(sp.kind, sc, slugs)}{_button(sc, slugs)}</div></section>"
    )


def _footer(plan: SitePlan, content: SiteContent) -> str:
    details: list[str] = []
    for page in plan.pages:
        written = {s.section_id: s for s in content.page(page.slug).sections}
        for sp in page.sections:
            sc = written.get(sp.id)
            if sc and sp.kind == "contact" and not details:
                details = [f"<li>{_contact_value(i.text)}</li>" for i in sc.items if i.text]
            if sc and sp.kind == "hours" and sc.items and len(details) < 5:
                details += [f"<li>{_e(' '.join(x for x in (i.title, i.text) if x))}</li>" for i in sc.items[:3]]
    links = "".join(f'<li><a href="{_e(page_file(p.slug))}">{_e(p.nav_label)}</a></li>' for p in plan.pages)
    contact = (
        (f'<div><p class="footer-title">Contact</p><ul class="footer-list" role="list">{"".join(details)}</ul></div>')
        if details
        else ""
    )
    return (
        f'<footer class="site-footer"><div class="container footer-grid">'
        f'<div><p class="footer-brand">{_e(plan.site_name)}</p><p>{_e(plan.tagline)}</p></div>'
        f'{contact}<div><p class="footer-title">Explore</p><ul class="footer-list" role="list">{links}</ul></div>'
        f'</div><div class="container footer-bottom"><p>&copy; {_e(plan.site_name)}. All rights reserved.</p>'
        "</div></footer>"
    )


def _page_html(plan: SitePlan, content: SiteContent, page: PagePlan, footer: str) -> str:
    written = content.page(page.slug)
    by_id = {s.section_id: s for s in written.sections}
    slugs = [p.slug for p in plan.pages]
    current = ' aria-current="page"'
    nav = "".join(
        f'<li><a href="{_e(page_file(p.slug))}"{current if p.slug == page.slug else ""}>{_e(p.nav_label)}</a></li>'
        for p in (plan.page(s) for s in plan.nav)
    )
    parts: list[str] = []
    planned = [(sp, by_id[sp.id]) for sp in page.sections if sp.id in by_id]
    # Exactly one h1: the leading hero's heading, else a page banner with the page title.
    has_hero_h1 = bool(planned) and planned[0][0].kind == "hero"
    if not has_hero_h1:
        parts.append(
            f'<div class="page-banner"><div class="container"><p class="eyebrow">{_e(plan.site_name)}</p>'
            f"<h1>{_e(page.title)}</h1></div></div>"
        )
    eyebrow = f'<p class="eyebrow">{_e(plan.tagline)}</p>' if plan.tagline else ""
    for i, (sp, sc) in enumerate(planned):
        tag = "h1" if i == 0 and has_hero_h1 else "h2"
        parts.append(_render_section(sp, sc, slugs, tag, eyebrow))
    initial = next((ch for ch in plan.site_name if ch.isalnum()), "·").upper()
    body = "\n".join(parts)
    return (
        f'<!DOCTYPE html>\n<html lang="{_e(plan.language)}">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(written.meta_title)}</title>\n"
        f'<meta name="description" content="{_e(written.meta_description)}">\n'
        f'<meta name="theme-color" content="{_e(plan.palette.primary)}">\n'
        f'<link rel="stylesheet" href="{STYLESHEET}">\n</head>\n<body>\n'
        '<a class="skip-link" href="#main">Skip to content</a>\n'
        f'<header class="site-header"><div class="container header-inner">'
        f'<a class="brand" href="index.html"><span class="brand-mark" aria-hidden="true">{_e(initial)}</span>'
        f'<span class="brand-name">{_e(plan.site_name)}</span></a>'
        f'<nav aria-label="Main"><ul role="list">{nav}</ul></nav></div></header>\n'
        f'<main id="main">\n{body}\n</main>\n{footer}\n</body>\n</html>\n'
    )


_CSS = Template("""\
:root {
  --primary: $primary;
  --secondary: $secondary;
  --accent: $accent;
  --on-accent: $text;
  --bg: $background;
  --surface: #ffffff;
  --text: $text;
  --muted: $muted;
  --border: $border;
  --tint: $tint;
  --radius: 16px;
  --shadow: 0 1px 2px rgb(16 24 40 / 6%), 0 10px 28px rgb(16 24 40 / 8%);
  --max: 1120px;
  --font: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Noto Sans", sans-serif;
}
*, *::before, *::after { box-sizing: border-box; }
html { scroll-behavior: smooth; -webkit-text-size-adjust: 100%; }
body { margin: 0; font-family: var(--font); font-size: 1.0625rem; line-height: 1.65; color: var(--text);
  background: var(--bg); -webkit-font-smoothing: antialiased; }
h1, h2, h3 { line-height: 1.15; letter-spacing: -0.015em; }
p { margin: 0 0 1rem; }
a { color: var(--primary); text-underline-offset: 0.2em; }
a:hover { text-decoration-thickness: 2px; }
:focus-visible { outline: 3px solid var(--primary); outline-offset: 3px; border-radius: 6px; }
.hero :focus-visible, .cta-box :focus-visible, .site-footer :focus-visible { outline-color: #ffffff; }
.container { width: min(100% - 2.5rem, var(--max)); margin-inline: auto; }
.skip-link { position: absolute; left: -999px; top: 0.75rem; z-index: 100; padding: 0.6rem 1rem;
  background: var(--text); color: #ffffff; border-radius: 8px; }
.skip-link:focus { left: 0.75rem; }

/* header */
.site-header { position: sticky; top: 0; z-index: 50; background: rgb(255 255 255 / 92%);
  backdrop-filter: saturate(180%) blur(10px); border-bottom: 1px solid var(--border); }
.header-inner { display: flex; align-items: center; justify-content: space-between; gap: 1rem;
  flex-wrap: wrap; min-height: 4.5rem; }
.brand { display: inline-flex; align-items: center; gap: 0.65rem; color: var(--text); font-weight: 800;
  font-size: 1.2rem; text-decoration: none; letter-spacing: -0.01em; }
.brand-mark { display: grid; place-items: center; width: 2.4rem; height: 2.4rem; border-radius: 12px;
  background: linear-gradient(135deg, var(--primary), var(--secondary)); color: #ffffff; font-size: 1.15rem; }
.site-header ul { display: flex; flex-wrap: wrap; gap: 0.25rem; margin: 0; padding: 0; list-style: none; }
.site-header nav a { display: block; padding: 0.5rem 0.95rem; border-radius: 999px; color: var(--text);
  font-weight: 600; text-decoration: none; }
.site-header nav a:hover { background: var(--tint); }
.site-header nav a[aria-current="page"] { background: var(--primary); color: #ffffff; }

/* hero and page banner */
.hero, .page-banner { position: relative; overflow: hidden; color: #ffffff;
  background: linear-gradient(135deg, var(--primary) 0%, var(--secondary) 100%); }
.hero { padding: clamp(4rem, 11vw, 8rem) 0; }
.page-banner { padding: clamp(2.75rem, 7vw, 4.5rem) 0; }
.hero .container, .page-banner .container { position: relative; }
.hero-art { position: absolute; right: -6rem; top: -5rem; width: min(38rem, 80vw); color: #000000;
  pointer-events: none; }
.hero h1 { font-size: clamp(2.5rem, 6vw, 4.25rem); margin: 0.5rem 0 1.25rem; max-width: 16ch; }
.page-banner h1 { font-size: clamp(2.1rem, 4.5vw, 3.25rem); margin: 0.5rem 0 0; }
.lead { font-size: clamp(1.1rem, 2vw, 1.3rem); max-width: 58ch; }
/* Overlays on white text darken, never lighten: primary and secondary only just reach AA against white. */
.eyebrow { display: inline-block; margin: 0; padding: 0.3rem 0.85rem; border-radius: 999px;
  background: rgb(0 0 0 / 16%); font-size: 0.85rem; font-weight: 700; letter-spacing: 0.06em;
  text-transform: uppercase; }
.actions { margin: 1.75rem 0 0; }
.button { display: inline-flex; align-items: center; gap: 0.5rem; padding: 0.9rem 1.6rem; border-radius: 999px;
  background: var(--accent); color: var(--on-accent); font-weight: 700; text-decoration: none;
  box-shadow: 0 6px 18px rgb(0 0 0 / 18%); transition: transform 0.15s ease, box-shadow 0.15s ease; }
.button:hover { transform: translateY(-2px); box-shadow: 0 10px 24px rgb(0 0 0 / 22%); }

/* sections */
.section { padding: clamp(3.5rem, 8vw, 6rem) 0; }
.section:nth-of-type(even) { background: var(--surface); }
.section h2 { font-size: clamp(1.8rem, 3.4vw, 2.5rem); margin: 0 0 1rem; }
.section h2::after { content: ""; display: block; width: 3rem; height: 4px; margin-top: 0.75rem;
  border-radius: 2px; background: var(--primary); }
.section-intro, .prose p { max-width: 65ch; color: var(--muted); font-size: 1.1rem; }
.prose p:first-child { color: var(--text); font-size: 1.2rem; }
.cards, .quotes, .gallery { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(100%, 15rem), 1fr));
  gap: 1.25rem; margin: 2.25rem 0 0; padding: 0; list-style: none; }
.card, .quote, .tile { margin: 0; padding: 1.6rem; background: var(--surface); border: 1px solid var(--border);
  border-radius: var(--radius); box-shadow: var(--shadow); }
.section:nth-of-type(even) .card, .section:nth-of-type(even) .quote { background: var(--bg); }
.card h3 { margin: 1rem 0 0.4rem; font-size: 1.2rem; }
.card p { margin: 0; color: var(--muted); }
.card-icon { display: grid; place-items: center; width: 2.75rem; height: 2.75rem; border-radius: 12px;
  background: var(--tint); color: var(--primary); }
.quote { display: flex; flex-direction: column; gap: 0.75rem; color: var(--primary); }
.quote blockquote { margin: 0; color: var(--text); font-size: 1.08rem; }
.quote figcaption { margin-top: auto; color: var(--muted); font-weight: 700; }
.tile { padding: 0; overflow: hidden; }
.tile-art { display: grid; place-items: center; aspect-ratio: 4 / 3; color: var(--primary);
  background: linear-gradient(135deg, var(--tint), var(--surface)); }
.tile figcaption { padding: 1rem 1.25rem; font-weight: 700; }
.faq { display: grid; gap: 0.75rem; max-width: 52rem; margin-top: 2rem; }
.faq details { padding: 1rem 1.25rem; background: var(--surface); border: 1px solid var(--border);
  border-radius: 12px; }
.section:nth-of-type(even) .faq details { background: var(--bg); }
.faq summary { cursor: pointer; font-weight: 700; }
.faq details p { margin: 0.75rem 0 0; color: var(--muted); }
.contact { font-style: normal; }
.contact-grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(100%, 16rem), 1fr));
  gap: 1.25rem; margin: 2rem 0 0; }
.contact-item { padding: 1.4rem 1.5rem; background: var(--surface); border: 1px solid var(--border);
  border-radius: var(--radius); box-shadow: var(--shadow); }
.contact-item dt, .hours dt { color: var(--muted); font-size: 0.85rem; font-weight: 700; letter-spacing: 0.06em;
  text-transform: uppercase; }
.contact-item dd { margin: 0.35rem 0 0; font-size: 1.1rem; font-weight: 600; overflow-wrap: anywhere; }
.hours { max-width: 32rem; margin: 1.5rem 0 0; }
.hours div { display: flex; justify-content: space-between; gap: 1rem; padding: 0.8rem 0;
  border-bottom: 1px dashed var(--border); }
.hours dt { font-size: 1rem; letter-spacing: 0; text-transform: none; color: var(--text); }
.hours dd { margin: 0; font-weight: 700; }
.cta-band { background: transparent !important; }
.cta-box { display: flex; flex-wrap: wrap; align-items: center; justify-content: space-between; gap: 1.5rem;
  padding: clamp(2rem, 5vw, 3.5rem); border-radius: 24px; color: #ffffff; box-shadow: var(--shadow);
  background: linear-gradient(135deg, var(--secondary), var(--primary)); }
.cta-box h2::after { background: var(--accent); }
.cta-box p { margin: 0; max-width: 50ch; }
.cta-box .actions { margin: 0; }

/* footer */
.site-footer { margin-top: 2rem; padding: 3.5rem 0 1.5rem; background: var(--text); color: rgb(255 255 255 / 86%); }
.site-footer a { color: #ffffff; }
.footer-grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(100%, 14rem), 1fr)); gap: 2rem; }
.footer-brand { color: #ffffff; font-size: 1.25rem; font-weight: 800; margin-bottom: 0.5rem; }
.footer-title { color: #ffffff; font-weight: 700; margin-bottom: 0.75rem; }
.footer-list { margin: 0; padding: 0; list-style: none; display: grid; gap: 0.4rem; }
.footer-bottom { margin-top: 2.5rem; padding-top: 1.25rem; border-top: 1px solid rgb(255 255 255 / 15%);
  font-size: 0.9rem; }
.footer-bottom p { margin: 0; }

@media (max-width: 680px) {
  .site-header { position: static; }
  .header-inner { flex-direction: column; align-items: flex-start; padding: 0.85rem 0; }
  .site-header nav, .site-header ul { width: 100%; flex-direction: column; }
  .cta-box { flex-direction: column; align-items: flex-start; }
}
@media (prefers-reduced-motion: reduce) {
  html { scroll-behavior: auto; }
  .button { transition: none; }
}
""")


def site_css(palette: Palette) -> str:
    """The stylesheet, with the palette as CSS custom properties."""
    muted = _shade_until(_mix(palette.text, palette.background, 0.3), [palette.background, WHITE], MIN_CONTRAST, -0.02)
    return _CSS.substitute(
        primary=palette.primary,
        secondary=palette.secondary,
        accent=palette.accent,
        background=palette.background,
        text=palette.text,
        muted=muted,
        border=_mix(palette.text, palette.background, 0.88),
        tint=_mix(palette.primary, WHITE, 0.88),
    )


def offline_code(plan: SitePlan, content: SiteContent) -> SiteCode:
    """One HTML file per planned page plus `assets/style.css`, every brief-derived string escaped."""
    footer = _footer(plan, content)
    files = [GeneratedFile(path=page_file(p.slug), content=_page_html(plan, content, p, footer)) for p in plan.pages]
    files.append(GeneratedFile(path=STYLESHEET, content=site_css(plan.palette)))
    return SiteCode(files=files)


def offline_site(brief: Brief) -> SiteCode:
    """All three phases at once, for previews and tests."""
    plan = offline_plan(brief)
    return offline_code(plan, offline_content(brief, plan))


__all__ = [
    "contrast_ratio",
    "offline_code",
    "offline_content",
    "offline_plan",
    "offline_site",
    "relative_luminance",
    "site_css",
    "site_palette",
]
