"""RESULTS.md, the charts and the target checks, from the measurements of bench/run.py."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

OLD_ZERO = 10.6  # sites/s of the old design, latency 0, 2 processes
TARGET_ZERO = 20 * OLD_ZERO
TARGET_CPU_MS = 10.0
TARGET_RSS_MIB = 250.0
TARGET_TO_START_P95_MS = 100.0
#: Issue 15: one replica holding 2,000 generations within 400 MiB; scale-out within 95% of the ideal.
TARGET_INFLIGHT_RSS_MIB = 400.0
TARGET_SCALEOUT_SHARE = 0.95
#: A run is CPU-bound when reaching its ideal throughput would keep the replica's one event-loop thread
#: at least this busy: past ~70%, each step of a generation waits longer for the loop than it runs
#: (queueing), which stretches every site beyond its model time and caps throughput below the ideal.
CPU_BOUND_SHARE = 0.7


def _runs(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in report["runs"]}


def check_targets(report: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    runs = _runs(report)
    checks: list[dict[str, Any]] = []

    def add(target: str, ok: bool | None, measured: str, why: str = "", status: str | None = None) -> None:
        checks.append(
            {"target": target, "status": status or ("met" if ok else "missed"), "measured": measured, "why": why}
        )

    zero = runs.get("zero")
    if zero:
        add(
            f"latency 0: >= {TARGET_ZERO:.0f} sites/s (20x the old {OLD_ZERO})",
            zero["throughput"] >= TARGET_ZERO,
            f"{zero['throughput']} sites/s ({zero['throughput'] / OLD_ZERO:.1f}x)",
            f"one replica's event loop at {zero['worker_cpu_pct']}% of a core: CPU-bound; at {TARGET_ZERO:.0f} sites/s "
            f"the worker alone would need {TARGET_ZERO * zero['worker_cpu_ms_per_site'] / 1000:.1f} cores and, with "
            f"PostgreSQL, Redis and the fake provider on the same machine, "
            f"{TARGET_ZERO * (zero['worker_cpu_ms_per_site'] + sum(zero['cpu_ms_per_site'].values())) / 1000:.1f}"
            " of its 2",
        )
        add(
            f"worker CPU per site < {TARGET_CPU_MS:g} ms",
            zero["worker_cpu_ms_per_site"] < TARGET_CPU_MS,
            f"{zero['worker_cpu_ms_per_site']} ms",
        )
    for name, r in runs.items():
        if not name.startswith("lat"):
            continue
        ok = r["of_ideal"] >= 0.9
        need = r["ideal"] * r["worker_cpu_ms_per_site"] / 1000  # cores the ideal throughput would take
        cpu_bound = need >= CPU_BOUND_SHARE
        status = "met" if ok else ("cpu-bound" if cpu_bound else "missed")
        why = (
            f"CPU-bound: the ideal x {r['worker_cpu_ms_per_site']} ms/site needs {need:.2f} of the one core an "
            f"event loop has (at most ~{1000 * CPU_BOUND_SHARE / r['worker_cpu_ms_per_site']:.0f} sites/s "
            f"before queueing for the loop stretches every site); the loop ran at {r['worker_cpu_pct']}%"
            if cpu_bound and not ok
            else ""
        )
        add(
            f"latency {r['latency_ms']:g} ms, max_jobs {r['max_jobs']}: >= 90% of ideal {r['ideal']}",
            ok,
            f"{r['throughput']} sites/s = {r['of_ideal']:.0%}",
            why,
            status,
        )
    rl = report.get("ratelimit")
    if rl:
        add(
            f"ratelimit: never above {rl['provider_rpm']} requests in any 60 s, no 429 after the first",
            rl["max_requests_in_any_60s"] <= rl["provider_rpm"] and rl["429s_after_the_first"] == 0,
            f"at most {rl['max_requests_in_any_60s']} in 60 s, {rl['max_requests_per_10s']} in 10 s; "
            f"{rl['429s_received']} 429s",
        )
    inflight = runs.get("inflight")
    if inflight and inflight.get("probes"):
        held = inflight["sites"] - inflight["probes"]
        add(
            f"{held} in flight on one replica: peak RSS < {TARGET_INFLIGHT_RSS_MIB:g} MiB",
            inflight["peak_rss_mib"] < TARGET_INFLIGHT_RSS_MIB and inflight["peak_running"] >= held,
            f"{inflight['peak_rss_mib']} MiB, {inflight['peak_running']} running at the peak",
        )
        add(
            f"{held} in flight on one replica: enqueue-to-start p95 < {TARGET_TO_START_P95_MS:g} ms",
            inflight["to_start_ms"]["p95"] < TARGET_TO_START_P95_MS,
            f"p50 {inflight['to_start_ms']['p50']} ms, p95 {inflight['to_start_ms']['p95']} ms "
            f"({inflight['probes']} jobs enqueued one by one while they ran)",
        )
    cores = report.get("machine", {}).get("cpus") or 2
    for name, r in runs.items():
        if name.startswith("scaleout") and r["ideal"]:
            ok = r["of_ideal"] >= TARGET_SCALEOUT_SHARE
            # Cores the ideal rate takes on this machine: every process of the run (worker, PostgreSQL, Redis,
            # the fake provider, the driver) at its measured CPU per site.
            need = r["ideal"] * (r["worker_cpu_ms_per_site"] + sum(r["cpu_ms_per_site"].values())) / 1000
            loop = r["ideal"] / r["replicas"] * r["worker_cpu_ms_per_site"] / 1000  # of each replica's core
            cpu_bound = need >= CPU_BOUND_SHARE * cores or loop >= CPU_BOUND_SHARE
            why = (
                f"the machine: the ideal x {need / r['ideal'] * 1000:.1f} ms of CPU per site (all processes) "
                f"needs {need:.2f} of its {cores} cores (each replica's loop {loop:.0%} of one); slots busy "
                f"{_share(r.get('occupancy'))}, model time / site time {_share(r.get('speed'))}"
                if cpu_bound and not ok
                else ""
            )
            add(
                f"scale-out, {r['replicas']} replicas x max_jobs {r['max_jobs']}, latency "
                f"{r['latency_ms'] / 1000:g} s: >= {TARGET_SCALEOUT_SHARE:.0%} of ideal {r['ideal']}",
                ok,
                f"{r['throughput']} sites/s = {r['of_ideal']:.0%} (slots busy {_share(r.get('occupancy'))}, model "
                f"time / site time {_share(r.get('speed'))}), {r['peak_running']} running at the peak; machine CPU "
                f"{r['machine_cpu_pct']}%",
                why,
                "cpu-bound" if cpu_bound and not ok else None,
            )
    big = inflight or max(
        (r for n, r in runs.items() if n.startswith("lat")), key=lambda r: r["max_jobs"], default=None
    )
    if big and not big.get("probes"):
        add(
            f"peak RSS at {big['max_jobs']} max_jobs (peak {big['peak_running']} running) < {TARGET_RSS_MIB:g} MiB",
            big["peak_rss_mib"] < TARGET_RSS_MIB,
            f"{big['peak_rss_mib']} MiB",
        )
        if big["peak_running"] < big["max_jobs"]:
            checks[-1]["why"] = f"only {big['peak_running']} generations were running at once at the peak"
    for name, r in runs.items():
        if name.startswith("window"):  # issue 15 part 1: the queue's head does not cap the cluster
            slots = r["replicas"] * r["max_jobs"]
            add(
                f"{r['replicas']} replicas x max_jobs {r['max_jobs']}: all {slots} slots busy at once",
                r["peak_running"] >= slots,
                f"peak {r['peak_running']} running",
            )
    edits = report.get("edits")
    if edits:
        checks += edit_checks(edits)
    over = [r for r in report["runs"] if r["peak_pg_conns"] > r["pg_conn_bound"]]
    add(
        "PostgreSQL connections never above the pools' maximum",
        not over,
        ", ".join(f"{r['name']} {r['peak_pg_conns']}/{r['pg_conn_bound']}" for r in report["runs"]),
    )
    enq = runs.get("enqueue")
    if enq:
        add(
            f"enqueue-to-start p95 < {TARGET_TO_START_P95_MS:g} ms (default settings)",
            enq["to_start_ms"]["p95"] < TARGET_TO_START_P95_MS,
            f"p50 {enq['to_start_ms']['p50']} ms, p95 {enq['to_start_ms']['p95']} ms",
        )
    slow = runs.get("slowlog")
    if slow:
        # The same run without the slow INSERT; results.json files older than `slowbase` paired it with
        # the latency run of the same size.
        base = runs.get("slowbase") or next(
            (r for n, r in runs.items() if n == f"lat{slow['max_jobs']}" and r["sites"] == slow["sites"]), None
        )
        if base:
            # A one-wave run (a smoke test's few sites) has no steady rate: its overall one stands in.
            slow_rate = slow["throughput"] or slow["throughput_overall"]
            base_rate = base["throughput"] or base["throughput_overall"]
            ratio = slow_rate / base_rate
            add(
                f"a slow progress log (+{slow['slow_log_ms']:g} ms per row) does not stall generations "
                "(>= 90% of the same run without)",
                ratio >= 0.9,
                f"{slow_rate} vs {base_rate} sites/s ({ratio:.0%}); rows logged "
                f"{slow['log_rows_per_s']}/s, written {slow.get('log_rows_written_per_s', '-')}/s while the "
                f"generations ran, the log's last row {slow.get('log_lag_s', '-')} s after the last site; "
                f"{slow['log_rows'] / slow['sites']:.1f} rows per site",
            )
    return checks


def edit_checks(edits: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 22's goals for the `edits` scenario (bench/edits.py): one check per goal, every edit in it."""
    goals = edits["goals"]
    every = [(site, e) for site in edits["sites"] for e in site["edits"]]

    def over_edits(target: str, flag: str, show: Any) -> dict[str, Any]:
        missed = [f"{s['pages']}p {e['name']}" for s, e in every if not e[flag]]
        return {
            "target": target,
            "status": "missed" if missed else "met",
            "measured": ", ".join(f"{s['pages']}p {e['name']} {show(e)}" for s, e in every),
            "why": f"missed by {', '.join(missed)}" if missed else "",
        }

    checks = [
        over_edits(
            f"edits: tokens <= {goals['tokens']:.0%} of the site's generation", "tokens_ok", _pct("tokens_share")
        ),
        over_edits(
            f"edits: wall time <= {goals['wall']:.0%} of the site's generation (model latency "
            f"{edits['latency_s']:g} s per call)",
            "wall_ok",
            _pct("wall_share"),
        ),
        over_edits(
            "edits: only the changed files added to site_blobs",
            "storage_ok",
            lambda e: f"{e['blob_bytes_added']} B for {e['changed_files']}/{e['site_files']} files",
        ),
    ]
    rb, rd = edits["rollback"], edits["reads"]
    checks.append(
        {
            "target": f"rollback: enqueue to new live version p95 < {goals['rollback_p95_ms']:g} ms "
            f"({rb['site_files']} files)",
            "status": "met" if rb["ok"] else "missed",
            "measured": f"p50 {rb['to_live_ms']['p50']:.1f} ms, p95 {rb['to_live_ms']['p95']:.1f} ms, max "
            f"{rb['to_live_ms']['max']:.1f} ms over {rb['rollbacks']}",
            "why": "",
        }
    )
    for ok, key, one, when in (
        (rd["ok"], "many_versions_ms", "one_version_ms", "just after they were made"),
        (rd.get("ok_after_analyze"), "many_after_analyze_ms", "one_after_analyze_ms", "after ANALYZE"),
    ):
        checks.append(
            {
                "target": f"live-file read no slower with {rd['versions']} versions, {when} (p50 and p95 within "
                f"{goals['read_tolerance']:g}x of an order with 1 version, read in turns)",
                "status": "met" if ok else "missed",
                "measured": f"p50/p95 {rd[key]['p50']:.3f}/{rd[key]['p95']:.3f} ms vs "
                f"{rd[one]['p50']:.3f}/{rd[one]['p95']:.3f} ms",
                "why": "",
            }
        )
    return checks


def _pct(key: str) -> Any:
    return lambda e: f"{e[key]:.0%}"


# ---------------------------------------------------------------------------------------------- charts

#: Every chart `charts` can draw, in its order.
CHARTS = ("throughput.png", "latency.png", "rss.png", "scaleout.png", "inflight.png", "ratelimit.png")


def charts(report: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    plt.rcParams.update({"font.size": 8, "figure.dpi": 90})
    runs = _runs(report)
    made = []

    lat = sorted((r for n, r in runs.items() if n.startswith("lat")), key=lambda r: r["max_jobs"])
    scale = sorted(
        (r for n, r in runs.items() if n == "zero" or (n.startswith("scale") and not n.startswith("scaleout"))),
        key=lambda r: r["replicas"],
    )
    if lat or scale:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        ax = axes[0]
        if lat:
            x = [r["max_jobs"] for r in lat]
            ax.plot(x, [r["ideal"] for r in lat], "k--", label="ideal max_jobs / (3 x latency)")
            ax.plot(x, [0.9 * r["ideal"] for r in lat], ":", color="grey", label="90% of ideal (target)")
            ax.plot(x, [r["throughput"] for r in lat], "o-", color="tab:blue", label="measured, 1 replica")
            for r in lat:
                ax.annotate(
                    f"{r['throughput']:.0f}/s\n{r['worker_cpu_pct']:.0f}% CPU",
                    (r["max_jobs"], r["throughput"]),
                    textcoords="offset points",
                    xytext=(4, 6),
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_yticks(
                [
                    t
                    for t in (10, 25, 50, 100, 200, 400, 800, 1600)
                    if min(x) / 30 <= t <= 2 * max(r["ideal"] for r in lat)
                ]
            )
            ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xticks(x, [str(v) for v in x])
            ax.set_xlabel("generations in flight (max_jobs)")
            ax.set_ylabel("sites/s")
            ax.set_title(f"model latency {lat[0]['latency_ms']:g} ms")
            ax.legend(loc="upper left")
        ax = axes[1]
        if scale:
            x = [r["replicas"] for r in scale]
            ax.plot(x, [r["throughput"] for r in scale], "o-", color="tab:green", label="sites/s (latency 0)")
            ax.plot(x, [scale[0]["throughput"] * n for n in x], "k--", label="linear from 1 replica")
            ax.axhline(TARGET_ZERO, color="tab:red", ls=":", label=f"target {TARGET_ZERO:.0f}/s (one replica)")
            ax2 = ax.twinx()
            ax2.bar(x, [r["machine_cpu_pct"] for r in scale], alpha=0.15, color="grey", width=0.4)
            ax2.set_ylim(0, 110)
            ax2.set_ylabel("machine CPU % (bars)")
            ax.set_xticks(x)
            ax.set_xlabel("replicas (2-core machine)")
            ax.set_ylabel("sites/s")
            ax.set_title("scale-out, latency 0")
            ax.legend(loc="upper left")
        fig.tight_layout()
        fig.savefig(out / "throughput.png")
        plt.close(fig)
        made.append("throughput.png")

    enq = runs.get("enqueue")
    if enq or lat:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        ax = axes[0]
        if enq and enq["to_start_samples"]:
            xs = enq["to_start_samples"]
            ax.hist(xs, bins=40, color="tab:blue")
            for q, ls in ((0.5, "-"), (0.95, "--")):
                v = enq["to_start_ms"]["p50" if q == 0.5 else "p95"]
                ax.axvline(v, color="k", ls=ls, label=f"p{int(q * 100)} {v:.0f} ms")
            ax.axvline(TARGET_TO_START_P95_MS, color="tab:red", ls=":", label="p95 target 100 ms")
            ax.set_xlabel("enqueue to start (ms)")
            ax.set_ylabel("jobs")
            ax.set_title(enq["label"], fontsize=7)
            ax.legend()
        ax = axes[1]
        for r in lat:
            d = sorted(r["duration_samples"])
            if d:
                ax.plot(d, [i / len(d) for i in range(len(d))], label=f"max_jobs {r['max_jobs']}")
        if lat:
            ax.axvline(3 * lat[0]["latency_ms"], color="k", ls="--", label="3 model calls")
            ax.set_xscale("log")
            ax.set_xlabel("generation start to finish (ms)")
            ax.set_ylabel("share of sites")
            ax.set_title(f"per-site duration, latency {lat[0]['latency_ms']:g} ms")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "latency.png")
        plt.close(fig)
        made.append("latency.png")

    series = report.get("rss_series") or {}
    if series:
        fig, ax = plt.subplots(figsize=(9, 3.2))
        for name, pts in series.items():
            if pts:
                step = max(1, len(pts) // 600)
                pts = pts[::step]
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    label=f"{name} ({runs[name]['label']})" if name in runs else name,
                    lw=1,
                )
        ax.axhline(TARGET_RSS_MIB, color="tab:red", ls=":", label="target 250 MiB")
        ax.set_xlabel("seconds since the run's first enqueue")
        ax.set_ylabel("worker RSS (MiB, largest replica)")
        ax.set_ylim(0, max(TARGET_RSS_MIB * 1.1, max((p[1] for s in series.values() for p in s), default=0) * 1.1))
        ax.legend(fontsize=6, ncol=2)
        ax.set_title("worker RSS over time")
        fig.tight_layout()
        fig.savefig(out / "rss.png")
        plt.close(fig)
        made.append("rss.png")
    scaleout = sorted(
        (r for n, r in runs.items() if n.startswith("scaleout") and not n.endswith("long")), key=lambda r: r["replicas"]
    )
    long_runs = [r for n, r in runs.items() if n.startswith("scaleout") and n.endswith("long") and r["ideal"]]
    if scaleout:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        ax = axes[0]
        for r in scaleout:
            series = r.get("running_series") or []
            ax.plot([t for t, _ in series], [n for _, n in series], label=f"{r['replicas']} x {r['max_jobs']}")
            ax.axhline(r["replicas"] * r["max_jobs"], color="grey", ls=":", lw=0.8)
        ax.set_xlabel("seconds from the first enqueue")
        ax.set_ylabel("generations running")
        ax.set_title("running generations (dotted: the slots)")
        ax.legend(loc="upper right", fontsize=7)
        ax = axes[1]
        x = [r["replicas"] for r in scaleout]
        ax.plot(x, [r["ideal"] for r in scaleout], "k--", label="ideal slots / (3 x latency)")
        ax.plot(x, [TARGET_SCALEOUT_SHARE * r["ideal"] for r in scaleout], ":", color="grey", label="95% of ideal")
        ax.plot(x, [r["throughput"] for r in scaleout], "o-", color="tab:green", label="measured")
        for r in long_runs:  # same slots, a latency at which the machine's CPU is not the limit: share of its ideal
            ax.plot(
                [r["replicas"]],
                [r["throughput"]],
                "s",
                color="tab:purple",
                label=f"measured at {r['latency_ms'] / 1000:g} s ({r['of_ideal']:.0%} of its ideal {r['ideal']:g})",
            )
        ax2 = ax.twinx()
        ax2.bar(x, [r["machine_cpu_pct"] for r in scaleout], alpha=0.15, color="grey", width=0.8)
        ax2.set_ylabel("machine CPU %")
        ax2.set_ylim(0, 100)
        ax.set_xticks(x)
        ax.set_xlabel(f"replicas x max_jobs {scaleout[0]['max_jobs']} (2-core machine)")
        ax.set_ylabel("sites/s")
        ax.set_title(f"scale-out, model latency {scaleout[0]['latency_ms'] / 1000:g} s")
        ax.legend(loc="upper left", fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "scaleout.png")
        plt.close(fig)
        made.append("scaleout.png")
    inflight = runs.get("inflight")
    rss_pts = (report.get("rss_series") or {}).get("inflight") or []
    if inflight and rss_pts:
        fig, ax = plt.subplots(figsize=(7, 3.4))
        t0 = rss_pts[0][0]
        ax.plot([t - t0 for t, _ in rss_pts], [r for _, r in rss_pts], color="tab:blue", label="worker RSS (MiB)")
        ax.axhline(TARGET_INFLIGHT_RSS_MIB, color="tab:red", ls=":", label=f"target {TARGET_INFLIGHT_RSS_MIB:g} MiB")
        ax.set_ylim(0, TARGET_INFLIGHT_RSS_MIB * 1.15)
        ax.set_xlabel("seconds from the first enqueue")
        ax.set_ylabel("MiB")
        ax2 = ax.twinx()
        series = inflight.get("running_series") or []
        ax2.plot([t for t, _ in series], [n for _, n in series], color="tab:green", label="generations running")
        ax2.set_ylabel("generations running")
        ax2.set_ylim(0, max((n for _, n in series), default=1) * 1.15)
        for i, t in enumerate(inflight.get("probe_enqueued_s") or []):
            ax.axvline(t, color="grey", lw=0.3, alpha=0.5, label="a probe job enqueued" if i == 0 else None)
        lines = ax.get_legend_handles_labels()
        more = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower center", fontsize=7)
        ax.set_title(
            f"one replica holding {inflight['sites'] - inflight['probes']} generations (latency "
            f"{inflight['latency_ms'] / 1000:g} s); probes start p95 {inflight['to_start_ms']['p95']:.0f} ms"
        )
        fig.tight_layout()
        fig.savefig(out / "inflight.png")
        plt.close(fig)
        made.append("inflight.png")
    rl = report.get("ratelimit")
    if rl and rl.get("requests_per_10s"):
        fig, ax = plt.subplots(figsize=(7, 3.2))
        counts = rl["requests_per_10s"]
        ax.bar(
            [10 * i for i in range(len(counts))],
            counts,
            width=8,
            align="edge",
            color="tab:blue",
            label="requests the provider answered",
        )
        ax.axhline(
            rl["limit_per_10s"],
            color="tab:red",
            ls=":",
            label=f"its limit: {rl['provider_rpm']}/min = {rl['limit_per_10s']:g} per 10 s",
        )
        ax.set_xlabel("seconds from the first request (10 s windows)")
        ax.set_ylabel("requests")
        ax.set_ylim(0, rl["limit_per_10s"] * 1.4)
        ax.set_title(
            f"{rl['replicas']} replicas sharing one provider: {rl['429s_received']} 429s received, "
            f"at most {rl['max_requests_in_any_60s']} requests in any 60 s"
        )
        ax.legend(loc="upper right", fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "ratelimit.png")
        plt.close(fig)
        made.append("ratelimit.png")
    return made


# ---------------------------------------------------------------------------------------------- Markdown


def _f(v: Any, nd: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _share(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def _sites_dir(machine: dict[str, Any]) -> str:
    where = machine.get("sites_dir")
    if not where:
        return "the run's temporary folder"
    return f"`{where}`" + (" (tmpfs, see bench/README.md finding 11)" if where == "/dev/shm" else "")


def _postgres(report: dict[str, Any]) -> str:
    pg = report.get("postgres")
    if not pg:
        return "PostgreSQL (version not recorded)"
    return f"PostgreSQL {pg['version']} with {pg['compression']} for the large columns"


def _yes(ok: bool) -> str:
    return "PASS" if ok else "**MISS**"


def _ms3(v: dict[str, float]) -> str:
    return f"{v['p50']:.3f} / {v['p95']:.3f} / {v['max']:.3f}"


def _cpus(ed: dict[str, Any]) -> str:
    return f"{ed['cpus']} CPUs" if ed.get("cpus") else "CPUs not recorded"


def edits_section(ed: dict[str, Any]) -> list[str]:
    """The `edits` scenario (bench/edits.py): edits against their site's generation, rollbacks, reads, storage."""
    goals, rb, rd = ed["goals"], ed["rollback"], ed["reads"]
    lines = [
        "",
        f"## Edits and versions (issue 22; run of {ed['finished']}, {ed['elapsed_s']} s)",
        "",
        f"One replica (defaults, poll {rb['poll_delay_s']:g} s) on a machine whose 1-minute load average was "
        f"{' then '.join(map(str, ed.get('load_avg') or ['not recorded']))} ({_cpus(ed)}), "
        f"the fake provider at a constant "
        f"{ed['latency_s']:g} s per model call. Each site is generated, then edited in the order shown, each edit on "
        "the version the previous one made. Calls: requests the fake received / calls in the stored usage. "
        "Tokens: the usage stored on the run (`site_generations.usage`; the fake counts 4 characters a token). Wall: "
        "enqueue to the run's terminal status. Blob bytes: what `site_blobs` grew by, against the files of the new "
        "version that differ from its parent and the whole version. Goals: tokens <= "
        f"{goals['tokens']:.0%} and wall <= {goals['wall']:.0%} of the generation; only changed files stored. "
        "The estimate is not measured: the fake answers every call after the same latency, however much it writes, "
        "where a real model's answer takes longer the more tokens it outputs (the rate is an assumption).",
        "",
        "| site | run | calls | tokens in / out (by phase) | tokens, of generation | wall s, of generation | "
        f"estimate: wall + output at {ed.get('est_output_tokens_per_s', 100):g} tokens/s, of generation | "
        "files changed / in the version | blob bytes added / changed files' / version's | tokens | wall | storage |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for site in ed["sites"]:
        gen = site["generation"]
        for run in [gen, *site["edits"]]:
            edit = run is not gen
            name = (
                f"{run['name']}: {run['instruction']}"
                + (f" (pages {', '.join(run['pages'])})" if run.get("pages") else "")
                if edit
                else "generation"
            )
            phases = ", ".join(f"{p} {v['tokens']}" for p, v in run["phases"].items() if v["tokens"])
            fallbacks = f"; rewritten whole: {', '.join(run['fallbacks'])}" if run.get("fallbacks") else ""
            lines.append(
                f"| {site['pages']} pages | {name} | {run['calls']} / {run['usage_calls']} | "
                f"{run['input_tokens']} / {run['output_tokens']} ({phases}{fallbacks}) | {run['tokens']}"
                + (f", {run['tokens_share']:.0%}" if edit else "")
                + f" | {run['wall_s']:.2f}"
                + (f", {run['wall_share']:.0%}" if edit else "")
                + f" | {run['wall_est_s']:.1f}"
                + (f", {run['wall_est_share']:.0%}" if edit else "")
                + f" | {run['changed_files']} / {run['site_files']} | {run['blob_bytes_added']} / "
                f"{run['changed_bytes']} / {run['site_bytes']} | "
                + (
                    f"{_yes(run['tokens_ok'])} | {_yes(run['wall_ok'])} | {_yes(run['storage_ok'])} |"
                    if edit
                    else "- | - | - |"
                )
            )
    lines += [
        "",
        f"Rollbacks: {rb['rollbacks']}, alternating between two versions of a {rb['site_files']}-file site "
        f"({rb['site_bytes']} bytes: the {rb.get('generated_files', '?')} files of a generated site and more pages, "
        "the two versions added through the store), each rollback sent at a random moment of the replica's poll "
        "cycle, at latency 0 (a rollback calls no model). They added "
        f"{rb['blob_bytes_added']} bytes to `site_blobs`. Goal: p95 < {goals['rollback_p95_ms']:g} ms "
        f"({_yes(rb['ok'])}).",
        "",
        "| rollback | p50 ms | p95 ms | max ms |",
        "|---|---|---|---|",
    ]
    for label, key in (
        ("enqueue to the new live version (`site_orders.live_version`)", "to_live_ms"),
        ("of which enqueue to start (`started_at`: the poll, the claim)", "to_start_ms"),
        ("its publish phase (read the old version, write the site to disk; the commit not included)", "publish_ms"),
        ("the store step alone: read a version's files, add them as a new version (one transaction)", None),
    ):
        v = rb[key] if key else rd["store_step_ms"]
        lines.append(f"| {label} | {v['p50']:.1f} | {v['p95']:.1f} | {v['max']:.1f} |")
    lines += [
        "",
        f"The live-file read (`api_site_file`, the API's query for a file of the live version, prepared, one "
        f"connection), {rd['reads']} reads of `index.html` per case: order A keeps 1 version, order B gets "
        f"{rd['versions']} (made by the store step above, {rd['store_step_ms']['n']} times, in a burst), the two read "
        "in turns at each stage, so that the machine's load moves both alike. Goal: B no slower than A, p50 and p95 "
        f"within {goals['read_tolerance']:g}x: just "
        f"after they were made {_yes(rd['ok'])}, after ANALYZE {_yes(bool(rd.get('ok_after_analyze')))}.",
        "",
        "| stage | A (1 version) p50 / p95 / max ms | B p50 / p95 / max ms |",
        "|---|---|---|",
    ]
    for stage, a, b in (
        ("before B's versions (both at 1)", "one_before_ms", "many_before_ms"),
        (f"B at {rd['versions']} versions, just made", "one_version_ms", "many_versions_ms"),
        (f"B at {rd['versions']} versions, after ANALYZE", "one_after_analyze_ms", "many_after_analyze_ms"),
    ):
        if a in rd and b in rd:
            lines.append(f"| {stage} | {_ms3(rd[a])} | {_ms3(rd[b])} |")
    then = rd.get("tables_then") or {}
    lines += [
        "",
        "Row versions of the tables just after B's versions were made (live / dead, pg_stat_user_tables, whose "
        "counters lag by up to a second): "
        + ", ".join(f"{t} {v['n_live_tup']} / {v['n_dead_tup']}" for t, v in sorted(then.items()))
        + ("." if then else "not recorded."),
        "",
        f"B's read, EXPLAIN (ANALYZE, BUFFERS): just after the versions were made, {_plan(rd.get('plan_then'))}; "
        f"after ANALYZE, {_plan(rd['plan'])}.",
    ]
    return lines


def _plan(lines: list[str] | None) -> str:
    """The scans a plan ran and the buffers its root node touched, on one line."""
    if not lines:
        return "not recorded"
    scans = [x.strip().removeprefix("->").strip() for x in lines if "Scan" in x and "never executed" not in x]
    total = next((x.strip() for x in lines if x.strip().startswith("Buffers:")), "")
    return "; ".join(scans) + (f" ({total} in all)" if total else "")


def write_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    out: Path = args.out
    try:
        made = charts(report, out)
    except ModuleNotFoundError as exc:  # matplotlib: `make bench` installs it, the test suite does not
        # The charts an earlier rendering drew stay linked (a `--scenarios edits` run merged into the results keeps
        # the other scenarios' figures, and their charts with them).
        made = [name for name in CHARTS if (out / name).exists()]
        no_charts = f"Not drawn: {exc.name} is not installed (`make bench` installs it)."
        if made:
            no_charts = f"Not redrawn by this rendering ({exc.name} is not installed): the charts already here."
    else:
        no_charts = ""
    runs = report["runs"]
    runs_by_name = _runs(report)
    m = report["machine"]
    lines = [
        "# sitegen-worker benchmark results",
        "",
        # The run's date, not this rendering's (`python -m bench.report` re-renders an old run).
        f"Generated by `make bench` (`python -m bench.run`) on {report.get('finished') or 'an unrecorded date'}: "
        f"{m['cpus']} CPUs, {m['mem_gib']} GiB, Python {m['python']}, {_postgres(report)}; "
        "PostgreSQL, Redis, the fake provider(s), "
        f"the worker(s) and this driver all on the same machine; the sites written under {_sites_dir(m)}. "
        f"Whole run: {report['elapsed_s']} s. "
        "Raw numbers: `results.json`; bench/README.md says what each column means."
        + "".join(
            f" Merged in since: `--scenarios {m['scenarios']}` of {m['finished']} ({m['elapsed_s']} s), its"
            " sections replacing those of the same name."
            for m in report.get("merged_runs", [])
        ),
        "",
        "Worker settings are the defaults (pools 10 + 2 connections, poll 0.05 s, log level "
        f"{report.get('args', {}).get('log_level', 'INFO')}) except `max_jobs` and, where calls take time, the "
        "provider's `max_concurrency`, set to `max_jobs` (its default, 8, would cap 200 ms calls at 40/s). Model "
        "calls take the stated latency x uniform(1 - j, 1 + j), "
        f"j = {report.get('args', {}).get('latency_jitter', 0)}.",
        "",
        "## Runs",
        "",
        "| run | sites | sites/s | ideal | of ideal | worker CPU ms/site (kernel) | worker core % | machine CPU % | "
        "peak RSS MiB | peak running | PG conns peak/max | PG sessions/site | enqueue→start p50 / p95 ms | "
        "site duration p50 / p95 ms | progress rows/s logged / written | log lag s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['name']}: {r['label']} | {r['sites']} | {_f(r['throughput'])} | {_f(r['ideal'])} | "
            f"{_share(r['of_ideal'])} | "
            f"{_f(r['worker_cpu_ms_per_site'], 2)} ({_f(r.get('worker_sys_ms_per_site'), 2)}) | "
            f"{_f(r['worker_cpu_pct'])} | {_f(r['machine_cpu_pct'])} | "
            f"{_f(r['peak_rss_mib'])} | {r['peak_running']} | {r['peak_pg_conns']}/{r['pg_conn_bound']} | "
            f"{_f(r['pg_sessions_per_site'], 3)} | "
            f"{_f(r['to_start_ms']['p50'], 0)} / {_f(r['to_start_ms']['p95'], 0)} | "
            f"{_f(r['duration_ms']['p50'], 0)} / {_f(r['duration_ms']['p95'], 0)} | "
            f"{_f(r['log_rows_per_s'], 0)} / {_f(r.get('log_rows_written_per_s'), 0)} | {_f(r.get('log_lag_s'), 1)} |"
        )
    lines += [
        "",
        "Enqueue→start in the throughput runs is mostly time spent queued behind the backlog (all jobs are "
        "enqueued at once); the `enqueue` run paces arrivals below capacity and is the one to read for poll latency."
        + (
            f" `slowbase` and `slowlog` are {runs_by_name['slowlog']['sites']} sites each, few enough for the"
            " progress buffer: read them against each other; a run that short still finishes in the waves of its"
            " simultaneous start, so its share of the ideal is lower than the `lat` runs' (bench/README.md)."
            if "slowlog" in runs_by_name
            else ""
        ),
        "",
        "## Where the CPU goes, per site (ms)",
        "",
        "| run | worker | fake provider | PostgreSQL | Redis | bench driver | retried generations | Redis cmds/site "
        "| KiB stored/site |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        c = r["cpu_ms_per_site"]
        lines.append(
            f"| {r['name']} | {_f(r['worker_cpu_ms_per_site'], 2)} | {_f(c['fake'], 2)} | {_f(c['postgres'], 2)} | "
            f"{_f(c['redis'], 2)} | {_f(c['bench'], 2)} | {r['retried_generations']} | "
            f"{_f(r['redis_cmds_per_site'])} | {_f(r.get('stored_kib_per_site'))} |"
        )
    lines += ["", "## Targets (issue 6)", "", "| target | status | measured | why |", "|---|---|---|---|"]
    for c in report.get("checks", []):
        lines.append(f"| {c['target']} | **{c['status']}** | {c['measured']} | {c['why']} |")
    lines += [
        "",
        "`cpu-bound` means the run missed 90% of ideal where the ideal itself would keep the replica's single "
        f"event-loop thread >= {CPU_BOUND_SHARE:.0%} busy (ideal x worker CPU per site): past that, generations "
        "queue for the loop at every step and each site takes longer than its model calls. Less CPU per site, "
        "or more replicas, is what moves that point. A scale-out run is `cpu-bound` when its ideal would keep "
        f"the machine's cores, or each replica's loop, >= {CPU_BOUND_SHARE:.0%} busy (ideal x the CPU per site of "
        "every process of the run: worker, PostgreSQL, Redis, fake provider, driver): this machine, not the design, "
        "is then the limit (the `long` run gives the same slots a latency at which the machine is not). "
        "`--check` fails on `missed` only.",
    ]
    prof = report.get("profile") or {}
    if prof:
        lines += [
            "",
            f"## Profile (py-spy, {prof['rate']} Hz, {prof['sites']} sites at latency 0): "
            f"{prof['cpu_ms_per_site']} ms of samples per site",
            "",
            "Sampled with `--gil`: only the thread holding the GIL, so this is the Python-level CPU; time in "
            "system calls made without the GIL (socket and file I/O) and in the kernel is not in it, which is why "
            "the total is below the measured worker CPU (the runs table gives the kernel's share). "
            "Raw stacks: `profile.raw` (flamegraph.pl / speedscope can open them).",
            "",
            "By library (innermost known frame):",
            "",
            "| where | ms/site | share |",
            "|---|---|---|",
        ]
        lines += [f"| {b} | {ms} | {share}% |" for b, ms, share in prof["buckets"]]
        lines += ["", "Top functions, self time:", "", "| function | ms/site | share |", "|---|---|---|"]
        lines += [f"| `{f}` | {ms} | {share}% |" for f, ms, share in prof["self"][:15]]
        lines += ["", "Worker functions, inclusive:", "", "| function | ms/site | share |", "|---|---|---|"]
        lines += [f"| `{f}` | {ms} | {share}% |" for f, ms, share in prof["inclusive_worker"][:18]]
    progress = report.get("progress") or []
    if progress:
        lines += [
            "",
            "## What the progress log can write",
            "",
            "`ProgressLog` alone (its own pool, one ordered writer, batches of up to 500 rows) fed as fast as "
            "one event loop can log rows: the most rows/s it gets into PostgreSQL.",
            "",
            "| INSERT slowed by | rows | logged rows/s | written rows/s | dropped |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {p['slow_log_ms']:g} ms per row | {p['rows']} | {p['logged_per_s']} | {p['rows_per_s']} | "
            f"{p['dropped']} |"
            for p in progress
        ]
    idle = report.get("idle") or []
    if idle:
        lines += [
            "",
            "## What polling costs an idle replica",
            "",
            "Redis counts the commands a Lua script runs as commands: `evalsha` is the one round trip of a poll.",
            "",
            "| poll_delay_s | Redis commands/s | by command (/s) | worker CPU % |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {i['poll_delay_s']} | {i['redis_cmds_per_s']} | "
            + ", ".join(f"{c} {r}" for c, r in (i.get("redis_cmds_by_command_per_s") or {}).items())
            + f" | {i['worker_cpu_pct']} |"
            for i in idle
        ]
    inflight = next((r for r in report["runs"] if r["name"] == "inflight" and r.get("held")), None)
    if inflight:
        h, n = inflight["held"], inflight["held"]["generations"]
        grown = h["worker_rss_mib"] - (inflight.get("rss_start_mib") or 0)
        lines += [
            "",
            f"## What each generation in flight costs (one replica holding {n}, issue 15)",
            "",
            "Read while every generation waited on its model call. The worker's RSS, sockets and Redis "
            "keys grow with each one; PostgreSQL connections do not (the pools' maximum holds).",
            "",
            "| what | held in all | per generation |",
            "|---|---|---|",
            f"| worker RSS | {h['worker_rss_mib']} MiB ({grown:.1f} MiB over the idle replica) | "
            f"{grown * 1024 / n:.1f} KiB |",
            f"| open file descriptors (model-call sockets mostly) | {h['worker_open_fds']} | "
            f"{h['worker_open_fds'] / n:.2f} |",
            f"| Redis keys | {h['redis_keys']} | {h['redis_keys'] / n:.2f} |",
            f"| Redis memory | {h['redis_used_mib']} MiB | {h['redis_used_mib'] * 1024 / n:.1f} KiB |",
            f"| PostgreSQL connections | {h['pg_conns']} (bound {inflight['pg_conn_bound']}) | - |",
            "| leases renewed per heartbeat | one UPDATE and one Redis script call for all | "
            "one row; a PEXPIRE and two ZADDs |",
        ]
    rl = report.get("ratelimit")
    if rl:
        lines += [
            "",
            f"## {rl['replicas']} replicas sharing a provider limited to {rl['provider_rpm']} requests/min (issue 15)",
            "",
            f"The provider (the fake) answers 429 beyond {rl['provider_rpm']} requests in any 60 s; the "
            f"worker's shared limit is {rl['shared_rpm']}/min (2% under). {rl['sites']} sites enqueued at once.",
            "",
            "| what | measured |",
            "|---|---|",
            f"| requests answered, most in a 10 s window (limit {rl['limit_per_10s']:g}) | "
            f"{rl['max_requests_per_10s']} |",
            f"| most in any 60 s (limit {rl['provider_rpm']}) | {rl['max_requests_in_any_60s']} |",
            f"| 429s received (after the first) | {rl['429s_received']} ({rl['429s_after_the_first']}) |",
            f"| sites/s (ideal {rl['ideal_sites_per_s']}: the limit / 3 calls) | {rl['sites_per_s']} |",
            f"| budget waits in the progress log | {rl['budget_waits_logged']}; expected wait p50 "
            f"{rl['budget_wait_s']['p50']} s, p95 {rl['budget_wait_s']['p95']} s, max "
            f"{rl['budget_wait_s']['max']} s |",
            f"| requests answered per 10 s | {', '.join(map(str, rl['requests_per_10s']))} |",
        ]
    beats = report.get("heartbeat") or []
    if beats:
        lines += [
            "",
            "## What the heartbeat costs a replica (issue 14: a shorter lease for SIGKILL recovery)",
            "",
            "One replica holding its generations in long model calls: PEXPIREs and the UPDATEs of "
            "site_generations come from the heartbeat alone (every lease_s/4, one pipeline and one "
            "statement per beat for all of them).",
            "",
            "| lease_s | generations | beats/s | Redis PEXPIRE/s | Redis commands/s (all) | "
            "PostgreSQL rows updated/s | PostgreSQL commits/s (all) |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {b['lease_s']:g} | {b['generations']} | {b['beats_per_s']} | {b['redis_pexpire_per_s']} | "
            f"{b['redis_cmds_per_s']} | {b['pg_rows_updated_per_s']} | {b['pg_commits_per_s']} |"
            for b in beats
        ]
    if report.get("edits"):
        lines += edits_section(report["edits"])
    lines += [
        "",
        "## The old design, same machine (issue 6)",
        "",
        "| load | old (Celery + SQLAlchemy) |",
        "|---|---|",
        "| latency 0, 2 processes | 10.6 sites/s, 157 ms per-site service time, 237 MiB peak RSS, 5 PostgreSQL "
        "sessions opened per site |",
        "| latency 200 ms, 8 processes | 7.1 sites/s (71% of ideal 10), 710 MiB, 11 sessions peak |",
        "| latency 200 ms, 32 processes | 9.1 sites/s (23% of ideal 40), 2.6 GiB, 43 sessions |",
        "",
        "## Charts",
        "",
    ]
    lines += ([no_charts, ""] if made and no_charts else []) + [f"![{name}]({name})" for name in made] or [no_charts]
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":  # re-render from results.json: python -m bench.report [dir]
    import sys

    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results"
    data = json.loads((folder / "results.json").read_text())
    ns = argparse.Namespace(out=folder)
    data["checks"] = check_targets(data, ns)
    write_report(data, ns)
