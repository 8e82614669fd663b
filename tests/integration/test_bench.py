"""`make bench` keeps working: every scenario but the profiled one, at a few sites each.

This asserts that the benchmark runs and reports, never how fast anything was: timings are for
`make bench` on a quiet machine, not for the suite (bench/README.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent

pytest.importorskip("psutil", reason="psutil is a dev dependency: `make install`")


#: How long a bench run stopped with Ctrl-C (SIGINT) gets to stop its servers before it is killed.
STOP_S = 30


def run_bench(args: list[str], *, timeout_s: float) -> str:
    """`python -m bench.run ARGS` without the caller's service settings; fails the test unless it exits 0 in
    `timeout_s`. One that takes longer is stopped as a person would, with SIGINT, so that it stops the
    PostgreSQL and Redis it started (a SIGKILL left them running), and killed only after STOP_S more. What it
    printed on stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SITEGEN_", "DATABASE_URL", "REDIS_URL"))}
    with subprocess.Popen(
        [sys.executable, "-m", "bench.run", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as bench:
        try:
            out, err = bench.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            bench.send_signal(signal.SIGINT)
            try:
                out, err = bench.communicate(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                bench.kill()
                out, err = bench.communicate()
            raise AssertionError(f"bench.run did not end in {timeout_s:.0f} s:\n{out[-3000:]}{err[-3000:]}") from None
    assert bench.returncode == 0, out[-3000:] + err[-3000:]
    return out


@pytest.mark.timeout(480)
def test_every_scenario_runs_and_is_reported(tmp_path: Path) -> None:
    out = tmp_path / "results"
    args = [
        "--scenarios", "zero,latency,inflight,enqueue,slowlog,scale,scaleout,ratelimit,progress,idle,heartbeat",
        "--zero-sites", "12",
        "--max-jobs", "4",
        "--latency-ms", "20",
        "--latency-min-sites", "8",
        "--inflight-jobs", "6",
        "--inflight-latency-s", "1",
        "--inflight-probes", "2",
        "--inflight-probe-rate", "20",
        "--scaleout-replicas", "1,2",
        "--scaleout-max-jobs", "3",
        "--scaleout-latency-s", "0.2",
        "--scaleout-waves", "2",
        "--scaleout-long-latency-s", "0.3",
        "--scaleout-long-waves", "2",
        "--ratelimit-replicas", "2",
        "--ratelimit-sites", "2",
        "--ratelimit-latency-s", "0.1",
        "--enqueue-rate", "50",
        "--enqueue-sites", "6",
        "--slowlog-sites", "6",
        "--replicas", "1,2",
        "--scale-sites", "12",
        "--progress-rows", "200",
        "--idle-seconds", "0.3",
        "--heartbeat-jobs", "3",
        "--heartbeat-seconds", "1",
        "--order-base", "500001",
        "--out", str(out),
    ]  # fmt: skip
    run_bench(args, timeout_s=420)  # about 100 s alone; the suite's other workers share the cores

    report = json.loads((out / "results.json").read_text())
    runs = {r["name"]: r for r in report["runs"]}
    expected = {
        "zero": 12,
        "lat4": 8,
        "inflight": 8,
        "enqueue": 6,
        "slowbase": 6,
        "slowlog": 6,
        "scale2": 12,
        "scaleout1": 6,
        "scaleout2": 12,
        "scaleout2long": 12,
    }
    assert {name: r["sites"] for name, r in runs.items()} == expected
    for r in runs.values():
        assert r["retried_generations"] == 0 and r["peak_pg_conns"] <= r["pg_conn_bound"], r["name"]
        assert r["worker_cpu_ms_per_site"] > 0 and r["throughput_overall"] > 0, r["name"]
    assert runs["inflight"]["peak_running"] >= 6, "all six generations of the in-flight run were running at once"
    assert runs["inflight"]["one_wave"] and runs["inflight"]["ideal"] is None, "one wave has no steady rate"
    assert runs["scaleout2"]["ideal"] and runs["scaleout2"]["running_series"], "a backlog has an ideal"
    for name in ("scaleout2", "scaleout2long"):  # Little's law's two factors (bench/stats.py)
        r = runs[name]
        assert 0 < r["occupancy"] <= 1 and 0 < r["speed"] and r["of_ideal"] > 0, name
    assert runs["slowlog"]["log_rows"] == 10 * 6, "every progress row of the slow-log run was written"
    assert [p["rows"] for p in report["progress"]] == [200, 20]
    assert [i["poll_delay_s"] for i in report["idle"]] == [0.05, 0.5]
    assert [(b["lease_s"], b["generations"]) for b in report["heartbeat"]] == [(8, 3), (20, 3)]
    assert report["postgres"]["version"] and report["finished"]

    targets = {c["target"].split(":")[0] for c in report["checks"]}
    assert "latency 0" in targets and "worker CPU per site < 10 ms" in targets
    results = (out / "RESULTS.md").read_text()
    for name in expected:
        assert f"| {name}: " in results, name
    assert "## Targets (issue 6)" in results and "## What polling costs an idle replica" in results
    assert "## What the heartbeat costs a replica" in results
    assert report["ratelimit"]["requests_answered"] == 6 and "sharing a provider limited to 120" in results
    assert "## What each generation in flight costs" in results and runs["inflight"]["held"]["generations"] == 6
    assert len(runs["inflight"]["to_start_samples"]) == 2, "the probes' enqueue-to-start, sent once all 6 are held"
    scaleout = {c["target"]: c for c in report["checks"] if c["target"].startswith("scale-out")}
    assert len(scaleout) == 3 and all(c["status"] in ("met", "missed", "cpu-bound") for c in scaleout.values())


@pytest.mark.timeout(120)
def test_the_edits_scenario_runs_and_is_reported(tmp_path: Path) -> None:
    """Issue 22's `edits` scenario at its smallest: one edit of a 2-page site, a few rollbacks and reads."""
    out = tmp_path / "results"
    args = [
        "--scenarios", "edits",
        "--edits-pages", "2",
        "--edits-kinds", "colour",
        "--edits-latency-s", "0",
        "--edits-rollbacks", "3",
        "--edits-rollback-files", "6",
        "--edits-read-versions", "3",
        "--edits-reads", "5",
        "--order-base", "600001",
        "--out", str(out),
    ]  # fmt: skip
    printed = run_bench(args, timeout_s=100)

    edits = json.loads((out / "results.json").read_text())["edits"]
    (site,) = edits["sites"]
    (colour,) = site["edits"]
    assert site["pages"] == 2 and colour["name"] == "colour" and colour["version"] == 2
    assert colour["calls"] == colour["usage_calls"] == 2, "the plan and the stylesheet: two model calls"
    assert 0 < colour["tokens"] < site["generation"]["tokens"] and colour["changed_files"] == 2  # css, manifest
    assert colour["blob_bytes_added"] == colour["changed_bytes"] > 0
    assert edits["rollback"]["rollbacks"] == edits["rollback"]["to_live_ms"]["n"] == 3
    assert edits["rollback"]["site_files"] == 6 and edits["rollback"]["blob_bytes_added"] == 0
    reads = edits["reads"]
    assert reads["versions"] == 3 and reads["one_version_ms"]["n"] == reads["many_after_analyze_ms"]["n"] == 5
    results = (out / "RESULTS.md").read_text()
    assert "## Edits and versions (issue 22" in results and "| 2 pages | colour: Make the header blue" in results
    assert "PASS" in printed or "MISS" in printed
