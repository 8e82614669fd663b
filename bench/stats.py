"""Steady-state throughput of a run with a backlog, from each generation's start and finish.

A run with a model latency starts its `slots` generations together, so they finish in waves. Counting
finishes over a window is then biased by where the window's ends fall in a wave. The estimate used
before issue 15's last round took the rate after the first wave, `(n - slots) / (last finish - the
slots-th finish)`: both ends are maxima of jittered durations, and the later one is the maximum of
more sums, so the window grows with the number of slots. On an ideal schedule (every slot always
busy, every site exactly its model time) it reads 92% with 100 or 400 slots and 86% with 2,000 (see
tests/unit/test_bench_stats.py): the design was billed for the estimator's bias.

Little's law has no such bias: over a window in which every slot should be busy (the backlog not yet
empty), throughput = mean generations running / mean time a generation takes. It splits into the
two ways a run falls short of its ideal, `slots / (calls x latency)`:
- occupancy: the share of the slots that held a running generation (the rest is poll delay, the
  claim, the time between one generation's end and the next one's start, or starvation);
- speed: model time / site duration (the rest is CPU, the database and queueing for the event loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import fmean


@dataclass(frozen=True)
class Steady:
    rate: float  # generations per second
    occupancy: float  # mean running / slots over the window
    mean_duration_s: float
    window_s: float  # the window's length: from all slots first busy to the last start

    def of_ideal(self, slots: int, model_s: float) -> float:
        return self.rate / (slots / model_s)


def steady_state(spans: list[tuple[float, float]], slots: int) -> Steady | None:
    """Little's law over the backlog window of runs whose `spans` (start, finish) exceed `slots`.

    The window opens when the first `slots` generations have started (every slot busy for the first
    time) and closes at the last start (the backlog is empty after it). None when there is no such
    window (one wave, or fewer generations than slots).
    """
    if len(spans) <= slots or slots < 1:
        return None
    starts = sorted(s for s, _ in spans)
    lo, hi = starts[slots - 1], starts[-1]
    if hi <= lo:
        return None
    busy = sum(max(0.0, min(f, hi) - max(s, lo)) for s, f in spans)
    running = busy / (hi - lo)
    # The time in the system of the generations that arrived in the window (Little's W).
    mean_duration = fmean(f - s for s, f in spans if lo <= s <= hi)
    return Steady(
        rate=running / mean_duration, occupancy=running / slots, mean_duration_s=mean_duration, window_s=hi - lo
    )


def after_first_wave(finishes: list[float], slots: int) -> float:
    """The former estimate: finishes after the first wave over the time since it ended (biased low)."""
    finished = sorted(finishes)
    lo, hi = finished[slots - 1], finished[-1]
    return (len(finished) - slots) / (hi - lo)
