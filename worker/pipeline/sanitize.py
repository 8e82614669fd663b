"""What a published page may hold: an allow-list of elements, attributes and URLs, enforced on every page.

A page runs no script the model wrote, contacts no host the operator did not allow
(`output.allowed_embed_hosts`), posts forms only to itself or an allowed host, and cannot send its
visitors elsewhere by itself (no meta refresh, no `<base>`). `clean_page` rebuilds each page:

- the `<body>` is the serialisation of ammonia (the `nh3` binding), which parses the whole document
  as a browser with scripting on would (so `<noscript>` content is raw text, as in the browser that
  shows the page) and keeps only the elements and attributes listed below; the URL attributes go
  through `_attribute`, which keeps navigation links (relative, `#`, http, https, mailto, tel),
  resources only from the site or an allowed host (and raster `data:` images), form targets only
  on the site or an allowed host;
- the `<head>` is written by this module from the page's `<title>`, its `<meta>` description,
  viewport and the like, its `<link>` stylesheets and icons and its `<style>` (CSS cleaned by
  `clean_css`), every value escaped; `<meta http-equiv>` (refresh, a CSP of the model's),
  `<meta name=referrer>` and `<base>` are dropped; it starts with `<meta charset>`, a
  Content-Security-Policy meta tag (the backstop: `csp`) and our own referrer policy;
- `<script src>` from an allowed host is the only script kept: written by this module, at the end
  of the head or the body it was in (document order kept), never with inline code.

`clean_page` is a fixed point: cleaning its output again gives the same bytes. What it removed is
read from a second, independent parse (lexbor's) of the page as the model wrote it, one line each,
for the `site.warning` rows; that list is a report, the allow-list above is what holds.
"""

from __future__ import annotations

import functools
import html
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import nh3
import tinycss2
import tinycss2.ast
from selectolax.lexbor import LexborHTMLParser as HTMLParser
from selectolax.lexbor import LexborNode

from worker.site_headers import normalize_hosts as normalize_hosts  # one definition, shared with the API

ALLOWED_HOSTS_SETTING = "output.allowed_embed_hosts"

# --------------------------------------------------------------------------- the allow-list

_SVG_TAGS = frozenset(
    "svg g path circle ellipse rect line polyline polygon defs lineargradient radialgradient stop".split()
)
#: Elements a page's body may hold (HTML and inline SVG; no MathML, no <use>, no SVG animation).
BODY_TAGS = (
    frozenset(
        "a abbr address article aside audio b bdi bdo blockquote br button caption cite code col colgroup data "
        "dd del details dfn div dl dt em fieldset figcaption figure footer form h1 h2 h3 h4 h5 h6 header hgroup "
        "hr i iframe img input ins kbd label legend li main mark menu meter nav ol optgroup option output p "
        "picture pre progress q rp rt ruby s samp search section select small source span strong sub summary "
        "sup table tbody td textarea tfoot th thead time tr track u ul var video wbr".split()
    )
    | {"linearGradient", "radialGradient"}
    | _SVG_TAGS
)
_BODY_TAGS_LOWER = frozenset(t.lower() for t in BODY_TAGS)
#: Removed with their content; any other element removed leaves its content (an <object>: its fallback, as a
#: browser shows when the object does not load).
_CLEAN_CONTENT_TAGS = frozenset(
    "script style title noscript template embed applet frame frameset noembed noframes xmp plaintext math".split()
)
_GLOBAL_ATTRIBUTES = frozenset("class id title lang dir role tabindex hidden translate itemprop itemscope".split())
_SVG_ATTRIBUTES = frozenset(
    "viewBox width height xmlns fill stroke stroke-width stroke-linecap stroke-linejoin stroke-dasharray "
    "stroke-opacity fill-opacity fill-rule clip-rule opacity d cx cy r rx ry x y x1 y1 x2 y2 points transform "
    "focusable preserveAspectRatio offset stop-color stop-opacity gradientUnits gradientTransform".split()
)
_MEDIA = frozenset("src controls autoplay muted loop preload width height".split())
#: Attributes per element, beside the global ones, `aria-*`, `data-*` and `style` (whose CSS is cleaned).
ATTRIBUTES: dict[str, frozenset[str]] = {
    "a": frozenset("href hreflang rel target type download".split()),
    "img": frozenset("src srcset sizes alt width height loading decoding".split()),
    "source": frozenset("src srcset sizes media type width height".split()),
    "video": _MEDIA | {"poster", "playsinline"},
    "audio": _MEDIA,
    "track": frozenset("src kind srclang label default".split()),
    "iframe": frozenset("src width height loading allow allowfullscreen name".split()),
    "form": frozenset("action method enctype autocomplete name novalidate target accept-charset".split()),
    "input": frozenset(
        "type name value placeholder required disabled checked min max step pattern autocomplete maxlength "
        "minlength size readonly multiple accept alt src formaction formmethod formenctype formnovalidate "
        "formtarget list inputmode form".split()
    ),
    "button": frozenset(
        "type name value disabled formaction formmethod formenctype formnovalidate formtarget form".split()
    ),
    "label": frozenset({"for", "form"}),
    "select": frozenset("name required disabled multiple size autocomplete form".split()),
    "option": frozenset({"value", "selected", "disabled", "label"}),
    "optgroup": frozenset({"label", "disabled"}),
    "textarea": frozenset(
        "name rows cols placeholder required disabled readonly maxlength minlength wrap form".split()
    ),
    "fieldset": frozenset({"name", "disabled", "form"}),
    "output": frozenset({"for", "name", "form"}),
    "td": frozenset({"colspan", "rowspan", "headers"}),
    "th": frozenset({"colspan", "rowspan", "headers", "scope", "abbr"}),
    "col": frozenset({"span"}),
    "colgroup": frozenset({"span"}),
    "ol": frozenset({"start", "reversed", "type"}),
    "li": frozenset({"value"}),
    "time": frozenset({"datetime"}),
    "data": frozenset({"value"}),
    "blockquote": frozenset({"cite"}),
    "q": frozenset({"cite"}),
    "del": frozenset({"cite", "datetime"}),
    "ins": frozenset({"cite", "datetime"}),
    "details": frozenset({"open", "name"}),
    "meter": frozenset("value min max low high optimum".split()),
    "progress": frozenset({"value", "max"}),
    **{tag: _SVG_ATTRIBUTES for tag in _SVG_TAGS | {"linearGradient", "radialGradient"}},
}
#: The same names in lower case, as lexbor reports them (ammonia, like browsers, says `viewBox`).
_ATTRIBUTES_LOWER = {tag.lower(): frozenset(a.lower() for a in names) for tag, names in ATTRIBUTES.items()}
_GENERIC_PREFIXES = frozenset({"aria-", "data-"})

#: URL attributes by kind. A link is followed only when the visitor clicks it; a resource is loaded by the page.
_LINK_ATTRIBUTES = {("a", "href"), ("blockquote", "cite"), ("q", "cite"), ("del", "cite"), ("ins", "cite")}
_FORM_ATTRIBUTES = {("form", "action"), ("input", "formaction"), ("button", "formaction")}
_IMAGE_ATTRIBUTES = {("img", "src"), ("source", "src"), ("input", "src"), ("video", "poster")}
_RESOURCE_ATTRIBUTES = {("video", "src"), ("audio", "src"), ("track", "src"), ("iframe", "src")}
_SRCSET_TAGS = frozenset({"img", "source"})
#: SVG presentation attributes that take CSS values with url() (a fill pattern on another host).
_SVG_CSS_ATTRIBUTES = frozenset({"fill", "stroke"})

#: <meta name=...> kept in the head (`referrer` is not: the page sets its own policy, `_REFERRER`).
_META_NAMES = frozenset(
    "description viewport theme-color keywords author robots color-scheme generator application-name "
    "format-detection".split()
)
#: <link rel=...> kept; those the browser fetches are resources (site or allowed host), the rest are links.
_FETCHED_RELS = frozenset({"stylesheet", "icon", "shortcut", "apple-touch-icon", "manifest", "mask-icon"})
_LINK_RELS = _FETCHED_RELS | {"canonical", "alternate", "author", "license", "next", "prev", "me"}
_SCRIPT_TYPES = frozenset({"", "text/javascript", "application/javascript", "module"})
#: The visitor's page address is sent to other sites as its origin only, whatever the model asked for.
_REFERRER = "strict-origin-when-cross-origin"
_LANG = re.compile(r"[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*")

# --------------------------------------------------------------------------- URLs

# Browsers drop tabs and newlines anywhere in a URL, and leading/trailing C0 controls and spaces.
_IGNORED_IN_URL = re.compile(r"[\t\n\r]")
_C0_AND_SPACE = "".join(map(chr, range(33)))
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
_RASTER_DATA = re.compile(r"data:image/(?:png|gif|jpeg|jpg|webp|avif)[;,]", re.I)
_NAVIGATION_SCHEMES = frozenset({"http", "https", "mailto", "tel"})
_SHOWN_URL_CHARS = 200


def browser_url(raw: str) -> str:
    """A URL attribute as browsers read it: tabs and newlines dropped, controls and spaces stripped."""
    return _IGNORED_IN_URL.sub("", raw).strip(_C0_AND_SPACE)


def host_allowed(host: str, allowed: frozenset[str]) -> bool:
    """`host` is an allowed host or a subdomain of one (both already normalized)."""
    return any(host == a or host.endswith("." + a) for a in allowed)


def link_problem(raw: str) -> str | None:
    """Why a link (followed when clicked) is refused, None when it is kept: relative, #, http(s), mailto, tel."""
    scheme = _SCHEME.match(browser_url(raw))
    if scheme is None or scheme.group(1).lower() in _NAVIGATION_SCHEMES:
        return None
    return f"{scheme.group(1).lower()}: addresses are not allowed in links"


def resource_problem(raw: str, allowed: frozenset[str], *, image: bool = False) -> str | None:
    """Why a page may not load the resource at `raw` (None: it may: a file of the site, or an allowed host).

    `image`: raster `data:` images are allowed too (no SVG: it is a document that can hold script).
    """
    url = browser_url(raw).replace("\\", "/")  # browsers read a backslash as '/' in http(s) URLs
    if not url:
        return None
    if url[:5].lower() == "data:":
        return None if image and _RASTER_DATA.match(url) else "data: addresses are not allowed here"
    scheme = _SCHEME.match(url)
    name = scheme.group(1).lower() if scheme else ""
    try:
        if url.startswith("//"):  # protocol-relative; browsers skip any number of slashes: "///evil.example"
            parts = urlsplit(f"https://{url.lstrip('/')}")
        elif name in ("http", "https"):  # "https:evil.example/x.js" (no slashes) is on evil.example too
            parts = urlsplit(f"{name}://{url[len(name) + 1 :].lstrip('/')}")
        elif scheme:
            return f"{name}: addresses are not allowed here"
        else:
            return None  # a file of the site (site_problems checks that it exists)
        host = unquote(parts.hostname or "").strip(".")
    except ValueError:
        return "its address cannot be parsed"
    if not host:
        return "its address has no host"
    if host_allowed(host, allowed):
        return None
    return f"host {host} not in {ALLOWED_HOSTS_SETTING}"


def form_problem(raw: str, allowed: frozenset[str]) -> str | None:
    """Why a form may not post to `raw`: only the site itself or an allowed host (http or https)."""
    if browser_url(raw)[:5].lower() == "data:":
        return "data: addresses are not allowed here"
    return resource_problem(raw, allowed)


def srcset_urls(srcset: str) -> list[str]:
    """The candidate URLs of a `srcset`: whitespace-free runs, so data: URLs with commas stay whole."""
    urls: list[str] = []
    for candidate in re.finditer(r"[\s,]*([^\s,][^\s]*)[^,]*", srcset):
        url = candidate.group(1).rstrip(",")
        if url:
            urls.append(url)
    return urls


def url_problem(tag: str, attribute: str, value: str, allowed: frozenset[str]) -> str | None:
    """Why the URL attribute `attribute` of `<tag>` is refused (None: kept, or not a URL attribute)."""
    key = (tag, attribute)
    if key in _LINK_ATTRIBUTES:
        return link_problem(value)
    if key in _FORM_ATTRIBUTES:
        return form_problem(value, allowed)
    if key in _IMAGE_ATTRIBUTES:
        return resource_problem(value, allowed, image=True)
    if key in _RESOURCE_ATTRIBUTES:
        return resource_problem(value, allowed)
    if attribute == "srcset" and tag in _SRCSET_TAGS:
        return next((p for u in srcset_urls(value) if (p := resource_problem(u, allowed, image=True))), None)
    return None


def printable(text: str) -> str:
    """`text` with control (and other unprintable) characters escaped: safe for logs and jsonb."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def shown(url: str) -> str:
    """A URL as a warning shows it: stripped, clipped, printable."""
    url = url.strip()
    return printable(url if len(url) <= _SHOWN_URL_CHARS else url[: _SHOWN_URL_CHARS - 1] + "…")


# --------------------------------------------------------------------------- CSS


def _css_url_problem(url: str, allowed: frozenset[str]) -> str | None:
    return resource_problem(url, allowed, image=True)


def _clean_tokens(tokens: list[tinycss2.ast.Node], allowed: frozenset[str], removed: list[str]) -> bool:
    """Replace, in place, each url(), image-set() string and @import address not allowed by `none`."""
    changed = False
    importing = False
    for i, token in enumerate(tokens):
        url: str | None = None
        if isinstance(token, tinycss2.ast.URLToken):
            url = token.value
        elif isinstance(token, tinycss2.ast.FunctionBlock) and token.lower_name in ("url", "src"):
            strings = [t for t in token.arguments if isinstance(t, tinycss2.ast.StringToken)]
            url = strings[0].value if strings else tinycss2.serialize(token.arguments).strip()
        elif isinstance(token, tinycss2.ast.StringToken) and importing:
            url = token.value
        elif isinstance(token, tinycss2.ast.ParseError) and token.kind == "bad-url":
            removed.append("a malformed url()")  # browsers load nothing for it; neither does anyone reading it later
            tokens[i] = tinycss2.ast.IdentToken(token.source_line, token.source_column, "none")
            changed = True
            continue
        if url is not None:
            importing = False
            if (problem := _css_url_problem(url, allowed)) is not None:
                removed.append(f"url({shown(url)}) ({problem})")
                tokens[i] = tinycss2.ast.IdentToken(token.source_line, token.source_column, "none")
                changed = True
            continue
        if isinstance(token, tinycss2.ast.AtKeywordToken):
            importing = token.lower_value == "import"
        elif not isinstance(token, (tinycss2.ast.WhitespaceToken, tinycss2.ast.Comment)):
            importing = False
        if isinstance(token, tinycss2.ast.FunctionBlock):
            if token.lower_name.endswith("image-set") or token.lower_name == "image":  # a bare string is a URL
                for j, argument in enumerate(token.arguments):
                    if isinstance(argument, tinycss2.ast.StringToken) and (
                        problem := _css_url_problem(argument.value, allowed)
                    ):
                        removed.append(f"url({shown(argument.value)}) ({problem})")
                        token.arguments[j] = tinycss2.ast.IdentToken(
                            argument.source_line, argument.source_column, "none"
                        )
                        changed = True
            changed |= _clean_tokens(token.arguments, allowed, removed)
        elif isinstance(
            token, (tinycss2.ast.ParenthesesBlock, tinycss2.ast.SquareBracketsBlock, tinycss2.ast.CurlyBracketsBlock)
        ):
            changed |= _clean_tokens(token.content, allowed, removed)
    return changed


def clean_css(css: str, allowed: frozenset[str]) -> tuple[str, list[str]]:
    """`css` with every url(), image-set() address and @import that is not a site file or on an allowed
    host replaced by `none`, and one line per replacement; `css` itself when nothing was replaced.

    Read by a CSS tokenizer (tinycss2), so escapes (`u\\72l(`), comments and nesting do not hide a URL.
    """
    lowered = css.lower()
    if "url" not in lowered and "@import" not in lowered and "image" not in lowered and "\\" not in css:
        return css, []  # the usual style attribute, and most stylesheets' rules
    tokens = tinycss2.parse_component_value_list(css)
    removed: list[str] = []
    if not _clean_tokens(tokens, allowed, removed):
        return css, []
    return tinycss2.serialize(tokens), removed


# --------------------------------------------------------------------------- the page


def csp(allowed: frozenset[str]) -> str:
    """The Content-Security-Policy every page carries as a meta tag: the rules above, once more."""
    hosts = "".join(f" {h} *.{h}" for h in sorted(allowed))
    scripts = hosts.strip() or "'none'"
    return (
        f"default-src 'self'{hosts}; script-src {scripts}; "
        f"object-src 'none'; base-uri 'none'; form-action 'self'{hosts}; img-src 'self' data:{hosts}; "
        f"style-src 'self' 'unsafe-inline'{hosts}; font-src 'self'{hosts}; media-src 'self'{hosts}; "
        f"frame-src 'self'{hosts}; connect-src 'self'{hosts}"
    )


def _attribute_filter(allowed: frozenset[str], tag: str, attribute: str, value: str) -> str | None:
    """ammonia's callback for every attribute: URLs and CSS as `url_problem` and `clean_css` rule."""
    if attribute == "style" or (attribute in _SVG_CSS_ATTRIBUTES and "(" in value):
        return clean_css(value, allowed)[0]
    if url_problem(tag, attribute, value, allowed) is not None:
        return None
    return value


@functools.lru_cache(maxsize=64)
def _cleaner(allowed: frozenset[str] | None) -> nh3.Cleaner:
    """ammonia with our allow-list; `allowed` None: without the URL and CSS callback, which costs most of
    its time and changes nothing in a page it already cleaned (what `_fixed_point` uses it for)."""
    # Both spellings of SVG's camelCase names: ammonia compares them as the parser wrote them.
    attributes = {tag: set(names) | {n.lower() for n in names} for tag, names in ATTRIBUTES.items()}
    attributes["*"] = set(_GLOBAL_ATTRIBUTES | {"style"})
    return nh3.Cleaner(
        tags=set(BODY_TAGS),
        clean_content_tags=set(_CLEAN_CONTENT_TAGS),
        attributes=attributes,
        attribute_filter=None if allowed is None else functools.partial(_attribute_filter, allowed),
        strip_comments=True,
        link_rel=None,
        generic_attribute_prefixes=set(_GENERIC_PREFIXES),
        url_schemes={"http", "https", "mailto", "tel", "data"},  # data: only as _attribute_filter allows it
    )


def _escape(value: str) -> str:
    """Text or a double-quoted attribute value, escaped (single quotes left alone: CSP's 'self' stays legible)."""
    return html.escape(value, quote=False).replace('"', "&quot;")


def _style_text(css: str) -> str:
    """CSS as the text of a <style> element: no `<` at all (CSS needs none outside strings, where `\\3c ` is
    the same character), so nothing in it can end the element or look like markup to any parser."""
    return css.replace("<", "\\3c ")


@dataclass(frozen=True)
class CleanPage:
    """A page as published (`html`) and what was removed from the page as written, one line each."""

    html: str
    removed: list[str]


def _script_tag(node: LexborNode, allowed: frozenset[str]) -> str | None:
    """The <script src> we write for `node`, None when it is not an allowed host's script."""
    attributes = node.attributes
    src = attributes.get("src")
    kind = (attributes.get("type") or "").strip().lower()
    if src is None or kind not in _SCRIPT_TYPES or not browser_url(src):
        return None
    if resource_problem(src, allowed) is not None or browser_url(src)[:5].lower() == "data:":
        return None
    if not _SCHEME.match(browser_url(src)) and not browser_url(src).startswith("//"):
        return None  # a site file: .js files are not published
    parts = [f'<script src="{_escape(browser_url(src))}"']
    if kind == "module":
        parts.append(' type="module"')
    parts += [f" {flag}" for flag in ("async", "defer") if flag in attributes]
    for name in ("crossorigin", "integrity"):
        if (value := attributes.get(name)) is not None:
            parts.append(f' {name}="{_escape(value)}"')
    return "".join(parts) + "></script>"


def _head(tree: HTMLParser, allowed: frozenset[str], removed: list[str]) -> str:
    policy = csp(allowed)
    lines = [
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_escape(policy)}">',
        f'<meta name="referrer" content="{_REFERRER}">',
    ]
    head = tree.head
    titled = False
    for node in head.iter() if head is not None else ():
        tag = node.tag or ""
        attributes = node.attributes
        if tag == "title" and not titled:
            titled = True
            lines.append(f"<title>{_escape(node.text(deep=True))}</title>")
        elif tag == "meta":
            _head_meta(attributes, policy, lines, removed)
        elif tag == "link":
            _head_link(attributes, allowed, lines, removed)
        elif tag == "style":
            css, urls = clean_css(node.text(deep=True), allowed)
            removed += [f"removed {u} from <style>" for u in urls]
            media = attributes.get("media")
            opening = f'<style media="{_escape(media)}">' if media else "<style>"
            lines.append(f"{opening}{_style_text(css)}</style>")
        elif tag == "script":
            if (script := _script_tag(node, allowed)) is not None:
                lines.append(script)
            else:
                removed.append(_script_removal(node, allowed))
        elif tag not in ("-text", "_comment", "-comment"):
            removed.append(f"removed <{tag}>" + _about(node))
    return "\n".join(lines)


def _about(node: LexborNode) -> str:
    """What a removed element was about: its address or its kind of meta, when it has one."""
    for name in ("href", "src", "data", "http-equiv", "name"):
        if value := node.attributes.get(name):
            return f" ({name}={shown(value)})"
    return ""


def _head_meta(attributes: dict[str, str | None], policy: str, lines: list[str], removed: list[str]) -> None:
    """A <meta> of the head: kept (as we write it), dropped silently (a charset, or one of our own lines
    read back when a published page is cleaned again: `policy` is the page's CSP), or removed."""
    name = (attributes.get("name") or "").strip().lower()
    content = attributes.get("content") or ""
    if "charset" in attributes or (attributes.get("http-equiv") or "").strip().lower() == "content-type":
        return  # ours is the first line of the head
    if "http-equiv" in attributes:
        if (attributes.get("http-equiv") or "").lower() == "content-security-policy" and content == policy:
            return
        removed.append(f"removed <meta http-equiv={shown(attributes['http-equiv'] or '')}>")
    elif name == "referrer" and content == _REFERRER:
        return
    elif name in _META_NAMES:
        lines.append(f'<meta name="{name}" content="{_escape(content)}">')
    elif (prop := (attributes.get("property") or "").strip()).lower().startswith(("og:", "twitter:")):
        lines.append(f'<meta property="{_escape(prop)}" content="{_escape(content)}">')
    else:
        removed.append(f"removed <meta name={shown(name)}>")


def _head_link(
    attributes: dict[str, str | None], allowed: frozenset[str], lines: list[str], removed: list[str]
) -> None:
    rels = (attributes.get("rel") or "").lower().split()
    href = attributes.get("href") or ""
    if not rels or any(r not in _LINK_RELS for r in rels):
        removed.append(f"removed <link rel={shown(' '.join(rels))}>")
        return
    fetched = any(r in _FETCHED_RELS for r in rels)
    problem = resource_problem(href, allowed, image=True) if fetched else link_problem(href)
    if problem is not None:
        removed.append(f"removed <link href={shown(href)}> ({problem})")
        return
    parts = [f'<link rel="{" ".join(rels)}" href="{_escape(browser_url(href))}"']
    for name in ("type", "sizes", "media", "hreflang", "title"):
        if (value := attributes.get(name)) is not None:
            parts.append(f' {name}="{_escape(value)}"')
    lines.append("".join(parts) + ">")


def _script_removal(node: LexborNode, allowed: frozenset[str]) -> str:
    src = node.attributes.get("src")
    for name in ("href", "xlink:href"):  # SVG's <script>
        if src is None and (href := node.attributes.get(name)) is not None:
            return f"removed <script {name}={shown(href)}> (an SVG script is not published)"
    if src is None:
        return "removed inline <script>"
    problem = resource_problem(src, allowed)
    if problem is None:
        problem = "a script of the site or of this type is not published"
    return f"removed <script src={shown(src)}> ({problem})"


def _body_removals(tree: HTMLParser, allowed: frozenset[str], removed: list[str], scripts: list[str]) -> None:
    """What ammonia removes from the body, as lexbor reads it, and the allowed scripts to write back."""
    body = tree.body
    if body is None:
        return
    removed += [f"removed <body {name}>" for name in body.attributes]
    #: (a node, whether it is in an <svg>: foreign content, where `xlink:href` is the `href` ammonia keeps).
    stack = [(child, False) for child in body.iter()]
    stack.reverse()
    while stack:
        node, in_svg = stack.pop()
        tag = node.tag or ""
        in_svg = in_svg or tag == "svg"
        if tag.startswith(("-", "_")):
            continue
        if tag == "script":
            if (script := _script_tag(node, allowed)) is not None:
                scripts.append(script)
            else:
                removed.append(_script_removal(node, allowed))
            continue
        if tag not in _BODY_TAGS_LOWER:
            removed.append(f"removed <{tag}>" + _about(node))
            if tag in _CLEAN_CONTENT_TAGS:
                continue
        else:
            _attribute_removals(tag, node.attributes, allowed, removed, foreign=in_svg)
        children = [(child, in_svg) for child in node.iter()]
        children.reverse()
        stack += children


def _attribute_removals(
    tag: str, attributes: dict[str, str | None], allowed: frozenset[str], removed: list[str], *, foreign: bool
) -> None:
    listed = _ATTRIBUTES_LOWER.get(tag, frozenset())
    for name, value in attributes.items():
        name = name.lower()
        if foreign and name == "xlink:href":
            # In SVG, html5ever (ammonia's parser) reads it as `href` in the xlink namespace, and checks and
            # keeps it as `href`; lexbor names it `xlink:href`. Reported as ammonia treats it.
            if (problem := url_problem(tag, "href", value or "", allowed)) is not None:
                removed.append(f"removed <{tag} {name}={shown(value or '')}> ({problem})")
            continue
        if name in listed or name in _GLOBAL_ATTRIBUTES or name.startswith(("aria-", "data-")) or name == "style":
            if name == "style" or (name in _SVG_CSS_ATTRIBUTES and "(" in (value or "")):
                urls = clean_css(value or "", allowed)[1]
                removed += [f"removed {u} from <{tag} {name}>" for u in urls]
            elif (problem := url_problem(tag, name, value or "", allowed)) is not None:
                removed.append(f"removed <{tag} {name}={shown(value or '')}> ({problem})")
        else:
            removed.append(f"removed <{tag} {name}>")


#: ammonia's output is nearly always stable at once; a tree no parser makes (an <a> in an <a>, as the
#: tree builder allows it) reads back differently, so it is cleaned again until it reads back the same.
_MAX_PASSES = 4


def _fixed_point(allowed: frozenset[str], source: str) -> str:
    cleaner = _cleaner(allowed)
    body = cleaner.clean(source).strip()
    for _ in range(_MAX_PASSES):
        if _cleaner(None).clean(body).strip() == body:  # reads back the same: the usual case, checked cheaply
            return body
        body = cleaner.clean(body).strip()
    return ""  # no fixed point: nothing of it is published (the page then fails its checks, and is re-asked)


def _trimmed(body: LexborNode | None) -> str:
    """A body as lexbor serializes it, without the whitespace at its ends (where the head's elements were)."""
    html = (body.html or "") if body is not None else ""
    return html[html.find(">") + 1 : html.rfind("</body>")].strip()


def clean_page(page: str, source: str, allowed: frozenset[str], tree: HTMLParser | None = None) -> CleanPage:
    """The page as published: see the module's docstring. `tree`: lexbor's parse of `source`, if made."""
    if tree is None:
        tree = HTMLParser(source)
    removed: list[str] = []
    root = tree.root
    lang = (root.attributes.get("lang") or "").strip() if root is not None else ""
    if lang and not _LANG.fullmatch(lang):
        removed.append(f"removed <html lang={shown(lang)}>")
        lang = ""
    direction = (root.attributes.get("dir") or "").strip().lower() if root is not None else ""
    head = _head(tree, allowed, removed)
    body = _fixed_point(allowed, source)
    scripts: list[str] = []
    source_body = tree.body
    if source_body is not None and (
        source_body.attributes
        or tree.css_first("body script") is not None
        or _trimmed(source_body) != _trimmed(HTMLParser(f"<body>{body}</body>").body)
    ):  # something was removed (or a script moved): find out what, element by element
        _body_removals(tree, allowed, removed, scripts)
    html_attributes = (f' lang="{_escape(lang)}"' if lang else "") + (
        f' dir="{direction}"' if direction in ("ltr", "rtl", "auto") else ""
    )
    document = (
        f"<!DOCTYPE html>\n<html{html_attributes}>\n<head>\n{head}\n</head>\n<body>\n{body}\n"
        + "".join(f"{s}\n" for s in scripts)
        + "</body>\n</html>\n"
    )
    return CleanPage(document, [f"{page}: {printable(line)}" for line in _counted(removed)])


def _counted(lines: list[str]) -> list[str]:
    """Each distinct line once, in first-seen order, with how often it came when more than once."""
    counts: dict[str, int] = {}
    for line in lines:
        counts[line] = counts.get(line, 0) + 1
    return [line if n == 1 else f"{line} (x{n})" for line, n in counts.items()]
