"""A replica's stop, where a cancellation lands at the wrong moment (issue 21, the 600 s soak with SOAK_SEED=621816)."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import asyncpg
import pytest
from arq import ArqRedis
from arq.worker import Worker

from tests.helpers import SAMPLE_BRIEF, WorkerFactory, progress_messages, wait_until
from worker import client
from worker.settings import Settings
from worker.store import Store


async def test_a_stop_whose_cancellation_a_library_swallowed_still_ends_the_poll_loop(
    settings: Settings, start_worker: WorkerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect (soak, seed 621816): a replica logged "shutdown on SIGTERM, wait complete", then polled and
    recorded its health for 25 s until it was SIGKILLed. arq stops the poll loop by cancelling it once, and
    Python 3.11's `asyncio.wait_for` (redis-py 5 sends every command under it once a socket timeout is set)
    returns the inner result instead when the outer task is cancelled just as the inner one finishes
    (CPython gh-86296). The heart beat here swallows the cancel the same way, once."""
    in_beat = asyncio.Event()
    armed = False
    original = Worker.heart_beat

    async def heart_beat(self: Worker) -> None:
        await original(self)
        if armed:
            in_beat.set()
            try:
                await asyncio.get_running_loop().create_future()  # until the stop's cancel arrives
            except asyncio.CancelledError:
                pass  # swallowed, as wait_for does: Task.cancelling() still says a cancel was asked for

    monkeypatch.setattr(Worker, "heart_beat", heart_beat)
    worker = await start_worker()
    await wait_until(lambda: _started(worker), 30, what="the worker to poll")
    armed = True
    await asyncio.wait_for(in_beat.wait(), 30)
    worker.handle_sig(signal.SIGTERM)  # what arq does at the end of a SIGTERM's grace period: cancel the poll loop
    assert worker.main_task is not None
    done, _ = await asyncio.wait([worker.main_task], timeout=10)
    assert done, "the poll loop went on after its cancellation was swallowed"


async def _started(worker: Worker) -> bool:
    return worker.main_task is not None and "runtime" in worker.ctx


@pytest.mark.parametrize("phase", ["content", "assemble"])
async def test_a_phase_committed_as_the_job_is_cancelled_keeps_its_done_row(
    phase: str,
    settings: Settings,
    start_worker: WorkerFactory,
    redis: ArqRedis,
    db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Defect (soak, seed 621816): order 1084's code phase was committed in PostgreSQL, but its job was
    cancelled (the end of a SIGTERM's grace period) while waiting for the commit's answer; the hand-back
    followed and the "phase code done" row was never written, so the log said the phase never ended
    while the next replica resumed after it. The commit here answers only once the job was cancelled.
    The last phase's commit is the generation's success: it is logged, and nothing is handed back."""
    committed = asyncio.Event()
    answer = asyncio.Event()
    name = "finish_generation" if phase == "assemble" else "commit_phase"
    original = getattr(Store, name)

    async def slow_answer(self: Store, claim: Any, *args: Any, **kwargs: Any) -> Any:
        result = await original(self, claim, *args, **kwargs)
        if name == "finish_generation" or args[0] == phase:
            committed.set()
            await answer.wait()  # the answer is on its way when the cancel lands
        return result

    monkeypatch.setattr(Store, name, slow_answer)
    worker = await start_worker()
    await client.enqueue_generation(redis, 91, SAMPLE_BRIEF)
    await asyncio.wait_for(committed.wait(), 30)
    job = worker.tasks[client.job_id(91)]
    job.cancel()  # what arq does to the jobs still running at the end of a SIGTERM's grace period
    await asyncio.sleep(0)
    answer.set()
    await asyncio.gather(job, return_exceptions=True)
    last = "generation succeeded" if phase == "assemble" else "handed back at phase"
    await wait_until(lambda: _logged(db, 91, last), 30, what=f"the row {last!r}")

    messages = await progress_messages(db, 91)
    assert f"phase {phase} done" in messages, messages
    committed_phases = await db.fetchval(
        "SELECT count(*) FROM site_generation_phases p JOIN site_generations g ON g.id = p.generation_id "
        "WHERE g.order_id = 91 AND p.phase = $1",
        phase,
    )
    assert committed_phases == 1
    if phase == "assemble":
        assert await db.fetchval("SELECT status FROM site_generations WHERE order_id = 91") == "succeeded"
        assert not any(m.startswith("handed back") for m in messages), messages
    else:
        handed_back = next(i for i, m in enumerate(messages) if m.startswith("handed back at phase"))
        assert messages.index(f"phase {phase} done") < handed_back, "the phase's end is logged before the hand-back"


async def _logged(db: asyncpg.Connection, order_id: int, start: str) -> bool:
    return any(m.startswith(start) for m in await progress_messages(db, order_id))
