"""What a generated site may load when it is served, in one place: the allowed embed hosts
(`output.allowed_embed_hosts`) as they are compared, and the HTTP headers (CSP, nosniff, ...) the API's
`/v1/orders/{id}/site/...` and `sitegen preview` both send with every site file.

The API may import this module and the pipeline does; it imports neither.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

#: A host as a CSP host-source may name it (after IDNA): labels of letters, digits and '-', an optional port.
_CSP_HOST = re.compile(r"[a-z0-9-]+(\.[a-z0-9-]+)*(:[0-9]{1,5})?")


def normalize_hosts(hosts: Iterable[str]) -> frozenset[str]:
    """Allowed hosts as compared: lower case, no trailing dot; `*.example.com` or a URL also work."""
    normalized: set[str] = set()
    for entry in hosts:
        host = entry.strip().lower()
        if "://" in host:
            try:
                host = urlsplit(host).hostname or ""
            except ValueError:
                continue
        host = host.removeprefix("*.").strip(".")
        if host:
            normalized.add(host)
    return frozenset(normalized)


def csp_sources(hosts: Iterable[str]) -> list[str]:
    """Each allowed host and its subdomains (as the pipeline allows them) as CSP host-sources.

    Scheme-less, so a page served over HTTPS loads them over HTTPS only. An entry that is not a plain host
    name is left out (never copied into the policy, where a ';' or a space would add directives).
    """
    sources: list[str] = []
    for host in sorted(normalize_hosts(hosts)):
        try:
            ascii_host = host.encode("idna").decode("ascii")
        except UnicodeError:
            continue
        if _CSP_HOST.fullmatch(ascii_host):
            sources += [ascii_host, f"*.{ascii_host}"]
    return sources


def site_csp(allowed_hosts: Iterable[str]) -> str:
    """The Content-Security-Policy of a served site file: no script, no framing by other sites, no form posts;
    images, fonts, media and stylesheets from the site itself, `data:` and the allowed embed hosts only, so
    opening a page tells no host the operator did not allow who is looking (issue 20 finding 3)."""
    hosts = "".join(f" {source}" for source in csp_sources(allowed_hosts))
    return (
        f"default-src 'none'; img-src 'self' data:{hosts}; style-src 'self' 'unsafe-inline'{hosts}; "
        f"font-src 'self' data:{hosts}; media-src 'self' data:{hosts}; script-src 'none'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'self'; "
        "sandbox allow-same-origin allow-popups allow-popups-to-escape-sandbox"
    )


@functools.cache
def _headers(hosts: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    return (
        ("Content-Security-Policy", site_csp(hosts)),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
        ("Cache-Control", "private, no-cache"),
    )


def site_headers(allowed_hosts: Iterable[str]) -> dict[str, str]:
    """The security headers every served site file gets (built once per list of allowed hosts)."""
    return dict(_headers(tuple(allowed_hosts)))
