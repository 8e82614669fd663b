"""The domain's data: the order's brief and what each phase produces, as pydantic models.

Every model here is the validation boundary for something that came from outside (an
upstream app's brief, a model's answer), so limits are explicit and unknown keys rejected.
"""

from __future__ import annotations

import hashlib
import mimetypes
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

#: A page or section identifier: also the page's file name, so nothing path-like.
Slug = Annotated[str, StringConstraints(pattern=r"^[a-z0-9](?:[a-z0-9-]{0,46}[a-z0-9])?$")]
HexColor = Annotated[str, StringConstraints(pattern=r"^#[0-9a-fA-F]{6}$")]
#: The most pages a generation makes (the brief's and the generated plan's limit).
MAX_PAGES = 12
#: The most pages a site grows to by edits that add pages (a site plan's limit).
MAX_SITE_PAGES = 24
ShortText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]

#: Relative POSIX path of a generated file: segments of safe characters, no '..', no
#: absolute path, no backslash, no control character.
_SAFE_PATH = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,99}/){0,3}[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
ALLOWED_SUFFIXES = (".html", ".css", ".js", ".svg", ".txt", ".xml", ".json", ".webmanifest", ".ico")
MAX_FILE_BYTES = 2_000_000
MAX_FILES = 200

SectionKind = Literal[
    "hero",
    "features",
    "services",
    "about",
    "testimonials",
    "gallery",
    "cta",
    "contact",
    "text",
    "faq",
    "team",
    "pricing",
    "hours",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, frozen=True)


def page_file(slug: str) -> str:
    """The file a page is written to: `index` is the home page, others `<slug>.html`."""
    return f"{slug}.html"


# --------------------------------------------------------------------------- brief


class PageRequest(_Strict):
    slug: Slug
    title: ShortText
    purpose: str = Field(default="", max_length=1000)


class Contact(_Strict):
    email: str = Field(default="", max_length=200, pattern=r"^$|^[^@\s<>\"']+@[^@\s<>\"']+\.[^@\s<>\"']+$")
    phone: str = Field(default="", max_length=40, pattern=r"^[0-9+().\- ]*$")
    address: str = Field(default="", max_length=300)
    hours: str = Field(default="", max_length=300)


class Brief(_Strict):
    """What an upstream app sends for an order: the business and what its site should say."""

    business_name: ShortText
    description: str = Field(min_length=1, max_length=5000)
    industry: str = Field(default="", max_length=100)
    location: str = Field(default="", max_length=200)
    audience: str = Field(default="", max_length=1000)
    tone: str = Field(default="friendly and professional", max_length=100)
    language: str = Field(default="en", pattern=r"^[a-z]{2}(?:-[A-Z]{2})?$")
    services: list[ShortText] = Field(default_factory=list, max_length=12)
    pages: list[PageRequest] = Field(default_factory=list, max_length=MAX_PAGES)
    brand_color: HexColor | None = None
    contact: Contact = Field(default_factory=Contact)

    @field_validator("pages")
    @classmethod
    def _unique_slugs(cls, pages: list[PageRequest]) -> list[PageRequest]:
        slugs = [p.slug for p in pages]
        duplicated = sorted({s for s in slugs if slugs.count(s) > 1})
        if duplicated:
            raise ValueError(f"page slugs must be unique; repeated: {', '.join(duplicated)}")
        return pages


# --------------------------------------------------------------------------- plan


class Palette(_Strict):
    primary: HexColor
    secondary: HexColor
    accent: HexColor
    background: HexColor
    text: HexColor


class SectionPlan(_Strict):
    id: Slug
    kind: SectionKind
    heading: ShortText
    goal: str = Field(default="", max_length=500)


class PagePlan(_Strict):
    slug: Slug
    title: ShortText
    nav_label: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=40)]
    sections: list[SectionPlan] = Field(min_length=1, max_length=12)

    @field_validator("sections")
    @classmethod
    def _unique_sections(cls, sections: list[SectionPlan]) -> list[SectionPlan]:
        ids = [s.id for s in sections]
        if len(ids) != len(set(ids)):
            raise ValueError("section ids must be unique within a page")
        return sections


class SitePlan(_Strict):
    """Phase `plan`: the site's structure, look and navigation."""

    site_name: ShortText
    tagline: str = Field(default="", max_length=200)
    tone: str = Field(default="", max_length=100)
    language: str = Field(default="en", pattern=r"^[a-z]{2}(?:-[A-Z]{2})?$")
    palette: Palette
    pages: list[PagePlan] = Field(min_length=1, max_length=MAX_SITE_PAGES)
    nav: list[Slug] = Field(min_length=1, max_length=MAX_SITE_PAGES)

    @model_validator(mode="after")
    def _consistent(self) -> SitePlan:
        slugs = [p.slug for p in self.pages]
        if len(slugs) != len(set(slugs)):
            raise ValueError("page slugs must be unique")
        if "index" not in slugs:
            raise ValueError("pages must include the home page with slug 'index'")
        unknown = [s for s in self.nav if s not in slugs]
        if unknown:
            raise ValueError(f"nav names pages that are not planned: {', '.join(unknown)}")
        missing = [s for s in slugs if s not in self.nav]
        if missing:
            raise ValueError(f"every page must be in the nav; missing: {', '.join(missing)}")
        return self

    def page(self, slug: str) -> PagePlan:
        return next(p for p in self.pages if p.slug == slug)


# --------------------------------------------------------------------------- content


class ContentItem(_Strict):
    title: str = Field(default="", max_length=200)
    text: str = Field(default="", max_length=2000)


class SectionContent(_Strict):
    section_id: Slug
    heading: ShortText
    body: str = Field(default="", max_length=5000)
    items: list[ContentItem] = Field(default_factory=list, max_length=24)
    cta_label: str = Field(default="", max_length=60)
    cta_target: str = Field(default="", max_length=60, description="slug of a planned page, or empty")


class PageContent(_Strict):
    slug: Slug
    meta_title: ShortText
    meta_description: str = Field(min_length=1, max_length=300)
    sections: list[SectionContent] = Field(min_length=1, max_length=12)


class SiteContent(_Strict):
    """Phase `content`: the copy of every section of every planned page."""

    pages: list[PageContent] = Field(min_length=1, max_length=MAX_PAGES)

    def check_against(self, plan: SitePlan) -> None:
        """Raise ValueError unless this covers exactly the plan's pages and sections."""
        by_slug = {p.slug: p for p in self.pages}
        problems: list[str] = []
        for page in plan.pages:
            written = by_slug.get(page.slug)
            if written is None:
                problems.append(f"page {page.slug!r} has no content")
                continue
            have = {s.section_id for s in written.sections}
            problems += [
                f"page {page.slug!r} section {s.id!r} has no content" for s in page.sections if s.id not in have
            ]
            for section in written.sections:
                if section.cta_target and section.cta_target not in by_slug:
                    problems.append(
                        f"page {page.slug!r} section {section.section_id!r} "
                        f"links to unknown page {section.cta_target!r}"
                    )
        extra = sorted(set(by_slug) - {p.slug for p in plan.pages})
        problems += [f"page {s!r} is not in the plan" for s in extra]
        if problems:
            raise ValueError("; ".join(problems))

    def page(self, slug: str) -> PageContent:
        return next(p for p in self.pages if p.slug == slug)


# --------------------------------------------------------------------------- code


def check_relative_path(path: str) -> str:
    """Validate a generated file's path; the message says what is wrong with it."""
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise ValueError("file path contains a control or NUL character")
    if path.startswith("/") or "\\" in path or ".." in path.split("/"):
        raise ValueError(f"file path {path!r} must be relative, without '..' or backslashes")
    if not _SAFE_PATH.fullmatch(path):
        raise ValueError(f"file path {path!r} may only use letters, digits, '.', '_', '-' and up to 3 folders")
    if not path.lower().endswith(ALLOWED_SUFFIXES):
        raise ValueError(f"file path {path!r} has a type that is not allowed ({', '.join(ALLOWED_SUFFIXES)})")
    if not path.endswith(ALLOWED_SUFFIXES):  # the checks and the sanitizer read pages and styles by their suffix
        raise ValueError(f"file path {path!r} must end in a lower-case type ({', '.join(ALLOWED_SUFFIXES)})")
    return path


class GeneratedFile(_Strict):
    path: str
    content: str

    @field_validator("path")
    @classmethod
    def _safe_path(cls, path: str) -> str:
        return check_relative_path(path)

    @field_validator("content")
    @classmethod
    def _size(cls, content: str) -> str:
        if len(content.encode()) > MAX_FILE_BYTES:
            raise ValueError(f"file is larger than {MAX_FILE_BYTES} bytes")
        return content


class SiteCode(_Strict):
    """Phase `code`: the HTML of every page and the assets they use."""

    files: list[GeneratedFile] = Field(min_length=1, max_length=MAX_FILES)

    @field_validator("files")
    @classmethod
    def _unique_paths(cls, files: list[GeneratedFile]) -> list[GeneratedFile]:
        paths = [f.path.lower() for f in files]
        if len(paths) != len(set(paths)):
            raise ValueError("file paths must be unique")
        folders = {"/".join(p.split("/")[:i]) for p in paths for i in range(1, p.count("/") + 1)}
        clashing = sorted(folders & set(paths))
        if clashing:
            raise ValueError(f"file path(s) {', '.join(clashing)} are also used as folders")
        return files


# --------------------------------------------------------------------------- edits

#: The longest edit instruction a job may carry (characters).
MAX_INSTRUCTION_CHARS = 2000
#: The most pages an edit's `pages` may name.
MAX_EDIT_PAGES = 12
_PAGE_SLUG = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,46}[a-z0-9])?$")


def edit_request_problem(instruction: Any, base_version: Any, pages: Any) -> tuple[str, str] | None:
    """What is wrong with an edit's arguments as JSON gives them, as (field, message); None: nothing.

    The one check of an edit request: the API answers 400 with it, the `edit_site` job fails with it.
    """
    if not isinstance(instruction, str) or not instruction.strip():
        return "instruction", "required, a non-empty string saying what to change"
    if len(instruction) > MAX_INSTRUCTION_CHARS:
        return "instruction", f"{len(instruction):,} characters, over the limit of {MAX_INSTRUCTION_CHARS:,}"
    if "\x00" in instruction:
        return "instruction", "a NUL character (\\u0000) is not allowed"
    if base_version is not None and (
        isinstance(base_version, bool) or not isinstance(base_version, int) or not 0 < base_version < 2**31
    ):
        return "base_version", "must be a version number (a positive integer) or null"
    if pages is not None:
        if not isinstance(pages, list) or not 1 <= len(pages) <= MAX_EDIT_PAGES:
            return "pages", f"must be a list of 1 to {MAX_EDIT_PAGES} page slugs, or null"
        bad = [p for p in pages if not isinstance(p, str) or not _PAGE_SLUG.match(p)]
        if bad:
            return "pages", f"{str(bad[0])[:60]!r} is not a page slug (lowercase letters, digits and hyphens)"
        if len(set(pages)) != len(pages):
            return "pages", "a page is named twice"
    return None


class NewPage(_Strict):
    """A page an edit adds: its file is `<slug>.html`, and every page's navigation gains a link to it."""

    slug: Slug
    title: ShortText
    nav_label: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=40)]
    purpose: str = Field(default="", max_length=500)


class EditPlan(_Strict):
    """Phase `edit_plan`: which files of the base version an edit changes, and which pages it adds."""

    summary: str = Field(default="", max_length=500)
    change: list[str] = Field(default_factory=list, max_length=MAX_FILES, description="paths of existing files")
    add_pages: list[NewPage] = Field(default_factory=list, max_length=6)
    #: Files the instruction makes much smaller on purpose (a section removed): not taken for a lazy answer.
    shrinks: list[str] = Field(default_factory=list, max_length=MAX_FILES)
    #: Not empty: the edit cannot be carried out on this site, and why (the edit fails with this message).
    refuse: str = Field(default="", max_length=500)


class SearchReplace(_Strict):
    search: str = Field(min_length=1, max_length=MAX_FILE_BYTES)
    replace: str = Field(default="", max_length=MAX_FILE_BYTES)


class FileEdit(_Strict):
    """The answer of task `editing`: a file's changes as exact search/replace blocks."""

    path: str
    #: No block: the file needs no change for this instruction (it stays as it is).
    blocks: list[SearchReplace] = Field(default_factory=list, max_length=50)


class FileRewrite(_Strict):
    """The answer of task `rewriting`: a file written whole (a new page, or the fallback of a failed edit)."""

    path: str
    content: str = Field(min_length=1, max_length=MAX_FILE_BYTES)


class EditedFiles(_Strict):
    """Phase `edit_files`: the changed and added files in full, and those rewritten whole after their blocks failed."""

    files: list[GeneratedFile] = Field(default_factory=list, max_length=MAX_FILES)
    fallbacks: list[str] = Field(default_factory=list)


# --------------------------------------------------------------------------- assemble


class ManifestFile(_Strict):
    path: str
    sha256: str
    bytes: int


class Manifest(_Strict):
    """Phase `assemble`: what was written, written itself as `manifest.json`."""

    order_id: int
    generation_id: int
    site_name: str
    pages: list[str]
    files: list[ManifestFile]
    warnings: list[str] = Field(default_factory=list)
    #: Page path -> its quality warnings (see assemble.quality_report); only pages with some, empty when clean.
    quality: dict[str, list[str]] = Field(default_factory=dict)


@dataclass(frozen=True)
class OutputFile:
    """A file of the finished site as it is written to disk and stored in `site_files`."""

    path: str
    content: bytes

    @cached_property  # read for the manifest and again for the final commit
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def media_type(self) -> str:
        return mimetypes.guess_type(self.path)[0] or "application/octet-stream"
