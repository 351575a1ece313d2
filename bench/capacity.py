"""Echo sessions one transceiver core carries through the relay at <= 1 % audio loss (BENCHMARKS.md section 6).

Capacity (``measure_capacity``).  A transceiver started here in relay mode (registered with the agent
under a backend id of its own, on ``backend_port`` 5002) pinned to one CPU from its first instruction
(``taskset``), the probe pinned to the other CPUs; for each step N the probe opens N concurrent echo
sessions through the relay, talks for ``duration`` seconds and counts the audio that came back (the
probe's carrier: every 20 ms frame sent carries a quiet 400 Hz tone, the echo is counted frame by
frame).  CPU is the process's utime+stime from /proc/<pid>/stat over the window in which all N
sessions were talking.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from splitrelay.bench import sessions
from splitrelay.bench.sessions import CLK_TCK, CpuTimes, SessionBenchError, summary
from splitrelay.bench.system import process_cpu_ticks
from splitrelay.lab import stack
from splitrelay.lab.topology import Lab, Transceiver

CAPACITY_BACKEND_PORT = 5002
CAPACITY_WHIP_PORT = 8082
CAPACITY_BACKEND_ID = 4000      # first id tried for the capacity transceiver (lab transceivers are 1..50)
FRAME_S = 0.02
SATURATED_PCT = 90.0            # a process at this share of the CPUs it may use is the bottleneck

CAPACITY_METHOD = (
    "A splitrelay transceiver (echo handler, relay mode: registered with the lab's edge agent, so every "
    "packet crosses the XDP relay) is started pinned with taskset to one CPU; the client "
    "(splitrelay.client.probe --sessions N --carrier --together: plain aiortc, one Python process) is "
    "pinned to the other CPU(s) of the same machine. For each step N it opens N concurrent sessions (Opus "
    "audio + a data channel pinged every 250 ms); once all N are connected (+0.5 s) they all talk for the "
    "step's duration, then stay silent while the echo's tail comes back (0.5 s + twice the slowest beep "
    "round trip, at most 3 s), and close. Audio loss = 1 - (frames received carrying the probe's own voice) "
    "/ (frames the probe sent while talking), summed over the N sessions: every 20 ms frame sent while "
    "talking carries a quiet 400 Hz carrier under the 1 kHz beeps, and a received frame counts as echoed "
    "when its 400 Hz amplitude is at least half the echo's median level; a session that never talked "
    "counts duration/20 ms frames lost. This counts audio lost anywhere (uplink, the transceiver's socket, "
    "jitter buffer, handler or outbound queue, downlink, the client's jitter buffer); audio that comes back "
    "late but within the drain is not loss (audio_rtt_ms shows lateness). RTP loss (the transceiver's RTCP "
    "receiver reports: uplink; inbound-rtp: downlink), beeps echoed and UDP receive-buffer drops "
    "(UdpRcvbufErrors of the transceiver's and the client's namespaces) are reported beside it. CPU% = "
    "utime+stime of the process (all threads, /proc/<pid>/stat) over the window in which all N sessions "
    "were talking, 100 = one core; cpu_busy_pct = each CPU's non-idle share over the same window "
    "(/proc/stat, everything: our processes, kernel networking, and any other work on the machine). "
    "Capacity = the largest N whose loss is <= the threshold; the ramp stops at the first step above it. "
    "limited_by (at that step): 'client' when the probe was at >= 90% of a core (also when the transceiver "
    "was too: the client cannot be ruled out then), else 'transceiver' when "
    "the transceiver was at >= 90% of its core, or when only the transceiver's socket overflowed while its "
    "core had no other significant work (>= 20% of it busy beyond the transceiver counts as contention); "
    "'client' when only the client's sockets overflowed; null otherwise (see notes)."
)
CONTENDED_PCT = 20.0


def _free_backend_id(lab: Lab, first: int) -> int:
    taken = {b["id"] for b in stack.control(lab, lambda c: c.backends())}
    backend_id = first
    while backend_id in taken:
        backend_id += 1
    return backend_id


class _Sampler:
    """CPU time of two processes and of every CPU, sampled while a step runs."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.samples: list[tuple[float, dict[str, int | None], CpuTimes]] = []

    def sample(self) -> None:
        self.samples.append((time.monotonic(), {k: process_cpu_ticks(pid) for k, pid in self.pids.items()},
                             sessions.cpu_times()))

    def _ends(self, start: float, end: float) -> tuple[Any, Any] | None:
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2 or inside[-1][0] - inside[0][0] < 0.2:
            return None
        return inside[0], inside[-1]

    def process_pct(self, key: str, start: float, end: float) -> float | None:
        ends = self._ends(start, end)
        if ends is None or ends[0][1][key] is None or ends[1][1][key] is None:
            return None
        (t0, a, _), (t1, b, _) = ends
        return round(100.0 * (b[key] - a[key]) / CLK_TCK / (t1 - t0), 1)

    def cpu_busy_pct(self, start: float, end: float) -> dict[str, float]:
        ends = self._ends(start, end)
        return sessions.busy_pct(ends[0][2], ends[1][2]) if ends else {}


@dataclass
class CapacityStep:
    """One step of the ramp: ``sessions`` echo sessions at once, the probe's JSON reports summed over them."""

    sessions: int
    connected: int                           # sessions whose DTLS connected
    ok: int
    audio_loss: float | None                 # 1 - echoed / sent carrier frames, over every session
    worst_session_audio_loss: float | None
    frames_sent: int
    frames_echoed: int
    beeps_sent: int
    beeps_echoed: int
    audio_rtt_ms: dict[str, Any]             # summary() of every echoed beep's round trip
    rtp_packets_sent: int | None
    rtp_lost_uplink: int | None
    rtp_lost_downlink: int | None
    udp_rcvbuf_drops: dict[str, int]         # transceiver_netns, client_netns: socket buffer overflows
    dtls_connected_ms: dict[str, Any]        # summary() of offer sent -> DTLS connected
    window_s: float                          # the span in which every session talked (CPU is measured over it)
    transceiver_cpu_pct: float | None
    probe_cpu_pct: float | None
    cpu_busy_pct: dict[str, float]           # cpu0, cpu1, ...: each CPU's busy share over the window
    errors: list[str]
    other_cpu_pct: dict[str, float | None] = field(default_factory=dict)   # _contention()


def _step(lab: Lab, t: Transceiver, url: str, n: int, duration: float, transceiver_pid: int,
          probe_cpus: set[int] | None) -> CapacityStep:
    drops = {"transceiver_netns": sessions.rcvbuf_errors(t.netns),
             "client_netns": sessions.rcvbuf_errors(lab.client.netns)}
    probe = sessions.Probe(lab, [url, "--sessions", str(n), "--duration", str(duration), "--carrier",
                                 "--together"], probe_cpus)
    sampler = _Sampler({"transceiver": transceiver_pid, "probe": probe.proc.pid})
    bound = duration + sessions.CONNECT_TIMEOUT_S + 3.0 + 30.0 + 0.5 * n
    reports = probe.wait(bound, sampler.sample)
    drops = {"transceiver_netns": sessions.rcvbuf_errors(t.netns) - drops["transceiver_netns"],
             "client_netns": sessions.rcvbuf_errors(lab.client.netns) - drops["client_netns"]}
    expected = round(duration / FRAME_S)
    sent = echoed = 0
    losses = []
    for r in reports:
        if r["carrier_frames_sent"]:
            sent += r["carrier_frames_sent"]
            echoed += min(r["carrier_frames_echoed"], r["carrier_frames_sent"])
            losses.append(r["audio_loss"])
        else:                    # never talked: all its audio is lost
            sent += expected
            losses.append(1.0)
    talking = [r for r in reports if r["talk_started_mono"] is not None and r["talk_ended_mono"] is not None]
    start = max((r["talk_started_mono"] for r in talking), default=0.0)
    end = min((r["talk_ended_mono"] for r in talking), default=0.0)
    if end - start < 0.5 and talking:  # sessions barely overlapped: the whole talk span instead
        start = min(r["talk_started_mono"] for r in talking)
        end = max(r["talk_ended_mono"] for r in talking)
    rtts = [v for r in reports for v in r["audio_rtt_ms"]]

    def total(key: str) -> int | None:
        values = [r[key] for r in reports if r[key] is not None]
        return sum(values) if values else None

    return CapacityStep(
        sessions=n,
        connected=sum(1 for r in reports if r["dtls_connected_ms"] is not None),
        ok=sum(1 for r in reports if r["ok"]),
        audio_loss=round(1.0 - echoed / sent, 5) if sent else None,
        worst_session_audio_loss=round(max(losses), 5) if losses else None,
        frames_sent=sent,
        frames_echoed=echoed,
        beeps_sent=sum(r["beeps_sent"] for r in reports),
        beeps_echoed=sum(sum(r["beep_echoed"]) for r in reports),
        audio_rtt_ms=summary(rtts),
        rtp_packets_sent=total("packets_sent"),
        rtp_lost_uplink=total("packets_lost_uplink"),
        rtp_lost_downlink=total("packets_lost_downlink"),
        udp_rcvbuf_drops=drops,
        dtls_connected_ms=summary([r["dtls_connected_ms"] - r["offer_sent_ms"] for r in reports
                                   if r["dtls_connected_ms"] is not None and r["offer_sent_ms"] is not None]),
        window_s=round(end - start, 2),
        transceiver_cpu_pct=sampler.process_pct("transceiver", start, end),
        probe_cpu_pct=sampler.process_pct("probe", start, end),
        cpu_busy_pct=sampler.cpu_busy_pct(start, end),
        errors=sorted({r["error"] for r in reports if r["error"]}),
    )


def _fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least-squares line (slope, intercept) through (sessions, cpu%) points; None if underdetermined."""
    if len(points) == 1:
        return points[0][1] / points[0][0], 0.0
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return slope, my - slope * mx


def _contention(step: CapacityStep, cpu: int | None, probe_cpus: set[int] | None) -> dict[str, float | None]:
    """Busy share of the transceiver's core beyond the transceiver, and of the probe's cores beyond the probe."""
    busy = step.cpu_busy_pct
    out: dict[str, float | None] = {"transceiver_core": None, "probe_cores": None}
    if cpu is not None and f"cpu{cpu}" in busy and step.transceiver_cpu_pct is not None:
        out["transceiver_core"] = round(busy[f"cpu{cpu}"] - step.transceiver_cpu_pct, 1)
    if probe_cpus and all(f"cpu{c}" in busy for c in probe_cpus) and step.probe_cpu_pct is not None:
        out["probe_cores"] = round(sum(busy[f"cpu{c}"] for c in probe_cpus) - step.probe_cpu_pct, 1)
    return out


def _limited_by(step: CapacityStep, cpu: int | None,
                probe_cpus: set[int] | None) -> tuple[str | None, str]:
    """Who limited the first step above the loss threshold, and why (one line)."""
    probe_pct, trx_pct = step.probe_cpu_pct or 0.0, step.transceiver_cpu_pct or 0.0
    drops = step.udp_rcvbuf_drops
    other = _contention(step, cpu, probe_cpus)
    at = (f"at {step.sessions} sessions (loss {step.audio_loss:.2%}; transceiver {trx_pct}% of its core, "
          f"probe {probe_pct}%, other work on the transceiver's core {other['transceiver_core']}%, "
          f"socket drops {drops})")
    if probe_pct >= SATURATED_PCT and trx_pct >= SATURATED_PCT:
        return "client", (f"both the client and the transceiver were saturated {at}: the client cannot be "
                          "ruled out, so capacity is a lower bound, though the transceiver had no CPU to spare")
    if probe_pct >= SATURATED_PCT:
        return "client", f"the client saturated first {at}: capacity is a lower bound"
    if trx_pct >= SATURATED_PCT:
        return "transceiver", f"the transceiver saturated its core {at}"
    if (other["transceiver_core"] or 0.0) >= CONTENDED_PCT:
        return None, f"the transceiver's core was shared with other work {at}: not attributed"
    if drops["transceiver_netns"] and not drops["client_netns"]:
        return "transceiver", (f"the transceiver's one UDP socket overflowed (its event loop fell behind in "
                               f"bursts, not on average) {at}")
    if drops["client_netns"] and not drops["transceiver_netns"]:
        return "client", f"the client's sockets overflowed {at}"
    return None, f"neither process saturated {at}"


@dataclass(frozen=True)
class Capacity:
    """Echo sessions one transceiver core carried at <= ``loss_threshold`` audio loss, step by step."""

    cpu: int | None                      # the transceiver's CPU (None: nothing pinned)
    probe_cpus: list[int] | None
    duration_s: float
    loss_threshold: float
    transceiver: dict[str, Any]          # netns, backend_id, backend, whip_url
    host: dict[str, Any]
    steps: list[CapacityStep]
    capacity: int
    capacity_reached: bool               # a step went above the threshold (else capacity is a lower bound)
    limited_by: str | None               # "client", "transceiver" or None, at the first step above it
    transceiver_cpu_pct_per_session: float | None
    sessions_per_core_cpu_bound: float | None   # extrapolated: where the fitted CPU line meets 100 %
    notes: list[str] = field(default_factory=list)
    method: str = CAPACITY_METHOD

    @property
    def sessions_per_core(self) -> int | None:
        return self.capacity if self.cpu is not None else None

    def to_json(self) -> dict[str, Any]:
        """The results file's keys (as before the dataclass)."""
        out = asdict(self)
        order = ["method", "cpu", "probe_cpus", "duration_s", "loss_threshold", "transceiver", "host", "steps",
                 "capacity", "capacity_reached", "sessions_per_core", "limited_by",
                 "transceiver_cpu_pct_per_session", "sessions_per_core_cpu_bound", "notes"]
        out["sessions_per_core"] = self.sessions_per_core
        return {key: out[key] for key in order}


def measure_capacity(lab_name: str, steps: list[int], duration: float = 10.0, cpu: int | None = 0,
                     loss_threshold: float = 0.01, transceiver: int = 1,
                     backend_port: int = CAPACITY_BACKEND_PORT, whip_port: int = CAPACITY_WHIP_PORT,
                     progress: Callable[[str], None] | None = None) -> Capacity:
    """Concurrent echo sessions through the relay that one transceiver core carries with audio loss <= 1%,
    one ``CapacityStep`` per session count of ``steps``."""
    if not steps or any(n < 1 for n in steps):
        raise SessionBenchError(f"steps must be a non-empty list of positive session counts, got {steps}")
    if duration <= 0:
        raise SessionBenchError(f"duration must be positive, got {duration}")
    allowed = os.sched_getaffinity(0)
    if cpu is not None and cpu not in allowed:
        raise SessionBenchError(f"CPU {cpu} is not one this process may use ({sorted(allowed)})")
    probe_cpus = (allowed - {cpu}) or None if cpu is not None else None
    lab = Lab.load(lab_name)
    if not 1 <= transceiver <= len(lab.transceivers):
        raise SessionBenchError(f"lab {lab_name} has no transceiver {transceiver}")
    t = lab.transceivers[transceiver - 1]
    say = progress or (lambda _: None)
    host = {"cpus": os.cpu_count(), "loadavg_before": [round(v, 2) for v in os.getloadavg()]}
    backend_id = _free_backend_id(lab, CAPACITY_BACKEND_ID)
    proc, log = sessions.start_transceiver(lab, t, "capacity", backend_id, backend_port, whip_port, relay=True,
                                           cpu=cpu)
    url = sessions.whip_url(t.signal_ip4, whip_port)
    results: list[CapacityStep] = []
    try:
        for n in steps:
            say(f"capacity: {n} sessions for {duration:g} s")
            try:
                step = _step(lab, t, url, n, duration, proc.pid, probe_cpus)
            except SessionBenchError as exc:
                raise SessionBenchError(f"step {n}: {exc} (transceiver: {sessions.log_tail(log)})") from None
            step.other_cpu_pct = _contention(step, cpu, probe_cpus)
            results.append(step)
            if proc.poll() is not None:
                raise SessionBenchError(f"the transceiver exited at step {n}: {sessions.log_tail(log)}")
            if step.audio_loss is None or step.audio_loss > loss_threshold:
                break
    finally:
        sessions.stop_transceiver(lab, proc, log, backend_id)

    passed = [s for s in results if s.audio_loss is not None and s.audio_loss <= loss_threshold]
    failed = [s for s in results if s not in passed]
    capacity = max((s.sessions for s in passed), default=0)
    limited_by = None
    notes = []
    if failed:
        limited_by, why = _limited_by(failed[0], cpu, probe_cpus)
        notes.append(why)
    else:
        notes.append(f"no step exceeded {loss_threshold:.0%} loss: capacity is at least {capacity}")
    saturated = [s.sessions for s in passed if (s.probe_cpu_pct or 0.0) >= SATURATED_PCT]
    if saturated:
        notes.append(f"the probe was at >= {SATURATED_PCT:.0f}% of a core at steps {saturated}")
    contended = [s.sessions for s in results
                 if (s.other_cpu_pct["transceiver_core"] or 0.0) >= CONTENDED_PCT]
    if contended:
        notes.append(f"the transceiver's core had >= {CONTENDED_PCT:.0f}% of other work at steps {contended} "
                     "(kernel networking, other processes on this machine)")
    fit = _fit([(s.sessions, s.transceiver_cpu_pct) for s in passed if s.transceiver_cpu_pct is not None])
    per_session = round(fit[0], 2) if fit and fit[0] > 0 else None
    cpu_bound = round((100.0 - fit[1]) / fit[0], 1) if fit and fit[0] > 0 else None
    if cpu is None:
        notes.append("nothing was pinned (cpu=None): capacity is for the whole machine, not per core")
    return Capacity(
        cpu=cpu, probe_cpus=sorted(probe_cpus) if probe_cpus else None, duration_s=duration,
        loss_threshold=loss_threshold,
        transceiver={"netns": t.netns, "backend_id": backend_id, "backend": f"{t.ip4}:{backend_port}",
                     "whip_url": url},
        host=host, steps=results, capacity=capacity, capacity_reached=bool(failed), limited_by=limited_by,
        transceiver_cpu_pct_per_session=per_session, sessions_per_core_cpu_bound=cpu_bound, notes=notes)
