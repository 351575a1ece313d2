"""PNG plots of one benchmark run (linked from BENCHMARKS.md): rates, the RTT distribution, scale, sessions."""

from __future__ import annotations

from pathlib import Path

from splitrelay.bench.report import LABELS, get, rate_run

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

    paths = [p for p in ("kernel", "ceiling", "xdp", "userspace") if get(results, "parts", p)]
    labels = LABELS
    if any(get(results, "parts", p, "rate") for p in paths):
        fig, ax = plt.subplots(figsize=(7, 3.6))
        width = 0.38
        for i, pinned in enumerate((False, True)):
            values = [(rate_run(results, p, pinned) or {}).get("delivered_pps", 0) / 1e3 for p in paths]
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
    runs = get(results, "parts", "scale", "runs") or []
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
    setup = get(results, "parts", "sessions", "setup")
    if setup and get(setup, "paths", "relay") and get(setup, "paths", "direct"):
        fig, ax = plt.subplots(figsize=(7, 3.6))
        metrics = ["offer_to_answer_ms", "ice_connected_ms", "dtls_connected_ms"]
        for i, path in enumerate(("direct", "relay")):
            values = [get(setup, "paths", path, m, "median") or 0 for m in metrics]
            bars = ax.bar([x + (i - 0.5) * 0.38 for x in range(len(metrics))], values, 0.38,
                          label="direct to the transceiver" if path == "direct" else "through the XDP relay")
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks(range(len(metrics)), ["answer", "ICE connected", "DTLS connected"])
        ax.set_ylabel("ms after the offer is sent (median)")
        ax.set_title("WebRTC session setup (aiortc client)")
        ax.legend(fontsize=8)
        save(fig, "session-setup.png")
    steps = get(results, "parts", "sessions", "capacity", "steps") or []
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
