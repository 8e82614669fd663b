"""The versions API (issue 22, section 3): list, detail, diff, an old version's files, edits and rollbacks.

Versions are seeded with SQL, as the worker stores them (content-addressed blobs, one row per file of a
version, the order's live version), so these tests need no runner; edits and rollbacks are read back as
the arq jobs they enqueue.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from arq import ArqRedis
from arq.jobs import Job

from tests.helpers import SAMPLE_BRIEF, WorkerFactory, close_worker, wait_for_result
from tests.integration.test_api import FAST, READ, WRITE, Running, _start, auth, raw_get, sse
from worker import client
from worker.api.auth import Tokens
from worker.settings import Settings

ORDER = 7
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(40))

V1 = {
    "index.html": (b"<h1>Rosa's Bakery</h1>\n<p>Call +351 222 000 111</p>\n<p>Open daily</p>\n", "text/html"),
    "about.html": (b"<h1>About us</h1>\n", "text/html"),
    "assets/style.css": (b"header { color: red; }\n", "text/css"),
    "assets/logo.png": (PNG, "image/png"),
}
V2 = {
    "index.html": (b"<h1>Rosa's Bakery</h1>\n<p>Call +351 222 999 888</p>\n<p>Open daily</p>\n", "text/html"),
    "pricing.html": (b"<h1>Pricing</h1>", "text/html"),
    "assets/style.css": V1["assets/style.css"],
    "assets/logo.png": (PNG[::-1], "image/png"),
}

#: Sent as written (no client-side normalisation), as the live site's traversal test sends them.
HOSTILE = [
    "../../../../etc/passwd",
    "..%2f..%2fetc%2fpasswd",
    "%2e%2e/%2e%2e/etc/passwd",
    "%2E%2E%2Findex.html",
    "..\\..\\windows\\win.ini",
    "%5c..%5cindex.html",
    "/etc/passwd",
    "%2fetc%2fpasswd",
    "./index.html",
    "about.html/../index.html",
    "index.html%00.css",
    "assets//style.css",
    "..",
    "no-such-page.html",
]


async def add_version(
    db: asyncpg.Connection,
    order_id: int,
    number: int,
    files: dict[str, tuple[bytes, str]],
    *,
    parent: int | None = None,
    kind: str = "generation",
    instruction: str | None = None,
    usage: dict[str, Any] | None = None,
    live: bool = True,
) -> None:
    """A version stored as the worker stores one: blobs by sha256, its files, and (with `live`) made live."""
    await db.execute("INSERT INTO site_orders (id, brief) VALUES ($1, '{}') ON CONFLICT DO NOTHING", order_id)
    await db.execute(
        "INSERT INTO site_versions (order_id, number, parent, kind, instruction, usage, quality)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7)",
        order_id,
        number,
        parent,
        kind,
        instruction,
        json.dumps(usage or {}),
        json.dumps({"checks": {"links": "ok"}}),
    )
    for path, (content, media_type) in files.items():
        sha = hashlib.sha256(content).hexdigest()
        await db.execute(
            "INSERT INTO site_blobs (sha256, content, bytes) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            sha,
            content,
            len(content),
        )
        await db.execute(
            "INSERT INTO site_version_files (order_id, number, path, sha256, bytes, media_type)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            order_id,
            number,
            path,
            sha,
            len(content),
            media_type,
        )
    if live:
        await db.execute("UPDATE site_orders SET live_version = $2 WHERE id = $1", order_id, number)


@pytest.fixture
async def api(settings: Settings, db: asyncpg.Connection, redis: ArqRedis) -> AsyncIterator[Running]:
    async for running in _start(settings, Tokens(read=(READ,), write=(WRITE,)), FAST):
        yield running


@pytest.fixture
async def seeded(db: asyncpg.Connection) -> None:
    """Order 7: version 1 generated, version 2 an edit of it (live), version 3 a rollback to 1 (not live)."""
    usage = {"input_tokens": 1000, "output_tokens": 200, "calls": 3, "cost_usd": 0.0123, "by_phase": {"plan": {}}}
    await add_version(db, ORDER, 1, V1, usage=usage)
    await add_version(
        db, ORDER, 2, V2, parent=1, kind="edit", instruction="change the phone to +351 222 999 888", live=False
    )
    await add_version(db, ORDER, 3, V1, parent=2, kind="rollback", live=False)
    await db.execute("UPDATE site_orders SET live_version = 2 WHERE id = $1", ORDER)


async def get(api: Running, path: str, token: str = READ) -> tuple[int, Any]:
    async with api.http.get(f"{api.url}{path}", headers=auth(token)) as response:
        return response.status, await response.json()


async def post(api: Running, path: str, body: Any, token: str = WRITE) -> tuple[int, Any]:
    async with api.http.post(f"{api.url}{path}", headers=auth(token), json=body) as response:
        return response.status, await response.json()


# --------------------------------------------------------------------------- reading versions


async def test_versions_list_newest_first_with_live_size_and_usage(api: Running, seeded: None) -> None:
    status, body = await get(api, f"/v1/orders/{ORDER}/versions")
    assert status == 200
    assert body["order_id"] == ORDER and body["live_version"] == 2
    listed = body["versions"]
    assert [v["number"] for v in listed] == [3, 2, 1]
    assert [v["live"] for v in listed] == [False, True, False]
    assert [v["parent"] for v in listed] == [2, 1, None]
    assert [v["kind"] for v in listed] == ["rollback", "edit", "generation"]
    assert listed[1]["instruction"] == "change the phone to +351 222 999 888"
    assert listed[2]["files"] == 4 and listed[2]["bytes"] == sum(len(c) for c, _ in V1.values())
    assert listed[2]["usage"] == {"input_tokens": 1000, "output_tokens": 200, "calls": 3, "cost_usd": 0.0123}
    assert listed[2]["cost_usd"] == 0.0123 and listed[1]["cost_usd"] == 0
    assert all(v["created_at"] for v in listed)

    status, body = await get(api, f"/v1/orders/{ORDER}/versions?limit=1")
    assert status == 200 and [v["number"] for v in body["versions"]] == [3]
    status, body = await get(api, f"/v1/orders/{ORDER}/versions?limit=0")
    assert status == 400 and "limit" in body["error"]["message"]
    status, body = await get(api, "/v1/orders/999/versions")
    assert status == 404 and "order 999" in body["error"]["message"]


async def test_an_order_without_versions_lists_none(api: Running, db: asyncpg.Connection) -> None:
    await db.execute("INSERT INTO site_orders (id, brief) VALUES (8, '{}')")
    status, body = await get(api, "/v1/orders/8/versions")
    assert status == 200 and body == {"order_id": 8, "live_version": None, "versions": []}


async def test_version_detail_has_its_files_usage_instruction_parent_and_quality(api: Running, seeded: None) -> None:
    status, body = await get(api, f"/v1/orders/{ORDER}/versions/2")
    assert status == 200
    assert body["number"] == 2 and body["parent"] == 1 and body["kind"] == "edit" and body["live"] is True
    assert body["instruction"] == "change the phone to +351 222 999 888"
    assert body["quality"] == {"checks": {"links": "ok"}}
    assert body["files"] == [
        {
            "path": path,
            "sha256": hashlib.sha256(V2[path][0]).hexdigest(),
            "bytes": len(V2[path][0]),
            "media_type": V2[path][1],
        }
        for path in sorted(V2)
    ]
    assert body["bytes"] == sum(len(c) for c, _ in V2.values())


@pytest.mark.parametrize(
    ("path", "status", "named"),
    [
        ("/versions/abc", 400, "n must be"),
        ("/versions/0", 400, "n must be"),
        ("/versions/-1", 400, "n must be"),
        ("/versions/99999999999", 400, "n must be"),
        ("/versions/9", 404, "n: order 7 has no version 9"),
        ("/versions/x/diff", 400, "n must be"),
        ("/versions/9/diff", 404, "n: order 7 has no version 9"),
        ("/versions/2/diff?against=zero", 400, "against must be"),
        ("/versions/2/diff?against=0", 400, "against must be"),
        ("/versions/2/diff?against=9", 404, "against: order 7 has no version 9"),
        ("/versions/x/site/index.html", 400, "n must be"),
    ],
)
async def test_a_bad_version_number_is_refused_naming_the_parameter(
    api: Running, seeded: None, path: str, status: int, named: str
) -> None:
    got, body = await get(api, f"/v1/orders/{ORDER}{path}")
    assert got == status, body
    assert named in body["error"]["message"]


# --------------------------------------------------------------------------- diffs


async def test_diff_against_the_parent_shows_changed_added_and_removed_files(api: Running, seeded: None) -> None:
    status, body = await get(api, f"/v1/orders/{ORDER}/versions/2/diff")
    assert status == 200
    assert body["version"] == 2 and body["against"] == 1
    assert [c["path"] for c in body["changed"]] == ["assets/logo.png", "index.html"]
    logo, index = body["changed"]
    assert logo["binary"] is True and logo["diff"] is None
    assert logo["from_sha256"] == hashlib.sha256(PNG).hexdigest()
    assert index["binary"] is False and index["media_type"] == "text/html"
    assert index["diff"] == (
        "--- v1/index.html\n"
        "+++ v2/index.html\n"
        "@@ -1,3 +1,3 @@\n"
        " <h1>Rosa's Bakery</h1>\n"
        "-<p>Call +351 222 000 111</p>\n"
        "+<p>Call +351 222 999 888</p>\n"
        " <p>Open daily</p>\n"
    )
    assert body["added"] == [
        {
            "path": "pricing.html",
            "sha256": hashlib.sha256(b"<h1>Pricing</h1>").hexdigest(),
            "bytes": 16,
            "media_type": "text/html",
        }
    ]
    assert [r["path"] for r in body["removed"]] == ["about.html"]
    assert body["unchanged"] == 1  # assets/style.css, stored once for both versions


async def test_diff_against_any_version_and_of_the_first_version(api: Running, seeded: None) -> None:
    # 3 rolled back to 1's files: from 2 to 3 is the edit undone.
    status, body = await get(api, f"/v1/orders/{ORDER}/versions/3/diff?against=2")
    assert status == 200 and body["against"] == 2
    index = next(c for c in body["changed"] if c["path"] == "index.html")
    assert "-<p>Call +351 222 999 888</p>\n+<p>Call +351 222 000 111</p>\n" in index["diff"]
    assert [a["path"] for a in body["added"]] == ["about.html"]
    assert [r["path"] for r in body["removed"]] == ["pricing.html"]

    status, body = await get(api, f"/v1/orders/{ORDER}/versions/3/diff?against=1")
    assert status == 200 and body["changed"] == [] and body["added"] == [] and body["removed"] == []
    assert body["unchanged"] == 4

    # Version 1 has no parent: compared with no site, every file is added.
    status, body = await get(api, f"/v1/orders/{ORDER}/versions/1/diff")
    assert status == 200 and body["against"] is None
    assert [a["path"] for a in body["added"]] == sorted(V1) and body["changed"] == [] and body["removed"] == []


async def test_diff_marks_a_last_line_without_newline(api: Running, db: asyncpg.Connection) -> None:
    await add_version(db, 9, 1, {"index.html": (b"a\nb", "text/html")})
    await add_version(db, 9, 2, {"index.html": (b"a\nc", "text/html")}, parent=1)
    status, body = await get(api, "/v1/orders/9/versions/2/diff")
    assert status == 200
    assert body["changed"][0]["diff"].endswith("-b\n\\ No newline at end of file\n+c\n\\ No newline at end of file\n")


# --------------------------------------------------------------------------- an old version's files


async def test_an_old_version_is_served_with_the_live_sites_headers(
    api: Running, seeded: None, settings: Settings
) -> None:
    async with api.http.get(f"{api.url}/v1/orders/{ORDER}/versions/1/site/", headers=auth()) as response:
        assert response.status == 200
        old = await response.read()
        old_headers = response.headers
    assert old == V1["index.html"][0]
    async with api.http.get(f"{api.url}/v1/orders/{ORDER}/site/", headers=auth()) as response:
        assert response.status == 200
        assert await response.read() == V2["index.html"][0], "the live site is version 2"
        live_headers = response.headers
    assert old_headers["Content-Type"].startswith("text/html")
    assert old_headers["ETag"] == f'"{hashlib.sha256(old).hexdigest()}"'
    for name in ("Content-Security-Policy", "X-Content-Type-Options", "Referrer-Policy", "Cache-Control"):
        assert old_headers[name] == live_headers[name], name
    assert "script-src 'none'" in old_headers["Content-Security-Policy"]

    async with api.http.get(f"{api.url}/v1/orders/{ORDER}/versions/1/site/assets/style.css", headers=auth()) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/css")
    async with api.http.get(f"{api.url}/v1/orders/{ORDER}/versions/1/site/about.html", headers=auth()) as r:
        assert r.status == 200 and await r.read() == V1["about.html"][0]
    async with api.http.get(f"{api.url}/v1/orders/{ORDER}/versions/2/site/about.html", headers=auth()) as r:
        assert r.status == 404, "about.html was removed in version 2"
    async with api.http.get(f"{api.url}/v1/orders/{ORDER}/versions/9/site/index.html", headers=auth()) as r:
        assert r.status == 404


async def test_an_old_versions_stream_token_sets_a_cookie_for_that_versions_site(api: Running, seeded: None) -> None:
    async with api.http.post(f"{api.url}/v1/orders/{ORDER}/stream-token", headers=auth()) as response:
        token = (await response.json())["token"]
    async with api.http.get(f"{api.url}/v1/orders/{ORDER}/versions/1/site/", params={"token": token}) as response:
        assert response.status == 200
        cookie = response.cookies[f"sitegen_site_{ORDER}"]
    assert cookie["path"] == f"/v1/orders/{ORDER}/versions/1/site/" and cookie["httponly"]


async def test_traversal_attempts_on_an_old_version_get_404(api: Running, seeded: None) -> None:
    port = int(api.url.rsplit(":", 1)[1])
    for attempt in HOSTILE:
        status, body = await raw_get(port, f"/v1/orders/{ORDER}/versions/1/site/{attempt}")
        assert status == 404, attempt
        assert json.loads(body)["error"]["type"] == "not_found", attempt
    assert (await raw_get(port, f"/v1/orders/{ORDER}/versions/1/site/index.html"))[0] == 200


# --------------------------------------------------------------------------- edits and rollbacks


async def job_of(redis: ArqRedis, job_id: str) -> Any:
    """The job as arq stored it (function, args, kwargs), read back with the worker's JSON deserializer."""
    info = await Job(job_id, redis, _deserializer=client.deserialize).info()
    assert info is not None, job_id
    return info


async def test_post_edit_enqueues_an_edit_site_job_with_its_arguments(
    api: Running, seeded: None, redis: ArqRedis, settings: Settings
) -> None:
    status, body = await post(
        api, f"/v1/orders/{ORDER}/edits", {"instruction": "  make the header blue  ", "base_version": 1}
    )
    assert status == 202, body
    assert body["queued"] is True and body["job_id"].startswith(f"edit_site:{ORDER}:")
    assert body["base_version"] == 1 and body["live_version"] == 2
    info = await job_of(redis, body["job_id"])
    assert info.function == "edit_site"
    assert info.args == [ORDER, "make the header blue"]  # JSON: a list
    assert info.kwargs == {"base_version": 1, "pages": None}
    assert await redis.zscore(settings.worker.queue_name, body["job_id"]) is not None

    status, second = await post(
        api, f"/v1/orders/{ORDER}/edits", {"instruction": "add a pricing page", "pages": ["index", "pricing"]}
    )
    assert status == 202 and second["job_id"] != body["job_id"], "each edit is a job of its own"
    info = await job_of(redis, second["job_id"])
    assert info.args == [ORDER, "add a pricing page"]
    assert info.kwargs == {"base_version": None, "pages": ["index", "pricing"]}


async def test_post_rollback_enqueues_a_rollback_site_job(
    api: Running, seeded: None, redis: ArqRedis, settings: Settings
) -> None:
    status, body = await post(api, f"/v1/orders/{ORDER}/rollback", {"version": 1})
    assert status == 202, body
    assert body["job_id"].startswith(f"rollback_site:{ORDER}:") and body["version"] == 1
    info = await job_of(redis, body["job_id"])
    assert info.function == "rollback_site" and info.args == [ORDER, 1] and info.kwargs == {}
    assert await redis.zscore(settings.worker.queue_name, body["job_id"]) is not None

    status, body = await post(api, f"/v1/orders/{ORDER}/rollback", {"version": 9})
    assert status == 404 and body["error"]["message"] == f"version: order {ORDER} has no version 9"


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({}, "instruction: required"),
        ({"instruction": "   "}, "instruction: required"),
        ({"instruction": 42}, "instruction: required"),
        ({"instruction": "x" * 2001}, "instruction: 2,001 characters, over the limit of 2,000"),
        ({"instruction": "blue\u0000header"}, "instruction: a NUL character"),
        ({"instruction": "ok", "base_version": "2"}, "base_version: must be"),
        ({"instruction": "ok", "base_version": 0}, "base_version: must be"),
        ({"instruction": "ok", "base_version": True}, "base_version: must be"),
        ({"instruction": "ok", "pages": "index"}, "pages: must be a list"),
        ({"instruction": "ok", "pages": []}, "pages: must be a list"),
        ({"instruction": "ok", "pages": [f"p{i}" for i in range(13)]}, "pages: must be a list"),
        ({"instruction": "ok", "pages": ["../etc"]}, "pages: '../etc' is not a page slug"),
        ({"instruction": "ok", "pages": ["index", "index"]}, "pages: a page is named twice"),
        ({"instruction": "ok", "colour": "blue"}, "unknown field(s): colour"),
    ],
)
async def test_an_invalid_edit_is_refused_naming_the_field(
    api: Running, seeded: None, redis: ArqRedis, body: dict[str, Any], named: str
) -> None:
    status, answer = await post(api, f"/v1/orders/{ORDER}/edits", body)
    assert status == 400, answer
    assert named in answer["error"]["message"]
    assert await redis.keys("arq:job:*") == [], "nothing enqueued"


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({}, "version: required"),
        ({"version": "1"}, "version: required"),
        ({"version": 0}, "version: required"),
        ({"version": 1.5}, "version: required"),
        ({"version": 1, "force": True}, "unknown field(s): force"),
    ],
)
async def test_an_invalid_rollback_is_refused_naming_the_field(
    api: Running, seeded: None, redis: ArqRedis, body: dict[str, Any], named: str
) -> None:
    status, answer = await post(api, f"/v1/orders/{ORDER}/rollback", body)
    assert status == 400, answer
    assert named in answer["error"]["message"]
    assert await redis.keys("arq:job:*") == []


async def test_edits_of_an_unknown_version_order_or_site_are_refused(
    api: Running, seeded: None, db: asyncpg.Connection, redis: ArqRedis
) -> None:
    status, body = await post(api, f"/v1/orders/{ORDER}/edits", {"instruction": "blue", "base_version": 9})
    assert status == 404 and body["error"]["message"] == f"base_version: order {ORDER} has no version 9"
    status, body = await post(api, "/v1/orders/999/edits", {"instruction": "blue"})
    assert status == 404 and "order 999 not found" in body["error"]["message"]
    await db.execute("INSERT INTO site_orders (id, brief) VALUES (8, '{}')")
    status, body = await post(api, "/v1/orders/8/edits", {"instruction": "blue"})
    assert status == 409 and "no site to edit yet" in body["error"]["message"]
    status, body = await post(api, "/v1/orders/8/rollback", {"version": 1})
    assert status == 409 and "no site to roll back yet" in body["error"]["message"]
    async with api.http.post(
        f"{api.url}/v1/orders/{ORDER}/edits", headers={**auth(WRITE), "Content-Type": "text/plain"}, data="blue"
    ) as response:
        assert response.status == 415
    assert await redis.keys("arq:job:*") == []


async def test_an_order_generated_by_the_previous_release_can_be_edited(
    api: Running, db: asyncpg.Connection, redis: ArqRedis
) -> None:
    """No version yet, but a succeeded generation with files: the worker makes its version 1 on the edit."""
    await db.execute("INSERT INTO site_orders (id, brief) VALUES (10, '{}')")
    generation = await db.fetchval(
        "INSERT INTO site_generations (order_id, status) VALUES (10, 'succeeded') RETURNING id"
    )
    await db.execute(
        "INSERT INTO site_files (generation_id, path, content, sha256, bytes, media_type)"
        " VALUES ($1, 'index.html', '<p>hi</p>', 'x', 9, 'text/html')",
        generation,
    )
    status, body = await post(api, "/v1/orders/10/edits", {"instruction": "blue"})
    assert status == 202 and body["live_version"] is None
    assert (await job_of(redis, body["job_id"])).function == "edit_site"


async def test_read_tokens_cannot_post_edits_or_rollbacks(api: Running, seeded: None, redis: ArqRedis) -> None:
    for path, body in (("edits", {"instruction": "blue"}), ("rollback", {"version": 1})):
        status, answer = await post(api, f"/v1/orders/{ORDER}/{path}", body, token=READ)
        assert status == 403 and answer["error"]["message"] == "this endpoint needs a write token", path
        async with api.http.post(f"{api.url}/v1/orders/{ORDER}/{path}", json=body) as response:
            assert response.status == 401, path
    assert await redis.keys("arq:job:*") == []


# --------------------------------------------------------------------------- through a real worker


async def result_of(redis: ArqRedis, job_id: str) -> Any:
    job = Job(job_id, redis, _queue_name=client.QUEUE_NAME, _deserializer=client.deserialize)
    return await job.result(timeout=60, poll_delay=0.05)


@pytest.mark.timeout(120)
async def test_an_edit_and_a_rollback_posted_to_the_api_run_on_a_worker_and_show_in_it(
    api: Running, start_worker: WorkerFactory, redis: ArqRedis
) -> None:
    """End to end with the offline provider: POST an edit, see version 2 and its diff; POST a rollback to 1."""
    await start_worker()
    await client.enqueue_generation(redis, 20, SAMPLE_BRIEF)
    assert (await wait_for_result(redis, 20))["status"] == "succeeded"

    status, body = await post(api, "/v1/orders/20/edits", {"instruction": "Make the header blue"})
    assert status == 202, body
    result = await result_of(redis, body["job_id"])
    assert result["status"] == "succeeded" and result["version"] == 2

    status, listed = await get(api, "/v1/orders/20/versions")
    assert [(v["number"], v["kind"], v["live"]) for v in listed["versions"]] == [
        (2, "edit", True),
        (1, "generation", False),
    ]
    assert listed["versions"][0]["instruction"] == "Make the header blue"
    status, diff = await get(api, "/v1/orders/20/versions/2/diff")
    assert status == 200 and diff["against"] == 1 and diff["added"] == [] and diff["removed"] == []
    style = next(c for c in diff["changed"] if c["path"] == "assets/style.css")
    assert "\n-  --primary: #9b315f;\n+  --primary: #1d4ed8;\n" in style["diff"]
    assert sorted(c["path"] for c in diff["changed"]) == ["assets/style.css", "manifest.json"]

    status, body = await post(api, "/v1/orders/20/rollback", {"version": 1})
    assert status == 202, body
    result = await result_of(redis, body["job_id"])
    assert result["status"] == "succeeded" and result["version"] == 3
    status, three = await get(api, "/v1/orders/20/versions/3")
    assert three["kind"] == "rollback" and three["rolled_back_to"] == 1 and three["live"] is True
    status, runs = await get(api, "/v1/orders/20/generations")
    assert [(r["kind"], r["version"], r["status"]) for r in runs["generations"]] == [
        ("rollback", 3, "succeeded"),
        ("edit", 2, "succeeded"),
        ("generation", 1, "succeeded"),
    ], "each run says what it was and the version it made"
    status, back = await get(api, "/v1/orders/20/versions/3/diff?against=1")
    assert back["changed"] == [] and back["unchanged"] == 6, "a rollback is the old version's files"
    async with api.http.get(f"{api.url}/v1/orders/20/site/assets/style.css", headers=auth()) as live:
        async with api.http.get(f"{api.url}/v1/orders/20/versions/1/site/assets/style.css", headers=auth()) as one:
            assert await live.read() == await one.read()


async def test_a_stream_opened_after_posting_an_edit_follows_the_edit_not_the_previous_run(
    api: Running, start_worker: WorkerFactory, redis: ArqRedis
) -> None:
    """Regression (found building the dashboard's edit box): the event stream asked only whether the order's
    generate_site job was pending before it sent `end`, so a stream opened after POST /edits, while the edit
    was still in the queue, ended at once with the previous generation's `end`. It now also looks for the
    order's edits and rollbacks in arq's queue (where a job stays until it ends), and follows the edit."""
    worker = await start_worker()
    await client.enqueue_generation(redis, 21, SAMPLE_BRIEF)
    assert (await wait_for_result(redis, 21))["status"] == "succeeded"
    await close_worker(worker)  # no replica: the edit stays in the queue

    status, body = await post(api, "/v1/orders/21/edits", {"instruction": "Make the header blue"})
    assert status == 202, body
    async with api.http.get(f"{api.url}/v1/orders/21/events", headers=auth()) as response:
        stream = sse(response)
        while (await anext(stream)).kind != "comment":  # the generation's rows, then silence: no `end`
            pass
        await start_worker()
        rest = [e async for e in stream if e.kind != "comment"]
    assert rest[-1].kind == "end" and rest[-1].data["status"] == "succeeded"
    kinds = [(e.data.get("details") or {}).get("event") for e in rest[:-1]]
    assert kinds[0] == "edit.started" and kinds[-1] == "edit.succeeded", kinds
    assert rest[-1].data["generation_id"] == (await result_of(redis, body["job_id"]))["generation_id"]


async def test_the_live_file_read_is_one_key_lookup_with_a_thousand_versions_and_stale_statistics(
    db: asyncpg.Connection,
) -> None:
    """Regression (bench `edits`, 2026-12-08): with 1,000 versions of one order and statistics not yet updated,
    the live-file read joined the order to every version's copy of the path and filtered them (148 buffers
    against 9). It reads the live version first now, so the file is one primary-key lookup whatever the
    planner believes; its plan is checked here (timings belong to the bench)."""
    from worker.store import QUERIES

    await add_version(db, 30, 1, {"index.html": (b"<h1>v1</h1>", "text/html")})
    await db.execute(
        "INSERT INTO site_versions (order_id, number, parent, kind, usage, quality)"
        " SELECT 30, n, n - 1, 'rollback', '{}', '{}' FROM generate_series(2, 1000) AS n"
    )
    await db.execute(
        "INSERT INTO site_version_files (order_id, number, path, sha256, bytes, media_type)"
        " SELECT 30, n, f.path, f.sha256, f.bytes, f.media_type FROM generate_series(2, 1000) AS n,"
        " site_version_files f WHERE f.order_id = 30 AND f.number = 1"
    )
    await db.execute("UPDATE site_orders SET live_version = 1000 WHERE id = 30")
    for query, args in (("api_site_file", (30, "index.html")), ("api_site_files", (30,))):
        plan = json.loads(await db.fetchval(f"EXPLAIN (FORMAT JSON) {QUERIES[query]}", *args))
        scans = []

        def walk(node: dict[str, Any], scans: list[dict[str, Any]] = scans) -> None:
            if node.get("Relation Name") == "site_version_files":
                scans.append(node)
            for child in node.get("Plans", []):
                walk(child)

        walk(plan[0]["Plan"])
        assert scans, (query, plan)
        for scan in scans:
            assert scan["Node Type"] in ("Index Scan", "Index Only Scan", "Bitmap Heap Scan"), (query, scan)
            condition = scan.get("Index Cond") or scan.get("Recheck Cond") or ""
            if scan["Node Type"] == "Bitmap Heap Scan":
                condition = json.dumps(scan)
            assert "number" in condition, f"{query}: the version is part of the index lookup, not a filter: {scan}"
    assert (await db.fetchrow(QUERIES["api_site_file"], 30, "index.html"))["content"] == b"<h1>v1</h1>"


async def test_an_edits_events_replay_from_last_event_id_with_their_own_kinds(
    api: Running, start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    """Issue 22, section 3: an edit streams over the order's SSE endpoint with its own event kinds, and a client
    reconnecting with Last-Event-ID gets the rest of them, no gap and no duplicate, then the edit's `end`."""
    await start_worker()
    await client.enqueue_generation(redis, 23, SAMPLE_BRIEF)
    assert (await wait_for_result(redis, 23))["status"] == "succeeded"
    status, body = await post(api, "/v1/orders/23/edits", {"instruction": "Make the header blue"})
    assert status == 202, body
    result = await result_of(redis, body["job_id"])
    assert result["status"] == "succeeded"
    rows = await db.fetch(
        "SELECT id, details ->> 'event' AS event FROM site_generation_logs WHERE order_id = 23 AND generation_id = $1"
        " ORDER BY id",
        result["generation_id"],
    )
    kinds = [r["event"] for r in rows]
    assert kinds[0] == "edit.started" and kinds[-1] == "edit.succeeded", kinds
    assert {"edit.phase.started", "edit.phase.done"} <= set(kinds) and not any(
        k.startswith("generation.") for k in kinds if k
    )
    middle = rows[len(rows) // 2]["id"]
    headers = {**auth(), "Last-Event-ID": str(middle)}
    async with api.http.get(f"{api.url}/v1/orders/23/events", headers=headers) as response:
        events = [e async for e in sse(response) if e.kind != "comment"]
    assert [e.id for e in events[:-1]] == [r["id"] for r in rows if r["id"] > middle]
    assert events[-1].kind == "end" and events[-1].data == {
        "status": "succeeded",
        "generation_id": result["generation_id"],
    }
