"""The site's header policy (worker/site_headers.py): what the CSP lets a served page load, whatever the
`output.allowed_embed_hosts` setting holds."""

from __future__ import annotations

import pytest

from worker.site_headers import csp_sources, site_csp, site_headers


def _directives(csp: str) -> dict[str, list[str]]:
    return {d.split()[0]: d.split()[1:] for d in (part.strip() for part in csp.split(";")) if d}


def test_no_allowed_host_means_the_site_itself_and_data_only() -> None:
    """Regression: issue 20 finding 3: images, fonts and media came from any https: host."""
    directives = _directives(site_csp([]))
    assert directives["img-src"] == directives["font-src"] == directives["media-src"] == ["'self'", "data:"]
    assert directives["style-src"] == ["'self'", "'unsafe-inline'"]
    assert directives["default-src"] == directives["script-src"] == ["'none'"]


@pytest.mark.parametrize(
    ("entry", "sources"),
    [
        ("cdn.example.com", ["cdn.example.com", "*.cdn.example.com"]),
        (" CDN.Example.COM. ", ["cdn.example.com", "*.cdn.example.com"]),
        ("*.fonts.example", ["fonts.example", "*.fonts.example"]),
        ("https://maps.example:443/embed?x=1", ["maps.example", "*.maps.example"]),
        ("media.example:8443", ["media.example:8443", "*.media.example:8443"]),
        ("münchen.example", ["xn--mnchen-3ya.example", "*.xn--mnchen-3ya.example"]),
        ("10.0.0.7", ["10.0.0.7", "*.10.0.0.7"]),
    ],
)
def test_an_allowed_host_and_its_subdomains_become_sources(entry: str, sources: list[str]) -> None:
    assert csp_sources([entry]) == sources


HOSTILE_ENTRIES = [
    "*",
    "*.",
    ".",
    "https:",
    "http:",
    "data:",
    "blob:",
    "'unsafe-inline'",
    "'unsafe-eval'",
    "'self'",
    "'none'",
    "evil.example; script-src *",
    "evil.example script-src",
    "evil.example,other.example",
    "evil.example\nX-Injected: 1",
    "evil.example\r\nSet-Cookie: a=b",
    "evil.example/path",
    "https://[::1]/",
    "javascript:alert(1)",
    "'nonce-abc'",
    "evil.example'",
    "évil.example\x00",
    "https://u:p@evil.example:99999/",
    "x" * 300,
]


@pytest.mark.parametrize("entry", HOSTILE_ENTRIES)
def test_an_entry_that_is_not_a_plain_host_never_reaches_the_policy(entry: str) -> None:
    """A malformed setting cannot widen the policy: no directive, keyword, scheme or wildcard is added."""
    csp = site_csp([entry, "cdn.example.com"])
    directives = _directives(csp)
    assert set(directives) == {
        "default-src",
        "img-src",
        "style-src",
        "font-src",
        "media-src",
        "script-src",
        "base-uri",
        "form-action",
        "frame-ancestors",
        "sandbox",
    }, csp
    for name in ("img-src", "font-src", "media-src", "style-src"):
        extra = [s for s in directives[name] if s not in ("'self'", "data:", "'unsafe-inline'")]
        assert all(s.endswith("cdn.example.com") or s.startswith(("evil", "*.evil")) for s in extra), csp
        assert not {"*", "https:", "http:", "blob:", "'unsafe-eval'", "'none'"} & set(directives[name]), csp
    assert directives["script-src"] == ["'none'"] and "\n" not in csp and "\r" not in csp
    assert all(c.isprintable() and c.isascii() for c in csp), csp


def test_the_headers_every_site_file_gets() -> None:
    headers = site_headers(["cdn.example.com"])
    assert headers == {
        "Content-Security-Policy": site_csp(["cdn.example.com"]),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "private, no-cache",
    }
    headers["X-Content-Type-Options"] = "changed"
    assert site_headers(["cdn.example.com"])["X-Content-Type-Options"] == "nosniff", "each caller gets a copy"
