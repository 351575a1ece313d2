"""The soak's verdict and report: each call's class, growth, counters, the pass/fail lines, the file and plot.

bench/soak.py records a run's calls, events and samples; everything here reads only
those results, so a saved run (``--results``) can be judged again.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from splitrelay.bench.soak_plan import SoakPlan

DROP_GAP_MS = 1000            # an echo silent this long is a dropped call
GROWTH_LIMIT = 0.05           # RSS and open files, last samples over the first after the warm-up
HARNESS = ("callers", "soak")  # the bench's own processes: their growth is reported, not judged (the
                               # callers are node and libdatachannel, not this project)


# -- the verdict ------------------------------------------------------------------------------------


def call_worker(report: dict) -> int | None:
    """The worker that answered the call (its session resource is ``<worker>.<secret>``)."""
    location = report.get("location")
    return int(location.rsplit("/", 1)[1].split(".", 1)[0]) if location else None


def classify(call: dict, kill: dict | None, agent_down: list[dict]) -> str:
    """completed: connected, heard its echo, never silent for DROP_GAP_MS; killed: it was on the killed
    worker while it died (or could reach no worker then); refused: it could not connect while the agent
    was down (no ready ufrag left to answer with, strict policy: the transceiver answers 503); rejected:
    its offer was refused at another time; failed: answered, but it never connected (see RELIABILITY.md:
    libdatachannel callers that start together); dropped: it connected and lost its echo for
    DROP_GAP_MS or more."""
    r = call["report"] or {}
    audio = r.get("audio")
    long_gaps = [g for g in (audio or {}).get("gaps", []) if g[1] - g[0] >= DROP_GAP_MS]
    if r.get("ok") and audio and audio["voiced_in"] and not long_gaps:
        return "completed"
    if kill and call["started_at"] <= kill["done"] + 2.0 and call["ended_at"] >= kill["at"] \
            and call_worker(r) in (kill["worker"], None):
        return "killed"
    if audio is not None:
        return "dropped"
    if any(call["started_at"] <= e["done"] and call["ended_at"] >= e["at"] for e in agent_down):
        return "refused"
    return "rejected" if (r.get("error") or "").startswith(("WHIP POST", "the caller gave")) else "failed"


def growth(samples: list[dict], p: SoakPlan) -> dict[str, dict]:
    """Per process (and per life of it: a restarted agent or worker is a new one), RSS and open files
    from the first samples after the warm-up to the last before the drain (the first call cut short by
    the end), as a fraction: median of the last 3 over median of the first 3.  A process started during
    the run has its own warm-up: a worker the run's (it fills with calls), an agent one sample after its
    control API first answered (it holds no call; what it allocates comes with its compile).  A life with
    fewer than 4 samples in its window is not judged."""
    from statistics import median

    lives: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    born: dict[tuple[str, int], float] = {}
    for s in samples:
        for name, u in s["procs"].items():
            key, rss, fds = (name, u["pid"]), u["rss_kib"], u["fds"]
            if name == "agent" and "counters" not in s:
                continue       # still compiling: it serves from the first sample its control API answered
            born.setdefault(key, s["t"] if s["t"] > p.sample_s * 1.5 else None)
            own = 0.0 if born[key] is None else born[key] + (p.sample_s if name == "agent" else p.warmup_s)
            if max(p.warmup_s, own) <= s["t"] <= p.duration_s - p.call_max_s:
                lives.setdefault(key, []).append((s["t"], rss, fds))
    out = {}
    for (name, pid), points in lives.items():
        if len(points) < 4:
            continue
        first, last = points[:3], points[-3:]
        rss0, rss1 = median(x[1] for x in first), median(x[1] for x in last)
        fds0, fds1 = median(x[2] for x in first), median(x[2] for x in last)
        out[f"{name}" + (f"[{pid}]" if pid else "")] = {
            "from_s": round(points[0][0], 1), "to_s": round(points[-1][0], 1), "samples": len(points),
            "rss_kib": [round(rss0), round(rss1)], "rss_growth": round(rss1 / rss0 - 1, 4),
            "fds": [round(fds0, 1), round(fds1, 1)], "fds_growth": round(fds1 / fds0 - 1, 4) if fds0 else 0.0}
    return out


def counters_went_back(samples: list[dict]) -> list[str]:
    """Every counter that read less than at an earlier sample (the maps are pinned: none may)."""
    last: dict[str, tuple[float, int]] = {}
    back = []
    for s in samples:
        for name, value in s.get("counters", {}).items():
            if name in last and value < last[name][1]:
                back.append(f"{name}: {last[name][1]} at {last[name][0]:.0f} s, {value} at {s['t']:.0f} s")
            last[name] = (s["t"], value)
    return back


UNFREED_METRIC = "splitrelay_transceiver_sessions_unfreed"


def gauge_by_worker(metrics_text: str, name: str) -> dict[str, float]:
    """A gauge's value per worker from the supervisor's merged /metrics page."""
    return {sample.labels["worker"]: sample.value for family in text_string_to_metric_families(metrics_text)
            for sample in family.samples if sample.name == name and "worker" in sample.labels}


def unfreed_max(samples: list[dict]) -> dict[str, float]:
    """Per worker, the most ended sessions ever sampled still in memory (the collector's backlog)."""
    out: dict[str, float] = {}
    for s in samples:
        for worker, n in (s.get("unfreed") or {}).items():
            out[worker] = max(out.get(worker, 0.0), n)
    return out


def loop_stalls(samples: list[dict], at_least_ms: float = 250.0) -> list[dict]:
    """Each sample interval in which a worker's event loop ran a timer ``at_least_ms`` late or more
    (its lag histogram, scraped each sample through the supervisor): when, which worker, how late at
    most (the bucket's upper bound).  What a dropped call's silence is set against."""
    from splitrelay.bench.capacity_load import lag_worst_ms

    out, last = [], {}
    for s in samples:
        for worker, buckets in (s.get("loop_lag") or {}).items():
            now = {float(le): n for le, n in buckets.items()}
            if worker in last:
                worst = lag_worst_ms(last[worker][1], now)
                if worst is not None and worst >= at_least_ms:
                    out.append({"from_s": round(last[worker][0], 1), "to_s": round(s["t"], 1), "worker": worker,
                                "late_ms_up_to": worst})
            last[worker] = (s["t"], now)
    return out


def summary(results: dict) -> dict:
    p = SoakPlan(**results["plan"])
    kills = [e for e in results["events"] if e["what"] == "worker_kill"]
    kinds: dict[str, int] = {"completed": 0, "killed": 0, "refused": 0, "rejected": 0, "failed": 0, "dropped": 0}
    agent_down = [e for e in results["events"] if e["what"] == "agent_restart"]
    gaps = []
    for call in results["calls"]:
        kind = classify(call, kills[0] if kills else None, agent_down)
        call["class"] = kind
        kinds[kind] += 1
        if kind == "completed":
            gaps.append(call["report"]["audio"]["max_gap_ms"])
    gaps.sort()
    final = results["samples"][-1] if results["samples"] else {}
    steady = [s for s in results["samples"] if p.warmup_s <= s["t"] <= p.duration_s - p.call_max_s]
    return {
        "calls_started": len(results["calls"]), **{f"calls_{k}": v for k, v in kinds.items()},
        "concurrent_mean": round(sum(s["calls_live"] for s in steady) / len(steady), 1) if steady else None,
        "echo_gap_ms_max_p50": gaps[len(gaps) // 2] if gaps else None,
        "echo_gap_ms_max_max": gaps[-1] if gaps else None,
        "events": {what: sum(1 for e in results["events"] if e["what"] == what)
                   for what in ("reload", "agent_restart", "worker_kill")},
        "agent_down_s": [e.get("down_s") for e in agent_down],
        "reload_s": [round(e["done"] - e["at"], 1) for e in results["events"] if e["what"] == "reload"],
        "growth": growth(results["samples"], p),
        "final_fill": {k: final.get(k) for k in ("flows", "pending", "call_sessions", "sessions",
                                                 "transceiver_sessions")},
        "baseline_sessions": results["baseline_sessions"],
        "counters_went_back": counters_went_back(results["samples"]),
        "loop_stalls": loop_stalls(results["samples"]),
        "unfreed_max": unfreed_max(results["samples"]),
        "samples_without_counters": sum(1 for s in results["samples"] if "counters" not in s),
    }


def assess(results: dict, s: dict | None = None) -> list[str]:
    """What is wrong with the run, one line each (empty: it passed)."""
    p, s = SoakPlan(**results["plan"]), s or summary(results)
    wrong = []
    if s["calls_started"] <= p.concurrency:
        wrong.append(f"no churn: {s['calls_started']} calls started for {p.concurrency} slots")
    for kind in ("dropped", "rejected"):
        if s[f"calls_{kind}"]:
            bad = [c for c in results["calls"] if c.get("class") == kind][:3]
            wrong.append(f"{s[f'calls_{kind}']} calls {kind}, e.g. " + "; ".join(
                f"#{c['index']} worker {call_worker(c['report'] or {})}: {(c['report'] or {}).get('error')}, "
                f"gaps {[round(g[1] - g[0]) for g in ((c['report'] or {}).get('audio') or {}).get('gaps', [])]}"
                for c in bad))
    if s["events"]["worker_kill"] != 1 or not s["events"]["agent_restart"] or not s["events"]["reload"]:
        wrong.append(f"not every disturbance happened: {s['events']}")
    for name, g in s["growth"].items():
        if name.split("[")[0] in HARNESS:
            continue
        if g["rss_growth"] > GROWTH_LIMIT:
            wrong.append(f"{name} RSS grew {g['rss_growth']:.1%} ({g['rss_kib'][0]} -> {g['rss_kib'][1]} KiB "
                         f"from {g['from_s']} to {g['to_s']} s)")
        if g["fds_growth"] > GROWTH_LIMIT and g["fds"][1] - g["fds"][0] > 2:
            wrong.append(f"{name} open files grew {g['fds_growth']:.1%} ({g['fds'][0]} -> {g['fds'][1]})")
    fill = s["final_fill"]
    if (fill["flows"], fill["pending"], fill["call_sessions"], fill["transceiver_sessions"]) != (0, 0, 0, 0):
        wrong.append(f"the relay's maps did not empty: {fill}")
    if fill["sessions"] is not None and fill["sessions"] > s["baseline_sessions"]:
        wrong.append(f"{fill['sessions']} sessions at the end, {s['baseline_sessions']} ready ufrags at the start")
    if s["counters_went_back"]:
        wrong.append("counters went back: " + "; ".join(s["counters_went_back"][:5]))
    return wrong


# -- the report -------------------------------------------------------------------------------------


def plot(results: dict, out_dir: Path) -> Path:
    """RSS of every process, live calls and the relay's packet rates over the run, one PNG; the
    disturbances are vertical lines (reload dotted, agent restart dashed, worker kill solid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, p = results["samples"], SoakPlan(**results["plan"])
    minutes = [s["t"] / 60 for s in samples]
    fig, (rss_ax, calls_ax, pps_ax) = plt.subplots(3, 1, figsize=(8, 7.5), sharex=True)
    for name in ("agent", "supervisor", "worker0", "worker1", "callers", "soak"):
        values = [s["procs"][name]["rss_kib"] / 1024 if name in s["procs"] else float("nan") for s in samples]
        label = "callers (one node process)" if name == "callers" else ("this bench" if name == "soak" else name)
        rss_ax.plot(minutes, values, label=label)
    rss_ax.set_ylabel("RSS (MiB)")
    rss_ax.set_yscale("log")
    rss_ax.legend(fontsize=7, ncol=3)
    calls_ax.plot(minutes, [s["calls_live"] for s in samples], label="callers live")
    def series(key: str) -> list[float]:   # a gap where the agent or a worker could not be read
        return [float("nan") if s.get(key) is None else s[key] for s in samples]

    calls_ax.plot(minutes, series("transceiver_sessions"), label="transceiver sessions")
    calls_ax.plot(minutes, series("flows"), label="relay flows")
    calls_ax.set_ylabel("calls")
    calls_ax.legend(fontsize=7)
    for key, label in (("in_forwarded_pps", "client -> transceiver"),
                       ("out_forwarded_pps", "transceiver -> client")):
        pps_ax.plot(minutes, series(key), label=label)
    pps_ax.set_ylabel("forwarded pkt/s")
    pps_ax.set_xlabel("minutes")
    pps_ax.legend(fontsize=7)
    styles = {"reload": ":", "agent_restart": "--", "worker_kill": "-"}
    for ax in (rss_ax, calls_ax, pps_ax):
        for e in results["events"]:
            ax.axvline((e["at"] - results["t0"]) / 60, color="grey", linestyle=styles[e["what"]], linewidth=0.8)
    rss_ax.set_title(f"Soak, {p.minutes:g} min: reloads dotted, agent restarts dashed, worker kill solid")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"soak-{p.minutes:g}min.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compact(results: dict) -> dict:
    """The results to keep in a file: each call by its class, worker, times, error and gaps of 1 s or more
    (an hour holds ~1,700 calls; their every 200 ms gap and log tail made 0.5 MB in 10 minutes)."""
    def call(c: dict) -> dict:
        r, audio = c["report"] or {}, (c["report"] or {}).get("audio") or {}
        return {"index": c["index"], "class": c.get("class"), "worker": call_worker(r), "hold_s": c["hold_s"],
                "started_at": round(c["started_at"], 2), "ended_at": round(c["ended_at"], 2),
                "error": r.get("error"), "voiced_in": audio.get("voiced_in"),
                "max_gap_ms": audio.get("max_gap_ms"),
                "gaps": [g for g in audio.get("gaps", []) if g[1] - g[0] >= DROP_GAP_MS]}

    return {**results, "calls": [call(c) for c in results["calls"]]}
