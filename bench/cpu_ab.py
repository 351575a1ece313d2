"""A transceiver's CPU per call-second, two builds or settings of it side by side in one run (issue 24).

An optimization of the per-packet path is judged by the transceiver's own CPU per second of call:
utime+stime of its process (all threads) over the window in which all N echo sessions talk, divided by
N times that window (µs of CPU per call-second).  On this shared machine the figure drifts with the
other work on it, so the variants run under the same load in one run and *alternate*: round r runs
them in order, round r+1 in reverse (ABBA...), and each variant's median over the rounds is compared.
A variant is environment for the transceiver's process: ``PYTHONPATH`` at a checkout of another commit
(the "before" build: run this from outside the worktree, or ``-m`` puts the worktree's own package first
on the path), or ``SPLITRELAY_EVENT_LOOP`` (transceiver/loop.py).  Each run keeps its ready line.

Each step is ``capacity._step``: the transceiver (relay mode, echo handler, pinned to ``cpu``) and the
project's aiortc probe (``--carrier --together``, pinned to the other CPUs) in a lab the caller started.
Keep N modest (8-16): the aiortc client costs more per session than the transceiver, and the figure
holds only while the client keeps up (audio loss and the probe's CPU are reported beside it).

The figure holds only for a step whose audio came back whole: the transceiver encodes silence in place
of audio it did not get, and libopus encodes silence far cheaper than a tone, so a client starved of CPU
(this machine is shared) makes the transceiver look cheap.  A step with audio loss above ``MAX_LOSS``
is kept in the runs but left out of the medians.  ``nice`` (negative: root) is inherited by the
transceiver and the probe alike, so both variants get the same share of a busy machine.

With ``profile_dir``, py-spy samples the transceiver of each variant's first round (``--format raw``:
collapsed stacks, for ``top_frames``).

    cd /tmp && python -m splitrelay.bench.cpu_ab --lab fa1 --sessions 12 --rounds 3 \\
        --variant before:PYTHONPATH=/tmp/base --variant after:
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


def measure(lab_name: str, variants: dict[str, dict[str, str]], n: int = 12, duration: float = 10.0,
            rounds: int = 3, cpu: int = 0, profile_dir: Path | None = None, nice: int = 0) -> dict[str, Any]:
    """Per variant: each round's µs of transceiver CPU per call-second, their median and spread."""
    if nice:
        os.nice(nice)
    lab = Lab.load(lab_name)
    t = lab.transceivers[0]
    probe_cpus = (os.sched_getaffinity(0) - {cpu}) or None
    backend_id = capacity._free_backend_id(lab, capacity.CAPACITY_BACKEND_ID)
    url = sessions.whip_url(t.signal_ip4, AB_WHIP_PORT)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    loads = [os.getloadavg()[0]]
    try:
        for r in range(rounds):
            for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
                with _environment(variants[name]):
                    proc, log = sessions.start_transceiver(lab, t, f"ab-{name}", backend_id, AB_BACKEND_PORT,
                                                           AB_WHIP_PORT, relay=True, cpu=cpu)
                spy = None
                if profile_dir is not None and r < 2:
                    profile_dir.mkdir(parents=True, exist_ok=True)
                    spy = _profile(proc.pid, duration + 8, profile_dir / f"{name}.raw")
                try:
                    step = capacity._step(lab, t, url, n, duration, proc.pid, probe_cpus)
                finally:
                    sessions.stop(lab, proc)
                    ready = next((ln for ln in log.read_text().splitlines() if "transceiver ready" in ln), "")
                    log.unlink(missing_ok=True)
                    if spy is not None:
                        spy.wait(timeout=30)
                pct = step["transceiver_cpu_pct"]
                runs[name].append({
                    "round": r, "us_per_call_s": round(pct / 100.0 * 1e6 / n) if pct is not None else None,
                    "transceiver_cpu_pct": pct, "probe_cpu_pct": step["probe_cpu_pct"],
                    "audio_loss": step["audio_loss"], "audio_rtt_p50_ms": step["audio_rtt_ms"]["median"],
                    "window_s": step["window_s"], "loadavg_1m": round(os.getloadavg()[0], 2), "ready": ready})
                loads.append(os.getloadavg()[0])
                print(json.dumps({name: runs[name][-1]}), file=sys.stderr, flush=True)
    finally:
        try:
            stack.control(lab, lambda c: c.delete_backend(backend_id))
        except Exception:  # noqa: BLE001 - the agent may be gone; nothing else to undo
            pass
    out: dict[str, Any] = {"sessions": n, "duration_s": duration, "rounds": rounds, "cpu": cpu, "nice": nice,
                           "loadavg_1m": {"min": round(min(loads), 2), "max": round(max(loads), 2)},
                           "variants": {}}
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
    parser.add_argument("--sessions", type=int, default=12)
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
