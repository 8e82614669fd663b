"""Issue 22: site versions and edits, end to end through in-process workers on real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from arq import ArqRedis
from arq.jobs import Job, JobResult, JobStatus, SerializationError
from arq.worker import Worker

from tests.helpers import (
    SAMPLE_BRIEF,
    WorkerFactory,
    cli_env,
    close_worker,
    remote,
    run_sitegen,
    wait_for_result,
    wait_until,
    with_ai,
)
from worker import client
from worker.local.fake_server import FakeProviderServer
from worker.local.services import LocalServices
from worker.settings import Settings


def site_files(settings: Settings, order_id: int) -> dict[str, bytes]:
    root = Path(settings.output.dir).resolve() / str(order_id)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


async def generated(
    start_worker: WorkerFactory, redis: ArqRedis, order_id: int, custom: Settings | None = None, **overrides: Any
) -> Worker:
    worker = await start_worker(custom, **overrides)
    await client.enqueue_generation(redis, order_id, SAMPLE_BRIEF)
    assert (await wait_for_result(redis, order_id))["status"] == "succeeded"
    return worker


async def edit(redis: ArqRedis, order_id: int, instruction: str, **kwargs: Any) -> dict[str, Any]:
    job = await client.enqueue_edit(redis, order_id, instruction, **kwargs)
    assert job is not None
    result: dict[str, Any] = await job.result(timeout=60, poll_delay=0.05)
    return result


async def failed(job: Job) -> JobResult:
    """The result info of a job that must have failed (its result is our JSON description of the error)."""
    with pytest.raises(SerializationError):
        await job.result(timeout=60, poll_delay=0.05)
    info = await job.result_info()
    assert info is not None
    return info


async def events(db: asyncpg.Connection, order_id: int) -> list[str]:
    rows = await db.fetch(
        "SELECT details ->> 'event' AS event FROM site_generation_logs WHERE order_id = $1 ORDER BY id", order_id
    )
    return [r["event"] for r in rows if r["event"]]


async def test_a_generation_makes_version_1_live(
    start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection, settings: Settings
) -> None:
    await generated(start_worker, redis, 31)
    assert await db.fetchval("SELECT live_version FROM site_orders WHERE id = 31") == 1
    version = await db.fetchrow("SELECT * FROM site_versions WHERE order_id = 31")
    assert version["number"] == 1 and version["kind"] == "generation" and version["parent"] is None
    assert version["plan"]["site_name"]
    files = await db.fetch("SELECT path, sha256 FROM site_version_files WHERE order_id = 31 AND number = 1")
    on_disk = site_files(settings, 31)
    assert {f["path"]: f["sha256"] for f in files} == {p: hashlib.sha256(c).hexdigest() for p, c in on_disk.items()}


async def test_a_colour_edit_changes_only_the_stylesheet(
    start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection, settings: Settings
) -> None:
    """Acceptance 1: an edit changes only what it should; the other files are byte-identical."""
    await generated(start_worker, redis, 32)
    before = site_files(settings, 32)
    result = await edit(redis, 32, "Make the header blue")
    assert result["status"] == "succeeded" and result["kind"] == "edit" and result["version"] == 2
    after = site_files(settings, 32)
    changed = sorted(p for p in before if before[p] != after[p])
    assert changed == ["assets/style.css", "manifest.json"]
    assert b"--primary: #1d4ed8" in after["assets/style.css"]
    assert await db.fetchval("SELECT live_version FROM site_orders WHERE id = 32") == 2
    v2 = await db.fetchrow("SELECT * FROM site_versions WHERE order_id = 32 AND number = 2")
    assert v2["parent"] == 1 and v2["kind"] == "edit" and v2["instruction"] == "Make the header blue"
    # Stored by content: the edit stored the new stylesheet and manifest alone.
    shared = await db.fetchval(
        "SELECT count(*) FROM site_version_files a JOIN site_version_files b ON a.path = b.path AND a.sha256 = b.sha256"
        " WHERE a.order_id = 32 AND b.order_id = 32 AND a.number = 1 AND b.number = 2"
    )
    assert shared == len(before) - 2
    kinds = await events(db, 32)
    assert kinds[-5:] == ["edit.phase.done", "edit.phase.started", "edit.changed", "edit.phase.done", "edit.succeeded"]
    assert "edit.started" in kinds


async def test_adding_a_page_links_it_from_every_page(
    start_worker: WorkerFactory, redis: ArqRedis, settings: Settings
) -> None:
    await generated(start_worker, redis, 33)
    before = site_files(settings, 33)
    result = await edit(redis, 33, "Add a pricing page")
    assert result["status"] == "succeeded", result
    after = site_files(settings, 33)
    assert "pricing.html" in after and "pricing.html" not in before
    for path, content in after.items():
        if path.endswith(".html"):
            assert b'href="pricing.html"' in content, path
    assert after["assets/style.css"] == before["assets/style.css"]
    assert "pricing.html" in json.loads(after["manifest.json"])["pages"]


async def test_a_phone_number_and_a_section_removal(
    start_worker: WorkerFactory, redis: ArqRedis, settings: Settings, db: asyncpg.Connection
) -> None:
    """The phone number changes everywhere it is, in one answer per page. Regression (bench `edits`): the contact
    page has the number twice, and the offline provider's block for it matched both places, so it was re-asked
    twice and rewritten whole, and its whole-file rewrite changed the first place only."""
    await generated(start_worker, redis, 34)
    before = site_files(settings, 34)
    old_number = b'href="tel:+351222000111"'
    assert before["contact.html"].count(old_number) >= 2
    phone = await edit(redis, 34, "Change the phone number to +1 555 0100")
    assert phone["status"] == "succeeded", phone
    after = site_files(settings, 34)
    pages = [p for p in after if p.endswith(".html")]
    assert all(b'href="tel:+15550100"' in after[p] and old_number not in after[p] for p in pages)
    kinds = await events(db, 34)
    assert "model.answer_rejected" not in kinds and "edit.fallback" not in kinds
    assert after["assets/style.css"] == before["assets/style.css"]
    removed = await edit(redis, 34, "Remove the services section", pages=["index"])
    assert removed["status"] == "succeeded", removed
    final = site_files(settings, 34)
    assert b'id="services"' not in final["index.html"] and b'id="services"' in before["index.html"]
    assert final["about.html"] == after["about.html"]


async def test_an_edit_the_model_cannot_do_fails_and_leaves_the_live_version(
    start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection, settings: Settings
) -> None:
    """Acceptance 1: a failed edit leaves the live version unchanged on disk and in the database."""
    await generated(start_worker, redis, 35)
    before = site_files(settings, 35)
    job = await client.enqueue_edit(redis, 35, "Write me a poem about the sea")
    assert job is not None
    info = await failed(job)
    assert not info.success and "cannot carry out" in str(info.result)
    assert site_files(settings, 35) == before
    assert await db.fetchval("SELECT live_version FROM site_orders WHERE id = 35") == 1
    row = await db.fetchrow("SELECT status, error FROM site_generations WHERE order_id = 35 AND kind = 'edit'")
    assert row["status"] == "failed" and "offline provider understands" in row["error"]["message"]
    kinds = await events(db, 35)
    assert kinds[-1] == "edit.failed"


async def test_an_edit_limited_to_a_page_the_site_lacks_fails_naming_pages(
    start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection, settings: Settings
) -> None:
    """`pages` naming a page the site does not have (and the edit does not add) was accepted silently and the
    edit applied to other files; it fails now with an error naming `pages` and the site's pages, stored on
    the edit and in its progress log, the live version kept. A page the edit adds may be named."""
    await generated(start_worker, redis, 38)
    before = site_files(settings, 38)
    job = await client.enqueue_edit(redis, 38, "Make the header blue", pages=["index", "pricing"])
    assert job is not None
    info = await failed(job)
    assert not info.success and "pages: the site has no page 'pricing'" in str(info.result)
    assert site_files(settings, 38) == before
    row = await db.fetchrow("SELECT status, error FROM site_generations WHERE order_id = 38 AND kind = 'edit'")
    assert (
        row["status"] == "failed"
        and row["error"]["details"]["field"] == "pages"
        and "its pages: about, " in row["error"]["message"]
    )
    logged = await db.fetchval(
        "SELECT message FROM site_generation_logs WHERE order_id = 38 AND details ->> 'event' = 'edit.failed'"
    )
    assert "pages: the site has no page 'pricing'" in logged
    added = await edit(redis, 38, "Add a pricing page", pages=["pricing"])
    assert added["status"] == "succeeded" and "pricing.html" in site_files(settings, 38)


async def test_five_edits_sent_at_once_run_one_after_another_in_order(
    start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection, settings: Settings
) -> None:
    """Acceptance 1: five edits sent at once are applied one after another, in order, each exactly once."""
    await generated(start_worker, redis, 36, max_jobs=8)
    await start_worker(max_jobs=8)  # a second replica takes some of them
    texts = [f"Change the phone number to +1 555 010{i}" for i in range(5)]
    jobs: list[Job] = []
    for text in texts:
        job = await client.enqueue_edit(redis, 36, text)
        assert job is not None
        jobs.append(job)
    results = [await j.result(timeout=60, poll_delay=0.05) for j in jobs]
    assert [r["version"] for r in results] == [2, 3, 4, 5, 6]
    rows = await db.fetch(
        "SELECT number, parent, instruction FROM site_versions WHERE order_id = 36 AND kind = 'edit' ORDER BY number"
    )
    assert [r["instruction"] for r in rows] == texts
    assert [r["parent"] for r in rows] == [1, 2, 3, 4, 5]
    runs = await db.fetch(
        "SELECT started_at, finished_at FROM site_generations WHERE order_id = 36 AND kind = 'edit' ORDER BY version"
    )
    for earlier, later in itertools.pairwise(runs):
        assert earlier["finished_at"] <= later["started_at"]
    assert b"tel:+15550104" in site_files(settings, 36)["index.html"]


async def test_edits_sent_in_the_same_millisecond_run_in_the_order_sent(
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: `test_five_edits_sent_at_once_run_one_after_another_in_order` failed now and then (versions
    [2, 4, 3, 5, 6]). arq stamps a job with its enqueue time in milliseconds; edits sent within one
    millisecond tied, and the tie was broken by the order replicas registered them (and, for jobs still in
    the queue, by their random job ids), not by the order they were sent. The client's edit and rollback job
    ids now sort by send time, and both the queue's and PostgreSQL's order break ties by job id. Here every
    edit is stamped with the same millisecond."""
    await generated(start_worker, redis, 37, max_jobs=8)
    await start_worker(max_jobs=8)
    same_ms = int(time.time() * 1000)
    monkeypatch.setattr("arq.connections.timestamp_ms", lambda: same_ms)
    texts = [f"Change the phone number to +1 555 020{i}" for i in range(5)]
    jobs = [await client.enqueue_edit(redis, 37, text) for text in texts]
    results = [await j.result(timeout=60, poll_delay=0.05) for j in jobs if j is not None]
    runs = await db.fetch(
        "SELECT id, job_id, job_enqueued_at, created_at, started_at, version FROM site_generations"
        " WHERE order_id = 37 AND kind = 'edit' ORDER BY id"
    )
    assert [r["version"] for r in results] == [2, 3, 4, 5, 6], ([j.job_id for j in jobs if j], [dict(r) for r in runs])
    rows = await db.fetch("SELECT instruction FROM site_versions WHERE order_id = 37 AND kind = 'edit' ORDER BY number")
    assert [r["instruction"] for r in rows] == texts


async def test_an_edit_sent_while_the_generation_runs_waits_for_it(
    start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection, settings: Settings
) -> None:
    """Acceptance 1: an edit sent while the generation still runs waits for it (and then applies to it)."""
    await start_worker(max_jobs=4)
    await client.enqueue_generation(redis, 37, SAMPLE_BRIEF)
    result = await edit(redis, 37, "Make the header green")
    assert result["status"] == "succeeded" and result["version"] == 2
    generation = await db.fetchrow(
        "SELECT finished_at FROM site_generations WHERE order_id = 37 AND kind = 'generation'"
    )
    started = await db.fetchval("SELECT started_at FROM site_generations WHERE order_id = 37 AND kind = 'edit'")
    assert generation["finished_at"] <= started


async def test_a_rollback_makes_an_old_version_live_as_a_new_version(
    start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection, settings: Settings
) -> None:
    await generated(start_worker, redis, 38)
    first = site_files(settings, 38)
    await edit(redis, 38, "Make the header blue")
    job = await client.enqueue_rollback(redis, 38, 1)
    assert job is not None
    result = await job.result(timeout=60, poll_delay=0.05)
    assert result["status"] == "succeeded" and result["version"] == 3
    assert site_files(settings, 38) == first
    v3 = await db.fetchrow("SELECT kind, parent, rolled_back_to FROM site_versions WHERE order_id = 38 AND number = 3")
    assert dict(v3) == {"kind": "rollback", "parent": 2, "rolled_back_to": 1}
    assert await db.fetchval("SELECT count(*) FROM site_versions WHERE order_id = 38") == 3


async def test_edits_and_rollbacks_of_orders_without_a_site_or_version_fail_naming_what_to_fix(
    start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection
) -> None:
    await generated(start_worker, redis, 39)
    job = await client.enqueue_rollback(redis, 39, 7)
    assert job is not None
    info = await failed(job)
    assert not info.success and "no version 7" in str(info.result)
    await db.execute("INSERT INTO site_orders (id) VALUES (40)")
    job = await client.enqueue_edit(redis, 40, "Make the header blue")
    assert job is not None
    info = await failed(job)
    assert not info.success and "has no site to edit yet" in str(info.result)


async def test_a_cancel_ends_a_waiting_edit_and_one_still_in_the_queue(
    start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection, settings: Settings
) -> None:
    """Acceptance 1: cancel works on a queued edit (in the queue, or waiting for its turn)."""
    await close_worker(await generated(start_worker, redis, 41))  # no replica runs: the edit stays queued
    from worker.store import Store, create_pool

    queued = await client.enqueue_edit(redis, 41, "Make the header blue")
    assert queued is not None
    pool = await create_pool(settings.database, max_size=1, name="test")
    try:
        await Store(pool, replica_id="t", lease_s=5).request_cancel(41, "test cancel")
    finally:
        await pool.close()
    await start_worker()
    result = await queued.result(timeout=60, poll_delay=0.05)
    assert result["status"] == "cancelled"
    assert await db.fetchval("SELECT live_version FROM site_orders WHERE id = 41") == 1
    # A later edit is a new request and runs.
    assert (await edit(redis, 41, "Make the header red"))["version"] == 2


@pytest.mark.usefixtures("provider_key")
async def test_a_cancel_ends_a_running_edit_at_its_phase_and_leaves_the_live_version(
    fake: FakeProviderServer,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
    settings: Settings,
    services: LocalServices,
) -> None:
    """Acceptance 1: cancel works on a running edit. `sitegen cancel` ends it at its next safe point (here, its
    change-the-files call, which hangs until then): cancelled, its committed plan kept, no new version, the live
    site on disk and in the store as it was, and the edit not retried.

    Regression (found writing this test): `sitegen cancel` and POST /cancel aborted the order's generation job id,
    never the running edit's own, so the edit's model call in flight was not interrupted: it ran on until its
    read timeout."""
    custom = with_ai(settings, {"remote": remote("openai", fake.url, read_timeout_s=30)})
    await generated(start_worker, redis, 43, custom)
    before = site_files(settings, 43)
    fake.script("hang", when=_editing)
    calls = len(fake.requests)
    job = await client.enqueue_edit(redis, 43, "Make the header blue")
    assert job is not None
    await asyncio.to_thread(fake.wait_for_requests, calls + 2)  # the edit's plan, then its hanging edit call

    code, out = await run_sitegen(cli_env(services), "cancel", "43")
    assert code == 0 and "cancel requested" in out, out

    with pytest.raises(SerializationError):  # the job ends aborted, as a cancelled generation's does
        await job.result(timeout=30, poll_delay=0.05)
    run = await db.fetchrow(
        "SELECT id, kind, status, error, version FROM site_generations WHERE order_id = 43 ORDER BY id DESC LIMIT 1"
    )
    assert (run["kind"], run["status"], run["version"]) == ("edit", "cancelled", None)
    assert run["error"]["type"] == "Cancelled" and run["error"]["phase"] == "edit_files"
    phases = await db.fetch("SELECT phase FROM site_generation_phases WHERE generation_id = $1", run["id"])
    assert [p["phase"] for p in phases] == ["edit_plan"], "the committed phase is kept"
    assert await db.fetchval("SELECT live_version FROM site_orders WHERE id = 43") == 1
    assert await db.fetchval("SELECT count(*) FROM site_versions WHERE order_id = 43") == 1
    assert site_files(settings, 43) == before
    assert "edit cancelled at phase edit_files; committed phases kept: edit_plan" in [
        r["message"] for r in await db.fetch("SELECT message FROM site_generation_logs WHERE order_id = 43")
    ]
    assert len(fake.requests) == calls + 2, "a cancelled edit is not retried"


async def test_rollback_under_concurrent_reads_never_shows_a_mix(
    start_worker: WorkerFactory, redis: ArqRedis, settings: Settings
) -> None:
    """Acceptance 1: a rollback is atomic under concurrent reads: every read of the live folder sees one whole
    version. (It failed now and then under load: its reader read the manifest and the files by path, so a
    swap between two of its reads made it see a mix that no single folder ever held.)"""
    await generated(start_worker, redis, 42)
    await edit(redis, 42, "Add a pricing page")
    with_pricing = site_files(settings, 42)
    root = Path(settings.output.dir).resolve() / "42"
    seen: set[str] = set()
    stop = asyncio.Event()

    def exists(path: str, folder: int) -> bool:
        try:
            os.stat(path, dir_fd=folder)
        except FileNotFoundError:
            return False
        return True

    async def read() -> None:
        # One sample reads one folder (opened once, its files read relative to it), and counts only if that
        # folder was `<order_id>/` from before the first read to after the last: a sample that straddles
        # the swap reads two folders, as two HTTP requests a swap falls between do, and says nothing.
        while not stop.is_set():
            await asyncio.sleep(0)
            try:
                folder = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                continue
            try:
                live = os.fstat(folder).st_ino
                manifest_fd = os.open("manifest.json", os.O_RDONLY, dir_fd=folder)
                try:
                    manifest = json.loads(os.read(manifest_fd, 1 << 20))
                finally:
                    os.close(manifest_fd)
                paths = {f["path"] for f in manifest["files"]}
                present = {p for p in paths if exists(p, folder)}
                extra = exists("pricing.html", folder) and "pricing.html" not in paths
                if os.stat(root).st_ino != live:
                    continue  # swapped during the sample
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            finally:
                os.close(folder)
            seen.add("ok" if present == paths and not extra else "mix")

    reader = asyncio.create_task(read())
    job = await client.enqueue_rollback(redis, 42, 1)
    assert job is not None
    result = await job.result(timeout=60, poll_delay=0.01)
    stop.set()
    await reader
    assert result["status"] == "succeeded"
    assert "mix" not in seen and "ok" in seen
    assert not (root / "pricing.html").exists() and with_pricing != site_files(settings, 42)


def _editing(body: Any) -> bool:
    """The fake provider's filter for the requests of task `editing` (its prompt asks for search/replace blocks)."""
    return "with search/replace blocks" in json.dumps(body)


@pytest.mark.usefixtures("provider_key")
async def test_a_block_that_does_not_match_is_re_asked_then_the_file_is_rewritten_whole(
    fake: FakeProviderServer, start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection, settings: Settings
) -> None:
    """Acceptance 1: a search block that does not match is re-asked (ai.max_output_retries), then the file is
    rewritten whole, and the fallback is logged."""
    custom = with_ai(settings, {"remote": remote("openai", fake.url)})
    await generated(start_worker, redis, 51, custom)
    bad = json.dumps({"path": "assets/style.css", "blocks": [{"search": "--primary: #000001", "replace": "x"}]})
    fake.script(*[f"text:{bad}"] * 3, when=_editing)
    result = await edit(redis, 51, "Make the header blue")
    assert result["status"] == "succeeded", result
    assert b"--primary: #1d4ed8" in site_files(settings, 51)["assets/style.css"]
    kinds = await events(db, 51)
    assert kinds.count("model.answer_rejected") == 3
    assert "edit.fallback" in kinds
    problem = await db.fetchval(
        "SELECT details ->> 'problem' FROM site_generation_logs WHERE order_id = 51"
        " AND details ->> 'event' = 'model.answer_rejected' ORDER BY id LIMIT 1"
    )
    assert "block 1" in problem and "matches nothing" in problem


#: The read timeout that ends the hanging call of `test_the_files_of_one_edit_are_asked_for_side_by_side`.
HUNG_S = 5.0


@pytest.mark.usefixtures("provider_key")
async def test_the_files_of_one_edit_are_asked_for_side_by_side(
    fake: FakeProviderServer, start_worker: WorkerFactory, redis: ArqRedis, settings: Settings
) -> None:
    """An edit of every page asks for the pages at once (bench `edits`: one after another, an edit of a 12-page
    site's every footer took 13 model calls' time). The first page's call hangs: the others are asked
    meanwhile. (Its read timeout then retries it, and the edit succeeds.)"""
    custom = with_ai(settings, {"remote": remote("openai", fake.url, read_timeout_s=HUNG_S)})
    await generated(start_worker, redis, 44, custom)
    pages = [p for p in site_files(settings, 44) if p.endswith(".html")]
    assert len(pages) >= 3
    fake.script("hang", when=_editing)
    calls = len(fake.requests)
    job = await client.enqueue_edit(redis, 44, "Change the phone number to +1 555 0107")
    assert job is not None
    # The plan, then the editing calls: at least 3 of them arrive while the first one hangs (it ends at its
    # read timeout, HUNG_S later; asked one after another, the second would come only then).
    arrived = await asyncio.to_thread(fake.wait_for_requests, calls + 4, 30)
    editing = [r for r in arrived[calls:] if _editing(r.body)]
    assert editing[0].fault == "hang"
    assert len([r for r in editing if r.at < editing[0].at + HUNG_S]) >= 3, [r.at - editing[0].at for r in editing]
    result = await job.result(timeout=60, poll_delay=0.05)
    assert result["status"] == "succeeded", result
    assert all(b'href="tel:+15550107"' in site_files(settings, 44)[p] for p in pages)


LAZY_BLOCK = json.dumps(
    {"path": "assets/style.css", "blocks": [{"search": ":root {", "replace": ":root {\n/* ... */"}]}
)


@pytest.mark.parametrize("fault", ["truncated", f"text:{LAZY_BLOCK}"], ids=["truncated", "lazy"])
@pytest.mark.usefixtures("provider_key")
async def test_a_truncated_or_lazy_answer_is_re_asked(
    fault: str,
    fake: FakeProviderServer,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
    settings: Settings,
) -> None:
    """Acceptance 1: a truncated answer (cut JSON) or a lazy one ("/* ... */" in place of code) is re-asked."""
    custom = with_ai(settings, {"remote": remote("openai", fake.url)})
    await generated(start_worker, redis, 52, custom)
    fake.script(fault, when=_editing)
    result = await edit(redis, 52, "Make the header blue")
    assert result["status"] == "succeeded", result
    css = site_files(settings, 52)["assets/style.css"]
    assert b"--primary: #1d4ed8" in css and b"/* ... */" not in css
    kinds = await events(db, 52)
    assert kinds.count("model.answer_rejected") == 1 and "edit.fallback" not in kinds


async def test_the_sweeper_sends_a_lost_edit_again_under_its_own_job_id(
    start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection, settings: Settings
) -> None:
    """An edit whose job left Redis (a flushed Redis, a job expired) is re-sent by the sweeper as an edit, with its
    own job id and instruction, and applied once (before issue 22's sweeper, it was re-sent as generate_site)."""
    await generated(start_worker, redis, 43)
    await db.execute(
        "INSERT INTO site_generations (order_id, kind, status, attempt, request, job_id, job_enqueued_at,"
        " heartbeat_at, created_at) VALUES (43, 'edit', 'queued', 1, $1, 'edit_site:43:lost', now(),"
        " now() - interval '1 hour', now() - interval '1 hour')",
        json.dumps({"instruction": "Make the header blue", "base_version": None, "pages": None, "live_version": 1}),
    )
    await start_worker()  # its sweep at startup finds the stale edit
    job = Job("edit_site:43:lost", redis, _queue_name=settings.worker.queue_name, _deserializer=client.deserialize)

    async def sent() -> bool:
        return await job.status() != JobStatus.not_found

    await wait_until(sent, timeout=30, interval=0.05, what="the sweeper to re-send the edit")
    result = await job.result(timeout=60, poll_delay=0.05)
    assert result["status"] == "succeeded" and result["version"] == 2
    assert b"--primary: #1d4ed8" in site_files(settings, 43)["assets/style.css"]
    assert await db.fetchval("SELECT count(*) FROM site_generations WHERE order_id = 43 AND kind = 'edit'") == 1


async def test_keep_versions_prunes_old_versions_but_never_the_live_one_or_a_used_blob(
    start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection, settings: Settings
) -> None:
    custom = settings.model_copy(update={"output": settings.output.model_copy(update={"keep_versions": 2})})
    await generated(start_worker, redis, 44, custom)
    await edit(redis, 44, "Make the header blue")
    await edit(redis, 44, "Make the header green")
    rollback = await client.enqueue_rollback(redis, 44, 3)
    assert rollback is not None and (await rollback.result(timeout=60, poll_delay=0.05))["version"] == 4
    assert [r["number"] for r in await db.fetch("SELECT number FROM site_versions WHERE order_id = 44 ORDER BY 1")] == [
        3,
        4,
    ]
    assert await db.fetchval("SELECT live_version FROM site_orders WHERE id = 44") == 4
    orphans = await db.fetchval(
        "SELECT count(*) FROM site_blobs b"
        " WHERE NOT EXISTS (SELECT 1 FROM site_version_files f WHERE f.sha256 = b.sha256)"
    )
    assert orphans == 0
    missing = await db.fetchval(
        "SELECT count(*) FROM site_version_files f"
        " WHERE NOT EXISTS (SELECT 1 FROM site_blobs b WHERE b.sha256 = f.sha256)"
    )
    assert missing == 0
    assert b"--primary: #15803d" in site_files(settings, 44)["assets/style.css"]


async def test_versions_cannot_be_changed(start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection) -> None:
    """Versions are immutable: PostgreSQL refuses an UPDATE of a version or of its files."""
    await generated(start_worker, redis, 45)
    with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="immutable"):
        await db.execute("UPDATE site_versions SET instruction = 'x' WHERE order_id = 45")
    with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="immutable"):
        await db.execute("UPDATE site_version_files SET bytes = 0 WHERE order_id = 45")


async def test_an_order_generated_by_a_previous_release_gets_version_1_when_first_edited(
    start_worker: WorkerFactory, redis: ArqRedis, db: asyncpg.Connection, settings: Settings
) -> None:
    """Rolling upgrade (docs/upgrading.md): a generation an older replica finished wrote site_files and no
    version; the API still serves it, and the first edit makes its version 1 from those files, then version 2."""
    await generated(start_worker, redis, 46)
    before = site_files(settings, 46)
    await db.execute("DELETE FROM site_versions WHERE order_id = 46")
    await db.execute("UPDATE site_orders SET live_version = NULL WHERE id = 46")
    await db.execute("UPDATE site_generations SET version = NULL WHERE order_id = 46")
    result = await edit(redis, 46, "Make the header blue")
    assert result["status"] == "succeeded" and result["version"] == 2
    v1 = await db.fetch("SELECT path, sha256 FROM site_version_files WHERE order_id = 46 AND number = 1")
    assert {r["path"]: r["sha256"] for r in v1} == {p: hashlib.sha256(c).hexdigest() for p, c in before.items()}
