"""Packet-level measurements of one relay path: forwarding rate, added latency, first-packet routing.

A *path* is how a client's UDP packets reach the transceiver's host: through the
XDP relay, through the userspace relay (both on the relay's public port, routed
by ufrag and then by flow), or by plain kernel routing through the relay's
namespace (the floor: what any relay at all must cost at least).  Every function
here measures one path with the C load generator (bench/udpgen.c) in the lab's
client and transceiver namespaces, so the three paths are measured by the same
sender and the same receiver, only the relay differs.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from splitrelay.bench import loadgen
from splitrelay.bench.egress import EgressCounter
from splitrelay.bench.system import (
    BenchSystemError,
    ProgRunStats,
    process_cpu_s,
    prog_run_stats,
    softirq_cpu_s,
    threaded_napi,
    xdp_prog_id,
)
from splitrelay.bench.system import pinned as pin_process
from splitrelay.lab.links import set_sysctls
from splitrelay.lab.topology import Lab
from splitrelay.lab.netns import in_netns, nsenter_argv

SINK_PORT = 5000          # the transceiver's mux port: where the relay sends flows
FLOOR_PORT = 5001         # kernel-routed floor: a port no relay program touches
DATA_SIZE = 200           # bytes of UDP payload: an Opus 20 ms frame plus SRTP overhead, roughly
CLIENT_UFRAG = "bcli"
IP_FORWARD = "net/ipv4/ip_forward"


@dataclass(frozen=True)
class Route:
    """Where a path's packets are addressed, and what its first packet must carry."""

    name: str               # "xdp" | "userspace" | "kernel" | "ceiling" (bench/ceiling.py)
    dst_ip: str
    dst_port: int
    backend_port: int       # where the transceiver-side server listens
    relay_pid: int | None = None  # the userspace relay's process, for its CPU time

    @property
    def dst(self) -> str:
        return f"{self.dst_ip}:{self.dst_port}"

    @property
    def needs_session(self) -> bool:
        return self.name in ("xdp", "userspace")

    @property
    def runs_xdp(self) -> bool:
        """An XDP program on the relay's veths does the forwarding (its NAPI thread can be pinned)."""
        return self.name in ("xdp", "ceiling")


@dataclass(frozen=True)
class RateRun:
    """One forwarding-rate run of one path; a ``median_of`` result also carries every trial's rate."""

    path: str
    flows: int
    pinned: bool                  # sender on CPU 0, the relay's work on CPU 1
    offered_pps: int
    delivered_pps: int
    sent: int
    delivered: int
    loss: float | None
    softirq_cpu_s: float
    relay_cpu_s: float | None
    xdp_runs: int | None = None                    # the kernel's BPF statistics, when XDP forwarded
    xdp_ns_per_packet: float | None = None
    relay_cpu_ns_per_packet: float | None = None   # pinned runs: the relay's own core per delivered packet
    relay_cpu_what: str | None = None
    trials_pps: tuple[int, ...] = ()

    def to_json(self) -> dict:
        """The results file's keys (as before the dataclass): figures not measured are left out."""
        out = {k: v for k, v in asdict(self).items() if v is not None or k in ("loss", "relay_cpu_s")}
        out["sender_cpu"] = 0 if self.pinned else None
        out["trials_pps"] = list(self.trials_pps)
        if not self.trials_pps:
            del out["trials_pps"]
        return out


def relay_path(lab: Lab, name: str, relay_pid: int | None = None) -> Route:
    return Route(name, lab.relay_public.ip4, lab.relay_port, SINK_PORT, relay_pid)


def kernel_path(lab: Lab) -> Route:
    return Route("kernel", lab.transceivers[0].ip4, FLOOR_PORT, FLOOR_PORT)


def usernames_file(ufrags: list[str], directory: Path) -> Path:
    """The STUN USERNAMEs a client sends to reach these sessions ("server ufrag:client ufrag")."""
    path = directory / f"usernames-{ufrags[0]}-{len(ufrags)}.txt"
    path.write_text("".join(f"{u}:{CLIENT_UFRAG}\n" for u in ufrags))
    return path


@contextlib.contextmanager
def kernel_forwarding(lab: Lab) -> Iterator[None]:
    """Let the relay namespace forward IPv4 for the block (the floor, a direct path); restored after, always."""
    relay = lab.relay_public.netns
    saved = in_netns(relay, lambda: Path("/proc/sys", IP_FORWARD).read_text().strip())
    set_sysctls(relay, {IP_FORWARD: "1"})
    try:
        yield
    finally:
        set_sysctls(relay, {IP_FORWARD: saved})


@contextlib.contextmanager
def server(lab: Lab, mode: str, port: int, duration: float, **options) -> Iterator[dict]:
    """A udpgen ``sink`` or ``echo`` on the first transceiver host; yields a dict filled with its result."""
    t = lab.transceivers[0]
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="srbench-") as tmp:
        ready = Path(tmp) / "ready"
        proc = loadgen.start(mode, netns=t.netns, bind=f"{t.ip4}:{port}", duration=duration,
                             ready_file=str(ready), **options)
        try:
            loadgen.wait_ready(proc, ready, timeout=10.0)
            yield result
            if mode == "echo" or options.get("answer_stun"):   # serves until told: stop it now
                proc.terminate()
            result.update(loadgen.finish(proc, timeout=duration + 10))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def latency(lab: Lab, path: Route, count: int, interval_us: int, username: str | None,
            samples: Path | None = None) -> dict:
    """UDP ping-pong RTT through ``path`` to an echo server on the transceiver host."""
    with server(lab, "echo", path.backend_port, duration=count * (interval_us / 1e6 + 0.01) + 30):
        options = {"stun_username": username} if path.needs_session else {}
        result = loadgen.run("ping", netns=lab.client.netns, dst=path.dst, count=count,
                             interval_us=interval_us, timeout_ms=200, size=DATA_SIZE,
                             samples=str(samples) if samples else None,
                             timeout=count * (interval_us / 1e6 + 0.2) + 30, **options)
    return result


def first_packet(lab: Lab, path: Route, count: int, usernames: Path) -> dict:
    """RTT of a session's first packet (a STUN Binding Request from a new source port) through ``path``."""
    with server(lab, "echo", path.backend_port, duration=count * 0.25 + 30):
        return loadgen.run("ping", netns=lab.client.netns, dst=path.dst, count=count, new_flow_each=True,
                           usernames=str(usernames), interval_us=1000, timeout_ms=200,
                           timeout=count * 0.25 + 30)


def _prog_ids(lab: Lab) -> list[int]:
    ids = []
    for ifname in (lab.relay_public.ifname, lab.relay_internal.ifname):
        with contextlib.suppress(BenchSystemError):
            ids.append(xdp_prog_id(nsenter_argv(lab.relay_public.netns, []), ifname))
    return ids


def _prog_stats(ids: list[int]) -> ProgRunStats:
    total = ProgRunStats(0, 0)
    for prog_id in ids:
        s = prog_run_stats(prog_id)
        total = ProgRunStats(total.run_time_ns + s.run_time_ns, total.run_cnt + s.run_cnt)
    return total


def forwarding_rate(lab: Lab, path: Route, flows: int, duration: float, usernames: Path | None,
                    pinned: bool = False, src_ip: str | None = None, src_port: int = 20000,
                    shuffle: bool = False) -> RateRun:
    """Blast established flows at the relay as fast as one core can send; count what leaves the relay.

    The sender writes whole frames with AF_PACKET on the client's veth (no
    socket layer in the way); an XDP counter at the far end of the relay's
    internal link (bench/egress.c) counts what the relay sent on.  With
    ``usernames`` each flow is opened with its STUN Binding Request first
    (twice, in case one is lost); without, the flows must already be in the
    relay's flow map (the scale benchmark fills it directly).

    ``pinned``: the sender runs on CPU 0 and the relay's work on CPU 1 (XDP: the
    public veth's NAPI thread, see ``system.threaded_napi``; userspace: the relay
    process), so each relay has exactly one core, and its CPU time per packet is
    measured.  Unpinned, the scheduler decides (and XDP on veth runs on the
    sender's core, in its softirq).
    """
    client, relay = lab.client, lab.relay_public
    prog_ids = _prog_ids(lab) if path.runs_xdp else []
    options: dict = {"usernames": str(usernames), "open_rounds": 2} if usernames else {}
    with contextlib.ExitStack() as stack:
        relay_pid = path.relay_pid
        if pinned and path.runs_xdp:
            relay_pid = stack.enter_context(threaded_napi(nsenter_argv(relay.netns, []), relay.ifname, cpu=1))
        elif pinned and path.relay_pid:
            stack.enter_context(pin_process(path.relay_pid, cpu=1))
        counter = stack.enter_context(EgressCounter(lab, path.backend_port))
        if usernames and path.needs_session:
            # the transceiver's part in opening a flow: a relay carries media only on a flow whose backend
            # answered its Binding Request (the flow stays pending till then); the egress counter lets STUN
            # through to this sink, which sends each one back, and that confirms the flow
            stack.enter_context(server(lab, "sink", path.backend_port, duration=duration + 120, answer_stun=True))
        cpu0 = softirq_cpu_s()
        proc0 = process_cpu_s(relay_pid) if relay_pid else None
        prog0 = _prog_stats(prog_ids) if prog_ids else None
        count0 = counter.read()
        sent = loadgen.run("send", netns=client.netns, cpu=0 if pinned else None, iface=client.ifname,
                           src_mac=lab.mac(client.netns, client.ifname),
                           dst_mac=lab.mac(relay.netns, relay.ifname),
                           src_ip=src_ip or client.ip4, src_port=src_port, flows=flows, dst=path.dst,
                           size=DATA_SIZE, duration=duration, shuffle=shuffle, timeout=duration + 60, **options)
        # what a relay still holds in socket buffers drains within milliseconds: wait until the count settles
        delivered = _settled(counter)
        delivered -= count0
        softirq = softirq_cpu_s() - cpu0
        relay_cpu = process_cpu_s(relay_pid) - proc0 if relay_pid else None
        prog = _prog_stats(prog_ids) - prog0 if prog0 else None
    offered = sent.get("sent", 0)
    elapsed = sent.get("elapsed_s") or 0
    timed = bool(prog and prog.run_cnt)
    per_packet = relay_cpu is not None and delivered
    return RateRun(
        path=path.name, flows=flows, pinned=pinned,
        offered_pps=round(sent.get("pps", 0.0)),
        delivered_pps=round(delivered / elapsed) if elapsed else 0,
        sent=offered, delivered=delivered,
        loss=round(max(0.0, 1 - delivered / offered), 4) if offered else None,
        softirq_cpu_s=round(softirq, 3),
        relay_cpu_s=round(relay_cpu, 3) if relay_cpu is not None else None,
        xdp_runs=prog.run_cnt if timed else None,
        xdp_ns_per_packet=round(prog.ns_per_run, 1) if timed else None,
        relay_cpu_ns_per_packet=round(relay_cpu * 1e9 / delivered, 1) if per_packet else None,
        relay_cpu_what=(("NAPI thread (XDP program, redirect, veth transmit)" if path.runs_xdp
                         else "relay process (user + system)") if per_packet else None),
    )


def median_of(trials: int, run: Callable[[], RateRun]) -> RateRun:
    """Run a rate measurement ``trials`` times; the trial with the median delivered rate, and all rates.

    One 3-second run on a shared 2-core VM varies by several percent from the next;
    the median of three is what the targets are judged on, and ``trials_pps``
    shows the spread.
    """
    return median_run([run() for _ in range(max(1, trials))])


def median_run(runs: list[RateRun]) -> RateRun:
    """The run with the median delivered rate, carrying every run's rate (``trials_pps``, ascending)."""
    ordered = sorted(runs, key=lambda r: r.delivered_pps)
    return replace(ordered[len(ordered) // 2], trials_pps=tuple(r.delivered_pps for r in ordered))


def _settled(counter: EgressCounter, quiet_s: float = 0.1, limit_s: float = 3.0) -> int:
    """The counter's value once it stopped moving for ``quiet_s`` (bounded by ``limit_s``)."""
    deadline = time.monotonic() + limit_s
    value = counter.read()
    while time.monotonic() < deadline:
        time.sleep(quiet_s)  # polling a BPF map: there is no event to await
        now = counter.read()
        if now == value:
            break
        value = now
    return value
