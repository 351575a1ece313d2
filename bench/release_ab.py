"""Ended sessions freed by a full collection per pass (default) vs ``SPLITRELAY_GC=release``, side by side
(issue 24; BENCHMARKS.md, 2026-12-08).  ``python -m splitrelay.bench.release_ab CALLS ROUNDS [MODES]`` (root).

Two echo transceivers of one lab, one per mode, both pinned to cpu0 (MODES, comma-separated, in start
order; default ``sessions,release``); CALLS calls each from the load client on cpu1 stay up while, ROUNDS
times, 2 more calls are placed on each and ended.  Per mode, from its ``/metrics`` over those rounds: the
passes and how long each held the loop (``splitrelay_transceiver_session_release_seconds``), its full
collections (``splitrelay_transceiver_gc_pause_seconds{generation="2"}``), the in-to-out p99 / p99.9 and
its CPU.  One JSON line per mode.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from splitrelay import tokens
from splitrelay.bench import capacity_load, sessions
from splitrelay.bench.capacity import CAPACITY_BACKEND_ID, _free_backend_id
from splitrelay.bench.system import process_cpu_ticks
from splitrelay.client import load_client
from splitrelay.lab import stack
from splitrelay.lab.netns import in_netns
from splitrelay.lab.topology import Lab
from splitrelay.transceiver.garbage import GC_ENV
from splitrelay.transceiver.workers import READY

HISTOGRAMS = ("splitrelay_transceiver_session_release_seconds", "splitrelay_transceiver_gc_pause_seconds",
              "splitrelay_transceiver_media_in_to_out_seconds")


def _histograms(lab: Lab, admin: str, token: str) -> dict[str, dict[str, float]]:
    """Each of HISTOGRAMS (generation 2 only for the collections): bucket bound -> count, sum, count."""
    def read() -> dict[str, dict[str, float]]:
        request = urllib.request.Request(admin + "/metrics", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=3) as resp:  # noqa: S310 - the lab's own URL
            text = resp.read().decode()
        out: dict[str, dict[str, float]] = {name: {} for name in HISTOGRAMS}
        for family in text_string_to_metric_families(text):
            if family.name not in out:
                continue
            for s in family.samples:
                if s.labels.get("generation", "2") != "2":
                    continue
                key = s.labels["le"] if s.name.endswith("_bucket") else s.name.rsplit("_", 1)[1]
                out[family.name][key] = s.value
        return out
    return in_netns(lab.transceivers[0].netns, read)


def _quantile_ms(before: dict[str, float], after: dict[str, float], share: float) -> float:
    bounds = sorted((float(k), v - before.get(k, 0.0)) for k, v in after.items() if k not in ("sum", "count"))
    return 1000 * next(b for b, v in bounds if v >= share * bounds[-1][1])


def main() -> None:  # pragma: no cover - minutes of real calls
    calls, rounds = int(sys.argv[1]), int(sys.argv[2])
    modes = sys.argv[3].split(",") if len(sys.argv) > 3 else ["sessions", "release"]
    info = stack.start_lab(transceivers=1, handler="echo")
    lab = Lab.load(info["name"])
    t = lab.transceivers[0]
    token = tokens.load_key(lab.secret_file("admin.token")).decode()
    procs: dict[str, tuple] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            frames = Path(tmp) / "frames.json"
            load_client.write_frames(frames)
            for i, mode in enumerate(modes):
                os.environ[GC_ENV] = mode
                backend = _free_backend_id(lab, CAPACITY_BACKEND_ID + 200 + i)
                proc, log = sessions.start_transceiver(lab, t, f"gc{i}", backend, 5010 + i, 8090 + i, relay=True,
                                                       cpu=0, handler="echo", extra=("--offer-rate", "0"))
                admin = READY.search(Path(log).read_text()).group(2)
                procs[mode] = (proc, log, backend, sessions.whip_url(t.signal_ip4, 8090 + i), admin)
            os.environ.pop(GC_ENV)

            def talk(url: str, pid: int, n: int, seconds: float) -> None:
                capacity_load._run_client(lab, frames, url, n, seconds, "echo", pid, {1}, None, 0.0)

            held = [threading.Thread(target=talk, args=(p[3], p[0].pid, calls, 20.0 + rounds * 11 + 5))
                    for p in procs.values()]
            for th in held:
                th.start()
            time.sleep(20)
            cpu0, wall0 = {m: process_cpu_ticks(p[0].pid) for m, p in procs.items()}, time.time()
            before = {m: _histograms(lab, p[4], token) for m, p in procs.items()}
            for _ in range(rounds):
                churn = [threading.Thread(target=talk, args=(p[3], p[0].pid, 2, 3.0)) for p in procs.values()]
                for th in churn:
                    th.start()
                for th in churn:
                    th.join()
                time.sleep(7)   # past the 6 s after which the ends' pass runs
            cpu1, wall1 = {m: process_cpu_ticks(p[0].pid) for m, p in procs.items()}, time.time()
            after = {m: _histograms(lab, p[4], token) for m, p in procs.items()}
            for mode in procs:
                release, collections, in_out = (after[mode][h] for h in HISTOGRAMS)
                b_release, b_collections, b_in_out = (before[mode][h] for h in HISTOGRAMS)
                passes = release.get("count", 0) - b_release.get("count", 0)
                held_ms = 1000 * (release.get("sum", 0) - b_release.get("sum", 0))
                print(json.dumps({
                    "mode": mode, "passes": passes,
                    "held_ms_per_pass": round(held_ms / passes, 2) if passes else None,
                    "full_collections": collections.get("count", 0) - b_collections.get("count", 0),
                    "in_to_out_p99_ms": _quantile_ms(b_in_out, in_out, 0.99),
                    "in_to_out_p999_ms": _quantile_ms(b_in_out, in_out, 0.999),
                    "cpu_pct": round((cpu1[mode] - cpu0[mode]) / sessions.CLK_TCK / (wall1 - wall0) * 100, 1)}),
                      flush=True)
            for th in held:
                th.join()
    finally:
        for proc, log, backend, _, _ in procs.values():
            sessions.stop_transceiver(lab, proc, log, backend)
        stack.stop_lab(info["name"])


if __name__ == "__main__":  # pragma: no cover
    main()
