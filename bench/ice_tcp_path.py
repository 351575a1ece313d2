"""The TCP path beside the UDP path through one relay, in one run: added latency and relay CPU per packet.

A translating lab (one relay; the backend host runs a UDP echo instead of a
transceiver) and one session ufrag registered to that backend.  From the lab's
client namespace one client sends voice-sized packets (172 bytes: RTP header and
a 20 ms Opus frame), one at a time, each carrying a sequence number, and
waits for its echo: through the relay's UDP port (XDP) and through its ICE-TCP
port (edge/ice_tcp.py, RFC 4571 frames over one connection), in alternating
blocks so that load drift on a shared machine hits both paths alike.  Each path
is first opened with a Binding Request for the ufrag, as ICE opens it.

CPU per relayed packet (each echo is two: client to backend and back): for UDP,
the XDP programs' own run time (BPF_ENABLE_STATS); for TCP, the agent process's
user + system time (/proc), which holds the bridge's Python and its send/recv
syscalls but not all of the kernel's TCP receive work (softirq, charged to
whatever runs), so the TCP figure is a lower bound.

    sudo .venv/bin/python -m splitrelay.bench.ice_tcp_path [--count N] [--blocks N] [--json]
    sudo .venv/bin/python -m splitrelay.bench.ice_tcp_path --calls 200 [--seconds 10]
    sudo .venv/bin/python -m splitrelay.bench.ice_tcp_path --setup 20     # Chromium, TCP and UDP
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

from splitrelay.bench.forwarding import _prog_ids, _prog_stats
from splitrelay.bench.ice_tcp_calls import concurrent
from splitrelay.bench.ice_tcp_echo import PAYLOAD, SPLICE_PORT, TcpPath, UdpPath, echo_block, echo_lab
from splitrelay.bench.ice_tcp_echo import percentiles, splice_bridge, voice_packet
from splitrelay.bench.system import bpf_run_time_stats, machine
from splitrelay.lab.stack import TCP_PORT, admin_get, start_lab, stop_lab
from splitrelay.lab.topology import Lab


def measure(count: int, blocks: int, splice: bool = False) -> dict:
    """Round trips and relay CPU per packet, UDP (XDP) and TCP (the agent's bridge), and with
    ``splice`` also TCP through the kernel splice (edge/ice_tcp_splice.py), in alternating blocks."""
    with echo_lab() as (lab, pid, echo_pid), contextlib.ExitStack() as stack:
        progs = _prog_ids(lab)
        per_block = count // blocks
        names = ["udp", "tcp"] + (["splice"] if splice else [])
        rtts: dict[str, list[float]] = {name: [] for name in names}
        cpu = dict.fromkeys(names, 0)
        xdp = dict.fromkeys(names, 0)
        kernel = dict.fromkeys(names, 0)
        spliced = {"pid": None, "progs": []}
        if splice:
            spliced["pid"], spliced["progs"], spliced["stats"] = stack.enter_context(splice_bridge(lab))
        owner = {"udp": pid, "tcp": pid, "splice": spliced["pid"]}
        pipeline = dict.fromkeys(names, 0)   # ns: client thread + echo + relay process + kernel threads

        def pipeline_ns(name: str) -> int:
            return (time.thread_time_ns() + _schedstat_ns(echo_pid) + _schedstat_ns(owner[name])
                    + _kernel_threads_ns())

        def run() -> None:
            paths = {"udp": UdpPath((lab.relay_public.ip4, lab.relay_port)),
                     "tcp": TcpPath((lab.relay_public.ip4, TCP_PORT))}
            if splice:
                paths["splice"] = TcpPath((lab.relay_public.ip4, SPLICE_PORT))
            with bpf_run_time_stats():
                for b in range(blocks):
                    for name, path in paths.items():
                        cpu0, xdp0 = _schedstat_ns(owner[name]), _prog_stats(progs).run_time_ns
                        k0, p0 = _kernel_threads_ns(), pipeline_ns(name)
                        rtts[name] += echo_block(path, range(b * per_block, (b + 1) * per_block))
                        cpu[name] += _schedstat_ns(owner[name]) - cpu0
                        xdp[name] += _prog_stats(progs).run_time_ns - xdp0
                        kernel[name] += _kernel_threads_ns() - k0
                        pipeline[name] += pipeline_ns(name) - p0
                splice_prog = _prog_stats(spliced["progs"]) if splice else None
            spliced["prog_ns"] = splice_prog.run_time_ns if splice_prog else 0

        lab.in_netns(lab.client.netns, run, timeout=count * 0.15 + 120)
        stack.close()   # the splice bridge reports its counters as it stops
        relayed = 2 * per_block * blocks
        rtt = {name: percentiles(values) for name, values in rtts.items()}
        report = {
            "machine": machine(), "count": per_block * blocks, "blocks": blocks, "payload_bytes": PAYLOAD,
            "rtt": {"udp_xdp": rtt["udp"], "tcp_userspace": rtt["tcp"]},
            "added_rtt_us": {k: round(rtt["tcp"][k] - rtt["udp"][k], 1) for k in ("p50_us", "p99_us", "p999_us")},
            "relay_cpu_ns_per_packet": {
                "udp_xdp_program": round(xdp["udp"] / relayed),
                "tcp_agent_process": round(cpu["tcp"] / relayed),
                "udp_agent_process": round(cpu["udp"] / relayed)},   # ~0: XDP never wakes the agent
            # everything a round trip costs the machine, ns per relayed packet (module docstring)
            "pipeline_cpu_ns_per_packet": {name: round(pipeline[name] / relayed) for name in names},
            "kernel_threads_ns_per_packet": {name: round(kernel[name] / relayed) for name in names},
        }
        if splice:
            report["rtt"]["tcp_splice"] = rtt["splice"]
            report["added_rtt_us_splice"] = {k: round(rtt["splice"][k] - rtt["udp"][k], 1)
                                             for k in ("p50_us", "p99_us", "p999_us")}
            report["relay_cpu_ns_per_packet"].update(
                tcp_splice_programs=round(spliced["prog_ns"] / relayed),   # the two verdicts alone
                tcp_splice_process=round(cpu["splice"] / relayed))         # its sweeps only
            report["splice_counters"] = spliced["stats"]   # edge/ice_tcp_splice.py STATS
        return report


JITTER_BUFFER_MS = 60   # one way: a voice client plays a packet that arrives within this of its time


def _stream(path, seconds: float, first_seq: int) -> dict:  # noqa: ANN001
    """One voice stream through ``path``: a packet every 20 ms on a fixed clock, echoed; per packet
    its round trip, or None when it never came back (UDP's loss; TCP loses nothing, it is late)."""
    import threading

    sent: dict[int, int] = {}
    back: dict[int, int] = {}
    total = int(seconds * 50)
    done = threading.Event()

    def receive() -> None:
        while len(back) < total and not done.is_set():
            try:
                data = path.receive()
            except (OSError, ConnectionError):   # the shutdown below
                return
            if len(data) < 6:
                return
            back[struct.unpack_from("!I", data, 2)[0]] = time.perf_counter_ns()

    path.sock.settimeout(None)   # a TCP frame is never cut by a timeout; the shutdown ends the reader
    reader = threading.Thread(target=receive, daemon=True)
    reader.start()
    start = time.perf_counter_ns()
    for k in range(total):
        time.sleep(max(0.0, (start + k * 20_000_000 - time.perf_counter_ns()) / 1e9))
        seq = first_seq + k
        sent[seq] = time.perf_counter_ns()
        path.send(voice_packet(seq))
    time.sleep(2.0)   # what is late by more than this counts as lost
    done.set()
    with contextlib.suppress(OSError):
        path.sock.shutdown(socket.SHUT_RDWR)
    reader.join(3)
    return {seq: ((back[seq] - at) / 1000 if seq in back else None) for seq, at in sent.items()}


def _loss_summary(rtts: dict[int, float | None]) -> dict:
    """Delivered, late (beyond a 60 ms jitter buffer each way), the longest run of consecutive packets
    that did not play (lost or late) in ms of audio, and the round trips of those that came back."""
    limit_us = 2 * JITTER_BUFFER_MS * 1000 + 20_000   # both ways, on top of the path's own ~0
    played = [rtt is not None and rtt <= limit_us for _, rtt in sorted(rtts.items())]
    longest = run = 0
    for ok in played:
        run = 0 if ok else run + 1
        longest = max(longest, run)
    came = [rtt for rtt in rtts.values() if rtt is not None]
    return {"packets": len(rtts), "delivered": round(len(came) / len(rtts), 4),
            "played": round(sum(played) / len(rtts), 4), "longest_gap_ms": 20 * longest,
            "rtt": percentiles(came) if came else None}


def voice_under_loss(loss: float, seconds: float, blocks: int, splice: bool = False) -> dict:
    """Voice streams (50 packets/s, echoed) through UDP and ICE-TCP (and the splice) in alternating
    blocks, the client's link dropping ``loss`` of the frames each way, TCP's as well as UDP's."""
    from splitrelay.lab.impair import Impairment, read_stats

    with echo_lab(impair=Impairment(loss=loss, tcp=True, seed=20)) as (lab, _pid, _echo), \
            contextlib.ExitStack() as stack:
        counters: dict = {}
        if splice:
            counters = stack.enter_context(splice_bridge(lab))[2]
        names = ["udp", "tcp"] + (["splice"] if splice else [])
        rtts: dict[str, dict] = {name: {} for name in names}

        def run() -> None:
            ports = {"udp": None, "tcp": TCP_PORT, "splice": SPLICE_PORT}
            for b in range(blocks):
                for name in names:
                    path = (UdpPath((lab.relay_public.ip4, lab.relay_port)) if name == "udp"
                            else TcpPath((lab.relay_public.ip4, ports[name])))
                    try:
                        rtts[name].update(_stream(path, seconds / blocks, b * 100_000))
                    finally:
                        path.sock.close()

        lab.in_netns(lab.client.netns, run, timeout=len(names) * (seconds + 5 * blocks) + 120)
        stack.close()   # the splice bridge's counters: a desynced connection was framed by its 50 ms sweeps
        return {"splice_counters": counters, "machine": machine(),
                "loss_each_way": loss, "seconds_per_path": seconds,
                "jitter_buffer_ms_each_way": JITTER_BUFFER_MS,
                "paths": {name: _loss_summary(values) for name, values in rtts.items()},
                "link": {link: read_stats(lab, link) for link in lab.impaired}}


def _schedstat_ns(pid: int) -> int:
    """Nanoseconds a process (all its threads) has run (/proc/PID/task/*/schedstat: exact, not ticks).
    Without IRQ time accounting (this kernel) a softirq counts to whatever task it interrupted: with
    veth, the receiving side's protocol work runs in the sender's own send."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(stat.read_text().split()[0])
    return total


def _kernel_threads_ns() -> int:
    """Run time of every kworker and ksoftirqd (where a sockmap redirect is sent, and deferred
    softirqs run); the machine's other work lands here too, spread over the alternating blocks."""
    total = 0
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if comm.read_text().startswith(("kworker", "ksoftirqd")):
                total += int((comm.parent / "schedstat").read_text().split()[0])
    return total


def setup_times(runs: int) -> dict:
    """Chromium's call setup over ICE-TCP and over UDP through one relay, alternating: the
    transceiver's own timings from the offer's arrival to ICE and to DTLS connected (ms)."""
    from splitrelay.client.browser import Browser
    from splitrelay.lab.netns import nsenter_argv
    from splitrelay.lab.udp_block import block_udp, unblock_udp

    info = start_lab(transceivers=1, translate=True, block_udp=True)
    lab = Lab.load(info["name"])
    admin = info["transceivers"][0]["admin_url"]

    def session() -> dict | None:
        live = json.loads(admin_get(lab, admin, "/sessions"))   # the admin listener, with the lab's token
        return live[0] if live and live[0].get("dtls_connected_ms") else None

    times: dict[str, list[tuple[float, float]]] = {"tcp": [], "udp": []}
    try:
        with Browser(nsenter_argv(lab.client.netns, [])) as browser:
            for i in range(2 * runs):
                path = "tcp" if i % 2 == 0 else "udp"
                (block_udp if path == "tcp" else unblock_udp)(lab)
                call = browser.call(info["whip_url"], token=info["whip_token"])
                try:
                    heard = call.wait_audio(seconds=0.5, timeout=45)
                    if heard["pair"]["protocol"] != path:
                        raise ConnectionError(f"run {i}: expected {path}, the call took {heard['pair']}")
                    deadline = time.monotonic() + 10
                    while (s := session()) is None and time.monotonic() < deadline:
                        time.sleep(0.1)
                    times[path].append((s["ice_connected_ms"], s["dtls_connected_ms"]))
                finally:
                    call.hang_up()
                    deadline = time.monotonic() + 10
                    while session() is not None and time.monotonic() < deadline:
                        time.sleep(0.1)
    finally:
        stop_lab(info["name"])

    def summary(pairs: list[tuple[float, float]]) -> dict:
        ice, dtls = sorted(p[0] for p in pairs), sorted(p[1] for p in pairs)
        return {"runs": len(pairs), "ice_p50_ms": round(statistics.median(ice), 1),
                "ice_p95_ms": round(ice[min(len(ice) - 1, int(0.95 * len(ice)))], 1),
                "dtls_p50_ms": round(statistics.median(dtls), 1),
                "dtls_p95_ms": round(dtls[min(len(dtls) - 1, int(0.95 * len(dtls)))], 1)}

    return {"from": "the offer's arrival at the transceiver", "tcp": summary(times["tcp"]),
            "udp": summary(times["udp"]), "raw": times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=6000, help="echoes per path (default 6000)")
    parser.add_argument("--blocks", type=int, default=6, help="alternating blocks per path (default 6)")
    parser.add_argument("--calls", type=int, default=0,
                        help="instead: this many TCP-carried calls at once (50 packets/s each way), the agent's "
                             "CPU and memory per call")
    parser.add_argument("--seconds", type=float, default=10.0, help="with --calls or --loss: how long they run")
    parser.add_argument("--idle", type=int, default=0,
                        help="with --calls: first this many routed connections that then send nothing (memory "
                             "per idle connection)")
    parser.add_argument("--setup", type=int, default=0, metavar="RUNS",
                        help="instead: Chromium's setup time (offer to ICE and to DTLS connected, at the "
                             "transceiver) over ICE-TCP and over UDP, RUNS calls each, alternating")
    parser.add_argument("--splice", action="store_true",
                        help="also the in-kernel splice (edge/ice_tcp_splice.py, sockhash + sk_skb verdicts) as a "
                             "third path in the same blocks")
    parser.add_argument("--loss", type=float, default=0.0,
                        help="instead: voice streams under this loss (0.02 = 2 %%) each way on the client's link, "
                             "TCP's frames too, --seconds per path: delivered, played, longest gap")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.setup:
        print(json.dumps(setup_times(args.setup), indent=2))
        return 0
    if args.loss:
        report = voice_under_loss(args.loss, args.seconds, max(1, args.blocks // 3), args.splice)
        print(json.dumps(report, indent=2))
        return 0
    if args.calls:
        print(json.dumps(concurrent(args.calls, args.seconds, args.idle), indent=2))
        return 0
    report = measure(args.count, args.blocks, splice=args.splice)
    print(json.dumps(report, indent=2) if args.json else
          f"RTT p50/p99/p99.9 us: UDP {report['rtt']['udp_xdp']}, TCP {report['rtt']['tcp_userspace']}; "
          f"added {report['added_rtt_us']}; relay ns/packet {report['relay_cpu_ns_per_packet']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
