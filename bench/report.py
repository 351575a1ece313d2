"""Turn one benchmark run's figures into ratios, target verdicts, PNG plots and BENCHMARKS.md.

Absolute numbers from a 2-core VM on veth say little on their own; the ratios
between paths measured in the same run, on the same machine, by the same load
generator, are the result.  Every section says what was measured, how, and the
command that measures it again.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

COMMAND = "make bench    # = splitrelay bench --markdown BENCHMARKS.md --plots docs/bench"


def _get(d: Any, *keys: Any) -> Any:
    for key in keys:
        if isinstance(d, dict):
            d = d.get(key)
        elif isinstance(d, list) and isinstance(key, int) and -len(d) <= key < len(d):
            d = d[key]
        else:
            return None
    return d


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def _rate(results: dict, path: str, pinned: bool) -> dict | None:
    for run in _get(results, "parts", path, "rate") or []:
        if bool(run.get("pinned", run.get("sender_cpu") is not None)) == pinned:
            return run
    return None


def added_latency_us(results: dict, path: str, key: str) -> float | None:
    """A path's RTT percentile minus the kernel-routing floor's (what the relay adds)."""
    here = _get(results, "parts", path, "latency", key)
    floor = _get(results, "parts", "kernel", "latency", key)
    return None if here is None or floor is None else here - floor


def ratios(results: dict) -> dict:
    """The side-by-side ratios the issue asks for (None where a part did not run)."""
    out: dict[str, float | None] = {}
    for pinned in (False, True):
        xdp, user = _rate(results, "xdp", pinned), _rate(results, "userspace", pinned)
        out["rate_xdp_over_userspace" + ("_pinned" if pinned else "")] = _ratio(
            xdp and xdp["delivered_pps"], user and user["delivered_pps"])
    for key in ("p50_us", "p99_us", "p999_us"):
        xdp, user = added_latency_us(results, "xdp", key), added_latency_us(results, "userspace", key)
        out[f"added_{key}_xdp_over_userspace"] = None if xdp is None or not user else max(xdp, 0.0) / user
    out["first_packet_p50_xdp_over_userspace"] = _ratio(_get(results, "parts", "xdp", "first_packet", "p50_us"),
                                                        _get(results, "parts", "userspace", "first_packet",
                                                             "p50_us"))
    runs = _get(results, "parts", "scale", "runs") or []
    if len(runs) >= 2:
        out["scale_rate_largest_over_smallest"] = _ratio(runs[-1]["delivered_pps"], runs[0]["delivered_pps"])
        out["scale_rate_largest_over_smallest_1k_active"] = _ratio(
            _get(runs[-1], "active_subset", "delivered_pps"), _get(runs[0], "active_subset", "delivered_pps"))
    out["registration_xdp_over_userspace"] = _ratio(
        _get(results, "parts", "xdp", "registration", "register_per_s"),
        _get(results, "parts", "userspace", "registration", "register_per_s"))
    out["setup_relay_over_direct"] = _get(results, "parts", "sessions", "setup", "ratio_relay_to_direct",
                                          "dtls_connected_ms")
    return out


def targets(results: dict) -> list[dict]:
    """The issue's performance targets, each with the measured value and whether it is met."""
    r = ratios(results)
    largest = _get(results, "parts", "scale", "runs", -1, "flows")
    rows = [
        ("XDP delivered pkt/s >= 10x userspace", r["rate_xdp_over_userspace"], lambda v: v >= 10),
        ("... with the sender pinned to one core", r["rate_xdp_over_userspace_pinned"], lambda v: v >= 10),
        ("XDP added p99 latency <= 1/10 of userspace's", r["added_p99_us_xdp_over_userspace"], lambda v: v <= 0.1),
        (f"{_fmt(largest)} flows in the map, 1k active: rate >= 90% of the 1k-flow rate",
         r.get("scale_rate_largest_over_smallest_1k_active"), lambda v: v >= 0.9),
        (f"{_fmt(largest)} flows in the map, all active (worst case): rate >= 90% of the 1k-flow rate",
         r.get("scale_rate_largest_over_smallest"), lambda v: v >= 0.9),
        ("setup through the relay within 5% of direct", r["setup_relay_over_direct"], lambda v: v <= 1.05),
    ]
    return [{"target": name, "measured": None if value is None else round(value, 3),
             "met": None if value is None else bool(ok(value))} for name, value, ok in rows]


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _trials(run: dict | None) -> str:
    """Every trial's delivered rate, in kpkt/s (the row shows the median one)."""
    rates = (run or {}).get("trials_pps") or []
    return " / ".join(f"{r / 1e3:,.0f}" for r in rates) if len(rates) > 1 else ""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# -- plots ------------------------------------------------------------------------------

def plots(results: dict, samples_dir: Path, out_dir: Path) -> list[Path]:
    """PNG plots of the run; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig, name: str) -> None:
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    paths = [p for p in ("kernel", "xdp", "userspace") if _get(results, "parts", p)]
    labels = {"kernel": "kernel routing (floor)", "xdp": "XDP relay", "userspace": "userspace relay"}
    if any(_get(results, "parts", p, "rate") for p in paths):
        fig, ax = plt.subplots(figsize=(7, 3.6))
        width = 0.38
        for i, pinned in enumerate((False, True)):
            values = [(_rate(results, p, pinned) or {}).get("delivered_pps", 0) / 1e3 for p in paths]
            bars = ax.bar([x + (i - 0.5) * width for x in range(len(paths))], values, width,
                          label="sender on CPU 0, relay on CPU 1" if pinned else "unpinned")
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks(range(len(paths)), [labels[p] for p in paths])
        ax.set_ylabel("delivered kpkt/s")
        ax.set_title("Forwarding rate, established flows")
        ax.legend(fontsize=8)
        save(fig, "forwarding-rate.png")
    series = [(p, samples_dir / f"rtt-{p}.txt") for p in paths]
    series = [(p, f) for p, f in series if f.exists() and f.stat().st_size]
    if series:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        for p, f in series:
            rtts = sorted(int(x) / 1e3 for x in f.read_text().split())
            n = len(rtts)
            ax.plot(rtts, [1 - (i + 0.5) / n for i in range(n)], label=labels[p])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("UDP round trip (µs)")
        ax.set_ylabel("fraction of pings slower")
        ax.set_title("Ping-pong RTT (complementary CDF)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "latency-ccdf.png")
    runs = _get(results, "parts", "scale", "runs") or []
    if runs:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        flows = [r["flows"] for r in runs]
        ax.plot(flows, [r["delivered_pps"] / 1e3 for r in runs], "o-", label="kpkt/s, every flow active")
        if all(r.get("active_subset") for r in runs):
            ax.plot(flows, [r["active_subset"]["delivered_pps"] / 1e3 for r in runs], "o:",
                    label="kpkt/s, 1,000 flows active")
        ax.set_xscale("log")
        ax.set_xlabel("flows in the map")
        ax.set_ylabel("delivered kpkt/s")
        ax.set_ylim(bottom=0)
        ax2 = ax.twinx()
        ax2.plot(flows, [r.get("xdp_ns_per_packet") or 0 for r in runs], "s--", color="tab:red",
                 label="XDP ns/packet, every flow active")
        ax2.set_ylabel("XDP program ns per packet", color="tab:red")
        ax2.set_ylim(bottom=0)
        ax.legend(fontsize=8, loc="lower left")
        ax.set_title("Flow-table scale (XDP relay on its own core)")
        save(fig, "scale.png")
    setup = _get(results, "parts", "sessions", "setup")
    if setup and _get(setup, "paths", "relay") and _get(setup, "paths", "direct"):
        fig, ax = plt.subplots(figsize=(7, 3.6))
        metrics = ["offer_to_answer_ms", "ice_connected_ms", "dtls_connected_ms"]
        for i, path in enumerate(("direct", "relay")):
            values = [_get(setup, "paths", path, m, "median") or 0 for m in metrics]
            bars = ax.bar([x + (i - 0.5) * 0.38 for x in range(len(metrics))], values, 0.38,
                          label="direct to the transceiver" if path == "direct" else "through the XDP relay")
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks(range(len(metrics)), ["answer", "ICE connected", "DTLS connected"])
        ax.set_ylabel("ms after the offer is sent (median)")
        ax.set_title("WebRTC session setup (aiortc client)")
        ax.legend(fontsize=8)
        save(fig, "session-setup.png")
    steps = _get(results, "parts", "sessions", "capacity", "steps") or []
    if steps:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        ax.plot([s["sessions"] for s in steps], [100 * (s.get("audio_loss") or 0) for s in steps], "o-",
                label="audio loss %")
        ax.axhline(1.0, color="grey", linestyle=":", label="1% loss")
        ax.set_xlabel("concurrent echo sessions on one transceiver core")
        ax.set_ylabel("audio loss (%)")
        ax2 = ax.twinx()
        ax2.plot([s["sessions"] for s in steps], [s.get("transceiver_cpu_pct") or 0 for s in steps], "s--",
                 color="tab:red")
        ax2.set_ylabel("transceiver CPU %", color="tab:red")
        ax.set_title("Transceiver capacity")
        ax.legend(fontsize=8, loc="upper left")
        save(fig, "capacity.png")
    return written


# -- BENCHMARKS.md ------------------------------------------------------------------------

LABELS = {"kernel": "kernel routing (floor)", "xdp": "XDP relay", "userspace": "userspace relay"}


def _img(plot_dir_rel: str | None, name: str, written: list[Path]) -> str:
    if plot_dir_rel is None or not any(p.name == name for p in written):
        return ""
    return f"\n![{name}]({plot_dir_rel}/{name})\n"


def markdown(results: dict, written: list[Path] | None = None, plot_dir_rel: str | None = None,
             analysis: str | None = None) -> str:
    """BENCHMARKS.md for one run: machine, targets, every figure with its method and command."""
    written = written or []
    m = results.get("machine", {})
    prm = results.get("parameters", {})
    parts = results.get("parts", {})
    out = [
        "# splitrelay benchmarks\n",
        f"Generated by `{COMMAND.split('#')[0].strip()}` ({results.get('profile')} profile, "
        f"{_fmt(results.get('elapsed_s'))} s) on {m.get('date')} at commit `{m.get('commit')}`. "
        "Every figure below comes from that one run: the paths are measured side by side, by the same "
        "load generator (`bench/udpgen.c`: sendmmsg/recvmmsg and AF_PACKET), in the same lab "
        "(`lab/topology.py`: client, relay and transceiver network namespaces joined by veth pairs).\n",
        "Reproduce: `make bench` (all parts, about 5 minutes on this machine), `splitrelay bench --part xdp "
        "--part userspace` (a subset), `splitrelay bench --smoke --json` (the seconds-long version CI runs); "
        "the raw figures are in `docs/bench/results.json` (`splitrelay bench --from-results` re-renders "
        "this page from them).\n",
        "## Machine\n",
        _table(["", ""], [["CPUs", m.get("cpus")], ["CPU model", m.get("cpu_model")],
                          ["memory", f"{_fmt(m.get('memory_gib'))} GiB"], ["kernel", m.get("kernel")],
                          ["NIC", m.get("nic")], ["Python", m.get("python")]]),
        "## Targets\n",
        _table(["target", "measured", "met"],
               [[t["target"], _fmt(t["measured"], 3),
                 "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")] for t in targets(results)]),
        "Ratios are XDP ÷ userspace unless named otherwise; where a target is missed the analysis at the end "
        "says why.\n",
    ]
    paths = [p for p in ("kernel", "xdp", "userspace") if p in parts]
    if any(_get(parts, p, "rate") for p in paths):
        out += [
            "## 1. Forwarding rate, established flows\n",
            f"Method: {prm.get('rate_flows')} flows are opened with one STUN Binding Request each (a registered "
            f"ufrag per flow), then udpgen writes {prm.get('rate_duration_s')} s of 200-byte RTP-class packets "
            "round-robin over them as fast as it can (AF_PACKET on the client's veth, no socket layer), "
            f"{prm.get('trials', 1)} times: each row is the trial with the median delivered rate, and *trials* "
            "lists them all. "
            "*Delivered* is counted where the relay hands packets on: an XDP counter at the far end of the "
            "relay's internal link (`bench/egress.c`), the same point for every path, so the bridge and UDP "
            "stack behind it cost nothing and the relay is what saturates; loss is 1 − delivered/sent.\n\n"
            "On veth, XDP runs in the softirq of the CPU that transmits into the pair, i.e. the sender's, "
            "while the userspace relay is a process the scheduler puts on the other core. So each path runs "
            "twice: *unpinned* (the scheduler decides) and *pinned*: sender on CPU 0 and the relay's work on "
            "CPU 1 — for XDP the public veth's NAPI poll moved into a kernel thread (`threaded` NAPI) pinned "
            "to CPU 1, for userspace the relay process pinned to CPU 1, for kernel routing nothing to move. "
            "*Relay CPU ns/pkt* (pinned runs) is that thread's or process's CPU time per delivered packet: "
            "the relay's whole cost on its core. *XDP ns/pkt* is the program's own run time from the kernel's "
            "BPF statistics (`BPF_ENABLE_STATS`), without the redirect and veth transmit around it.\n",
            _table(["path", "sender", "offered kpkt/s", "delivered kpkt/s", "trials kpkt/s", "loss",
                    "relay CPU ns/pkt", "XDP ns/pkt (prog run time)"],
                   [[LABELS[p], "sender CPU 0, relay CPU 1" if r.get("pinned") else "unpinned",
                     _fmt(r.get("offered_pps", 0) / 1e3), _fmt(r.get("delivered_pps", 0) / 1e3), _trials(r),
                     _fmt(100 * r["loss"], 2) + " %" if r.get("loss") is not None else "n/a",
                     _fmt(r.get("relay_cpu_ns_per_packet")), _fmt(r.get("xdp_ns_per_packet"))]
                    for p in paths for r in _get(parts, p, "rate") or []]),
            _img(plot_dir_rel, "forwarding-rate.png", written),
        ]
    if any(_get(parts, p, "latency") for p in paths):
        rows = []
        for p in paths:
            lat = _get(parts, p, "latency") or {}
            rows.append([LABELS[p], *(lat.get(k) for k in ("min_us", "p50_us", "p90_us", "p99_us", "p999_us",
                                                           "max_us")),
                         added_latency_us(results, p, "p50_us") if p != "kernel" else None,
                         added_latency_us(results, p, "p99_us") if p != "kernel" else None,
                         f"{lat.get('received', 0)}/{lat.get('count', 0)}"])
        out += [
            "## 2. Added latency (UDP ping-pong)\n",
            f"Method: one flow; udpgen sends a 200-byte packet every {prm.get('ping_interval_us')} µs and waits "
            f"for its echo from a UDP echo server on the transceiver host ({prm.get('ping_count')} pings, "
            "CLOCK_MONOTONIC). The floor is the same ping routed by the relay namespace's kernel "
            "(`ip_forward=1`, no relay program on the path); *added* = path − floor at the same percentile.\n",
            _table(["path", "min µs", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "max µs", "added p50 µs",
                    "added p99 µs", "answered"], rows),
            _img(plot_dir_rel, "latency-ccdf.png", written),
        ]
    if any(_get(parts, p, "first_packet") for p in paths):
        out += [
            "## 3. First-packet routing (STUN Binding Request → answer)\n",
            f"Method: {prm.get('first_packet_count')} times, a new socket (new source port) sends a STUN "
            "Binding Request whose USERNAME names a registered session; the echo server on the transceiver "
            "host answers. Through a relay this is a session's first packet: ufrag lookup, flow learned, "
            "forwarded (for the userspace relay also: its per-flow socket created).\n",
            _table(["path", "p50 µs", "p90 µs", "p99 µs", "max µs", "answered"],
                   [[LABELS[p], *(_get(parts, p, "first_packet", k) for k in ("p50_us", "p90_us", "p99_us",
                                                                              "max_us")),
                     f"{_get(parts, p, 'first_packet', 'received')}/{_get(parts, p, 'first_packet', 'count')}"]
                    for p in paths if _get(parts, p, "first_packet")]),
        ]
    sc = parts.get("scale")
    if sc:
        out += [
            "## 4. Scale: flows in the map, memory, registration rate\n",
            "Method: the XDP relay is loaded without its daemon (nothing else runs), its flow map filled with "
            "BPF_MAP_UPDATE_BATCH, then two pinned runs per size (sender CPU 0, relay NAPI thread CPU 1): the "
            "sender visits *every* flow in a fixed shuffled order (AF_PACKET, one source address per 50,000 "
            "flows; every packet a different flow, the whole table is the working set: the worst case), and "
            "then only 1,000 of them (same table, a working set that fits in cache). *Ageing pass* is the "
            "agent's `age_flows` over the whole table (batched reads), timed once per size. Each rate is the "
            f"median of {prm.get('trials', 1)} trials.\n",
            _table(["flows in map", "active flows", "delivered kpkt/s", "trials kpkt/s", "loss",
                    "relay CPU ns/pkt", "XDP ns/pkt", "fill s", "ageing pass s"],
                   [row for r in sc["runs"] for row in (
                       [r.get("flows_in_map", r["flows"]), "all", _fmt(r["delivered_pps"] / 1e3), _trials(r),
                        _fmt(100 * r["loss"], 2) + " %" if r.get("loss") is not None else "n/a",
                        r.get("relay_cpu_ns_per_packet"), r.get("xdp_ns_per_packet"), r.get("fill_s"),
                        r.get("walk_s")],
                       [r.get("flows_in_map", r["flows"]), _get(r, "active_subset", "flows"),
                        _fmt((_get(r, "active_subset", "delivered_pps") or 0) / 1e3),
                        _trials(r.get("active_subset")),
                        _fmt(100 * _get(r, "active_subset", "loss"), 2) + " %"
                        if _get(r, "active_subset", "loss") is not None else "n/a",
                        _get(r, "active_subset", "relay_cpu_ns_per_packet"),
                        _get(r, "active_subset", "xdp_ns_per_packet"), "", ""])]),
            f"Kernel memory: the flow map is a preallocated hash of {_fmt(sc['flow_map_entries'])} entries "
            f"(key {sc['flow_key_bytes']} B, value {sc['flow_value_bytes']} B) charged "
            f"{_fmt(sc['flow_map_memlock_bytes'] / 2**20)} MiB: **{_fmt(sc['bytes_per_flow'])} bytes per flow**, "
            "paid whether the table is full or empty.\n",
            _img(plot_dir_rel, "scale.png", written),
        ]
    regs = [(p, _get(parts, p, "registration")) for p in ("xdp", "userspace") if _get(parts, p, "registration")]
    if regs:
        out += [
            "### Session registration rate (control API)\n",
            "Method: PUT then DELETE of distinct sessions over HTTP keep-alive with 8 requests in flight, "
            "from the relay namespace, as transceivers do before each answer.\n",
            _table(["relay", "sessions", "register /s", "unregister /s"],
                   [[LABELS[p], r["sessions"], r["register_per_s"], r["unregister_per_s"]] for p, r in regs]),
        ]
    sessions = parts.get("sessions") or {}
    out += _sessions_markdown(sessions, plot_dir_rel, written)
    if analysis:
        out += ["## Analysis\n", analysis.strip() + "\n"]
    return "\n".join(out)


def _stat_row(name: str, d: dict | None) -> list[Any]:
    d = d or {}
    return [name, *(d.get(k) for k in ("median", "p90", "min", "max", "n"))]


def _sessions_markdown(sessions: dict, plot_dir_rel: str | None, written: list[Path]) -> list[str]:
    out: list[str] = []
    setup = sessions.get("setup")
    if setup:
        rows = []
        for path in ("relay", "direct"):
            for metric in ("offer_to_answer_ms", "ice_connected_ms", "dtls_connected_ms"):
                rows.append(_stat_row(f"{path}: {metric.removesuffix('_ms').replace('_', ' ')}",
                                      _get(setup, "paths", path, metric)))
        out += [
            "## 5. Session setup: offer → ICE connected → DTLS connected\n",
            f"Method: {setup.get('method', '')}\n",
            _table(["path: step", "median ms", "p90 ms", "min ms", "max ms", "n"], rows),
            "Relay ÷ direct, medians: " + ", ".join(
                f"{k.removesuffix('_ms').replace('_', ' ')} **{_fmt(v, 3)}**"
                for k, v in (setup.get("ratio_relay_to_direct") or {}).items()) + ".\n",
            _img(plot_dir_rel, "session-setup.png", written),
        ]
    cap = sessions.get("capacity")
    if cap:
        out += [
            "## 6. Transceiver capacity: echo sessions per core\n",
            f"Method: {cap.get('method', '')}\n",
            _table(["sessions", "connected", "audio loss", "worst session", "audio RTT p50 ms",
                    "transceiver CPU %", "client CPU %"],
                   [[s.get("sessions"), s.get("connected"), _fmt(100 * (s.get("audio_loss") or 0), 2) + " %",
                     _fmt(100 * (s.get("worst_session_audio_loss") or 0), 2) + " %",
                     _get(s, "audio_rtt_ms", "median"), s.get("transceiver_cpu_pct"), s.get("probe_cpu_pct")]
                    for s in cap.get("steps", [])]),
            f"Capacity: **{_fmt(cap.get('capacity'))} concurrent echo sessions per core** at ≤ 1% audio loss"
            + ("" if cap.get("capacity_reached") else " (the loss threshold was not reached: a lower bound)")
            + (f"; limited by the {cap['limited_by']}" if cap.get("limited_by") else "") + ".\n"
            + "".join(f"\n- {n}" for n in cap.get("notes") or []) + "\n",
            _img(plot_dir_rel, "capacity.png", written),
        ]
    return out
