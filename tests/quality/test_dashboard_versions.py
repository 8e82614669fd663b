"""The order page's versions in real Chromium (playwright): the list updating live, an edit sent from the edit
box, the diff of two versions in both modes, an old version's preview, a rollback; a read session's page.

Skips, naming what is missing, without Chromium, playwright or axe-core (scripts/install-quality-tools.sh).
With SITEGEN_UPDATE_SCREENSHOTS=1 it saves docs/dashboard-versions.png (otherwise under the test's
temporary folder, so a test run leaves the working tree as it was).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from arq import ArqRedis

from tests.helpers import SAMPLE_BRIEF, WorkerFactory, wait_for_result
from tests.integration.test_api import READ, WRITE, Running, auth, new_generation
from tests.integration.test_versions_api import add_version
from tests.quality.test_dashboard_browser import DOCS, api, axe_violations, chromium
from tests.quality.test_site_quality import _axe_js

__all__ = ["api", "chromium"]  # fixtures, used by name

#: What the axe init script provokes in a sandboxed site frame (a live or an old version's preview): the
#: sandbox doing its job. Any other console error is a fault of the dashboard.
SANDBOXED = re.compile(r"^console error: Blocked script execution in '(about:blank|[^']*/site/[^']*)' because")
#: A line of a model's output that is markup: the diff must show it as text.
HOSTILE = "<img src=x onerror=\"document.title='pwned'\">"


def watch(page: Any, problems: list[str], *, expected: tuple[str, ...] = ()) -> None:
    """Collect the page's console errors, uncaught errors and HTTP errors (but those whose URL ends with one of
    `expected`: the refusals a test provokes)."""

    def refused(url: str) -> bool:
        return bool(expected) and url.endswith(expected)

    def response(r: Any) -> None:
        if r.status >= 400 and not refused(r.url):
            problems.append(f"HTTP {r.status} {r.url}")

    def console(m: Any) -> None:
        # Chromium logs each refused request as well, naming its URL as the message's location only.
        if m.type == "error" and not (m.text.startswith("Failed to load resource") and refused(m.location["url"])):
            problems.append(f"console {m.type}: {m.text}")

    page.on("console", console)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("response", response)


async def sign_in(page: Any, url: str, token: str) -> None:
    await page.goto(f"{url}/")
    await page.get_by_label("API token").fill(token)
    await page.get_by_role("button", name="Sign in").click()
    await page.get_by_role("heading", name="Overview").wait_for()


def version_row(page: Any, number: int) -> Any:
    return page.locator("#versions tbody tr").filter(has=page.get_by_role("cell", name=f"v{number}", exact=True))


@pytest.mark.timeout(240)
async def test_an_edit_from_the_edit_box_shows_live_its_diff_both_ways_a_preview_and_a_rollback(
    api: Running, chromium: Any, start_worker: WorkerFactory, redis: ArqRedis, tmp_path: Path
) -> None:
    shots = DOCS if os.environ.get("SITEGEN_UPDATE_SCREENSHOTS") == "1" else tmp_path
    await start_worker()
    async with api.http.post(
        f"{api.url}/v1/orders/83/generate", headers=auth(WRITE), json={"brief": SAMPLE_BRIEF}
    ) as response:
        assert response.status == 202
    assert (await wait_for_result(redis, 83))["status"] == "succeeded"
    axe = _axe_js()
    assert axe is not None
    context = await chromium.new_context(viewport={"width": 1280, "height": 900})
    await context.add_init_script(path=str(axe))
    problems: list[str] = []
    page = await context.new_page()
    watch(page, problems, expected=("/v1/orders/83/edits",))  # the refused edit below
    try:
        await sign_in(page, api.url, WRITE)
        await page.goto(f"{api.url}/orders/83")
        await page.locator("#stream-state").filter(has_text="ended: succeeded").wait_for()
        versions = page.get_by_role("table", name="Versions of order 83")
        await version_row(page, 1).filter(has_text="generation").filter(has_text="live").wait_for()
        assert await page.get_by_role("button", name=re.compile("Roll back")).count() == 0, "v1 is live"

        # A bad field: the API's 400, naming it, in the page's live region; nothing sent.
        result = page.locator("#versions-result")
        assert await result.get_attribute("aria-live") == "polite"
        await page.get_by_label("Instruction").fill("Make the header blue")
        await page.get_by_label("Pages (optional)").fill("../etc")
        await page.get_by_role("button", name="Send the edit").click()
        await result.filter(has_text="Edit not sent (HTTP 400): pages:").wait_for()
        assert "is not a page slug" in await result.inner_text()

        await page.get_by_label("Pages (optional)").fill("")
        await page.get_by_label("Instruction").fill("Change the phone number to 555-0199")
        await page.get_by_role("button", name="Send the edit").click()
        await result.filter(has_text="Edit sent").wait_for()
        # Version 2 joins the list live, without a reload, and becomes the live one.
        two = version_row(page, 2)
        await two.filter(has_text="live").wait_for(timeout=60_000)
        assert "edit of v1" in await two.inner_text()
        assert "Change the phone number to 555-0199" in await two.inner_text()
        await page.locator("#stream-state").filter(has_text="Edit").filter(has_text="ended: succeeded").wait_for()
        await page.get_by_role("button", name="Roll back to v1").wait_for()
        assert await versions.get_by_role("row").count() == 3  # the header and two versions

        # The diff of the newest version against its parent, unified then side by side.
        await page.get_by_role("button", name="Show the changes").click()
        output = page.locator("#diff-output")
        await output.get_by_role("heading", name="Changes from v1 to v2").wait_for()
        added = output.locator(".line-add").filter(has_text="555-0199").first
        await added.wait_for()
        assert '<a href="tel:5550199">555-0199</a>' in await added.inner_text(), "the markup shown as text"
        assert await output.locator(".line-del").filter(has_text="+351 222 000 111").count() >= 1
        assert await output.locator("a").count() == 0, "no markup of the diff became an element"
        await page.get_by_label("Side by side").check()
        split = output.locator("table.diff-split").first
        await split.wait_for()
        assert await split.locator("td.code-ins").filter(has_text="555-0199").count() >= 1
        assert await split.locator("td.code-del").filter(has_text="+351 222 000 111").count() >= 1
        assert await output.locator("a").count() == 0
        assert await axe_violations(page) == [], "the order page with a side-by-side diff"

        # Version 1's own files, in the preview.
        await page.get_by_label("Version to preview").select_option("1")
        await page.get_by_role("button", name="Preview", exact=True).click()
        frame = page.frame_locator("iframe[title='Preview of version 1 of order 83']")
        await frame.locator("body").filter(has_text="+351 222 000 111").wait_for()
        assert await frame.locator("body").filter(has_text="555-0199").count() == 0
        assert await page.get_by_role("link", name="Open version 1").get_attribute("href") == (
            "/v1/orders/83/versions/1/site/index.html"
        )

        # Back to version 1: version 3, "rollback to v1", becomes live.
        await page.get_by_role("button", name="Roll back to v1").click()
        await result.filter(has_text="Rollback to v1 sent").wait_for()
        three = version_row(page, 3)
        await three.filter(has_text="live").wait_for(timeout=60_000)
        assert "rollback to v1" in await three.inner_text()
        assert "live" not in await version_row(page, 2).inner_text()
        await page.locator("#stream-state").filter(has_text="Rollback").filter(has_text="ended: succeeded").wait_for()
        await page.get_by_role("button", name="Roll back to v2").wait_for()

        # Keyboard only: an edit typed and sent without the mouse.
        await page.get_by_label("Instruction").focus()
        await page.keyboard.type("Make the header blue")
        await page.keyboard.press("Tab")  # the pages field
        await page.keyboard.press("Tab")  # the submit button
        await page.keyboard.press("Enter")
        four = version_row(page, 4)
        await four.filter(has_text="live").wait_for(timeout=60_000)
        assert "edit of v3" in await four.inner_text()

        # The compare form kept the mode chosen (side by side) and now offers the new versions.
        await page.get_by_role("combobox", name="Version", exact=True).select_option("4")
        await page.get_by_role("combobox", name="Against").select_option("")  # its parent
        await page.get_by_role("button", name="Show the changes").click()
        await output.get_by_role("heading", name="Changes from v3 to v4").wait_for()
        assert await split.locator("td.code-ins").filter(has_text="--primary: #1d4ed8").count() == 1
        assert await axe_violations(page) == [], "the order page after a rollback and an edit"
        top, bottom = await page.evaluate(
            """() => [document.getElementById("versions"), document.getElementById("compare")]
                .map((e) => e.getBoundingClientRect()).map((r, i) => (i ? r.bottom : r.top) + window.scrollY)"""
        )
        clip = {"x": 0, "y": top - 16, "width": 1280, "height": bottom - top + 32}
        await page.screenshot(path=str(shots / "dashboard-versions.png"), full_page=True, clip=clip)
    finally:
        await context.close()
    problems = [p for p in problems if not SANDBOXED.match(p)]
    assert problems == [], "\n".join(problems)


async def test_a_read_session_sees_versions_and_diffs_as_text_but_no_edit_box_or_rollback_and_cannot_post(
    api: Running, chromium: Any, db: asyncpg.Connection, redis: ArqRedis
) -> None:
    """Seeded as the worker stores versions; version 2's page and instruction are hostile markup."""
    page_v1 = b"<!doctype html>\n<title>Rosa's Bakery</title>\n<h1>Rosa's Bakery</h1>\n<p>Open daily</p>\n"
    page_v2 = page_v1.replace(b"<p>Open daily</p>", HOSTILE.encode() + b"\n<p>Open daily</p>")
    await new_generation(db, 84, "succeeded")
    await add_version(db, 84, 1, {"index.html": (page_v1, "text/html")})
    await add_version(
        db, 84, 2, {"index.html": (page_v2, "text/html")}, parent=1, kind="edit", instruction=HOSTILE, live=False
    )
    axe = _axe_js()
    assert axe is not None
    context = await chromium.new_context(viewport={"width": 1280, "height": 900})
    await context.add_init_script(path=str(axe))
    problems: list[str] = []
    page = await context.new_page()
    watch(page, problems, expected=("/v1/orders/84/edits", "/v1/orders/84/rollback"))
    try:
        await sign_in(page, api.url, READ)
        await page.goto(f"{api.url}/orders/84")
        two = version_row(page, 2)
        await two.wait_for()
        assert HOSTILE in await two.inner_text(), "the instruction shown as text"
        assert await page.locator("#versions-result").count() == 1
        assert await page.locator("#edit-form").count() == 0
        assert await page.get_by_label("Instruction").count() == 0
        assert await page.locator("[data-rollback]").count() == 0
        assert await page.get_by_role("button", name=re.compile("Roll back")).count() == 0

        await page.get_by_role("combobox", name="Version", exact=True).select_option("2")
        await page.get_by_role("button", name="Show the changes").click()
        output = page.locator("#diff-output")
        added = output.locator(".line-add").filter(has_text="onerror").first
        await added.wait_for()
        assert await added.inner_text() == f"+{HOSTILE}"
        await page.get_by_label("Side by side").check()
        cell = output.locator("td.code-ins").filter(has_text="onerror").first
        await cell.wait_for()
        assert await cell.inner_text() == HOSTILE
        assert await page.locator("main img").count() == 0, "no markup of the diff or the list became an element"
        assert await page.title() != "pwned"
        assert await axe_violations(page) == [], "the order page of a read session"
        await page.set_viewport_size({"width": 390, "height": 844})
        await cell.wait_for()
        assert await axe_violations(page) == [], "the order page of a read session, on a phone"

        # The write routes refuse the read session, even sent as the dashboard sends them.
        statuses = await page.evaluate(
            """async () => Promise.all([["edits", {instruction: "Make the header blue"}], ["rollback", {version: 2}]]
                .map(async ([path, body]) => (await fetch(`/v1/orders/84/${path}`, {method: "POST",
                    headers: {"Content-Type": "application/json", "X-Sitegen-Dashboard": "1"},
                    body: JSON.stringify(body)})).status))"""
        )
        assert statuses == [403, 403]
    finally:
        await context.close()
    assert await redis.keys("arq:job:*") == [], "nothing enqueued"
    problems = [p for p in problems if not SANDBOXED.match(p)]
    assert problems == [], "\n".join(problems)


async def test_an_order_a_previous_release_generated_has_no_version_yet_and_gets_the_edit_box(
    api: Running, chromium: Any, db: asyncpg.Connection, redis: ArqRedis
) -> None:
    """Its first edit makes its version 1 (the worker's side is test_versions_api's): the page offers the edit,
    and nothing to compare or preview until then; the page waits for a replica to start the edit."""
    generation = await new_generation(db, 86, "succeeded")
    await db.execute(
        "INSERT INTO site_files (generation_id, path, content, sha256, bytes, media_type)"
        " VALUES ($1, 'index.html', '<p>hi</p>', 'x', 9, 'text/html')",
        generation,
    )
    context = await chromium.new_context(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page = await context.new_page()
    watch(page, problems)
    try:
        await sign_in(page, api.url, WRITE)
        await page.goto(f"{api.url}/orders/86")
        await page.get_by_text("No version yet").wait_for()
        await page.get_by_label("Instruction").fill("Make the header blue")
        assert await page.locator("#compare").is_hidden() and await page.locator("#version-preview").is_hidden()
        await page.get_by_role("button", name="Send the edit").click()
        await page.locator("#versions-result").filter(has_text="Edit sent").wait_for()
        await page.locator("#stream-state").filter(has_text="waiting for a replica to start it").wait_for()
    finally:
        await context.close()
    assert [key.decode().split(":")[2] for key in await redis.keys("arq:job:*")] == ["edit_site"]
    assert problems == [], "\n".join(problems)
