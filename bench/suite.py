"""The benchmark run: every figure of BENCHMARKS.md, side by side, in one lab, in one process.

Order matters on a 2-core machine, so it is fixed: the quiet measurements
(latency, first packet) come before the floods, and each path gets the same
sequence: the kernel-routing floor first (no relay program attached, the relay
namespace forwarding), then the local ceiling (a bare XDP program that only
rewrites MACs and redirects, bench/ceiling.c: rate only; half its trials before
the XDP relay, half after), then the XDP relay (the edge agent daemon, as deployed),
then the userspace relay (the same daemon with ``--datapath userspace``), then
the flow-table scale runs (XDP loaded in-process, no daemon), then the WebRTC
session figures in a lab of their own with a real transceiver.

A *profile* says how long each part runs: ``full`` for BENCHMARKS.md, ``smoke``
for CI (seconds; proves every part still runs, asserts nothing about speed).

Adding a part: its name in ``PARTS`` (the CLI's ``--part`` choices are read from
it), a call in ``run()`` that stores its figures under ``results["parts"][name]``,
its ratios and targets in ``report.py``, its section in ``report_markdown.py``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from splitrelay import defaults
from splitrelay.bench import ceiling, control, forwarding, scale, system
from splitrelay.lab import stack
from splitrelay.lab.topology import Lab
from splitrelay.errors import SplitrelayError

PARTS = ("floor", "ceiling", "xdp", "userspace", "scale", "sessions", "capacity")


class BenchError(SplitrelayError):
    """The benchmark could not run a part (one-line reason)."""


@dataclass(frozen=True)
class Profile:
    name: str
    ping_count: int
    ping_interval_us: int
    first_packet_count: int
    rate_flows: int
    rate_duration_s: float
    scale_sizes: tuple[int, ...]
    scale_duration_s: float
    registrations: int
    setup_runs: int
    setup_relays: tuple[int, ...]  # setup is measured in a lab with each of these relay counts
    capacity_steps: tuple[int, ...]
    capacity_duration_s: float
    trials: int = 1               # rate runs repeated; the median trial is reported
    notes: list[str] = field(default_factory=list)


PROFILES = {
    "full": Profile("full", ping_count=5000, ping_interval_us=200, first_packet_count=500, rate_flows=64,
                    rate_duration_s=3.0, scale_sizes=(1000, 100_000, 1_000_000), scale_duration_s=3.0,
                    registrations=2000, setup_runs=20, setup_relays=(1, 2),
                    capacity_steps=(1, 8, 16, 24, 32, 36, 40, 48), capacity_duration_s=10.0, trials=3),
    "smoke": Profile("smoke", ping_count=200, ping_interval_us=200, first_packet_count=20, rate_flows=8,
                     rate_duration_s=0.5, scale_sizes=(1000, 10_000), scale_duration_s=0.5,
                     registrations=100, setup_runs=1, setup_relays=(1, 2), capacity_steps=(1,),
                     capacity_duration_s=3.0),
}


@dataclass(frozen=True)
class PathFigures:
    """What a packet part returns for one path (kernel floor, ceiling, XDP relay, userspace relay)."""

    rate: list[forwarding.RateRun]                 # sender free, then pinned
    latency: dict | None = None                    # udpgen's ping report, as bench/udpgen.c prints it
    first_packet: dict | None = None               # the same, one new flow per ping
    registration: control.RegistrationRate | None = None

    def to_json(self) -> dict:
        """The results file's keys for the path (a part that did not measure a figure leaves it out)."""
        out: dict = {k: v for k, v in (("latency", self.latency), ("first_packet", self.first_packet))
                     if v is not None}
        out["rate"] = [r.to_json() for r in self.rate]
        if self.registration is not None:
            out["registration"] = asdict(self.registration)
        return out


def _agent(lab: Lab, datapath: str) -> subprocess.Popen:
    # flows of a benchmark must not age out between its parts, nor its registered sessions (no transceiver
    # refreshes their backend)
    args = ["--idle-timeout", "600", "--session-idle", "7200"]
    return stack.start_agent(lab, defaults.POLICY, args, plane=datapath)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def _lab() -> Iterator[Lab]:
    """A one-transceiver lab, removed after with its pinned maps and its daemons' logs."""
    lab = Lab.create(transceivers=1)
    try:
        yield lab
    finally:
        stack.stop_lab(lab.name)


@contextlib.contextmanager
def _relay(lab: Lab, datapath: str) -> Iterator[subprocess.Popen]:
    proc = _agent(lab, datapath)
    try:
        t = lab.transceivers[0]
        stack.control(lab, lambda c: c.put_backend(t.backend_id, t.ip4, forwarding.SINK_PORT))
        yield proc
    finally:
        _stop(proc)


def _session_names(p: Profile) -> list[str]:
    """The sessions a relay path routes by: one per first-packet probe and per flow of each rate run."""
    return (["ping0000"] + [f"fp{i:06d}" for i in range(p.first_packet_count)]
            + [f"rt{i:06d}" for i in range(p.rate_flows)] + [f"rp{i:06d}" for i in range(p.rate_flows)])


def _path_figures(lab: Lab, p: Profile, route: forwarding.Route, tmp: Path, say: Callable[[str], None],
                  samples_dir: Path) -> PathFigures:
    """Latency, first packet and forwarding rate (sender free, then pinned) of one path."""
    say(f"UDP ping-pong x{p.ping_count}")
    latency = forwarding.latency(lab, route, p.ping_count, p.ping_interval_us,
                                 f"ping0000:{forwarding.CLIENT_UFRAG}",
                                 samples=samples_dir / f"rtt-{route.name}.txt")
    say(f"first-packet (STUN) round trips x{p.first_packet_count}")
    fp_names = forwarding.usernames_file([f"fp{i:06d}" for i in range(p.first_packet_count)], tmp)
    first = forwarding.first_packet(lab, route, p.first_packet_count, fp_names)
    trials = _rate_trials(lab, p, route, tmp, say)
    return PathFigures(_medians(trials), latency, first)


def _medians(*trials: dict[bool, list[forwarding.RateRun]]) -> list[forwarding.RateRun]:
    """The median run of all ``trials`` given, sender free then pinned."""
    return [forwarding.median_run([run for t in trials for run in t[pinned]]) for pinned in (False, True)]


def _rate_trials(lab: Lab, p: Profile, route: forwarding.Route, tmp: Path,
                 say: Callable[[str], None]) -> dict[bool, list[forwarding.RateRun]]:
    """Every trial of one path's forwarding rate, sender free (False) and pinned (True)."""
    trials: dict[bool, list[forwarding.RateRun]] = {}
    for pinned in (False, True):
        say(f"forwarding {p.rate_flows} flows for {p.rate_duration_s:g} s x{p.trials}"
            + (", sender on CPU 0, relay on CPU 1" if pinned else ", unpinned"))
        rate_names = None
        if route.needs_session:  # each run opens fresh flows, from other source ports
            prefix = "rp" if pinned else "rt"
            rate_names = forwarding.usernames_file([f"{prefix}{i:06d}" for i in range(p.rate_flows)], tmp)
        def one_run(names: Path | None = rate_names, pinned: bool = pinned) -> forwarding.RateRun:
            return forwarding.forwarding_rate(lab, route, p.rate_flows, p.rate_duration_s, names, pinned=pinned,
                                              src_port=30000 if pinned else 20000)

        trials[pinned] = [one_run() for _ in range(max(1, p.trials))]
    return trials


def _ceiling_trials(lab: Lab, p: Profile, tmp: Path, say: Callable[[str], None],
                    half: int) -> dict[bool, list[forwarding.RateRun]]:
    with ceiling.attached(lab):
        return _rate_trials(lab, p, ceiling.route(lab), tmp,
                            lambda m: say(f"ceiling (bare XDP redirect, {half} of 2): {m}"))


def _relay_part(lab: Lab, p: Profile, datapath: str, tmp: Path, say: Callable[[str], None],
                samples_dir: Path) -> PathFigures:
    with _relay(lab, datapath) as proc:
        url = stack.control_url(lab)
        say(f"{datapath}: registering and removing {p.registrations} sessions through the control API")
        reg = control.registration_rate(lab, url, p.registrations, prefix="rg")
        control.register(lab, url, _session_names(p))
        route = forwarding.relay_path(lab, datapath, relay_pid=proc.pid if datapath == "userspace" else None)
        figures = _path_figures(lab, p, route, tmp, lambda m: say(f"{datapath}: {m}"), samples_dir)
        return replace(figures, registration=reg)


def run(profile: str = "full", parts: tuple[str, ...] = PARTS, samples_dir: Path | None = None,
        say: Callable[[str], None] = lambda _: None) -> dict:
    """Run the benchmark parts of ``profile``; returns every figure (JSON-serialisable)."""
    p = PROFILES[profile]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise BenchError(f"unknown part {sorted(unknown)[0]!r} (parts: {', '.join(PARTS)})")
    results: dict = {"profile": profile, "parameters": asdict(p), "machine": system.machine(), "parts": {}}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="srbench-") as tmp_name:
        tmp = Path(tmp_name)
        samples = samples_dir or tmp
        samples.mkdir(parents=True, exist_ok=True)
        if set(parts) & {"floor", "ceiling", "xdp", "userspace", "scale"}:
            say("building the lab (client, relay, transceiver namespaces)")
            with _lab() as lab, system.bpf_run_time_stats():
                if "floor" in parts:
                    with forwarding.kernel_forwarding(lab):
                        results["parts"]["kernel"] = _path_figures(
                            lab, p, forwarding.kernel_path(lab), tmp, lambda m: say(f"kernel routing: {m}"),
                            samples).to_json()
                # the ceiling's trials bracket the XDP relay's (before and after it): a machine whose load
                # drifts during the run moves both, and their ratio is what the ceiling row is for
                bracket: list[dict[bool, list[forwarding.RateRun]]] = []
                if "ceiling" in parts:
                    bracket.append(_ceiling_trials(lab, p, tmp, say, half=1))
                if "xdp" in parts:
                    results["parts"]["xdp"] = _relay_part(lab, p, "xdp", tmp, say, samples).to_json()
                if "ceiling" in parts:
                    bracket.append(_ceiling_trials(lab, p, tmp, say, half=2))
                if "userspace" in parts:
                    results["parts"]["userspace"] = _relay_part(lab, p, "userspace", tmp, say, samples).to_json()
                if bracket:
                    results["parts"]["ceiling"] = PathFigures(_medians(*bracket)).to_json()
                if "scale" in parts:
                    results["parts"]["scale"] = scale.scale(lab, list(p.scale_sizes), p.scale_duration_s,
                                                              progress=say, trials=p.trials).to_json()
        if "sessions" in parts:
            results["parts"]["sessions"] = _sessions_part(p, say)
        if "capacity" in parts:
            from splitrelay.bench import capacity_load

            results["parts"]["capacity"] = capacity_load.measure(p.name, progress=say)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    return results


def _sessions_part(p: Profile, say: Callable[[str], None]) -> dict:
    """Setup time in a lab per relay count of ``p.setup_relays`` (key ``setup`` for 1 relay, ``setup_2_relays``
    for 2, ...), and capacity in the first lab."""
    from splitrelay.bench import capacity, session_setup

    out: dict = {}
    for relays in p.setup_relays:
        key = "setup" if relays == 1 else f"setup_{relays}_relays"
        say(f"sessions: a lab with {relays} relay(s) and an echo transceiver advertising every relay")
        info = stack.start_lab(transceivers=1, handler="echo", relays=relays)
        try:
            say(f"sessions: {p.setup_runs} setups through the relay and {p.setup_runs} direct, {relays} relay(s)")
            out[key] = session_setup.measure_setup(info["name"], runs=p.setup_runs).to_json()
            if "capacity" not in out:
                say(f"sessions: capacity, steps {list(p.capacity_steps)}")
                out["capacity"] = capacity.measure_capacity(info["name"], steps=list(p.capacity_steps),
                                                            duration=p.capacity_duration_s,
                                                            progress=say).to_json()
        finally:
            stack.stop_lab(info["name"])
    return out


def save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
