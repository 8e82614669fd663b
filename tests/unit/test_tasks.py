"""worker/tasks.py: stopping tasks for good, a lost cancel included."""

from __future__ import annotations

import asyncio

from worker.tasks import cancel_and_wait


async def test_a_task_that_loses_a_cancel_is_cancelled_again_and_ends() -> None:
    """A lost cancel (asyncio.wait_for on Python 3.11 swallows one that comes as its call finishes) hangs a
    shutdown that cancels once and waits without a bound: the API server's did (stop 24). The replica's
    shutdown, its metrics sampler and the tests' workers stop their tasks this way too (a test worker's
    teardown once hung for 119 s in CI, the cause not found)."""
    lost = asyncio.Event()

    async def loses_one_cancel() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            lost.set()  # and goes on, as a task whose cancel was swallowed does
        await asyncio.Event().wait()

    stubborn = asyncio.create_task(loses_one_cancel())
    done = asyncio.create_task(asyncio.sleep(0))
    await asyncio.sleep(0)
    async with asyncio.timeout(10):
        await cancel_and_wait([stubborn, done], "test", again_s=0.05)
    assert lost.is_set() and stubborn.cancelled() and done.done()
