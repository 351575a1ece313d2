"""A transceiver's CPU per call-second, two or more builds or settings of it side by side in one run (issue 24).

An optimization of the per-packet path is judged by the transceiver's own CPU per second of call:
utime+stime of its process (all threads) over the window in which all calls talk, less what the same
process spends with no call, divided by the calls and that window (µs of CPU per call-second).  On
this shared machine (8 helpers, load 10-27 on 2 cores while this was written) the figure moves by
±30 % from one minute to the next, so the variants run *at once*: one transceiver per variant, all
pinned to ``cpu``, each taking ``n`` echo calls of one probe run (pinned to the other CPUs), so a busy
moment hits them all alike; the order of their URLs rotates each round, and each variant's median over
the rounds is compared.  A variant is environment for its transceiver's process: ``PYTHONPATH`` at a
copy of another commit's packages (the "before" build: run this from outside the worktree, or ``-m``
puts the worktree's own package first on the path), or ``SPLITRELAY_EVENT_LOOP`` (transceiver/loop.py).
Each variant keeps its ready line, which names its loop.

The figure holds only while the client keeps up: the transceiver encodes silence in place of audio it
did not get, and libopus encodes silence far cheaper than a tone, so a client starved of CPU makes the
transceiver look cheap.  A round with audio loss above ``MAX_LOSS`` is kept in the runs but left out of
the medians.  ``nice`` (negative: root) is inherited by the transceivers and the probe alike.

With ``profile_dir``, py-spy samples every variant's transceiver in the first round (``--format raw``:
collapsed stacks, for ``top_frames``).

    cd /tmp && python -m splitrelay.bench.cpu_ab --lab fa1 --sessions 3 --rounds 6 --nice -10 \\
        --variant before:PYTHONPATH=/tmp/base/py --variant after:
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from splitrelay.bench import capacity, sessions
from splitrelay.lab import stack
from splitrelay.lab.topology import Lab

AB_BACKEND_PORT = 5003
AB_WHIP_PORT = 8083
MAX_LOSS = 0.01


@contextlib.contextmanager
def _environment(extra: dict[str, str]) -> Iterator[None]:
    """``extra`` in os.environ while the transceiver is started (its process inherits it)."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """``name:KEY=VALUE,KEY=VALUE`` (``name:`` = the default environment)."""
    name, _, rest = spec.partition(":")
    if not name:
        raise ValueError(f"a variant is name:KEY=VALUE,..., got {spec!r}")
    env = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"variant {name}: {item!r} is not KEY=VALUE")
        env[key] = value
    return name, env


def top_frames(raw: Path, limit: int = 25) -> dict[str, list[tuple[str, float]]]:
    """Self and inclusive share of samples per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  if " (" in f else f for f in stack_text.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    share = (lambda c: [(f, round(100.0 * n / total, 1)) for f, n in c.most_common(limit)]) if total else list
    return {"samples": total, "self": share(own), "inclusive": share(inclusive)}  # type: ignore[dict-item]


def _profile(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return None
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
                             "--format", "raw", "--nonblocking", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _round(lab: Lab, urls: dict[str, str], pids: dict[str, int], n: int, duration: float,
           probe_cpus: set[int] | None) -> dict[str, dict[str, Any]]:
    """One probe run: ``n`` echo sessions per variant, all talking together; each variant's CPU and loss."""
    probe = sessions.Probe(lab, [*urls.values(), "--sessions", str(n * len(urls)), "--duration", str(duration),
                                 "--carrier", "--together"], probe_cpus)
    sampler = capacity._Sampler({**pids, "probe": probe.proc.pid})
    reports = probe.wait(duration + sessions.CONNECT_TIMEOUT_S + 33.0 + 0.5 * n * len(urls), sampler.sample)
    talking = [r for r in reports if r["talk_started_mono"] is not None and r["talk_ended_mono"] is not None]
    start = max((r["talk_started_mono"] for r in talking), default=0.0)
    end = min((r["talk_ended_mono"] for r in talking), default=0.0)
    rows = {}
    for name, url in urls.items():
        mine = [r for r in reports if r["whip_url"] == url]
        sent = sum(r["carrier_frames_sent"] or round(duration / capacity.FRAME_S) for r in mine)
        echoed = sum(min(r["carrier_frames_echoed"], r["carrier_frames_sent"]) for r in mine)
        pct = sampler.process_pct(name, start, end)
        rows[name] = {"transceiver_cpu_pct": pct, "audio_loss": round(1.0 - echoed / sent, 5) if sent else None,
                      "audio_rtt_p50_ms": sessions.summary([v for r in mine for v in r["audio_rtt_ms"]])["median"]}
    rows["probe"] = {"cpu_pct": sampler.process_pct("probe", start, end), "window_s": round(end - start, 2)}
    return rows


def _idle_pct(pids: dict[str, int], seconds: float = 4.0) -> dict[str, float | None]:
    """Each transceiver's CPU with no call (timers, registration): subtracted from its share under calls."""
    sampler = capacity._Sampler(pids)
    sampler.sample()
    time.sleep(seconds)
    sampler.sample()
    return {name: sampler.process_pct(name, 0.0, time.monotonic()) for name in pids}


def measure(lab_name: str, variants: dict[str, dict[str, str]], n: int = 4, duration: float = 10.0,
            rounds: int = 3, cpu: int = 0, profile_dir: Path | None = None, nice: int = 0) -> dict[str, Any]:
    """Per variant: each round's µs of transceiver CPU per call-second (net of its idle CPU), their median
    and spread.  All variants run at once on ``cpu``, ``n`` calls each from one probe, so a busy moment of
    the shared machine hits them all alike; the order of their URLs (which gets the probe's first session)
    rotates each round."""
    if nice:
        os.nice(nice)
    lab = Lab.load(lab_name)
    t = lab.transceivers[0]
    probe_cpus = (os.sched_getaffinity(0) - {cpu}) or None
    first = capacity._free_backend_id(lab, capacity.CAPACITY_BACKEND_ID + 100)
    procs: dict[str, tuple[subprocess.Popen, Path]] = {}
    urls = {name: sessions.whip_url(t.signal_ip4, AB_WHIP_PORT + i) for i, name in enumerate(variants)}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    loads = [os.getloadavg()[0]]
    spies = []
    try:
        for i, name in enumerate(variants):
            with _environment(variants[name]):
                procs[name] = sessions.start_transceiver(lab, t, f"ab-{i}", first + i, AB_BACKEND_PORT + i,
                                                         AB_WHIP_PORT + i, relay=True, cpu=cpu)
        pids = {name: proc.pid for name, (proc, _) in procs.items()}
        idle = _idle_pct(pids)
        for r in range(rounds):
            order = list(variants)[r % len(variants):] + list(variants)[:r % len(variants)]
            if profile_dir is not None and r == 0:
                profile_dir.mkdir(parents=True, exist_ok=True)
                spies = [spy for name in variants
                         if (spy := _profile(pids[name], duration + 8, profile_dir / f"{name}.raw"))]
            rows = _round(lab, {name: urls[name] for name in order}, pids, n, duration, probe_cpus)
            for spy in spies:
                spy.wait(timeout=60)
            spies = []
            for name in variants:
                row = rows[name]
                pct = row["transceiver_cpu_pct"]
                row.update(round=r, probe_cpu_pct=rows["probe"]["cpu_pct"], window_s=rows["probe"]["window_s"],
                           loadavg_1m=round(os.getloadavg()[0], 2),
                           us_per_call_s=round((pct - (idle[name] or 0.0)) / 100.0 * 1e6 / n)
                           if pct is not None else None)
                runs[name].append(row)
            loads.append(os.getloadavg()[0])
            print(json.dumps({name: runs[name][-1]["us_per_call_s"] for name in variants} | rows["probe"]),
                  file=sys.stderr, flush=True)
    finally:
        for i, (name, (proc, log)) in enumerate(procs.items()):
            sessions.stop(lab, proc)
            runs.setdefault(name, [])
            variants[name] = variants[name] | {"ready": next(
                (ln for ln in log.read_text().splitlines() if "transceiver ready" in ln), "")}
            log.unlink(missing_ok=True)
            try:
                stack.control(lab, lambda c, backend=first + i: c.delete_backend(backend))
            except Exception:  # noqa: BLE001 - the agent may be gone; nothing else to undo
                pass
    out: dict[str, Any] = {"sessions_per_variant": n, "duration_s": duration, "rounds": rounds, "cpu": cpu,
                           "nice": nice, "loadavg_1m": {"min": round(min(loads), 2), "max": round(max(loads), 2)},
                           "idle_cpu_pct": idle, "variants": {}}
    for name, rows in runs.items():
        values = [row["us_per_call_s"] for row in rows
                  if row["us_per_call_s"] is not None and (row["audio_loss"] or 0.0) <= MAX_LOSS]
        out["variants"][name] = {"env": variants[name], "runs": rows,
                                 "median_us_per_call_s": statistics.median(values) if values else None,
                                 "min": min(values, default=None), "max": max(values, default=None),
                                 "valid_runs": len(values)}
    if profile_dir is not None:
        out["profiles"] = {name: top_frames(profile_dir / f"{name}.raw") for name in variants
                           if (profile_dir / f"{name}.raw").exists()}
    return out


def main() -> None:  # pragma: no cover - run by hand as root against a lab
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lab", required=True)
    parser.add_argument("--variant", action="append", required=True, help="name:KEY=VALUE,... (twice or more)")
    parser.add_argument("--sessions", type=int, default=4, help="calls per variant")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpu", type=int, default=0)
    parser.add_argument("--profile", type=Path, help="py-spy collapsed stacks of each variant go here")
    parser.add_argument("--nice", type=int, default=0, help="niceness for the transceiver and the probe")
    args = parser.parse_args()
    variants = dict(parse_variant(v) for v in args.variant)
    started = time.monotonic()
    result = measure(args.lab, variants, args.sessions, args.duration, args.rounds, args.cpu, args.profile,
                     args.nice)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
