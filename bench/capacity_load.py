"""Calls per transceiver core, per profile, with a client that is not the bottleneck (issue 24).

For each profile a transceiver (relay mode: registered with the lab's agent, every packet crosses the
XDP relay) is pinned with taskset to one CPU; the load client (``client/node/load.js``: libdatachannel,
pre-encoded Opus, no decoding) runs in the lab's client namespace pinned to the other CPU(s).  Each
step N opens N calls, lets them all talk for ``duration`` seconds and reads, over the talking window
minus its first second (the calls' start-up):

* the transceiver's and the client's CPU (utime+stime of the process, all threads, /proc/<pid>/stat),
  as % of one core and as µs of CPU per second of call (CPU seconds / (calls x seconds)); the spread
  is over one-second slices of the window;
* the audio round trip at the client's socket: pulse sent -> first loud packet back (see
  client/load_client.py), p50 and p99 over all calls;
* loss: the larger of the pulses not echoed (of those the agent echoes) and the downlink's RTP
  sequence gaps;
* the transceiver encodes in its default ``--opus-mode`` (voip): a CELT-only encoder (lowdelay) spends
  nearly the same bytes on every frame (constrained VBR: ~81 on the quiet stream, a pulse's echo sinking
  from ~120 to ~95 over a call), so its echo cannot be timed by size; ``cpu_ab`` compares its CPU;
* the transceiver's own share of the echo, per frame (its packet at the mux to the echo's packet leaving),
  p99 from ``splitrelay_transceiver_media_in_to_out_seconds`` read with the loop lag;
* for a profile that echoes nothing (voice), the p99 lateness of the transceiver's packets (the gap
  after the previous one beyond the RTP time between them) stands in for the round trip.

The calls of a profile that speaks in cycles (conversation, voice) are not in step: call i starts talking
i/N of a cycle before the window (``phase_spread``), so at any moment the agent speaks in its share of
the calls, as in an operator's fleet, not in all of them at once.

The ramp stops at the first step whose RTT p50 (voice: lateness p99) exceeds the one-call step's by
more than ``rtt_margin`` ms, whose loss exceeds ``loss_threshold``, or where a call did not connect;
the step before is the capacity.  It is the transceiver's only if the transceiver, not the client, was
saturated there: its process at ``SATURATED_PCT`` of its core, or its event loop late by more than
``rtt_margin`` at the 99th percentile (``splitrelay_transceiver_event_loop_lag_seconds``, read from its
/metrics every 2 s over the same window) while the client was not saturated and nothing else
held its core: one loop serves every call, so it saturates by lateness before its core's average
reads full.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from splitrelay.bench import sessions
from splitrelay.bench.capacity import CAPACITY_BACKEND_ID, _fit, _free_backend_id
from splitrelay.bench.sessions import CLK_TCK, SessionBenchError, _quantile
from splitrelay.bench.system import process_cpu_ticks
from splitrelay.client import load_client
from splitrelay.lab import stack
from splitrelay.lab.topology import Lab
from splitrelay.tokens import TOKEN_ENV

# name -> (transceiver handler spec, the agent's speak cycle s and share: which pulses come back)
PROFILES: dict[str, tuple[str, float, float]] = {
    "echo": ("echo", 0.0, 1.0),
    "conversation": ("conversation:cycle=10,speak_share=0.4", 10.0, 0.4),
    # the agent answers speech and never echoes: the caller speaks a sentence every 5 s (its recogniser and
    # replies run), no pulse; no round trip, loss from the RTP gaps
    "voice": ("voice", 10.0, 0.0),
}
SPEAKING_CALLER = {"voice"}   # profiles whose caller sends speech (load_client.make_speech_frames)
LOAD_BACKEND_PORT = 5003
LOAD_WHIP_PORT = 8083
WARMUP_S = 1.0              # the window's first second is left out (calls starting, buffers settling)
SATURATED_PCT = 90.0        # a process at this share of its core(s) is the bottleneck
CONTENDED_PCT = 20.0        # other work on the transceiver's core beyond this: its figure is the machine's
RTT_MARGIN_MS = 20.0
LOSS_THRESHOLD = 0.01

METHOD = __doc__.split("\n\n", 1)[1].strip()


class _Sampler:
    """CPU ticks of some processes and every CPU's busy time, sampled on the wall clock (the client
    reports Unix times); ``lag``: the transceiver's histograms (``_histogram_reader``), read every
    ``LAG_EVERY_S``."""

    def __init__(self, pids: dict[str, int],
                 lag: Callable[[], dict[str, dict[float, float]]] | None = None) -> None:
        self.pids, self.lag = pids, lag
        self.samples: list[tuple[float, dict[str, int | None]]] = []
        self.cpus: list[tuple[float, sessions.CpuTimes]] = []
        self.lags: list[tuple[float, dict[str, dict[float, float]]]] = []

    def sample(self) -> None:
        self.samples.append((time.time(), {k: process_cpu_ticks(pid) for k, pid in self.pids.items()}))
        self.cpus.append((time.time(), sessions.cpu_times()))
        if self.lag is not None and (not self.lags or time.time() - self.lags[-1][0] >= LAG_EVERY_S):
            with contextlib.suppress(OSError, ValueError):   # a scrape that failed: the next one counts
                self.lags.append((time.time(), self.lag()))

    def p99_ms(self, start: float, end: float, histogram: str) -> float | None:
        """A histogram's 99th percentile over [start, end] (``lag``: the loop's lateness; ``in_to_out``: live
        audio's time in the transceiver), as the upper bound of its bucket (ms); None without two scrapes
        in the window or any sample between them."""
        inside = [b[histogram] for t, b in self.lags if start <= t <= end]
        if len(inside) < 2:
            return None
        return lag_p99_ms(inside[0], inside[-1])

    def busy_pct(self, start: float, end: float) -> dict[str, float]:
        """Each CPU's non-idle share over [start, end] (everything on the machine, not only ours)."""
        inside = [c for t, c in self.cpus if start <= t <= end]
        return sessions.busy_pct(inside[0], inside[-1]) if len(inside) >= 2 else {}

    def slices(self, key: str, start: float, end: float) -> list[tuple[float, float]]:
        """(seconds, CPU seconds) between consecutive samples about 1 s apart inside [start, end]."""
        inside = [s for s in self.samples if start <= s[0] <= end and s[1][key] is not None]
        out, last = [], None
        for s in inside:
            if last is None:
                last = s
            elif s[0] - last[0] >= 0.95:
                out.append((s[0] - last[0], (s[1][key] - last[1][key]) / CLK_TCK))
                last = s
        return out


LAG_EVERY_S = 2.0           # s between /metrics scrapes: a scrape reads every session's stats (aiortc
                            # getStats), CPU of the transceiver's that the step would count as the calls'
LAG_METRIC = "splitrelay_transceiver_event_loop_lag_seconds_bucket"
IN_TO_OUT_METRIC = "splitrelay_transceiver_media_in_to_out_seconds_bucket"


def lag_buckets(metrics_text: str, by: str | None = None, metric: str = LAG_METRIC) -> dict:
    """A histogram's cumulative bucket counts (upper bound in s -> count) from a /metrics page, the loop
    lag's by default; with ``by`` (a label, e.g. a supervisor's ``worker``), one such dict per value of it."""
    out: dict = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == metric:
                le = float(sample.labels["le"])
                into = out.setdefault(sample.labels[by], {}) if by else out
                into[le] = into.get(le, 0.0) + sample.value
    return out


def lag_worst_ms(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The largest lateness between two scrapes, as the upper bound of the bucket holding every sample
    taken between them (ms; inf: beyond the largest bucket); None: no sample between, or the histogram
    started over (a restarted process)."""
    if any(n < before.get(le, 0.0) for le, n in after.items()):
        return None
    return lag_quantile_ms(before, after, 1.0)


def lag_p99_ms(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The 99th percentile of the lag samples taken between two scrapes (ms; see ``lag_quantile_ms``)."""
    return lag_quantile_ms(before, after, 0.99)


def lag_quantile_ms(before: dict[float, float], after: dict[float, float], share: float) -> float | None:
    """The upper bound of the first bucket holding ``share`` of the samples taken between two scrapes of
    the cumulative histogram, in ms (inf: beyond the largest bucket); None: no sample between."""
    bounds = sorted(after)
    if not bounds:
        return None
    total = after[bounds[-1]] - before.get(bounds[-1], 0.0)
    if total <= 0:
        return None
    for le in bounds:
        if after[le] - before.get(le, 0.0) >= share * total:
            return le * 1000.0
    return None


def _cpu(slices: list[tuple[float, float]], calls: int) -> dict[str, float | None]:
    """CPU % of one core over the slices, and µs of CPU per call-second: overall and its spread."""
    wall = sum(w for w, _ in slices)
    if not slices or wall <= 0:
        return {"pct": None, "us_per_call_s": None, "us_per_call_s_p10": None, "us_per_call_s_p90": None,
                "slices": 0}
    per = sorted(1e6 * c / w / calls for w, c in slices)
    return {"pct": round(100.0 * sum(c for _, c in slices) / wall, 1),
            "us_per_call_s": round(1e6 * sum(c for _, c in slices) / wall / calls, 1),
            "us_per_call_s_p10": round(_quantile(per, 0.1), 1), "us_per_call_s_p90": round(_quantile(per, 0.9), 1),
            "slices": len(slices)}


def _histogram_reader(lab: Lab, t: Any, log: Path) -> Callable[[], dict[str, dict[float, float]]]:  # noqa: ANN401
    """A function that scrapes the bench's transceiver's loop-lag and in-to-out buckets, ``{"lag": ...,
    "in_to_out": ...}`` (its admin listener is on loopback in its namespace, at the address its ready line
    gives): one scrape for both, as a scrape costs the transceiver every session's stats."""
    import urllib.request

    from splitrelay import tokens
    from splitrelay.lab.netns import in_netns
    from splitrelay.transceiver.workers import READY

    found = READY.search(log.read_text())
    if found is None:
        raise SessionBenchError(f"no ready line with the admin URL in {log}")
    token = tokens.load_key(lab.secret_file("admin.token")).decode()
    request = urllib.request.Request(found.group(2) + "/metrics", headers={"Authorization": f"Bearer {token}"})

    def scrape() -> dict[str, dict[float, float]]:
        with urllib.request.urlopen(request, timeout=2) as resp:  # noqa: S310 - the lab's own URL
            text = resp.read().decode()
        return {"lag": lag_buckets(text), "in_to_out": lag_buckets(text, metric=IN_TO_OUT_METRIC)}

    return lambda: in_netns(t.netns, scrape)


def _run_client(lab: Lab, frames: Path, url: str, n: int, duration: float, profile: str,
                transceiver_pid: int, client_cpus: set[int] | None,
                lag: Callable[[], dict[str, dict[float, float]]] | None = None,
                spread: float = 0.0) -> tuple[dict[str, Any], _Sampler, int]:
    _, cycle, share = PROFILES[profile]
    argv = load_client.load_argv(frames, url, n, duration, cycle, share, spread)
    if client_cpus:
        argv = ["taskset", "-c", ",".join(map(str, sorted(client_cpus))), *argv]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = lab.popen(lab.client.netns, argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                         cwd=load_client.NODE_DIR, env={**os.environ, TOKEN_ENV: stack.whip_token(lab)})
        sampler = _Sampler({"transceiver": transceiver_pid, "client": proc.pid}, lag)
        bound = duration + spread + load_client.CONNECT_PHASE_S + 30.0
        deadline = time.monotonic() + bound
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise SessionBenchError(f"the load client did not finish {n} calls within {bound:.0f} s")
                sampler.sample()
                time.sleep(0.25)
        finally:
            sessions.stop(lab, proc, grace=5.0)
        out.seek(0)
        err.seek(0)
        report = load_client.parse_report(out.read(), err.read(), proc.returncode)
    return report, sampler, proc.returncode


def _step(lab: Lab, frames: Path, url: str, n: int, duration: float, profile: str, transceiver_pid: int,
          cpu: int | None, client_cpus: set[int] | None,
          lag: Callable[[], dict[str, dict[float, float]]] | None = None, spread: float = 0.0) -> dict[str, Any]:
    drops = sessions.rcvbuf_errors(lab.transceivers[0].netns)
    report, sampler, _ = _run_client(lab, frames, url, n, duration, profile, transceiver_pid, client_cpus, lag,
                                     spread)
    drops = sessions.rcvbuf_errors(lab.transceivers[0].netns) - drops
    start, end = report["talk_started_unix"] + WARMUP_S, report["talk_ended_unix"]
    rtts = sorted(v for s in report["per_session"] for v in s["rtt_ms"])
    lateness = sorted(v for s in report["per_session"] for v in s["gap_lateness_ms"])
    expected = report["pulses_expected"]
    pulse_loss = 1.0 - report["pulses_expected_echoed"] / expected if expected else None
    downlink_loss = 1.0 - report["received"] / report["received_expected"] if report["received_expected"] else None
    losses = [v for v in (pulse_loss, downlink_loss) if v is not None]
    trx = _cpu(sampler.slices("transceiver", start, end), n)
    client = _cpu(sampler.slices("client", start, end), n)
    busy = sampler.busy_pct(start, end)
    core = busy.get(f"cpu{cpu}") if cpu is not None else None
    return {
        "sessions": n, "connected": report["connected"], "connect_s": report["connect_s"],
        "connect_retries": report["connect_retries"],
        "rtt_ms_p50": round(_quantile(rtts, 0.5), 2) if rtts else None,
        "rtt_ms_p99": round(_quantile(rtts, 0.99), 2) if rtts else None, "rtt_samples": len(rtts),
        "gap_lateness_ms_p99": round(_quantile(lateness, 0.99), 2) if lateness else None,
        "loss": round(max(losses), 5) if losses else None,
        "pulse_loss": round(pulse_loss, 5) if pulse_loss is not None else None,
        "downlink_loss": round(downlink_loss, 5) if downlink_loss is not None else None,
        "pulses_expected_per_call": [s["pulses_expected"] for s in report["per_session"]],
        "packets_sent": report["sent"], "packets_received": report["received"],
        "packets_received_small": report["received_small"],
        "packets_received_large": report["received_large"],
        "transceiver_udp_rcvbuf_drops": drops,
        "window_s": round(end - start, 2),
        "transceiver_cpu": trx,
        "transceiver_loop_lag_ms_p99": sampler.p99_ms(start, end, "lag"),
        "transceiver_in_to_out_ms_p99": sampler.p99_ms(start, end, "in_to_out"),
        "transceiver_core_busy_pct": core,
        "other_work_on_transceiver_core_pct": (round(core - trx["pct"], 1)
                                               if core is not None and trx["pct"] is not None else None),
        "cpu_busy_pct": busy,
        "client_cpu": client,
        "client_cpu_self_s": report["client_cpu_s"],
        "client_over_transceiver_cpu": (round(client["pct"] / trx["pct"], 2)
                                        if client["pct"] is not None and trx["pct"] else None),
        "loadavg": [round(v, 2) for v in os.getloadavg()],
        "errors": report["errors"],
    }


def _verdict(step: dict[str, Any], base: dict[str, Any], rtt_margin: float, loss_threshold: float) -> str | None:
    """Why this step is past capacity (None: it is within); ``base``: the one-call step.  A profile without a
    round trip (voice) is judged by the p99 lateness of the packets it sends instead, with the same margin."""
    base_rtt = base["rtt_ms_p50"]
    if step["connected"] < step["sessions"]:
        return f"{step['sessions'] - step['connected']} of {step['sessions']} calls did not connect"
    if step["loss"] is None or step["loss"] > loss_threshold:
        return f"loss {step['loss']} > {loss_threshold}"
    if base_rtt is not None and step["rtt_ms_p50"] is not None and step["rtt_ms_p50"] > base_rtt + rtt_margin:
        return f"RTT p50 {step['rtt_ms_p50']} ms > {base_rtt} + {rtt_margin:g} ms"
    late, base_late = step["gap_lateness_ms_p99"], base["gap_lateness_ms_p99"]
    if base_rtt is None and late is not None and base_late is not None and late > base_late + rtt_margin:
        return f"downlink lateness p99 {late} ms > {base_late} + {rtt_margin:g} ms"
    return None


def _limited_by(step: dict[str, Any], rtt_margin: float = RTT_MARGIN_MS) -> str | None:
    """Who was saturated at the step past capacity: "client", "transceiver" (its core full, or its event
    loop late by more than ``rtt_margin`` p99), "contended" (the transceiver's core was busy with other
    work: a shared machine), or None (nobody: see the step)."""
    trx, client = step["transceiver_cpu"]["pct"] or 0.0, step["client_cpu"]["pct"] or 0.0
    if client >= SATURATED_PCT:
        return "client"
    if trx >= SATURATED_PCT:
        return "transceiver"
    if (step["other_work_on_transceiver_core_pct"] or 0.0) >= CONTENDED_PCT:
        return "contended"
    if (step.get("transceiver_loop_lag_ms_p99") or 0.0) > rtt_margin:
        return "transceiver"
    return None


def phase_spread(profile: str, frames_info: dict[str, Any]) -> float:
    """Over how many seconds the calls' phases are spread (load.js ``--phase-spread-ms``): one agent cycle
    (conversation), one caller's sentence and pause (voice), none for the echo (every frame costs the same).

    In step, every call of a conversation speaks in the same 4 s of 10: those 4 s are an echo of all N
    calls, past the core from 56 echo calls on, and their backlog (1.4 MB in the transceiver's socket at
    64 calls, 2026-12-07) made the 210 ms round trip of the 16:08 run with the core 80 % busy on average.
    An operator's calls are not in step; spread over a cycle, 40 % of them speak at any moment."""
    _, cycle, share = PROFILES[profile]
    if profile in SPEAKING_CALLER:
        return round(len(frames_info["cycle"]) * frames_info["frame_ms"] / 1000.0, 3)
    return cycle if 0 < share < 1 else 0.0


def measure_profile(lab_name: str, profile: str, steps: list[int], duration: float = 10.0, cpu: int | None = 0,
                    rtt_margin: float = RTT_MARGIN_MS, loss_threshold: float = LOSS_THRESHOLD,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Ramp ``steps`` calls of ``profile`` through the lab's relay into one pinned transceiver; the table.

    Returns ``{"profile", "handler", "cpu", "client_cpus", "duration_s", "steps": [step...],
    "capacity", "capacity_reached", "limited_by", "lower_bound", "stopped_because", "loadavg_before"}``;
    each step is ``_step``'s dict."""
    if profile not in PROFILES:
        raise SessionBenchError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    if not steps or steps[0] != 1 or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise SessionBenchError(f"steps must rise from 1 (the one-call baseline), got {steps}")
    reason = load_client.unavailable_reason()
    if reason:
        raise SessionBenchError(f"no load client: {reason}")
    allowed = os.sched_getaffinity(0)
    if cpu is not None and cpu not in allowed:
        raise SessionBenchError(f"CPU {cpu} is not one this process may use ({sorted(allowed)})")
    client_cpus = ((allowed - {cpu}) or None) if cpu is not None else None
    say = progress or (lambda _: None)
    lab = Lab.load(lab_name)
    t = lab.transceivers[0]
    handler = PROFILES[profile][0]
    loadavg_before = [round(v, 2) for v in os.getloadavg()]
    backend_id = _free_backend_id(lab, CAPACITY_BACKEND_ID + 100)
    results: list[dict[str, Any]] = []
    stopped = None
    with tempfile.TemporaryDirectory(prefix="srload-") as tmp:
        frames = Path(tmp) / "frames.json"
        frames_info = load_client.write_frames(frames, speech=profile in SPEAKING_CALLER)
        spread = phase_spread(profile, frames_info)
        proc, log = sessions.start_transceiver(lab, t, f"load-{profile}", backend_id, LOAD_BACKEND_PORT,
                                               LOAD_WHIP_PORT, relay=True, cpu=cpu, handler=handler,
                                               extra=("--offer-rate", "0"))
        url = sessions.whip_url(t.signal_ip4, LOAD_WHIP_PORT)
        lag = _histogram_reader(lab, t, log)
        try:
            for n in steps:
                say(f"capacity {profile}: {n} calls for {duration:g} s")
                try:
                    step = _step(lab, frames, url, n, duration, profile, proc.pid, cpu, client_cpus, lag, spread)
                except SessionBenchError as exc:
                    if not results:
                        raise
                    stopped = f"{n} calls: {exc}"   # the ramp ends here; the steps before stand
                    say(f"capacity {profile}: {stopped}")
                    break
                if step["connected"] < n:
                    step["transceiver_log"] = sessions.log_tail(log, 5)
                if proc.poll() is not None:
                    raise SessionBenchError(f"the transceiver exited at {n} calls: {sessions.log_tail(log)}")
                results.append(step)
                say(f"capacity {profile}: {n} calls: RTT p50 {step['rtt_ms_p50']} ms, loss {step['loss']}, "
                    f"transceiver {step['transceiver_cpu']['pct']} % ({step['transceiver_cpu']['us_per_call_s']} "
                    f"µs/call-s), client {step['client_cpu']['pct']} %")
                stopped = _verdict(step, results[0], rtt_margin, loss_threshold)
                if stopped:
                    break
        finally:
            sessions.stop_transceiver(lab, proc, log, backend_id)
    good = results[:-1] if stopped else results
    # the fixed cost (event loop, timers, registration) apart from the per-call one: a line through the steps
    fit = _fit([(s["sessions"], s["transceiver_cpu"]["pct"]) for s in results if s["transceiver_cpu"]["pct"]])
    marginal = round(fit[0] * 1e4, 1) if fit and fit[0] > 0 else None     # % of a core per call -> µs/s
    capacity = good[-1]["sessions"] if good else 0
    limited_by = _limited_by(results[-1], rtt_margin) if stopped and len(results) > len(good) else None
    return {"profile": profile, "handler": handler, "cpu": cpu,
            "client_cpus": sorted(client_cpus) if client_cpus else None, "duration_s": duration,
            "phase_spread_s": spread,
            "rtt_margin_ms": rtt_margin, "loss_threshold": loss_threshold,
            "echo_threshold_bytes": frames_info["echo_threshold"], "steps": results, "capacity": capacity,
            "marginal_us_per_call_s": marginal,
            "calls_per_core_cpu_bound": round((100.0 - fit[1]) / fit[0], 1) if marginal else None,
            "capacity_reached": bool(stopped), "stopped_because": stopped, "limited_by": limited_by,
            "lower_bound": limited_by != "transceiver", "loadavg_before": loadavg_before, "method": METHOD}


# the ramp per bench profile: the full one goes past the targets (echo 64, conversation 100 per core)
STEPS = {"full": (1, 8, 16, 32, 40, 48, 56, 64, 72, 80, 90, 100, 128, 160), "smoke": (1, 2)}
DURATION_S = {"full": 10.0, "smoke": 3.0}


def duration_for(bench_profile: str, profile: str) -> float:
    """A step's talking time: the bench profile's, but two whole cycles for a profile that speaks in cycles
    (in the first 60 % of a cycle the conversation echoes nothing: no round trip to time)."""
    _, cycle, share = PROFILES[profile]
    if bench_profile == "smoke" or not 0 < share < 1:
        return DURATION_S[bench_profile]
    return max(DURATION_S[bench_profile], 2 * cycle)


def voice_unavailable() -> str | None:
    """Why the ``voice`` handler cannot run here (its extras), None when it can."""
    from splitrelay.transceiver.handlers import handler_factory

    try:
        handler_factory("voice")
    except ValueError as exc:
        return str(exc)
    return None


def measure(bench_profile: str, profiles: tuple[str, ...] = tuple(PROFILES),
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``splitrelay bench --part capacity``: a one-transceiver lab, each profile's ramp in it, the lab removed.

    Returns ``{"profiles": {name: measure_profile(...)}, "skipped": {name: why}}``."""
    say = progress or (lambda _: None)
    out: dict[str, Any] = {"profiles": {}, "skipped": {}}
    if "voice" in profiles and (why := voice_unavailable()):
        out["skipped"]["voice"] = why
        profiles = tuple(p for p in profiles if p != "voice")
    say("capacity: a lab with one relay and the load client (libdatachannel) in its client namespace")
    info = stack.start_lab(transceivers=1, handler="echo")
    try:
        for profile in profiles:
            out["profiles"][profile] = measure_profile(info["name"], profile, list(STEPS[bench_profile]),
                                                       duration_for(bench_profile, profile), progress=say)
    finally:
        stack.stop_lab(info["name"])
    return out


def _fmt(v: Any) -> str:  # noqa: ANN401
    return "n/a" if v is None else str(v)


def _row(s: dict[str, Any]) -> str:
    t, c = s["transceiver_cpu"], s["client_cpu"]
    loss = None if s["loss"] is None else round(100 * s["loss"], 2)
    spread = f"{_fmt(t['us_per_call_s_p10'])}–{_fmt(t['us_per_call_s_p90'])}"
    return (f"| {s['sessions']} | {_fmt(s['rtt_ms_p50'])} / {_fmt(s['rtt_ms_p99'])} | {_fmt(loss)} % | "
            f"{_fmt(t['pct'])} % | {_fmt(s.get('transceiver_loop_lag_ms_p99'))} | {_fmt(t['us_per_call_s'])} "
            f"({spread}) | {_fmt(c['pct'])} % | "
            f"{_fmt(s['other_work_on_transceiver_core_pct'])} % | {_fmt(s['loadavg'][0])} |")


WHO_LIMITED = {"client": "the client was saturated",
               "transceiver": "the transceiver was saturated (its core, or its event loop late)",
               "contended": "the transceiver's core was busy with other work (a shared machine)",
               None: "neither side was saturated"}


def _verdict_line(r: dict[str, Any]) -> str:
    if not r["capacity_reached"]:
        return f"at least **{r['capacity']}** calls per core (no step failed: a lower bound)"
    if r["lower_bound"]:
        return (f"**{r['capacity']} calls per core**, a lower bound: at the next step "
                f"{WHO_LIMITED[r['limited_by']]} ({r['stopped_because']})")
    return f"**{r['capacity']} calls per core**, limited by the transceiver ({r['stopped_because']})"


def markdown(part: dict[str, Any] | None) -> list[str]:
    """The capacity tables (one per profile) for the generated part of BENCHMARKS.md."""
    if not part:
        return []
    out = ["## 7. Calls per transceiver core, per profile (libdatachannel load client)\n",
           METHOD.replace("``", "`") + "\n"]
    for name, r in part["profiles"].items():
        rows = [_row(s) for s in r["steps"]]
        out += [f"### {name} (handler `{r['handler']}`)\n",
                "| calls | RTT p50 / p99 ms | loss | transceiver CPU | its loop late, p99 ms | "
                "µs CPU per call-second (p10–p90) | client CPU | other work on its core | load |",
                "|---|---|---|---|---|---|---|---|---|", *rows, "",
                f"Capacity: {_verdict_line(r)}. Per call, from a line through the steps: "
                f"{_fmt(r['marginal_us_per_call_s'])} µs of CPU per call-second (the line meets one core at "
                f"{_fmt(r['calls_per_core_cpu_bound'])} calls).\n"]
    for name, why in part.get("skipped", {}).items():
        out.append(f"Profile {name} not run: {why}\n")
    return out
