"""One benchmark run's figures judged: the side-by-side ratios and the target verdicts.

Absolute numbers from a 2-core VM on veth say little on their own; the ratios
between paths measured in the same run, on the same machine, by the same load
generator, are the result.  ``report_markdown`` writes BENCHMARKS.md from them,
``report_plots`` the PNG plots; this module holds the rules both judge by.
"""

from __future__ import annotations

import math
from typing import Any

COMMAND = "make bench    # = splitrelay bench --markdown BENCHMARKS.md --plots docs/bench"
LABELS = {"kernel": "kernel routing (floor)", "ceiling": "bare XDP redirect (ceiling)", "xdp": "XDP relay",
          "userspace": "userspace relay"}


def get(d: Any, *keys: Any) -> Any:
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


def rate_run(results: dict, path: str, pinned: bool) -> dict | None:
    for run in get(results, "parts", path, "rate") or []:
        if bool(run.get("pinned", run.get("sender_cpu") is not None)) == pinned:
            return run
    return None


def added_latency_us(results: dict, path: str, key: str) -> float | None:
    """A path's RTT percentile minus the kernel-routing floor's (what the relay adds)."""
    here = get(results, "parts", path, "latency", key)
    floor = get(results, "parts", "kernel", "latency", key)
    return None if here is None or floor is None else here - floor


def ratios(results: dict) -> dict:
    """The side-by-side ratios the issue asks for (None where a part did not run)."""
    out: dict[str, float | None] = {}
    for pinned in (False, True):
        xdp, user = rate_run(results, "xdp", pinned), rate_run(results, "userspace", pinned)
        out["rate_xdp_over_userspace" + ("_pinned" if pinned else "")] = _ratio(
            xdp and xdp["delivered_pps"], user and user["delivered_pps"])
    for key in ("p50_us", "p99_us", "p999_us"):
        xdp, user = added_latency_us(results, "xdp", key), added_latency_us(results, "userspace", key)
        out[f"added_{key}_xdp_over_userspace"] = None if xdp is None or not user else max(xdp, 0.0) / user
    out["first_packet_p50_xdp_over_userspace"] = _ratio(get(results, "parts", "xdp", "first_packet", "p50_us"),
                                                        get(results, "parts", "userspace", "first_packet",
                                                             "p50_us"))
    runs = get(results, "parts", "scale", "runs") or []
    if len(runs) >= 2:
        out["scale_rate_largest_over_smallest"] = _ratio(runs[-1]["delivered_pps"], runs[0]["delivered_pps"])
        out["scale_rate_largest_over_smallest_1k_active"] = _ratio(
            get(runs[-1], "active_subset", "delivered_pps"), get(runs[0], "active_subset", "delivered_pps"))
    out["registration_xdp_over_userspace"] = _ratio(
        get(results, "parts", "xdp", "registration", "register_per_s"),
        get(results, "parts", "userspace", "registration", "register_per_s"))
    for pinned in (False, True):  # the relay against the bare MAC-rewrite-and-redirect program, same run
        xdp, bare = rate_run(results, "xdp", pinned), rate_run(results, "ceiling", pinned)
        out["rate_xdp_over_ceiling" + ("_pinned" if pinned else "")] = _ratio(
            xdp and xdp["delivered_pps"], bare and bare["delivered_pps"])
    xdp, bare = rate_run(results, "xdp", True), rate_run(results, "ceiling", True)
    # packets per CPU-second on the relay's own core, relay over ceiling: steadier than pkt/s on a loaded machine
    out["cpu_per_packet_ceiling_over_xdp_pinned"] = _ratio(bare and bare.get("relay_cpu_ns_per_packet"),
                                                           xdp and xdp.get("relay_cpu_ns_per_packet"))
    out["setup_relay_over_direct"] = get(results, "parts", "sessions", "setup", "ratio_relay_to_direct",
                                          "dtls_connected_ms")
    out["setup_relay_over_direct_2_relays"] = get(results, "parts", "sessions", "setup_2_relays",
                                                   "ratio_relay_to_direct", "dtls_connected_ms")
    return out


def targets(results: dict) -> list[dict]:
    """The issue's performance targets, each with the measured value and whether it is met."""
    r = ratios(results)
    largest = get(results, "parts", "scale", "runs", -1, "flows")
    rows = [
        ("XDP delivered pkt/s >= 10x userspace", r["rate_xdp_over_userspace"], lambda v: v >= 10),
        ("... with the sender pinned to one core", r["rate_xdp_over_userspace_pinned"], lambda v: v >= 10),
        ("XDP added p99 latency <= 1/10 of userspace's", r["added_p99_us_xdp_over_userspace"], lambda v: v <= 0.1),
        (f"{fmt(largest)} flows in the map, 1k active: rate >= 90% of the 1k-flow rate",
         r.get("scale_rate_largest_over_smallest_1k_active"), lambda v: v >= 0.9),
        (f"{fmt(largest)} flows in the map, all active (worst case): rate >= 90% of the 1k-flow rate",
         r.get("scale_rate_largest_over_smallest"), lambda v: v >= 0.9),
        ("setup through the relay within 5% of direct", r["setup_relay_over_direct"], lambda v: v <= 1.05),
        ("... with 2 relays advertised", r["setup_relay_over_direct_2_relays"], lambda v: v <= 1.05),
        ("XDP delivered pkt/s >= 80% of the local ceiling (bare XDP redirect)", r["rate_xdp_over_ceiling"],
         lambda v: v >= 0.8),
        ("... with the sender pinned to one core", r["rate_xdp_over_ceiling_pinned"], lambda v: v >= 0.8),
    ]
    return [{"target": name, "measured": None if value is None else round(value, 3),
             "met": None if value is None else bool(ok(value))} for name, value, ok in rows]


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
