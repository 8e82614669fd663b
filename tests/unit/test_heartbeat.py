"""The heartbeat's view of a claim (worker/pipeline/runner.py `Heartbeat`), without a database."""

from __future__ import annotations

import time
import uuid

import pytest

from worker.errors import ClaimLost
from worker.pipeline.runner import Heartbeat
from worker.store import Claim


def claim() -> Claim:
    return Claim(kind="started", generation_id=7, attempt=1, brief={}, token=uuid.uuid4())


def test_a_claim_no_beat_confirmed_for_longer_than_its_lease_may_be_lost() -> None:
    """Regression: test_a_replica_stalled_past_its_lease_leaves_the_job_to_its_new_owner failed now and then. A
    replica resumed from a stall (SIGSTOP) longer than its lease found its model call timed out and wrote
    "retrying in 0.8s" to the progress log while another replica owned the generation: nothing had told it
    yet that its claim was gone (its heartbeat had not beaten since). A run's model notices now require a
    beat to have confirmed the claim within the lease (`check_held`)."""
    heartbeat = Heartbeat()
    held = claim()
    heartbeat.track(held, "job-7")
    heartbeat.check_held(held, lease_s=8)  # just claimed: held

    assert held.token is not None
    heartbeat.confirmed[held.token] = time.monotonic() - 9  # the last beat that confirmed it: 9 s ago
    heartbeat.check(held)  # what a model call checks first: only what a beat found
    with pytest.raises(ClaimLost, match=r"generation 7: its lease was last confirmed 9\.\d s ago"):
        heartbeat.check_held(held, lease_s=8)


def test_a_claim_a_beat_found_taken_over_is_lost_at_once() -> None:
    heartbeat = Heartbeat()
    held = claim()
    heartbeat.track(held, None)
    assert held.token is not None
    heartbeat.lost.add(held.token)
    with pytest.raises(ClaimLost, match="taken over by another replica"):
        heartbeat.check_held(held, lease_s=8)
    heartbeat.forget(held)
    assert held.token not in heartbeat.confirmed
