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
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from splitrelay.bench.forwarding import _prog_ids, _prog_stats
from splitrelay.bench.system import bpf_run_time_stats, machine, process_cpu_s
from splitrelay.lab.stack import TCP_PORT, admin_get, control, start_lab, stop_lab
from splitrelay.lab.host import BACKEND_PORT
from splitrelay.lab.topology import Lab
from splitrelay.wire.stun import build_binding_request

UFRAG = "benchtcpufrag"
SPLICE_PORT = 8443                 # the splice experiment's listener, beside the agent's TCP_PORT
PAYLOAD = 172                      # RTP header + a 20 ms Opus frame at ~64 kb/s
ECHO = ("import socket,sys\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind((sys.argv[1],int(sys.argv[2])))\n"
        "while True:\n d,a=s.recvfrom(4096); s.sendto(d,a)\n")


def _packet(seq: int) -> bytes:
    return bytes([0x80, 0x6F]) + struct.pack("!I", seq) + bytes(PAYLOAD - 6)


class _UdpPath:
    def __init__(self, relay: tuple[str, int]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(2.0)
        self.sock.connect(relay)
        self.exchange(build_binding_request(f"{UFRAG}:benchclient"))

    def exchange(self, data: bytes) -> bytes:
        self.send(data)
        return self.receive()

    def send(self, data: bytes) -> None:
        self.sock.send(data)

    def receive(self) -> bytes:
        return self.sock.recv(4096)


class _TcpPath:
    def __init__(self, relay: tuple[str, int]) -> None:
        self.sock = socket.create_connection(relay, timeout=2.0)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # as browsers do for ICE-TCP
        self.exchange(build_binding_request(f"{UFRAG}:benchclient"))

    def _read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("the relay closed the ICE-TCP connection")
            out += chunk
        return out

    def exchange(self, data: bytes) -> bytes:
        self.send(data)
        return self.receive()

    def send(self, data: bytes) -> None:
        self.sock.sendall(len(data).to_bytes(2, "big") + data)

    def receive(self) -> bytes:
        return self._read(int.from_bytes(self._read(2), "big"))


def _block(path, seqs: range) -> list[float]:  # noqa: ANN001
    rtts = []
    for seq in seqs:
        data = _packet(seq)
        start = time.perf_counter_ns()
        if path.exchange(data) != data:
            raise ConnectionError(f"echo {seq} came back changed")
        rtts.append((time.perf_counter_ns() - start) / 1000)
    return rtts


def _percentiles(values: list[float]) -> dict:
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {"p50_us": at(0.50), "p99_us": at(0.99), "p999_us": at(0.999),
            "mean_us": round(statistics.mean(values), 1), "samples": len(values)}


def _agent_pid(lab: Lab) -> int:
    out = lab.run(lab.relay_public.netns, ["ss", "-Htlnp", f"sport = :{TCP_PORT}"]).stdout
    return int(out.split("pid=")[1].split(",")[0])


@contextlib.contextmanager
def _echo_lab(agent_args: list[str] | None = None, impair=None) -> Iterator[tuple[Lab, int, int]]:  # noqa: ANN001
    """A translating lab whose backend host runs the UDP echo, ``UFRAG`` registered to it; yields the
    lab, its agent's pid and the echo's, and tears it all down after (the echo with the lab's processes)."""
    info = start_lab(transceivers=1, translate=True, handler=None, agent_args=agent_args, impair=impair)
    lab = Lab.load(info["name"])
    try:
        t = lab.transceivers[0]
        echo = lab.popen(t.netns, [sys.executable, "-c", ECHO, t.ip4, str(BACKEND_PORT)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        control(lab, lambda c: c.put_session(UFRAG, t.backend_id))
        time.sleep(0.5)   # the echo binds (a lost first request would only be retried by hand)
        yield lab, _agent_pid(lab), echo.pid
    finally:
        stop_lab(info["name"])


@contextlib.contextmanager
def _splice_bridge(lab: Lab) -> Iterator[tuple[int, list[int]]]:
    """edge/ice_tcp_splice.py in the relay's namespace on ``SPLICE_PORT``, toward the echo; yields its
    pid, its two verdict programs' ids and a dict that gets its counters when it stops."""
    t = lab.transceivers[0]
    proc = lab.popen(lab.relay_public.netns,
                     [sys.executable, "-m", "splitrelay.edge.ice_tcp_splice",
                      "--listen", f"{lab.relay_public.ip4}:{SPLICE_PORT}", "--bind", lab.relay_internal.ip4,
                      "--backend", f"{t.ip4}:{BACKEND_PORT}"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().split()   # "ready ID ID", or nothing when it failed
        if not line or line[0] != "ready":
            raise ConnectionError(f"the splice bridge did not start (exit {proc.wait(10)})")
        stats: dict = {}
        yield proc.pid, [int(x) for x in line[1:]], stats
    finally:
        proc.terminate()
        with contextlib.suppress(ValueError, subprocess.TimeoutExpired):
            stats.update(json.loads(proc.communicate(timeout=10)[0].strip().splitlines()[-1]))


def measure(count: int, blocks: int, splice: bool = False) -> dict:
    """Round trips and relay CPU per packet, UDP (XDP) and TCP (the agent's bridge), and with
    ``splice`` also TCP through the kernel splice (edge/ice_tcp_splice.py), in alternating blocks."""
    with _echo_lab() as (lab, pid, echo_pid), contextlib.ExitStack() as stack:
        progs = _prog_ids(lab)
        per_block = count // blocks
        names = ["udp", "tcp"] + (["splice"] if splice else [])
        rtts: dict[str, list[float]] = {name: [] for name in names}
        cpu = dict.fromkeys(names, 0)
        xdp = dict.fromkeys(names, 0)
        kernel = dict.fromkeys(names, 0)
        spliced = {"pid": None, "progs": []}
        if splice:
            spliced["pid"], spliced["progs"], spliced["stats"] = stack.enter_context(_splice_bridge(lab))
        owner = {"udp": pid, "tcp": pid, "splice": spliced["pid"]}
        pipeline = dict.fromkeys(names, 0)   # ns: client thread + echo + relay process + kernel threads

        def pipeline_ns(name: str) -> int:
            return (time.thread_time_ns() + _schedstat_ns(echo_pid) + _schedstat_ns(owner[name])
                    + _kernel_threads_ns())

        def run() -> None:
            paths = {"udp": _UdpPath((lab.relay_public.ip4, lab.relay_port)),
                     "tcp": _TcpPath((lab.relay_public.ip4, TCP_PORT))}
            if splice:
                paths["splice"] = _TcpPath((lab.relay_public.ip4, SPLICE_PORT))
            with bpf_run_time_stats():
                for b in range(blocks):
                    for name, path in paths.items():
                        cpu0, xdp0 = _schedstat_ns(owner[name]), _prog_stats(progs).run_time_ns
                        k0, p0 = _kernel_threads_ns(), pipeline_ns(name)
                        rtts[name] += _block(path, range(b * per_block, (b + 1) * per_block))
                        cpu[name] += _schedstat_ns(owner[name]) - cpu0
                        xdp[name] += _prog_stats(progs).run_time_ns - xdp0
                        kernel[name] += _kernel_threads_ns() - k0
                        pipeline[name] += pipeline_ns(name) - p0
                splice_prog = _prog_stats(spliced["progs"]) if splice else None
            spliced["prog_ns"] = splice_prog.run_time_ns if splice_prog else 0

        lab.in_netns(lab.client.netns, run, timeout=count * 0.15 + 120)
        stack.close()   # the splice bridge reports its counters as it stops
        relayed = 2 * per_block * blocks
        rtt = {name: _percentiles(values) for name, values in rtts.items()}
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
        path.send(_packet(seq))
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
            "rtt": _percentiles(came) if came else None}


def voice_under_loss(loss: float, seconds: float, blocks: int, splice: bool = False) -> dict:
    """Voice streams (50 packets/s, echoed) through UDP and ICE-TCP (and the splice) in alternating
    blocks, the client's link dropping ``loss`` of the frames each way, TCP's as well as UDP's."""
    from splitrelay.lab.impair import Impairment, read_stats

    with _echo_lab(impair=Impairment(loss=loss, tcp=True, seed=20)) as (lab, _pid, _echo), \
            contextlib.ExitStack() as stack:
        counters: dict = {}
        if splice:
            counters = stack.enter_context(_splice_bridge(lab))[2]
        names = ["udp", "tcp"] + (["splice"] if splice else [])
        rtts: dict[str, dict] = {name: {} for name in names}

        def run() -> None:
            ports = {"udp": None, "tcp": TCP_PORT, "splice": SPLICE_PORT}
            for b in range(blocks):
                for name in names:
                    path = (_UdpPath((lab.relay_public.ip4, lab.relay_port)) if name == "udp"
                            else _TcpPath((lab.relay_public.ip4, ports[name])))
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


async def _calls(relay: tuple[str, int], calls: int, seconds: float, marks: dict, idle: int = 0) -> dict:
    """``idle`` ICE-TCP connections opened by a Binding Request and then silent (``marks["idle"]``
    once open; the caller samples memory then, ``marks["go"]`` set lets it go on), then ``calls`` more,
    each sending one voice packet per 20 ms for ``seconds``; ``marks`` gets the monotonic times when
    all were open and when done."""
    import asyncio

    async def opened() -> tuple:
        reader, writer = await asyncio.open_connection(*relay)
        request = build_binding_request(f"{UFRAG}:benchclient")
        writer.write(len(request).to_bytes(2, "big") + request)
        await reader.readexactly(2 + len(request))
        return reader, writer

    async def batch(n: int) -> list:   # 50 at a time: one by one, the first would idle out (30 s) first
        out = []
        for first in range(0, n, 50):
            out += await asyncio.gather(*(opened() for _ in range(first, min(n, first + 50))))
        return out

    silent = await batch(idle)
    marks["idle"] = time.monotonic()
    while idle and "go" not in marks:
        await asyncio.sleep(0.05)
    conns = await batch(calls)
    marks["open"] = time.monotonic()
    sent = received = 0

    data = _packet(0)
    framed = len(data).to_bytes(2, "big") + data

    async def send(writer) -> None:  # noqa: ANN001
        nonlocal sent
        start = time.monotonic()
        for k in range(int(seconds * 50)):   # on a 20 ms clock; a lost echo stalls nothing
            await asyncio.sleep(max(0.0, start + 0.02 * k - time.monotonic()))
            writer.write(framed)
            sent += 1

    async def receive(reader) -> None:  # noqa: ANN001
        nonlocal received
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await reader.readexactly(len(framed))
                received += 1

    readers = [asyncio.ensure_future(receive(r)) for r, _ in conns]
    await asyncio.gather(*(send(w) for _, w in conns))
    marks["done"] = time.monotonic()
    await asyncio.sleep(0.5)   # the last echoes
    for task in readers:
        task.cancel()
    for _, writer in conns + silent:
        writer.close()
    return {"sent": sent, "received": received}


def _socket_memory(lab: Lab) -> dict:
    """The relay namespace's TCP connections on the ICE-TCP port and its connected UDP sockets: how
    many, and the bytes their buffers hold (ss skmem r + f + w + o + bl), plus the size of one TCP
    and one UDP socket object (/proc/slabinfo, the kernel's own per-socket cost)."""
    def held(argv: list[str]) -> tuple[int, int]:
        out = lab.run(lab.relay_public.netns, argv).stdout
        count = total = 0
        for skmem in out.split("skmem:(")[1:]:
            fields = dict((k.rstrip("0123456789"), int(k[len(k.rstrip("0123456789")):]))
                          for k in skmem.split(")")[0].split(","))
            count += 1
            total += sum(fields.get(k, 0) for k in ("r", "f", "w", "o", "bl"))
        return count, total

    tcp_n, tcp_b = held(["ss", "-Htmn", "state", "established", f"sport = :{TCP_PORT}"])
    udp_n, udp_b = held(["ss", "-Humn", "state", "established"])
    objsize = {}
    for line in open("/proc/slabinfo"):
        fields = line.split()
        if fields and fields[0] in ("TCP", "UDP", "TCPv6", "UDPv6"):
            objsize[fields[0]] = int(fields[3])
    return {"tcp_connections": tcp_n, "tcp_buffer_bytes": tcp_b, "udp_sockets": udp_n, "udp_buffer_bytes": udp_b,
            "socket_object_bytes": objsize}


def concurrent(calls: int, seconds: float, idle: int = 0) -> dict:
    """Many TCP-carried voice calls at once through one relay: the agent's CPU and memory per call,
    and the kernel's socket memory.  With ``idle``, that many routed connections that send nothing
    more are opened first and the memory sampled then (per idle connection).  A lost echo is counted,
    not waited for; when the client or the echo cannot keep up, ``packets_per_call_per_s_achieved``
    says so."""
    import asyncio

    limit = str(calls + idle + 10)
    with _echo_lab(["--max-session-flows", "0", "--tcp-max-per-source", limit,
                    "--tcp-max-connections", limit]) as (lab, pid, _echo):
        rss0, cpu0 = _rss_kib(pid), process_cpu_s(pid)
        marks: dict = {}
        samples: dict = {}

        def run() -> dict:
            loop = asyncio.new_event_loop()
            task = loop.create_task(_calls((lab.relay_public.ip4, TCP_PORT), calls, seconds, marks, idle))
            while "idle" not in marks:
                loop.run_until_complete(asyncio.sleep(0.05))
            samples.update(idle_rss=_rss_kib(pid), idle_kernel=_socket_memory(lab))
            marks["go"] = True
            while "open" not in marks:
                loop.run_until_complete(asyncio.sleep(0.05))
            samples.update(rss=_rss_kib(pid), cpu=process_cpu_s(pid), kernel=_socket_memory(lab))
            result = loop.run_until_complete(task)
            samples["cpu_end"] = process_cpu_s(pid)
            loop.close()
            return result

        result = lab.in_netns(lab.client.netns, run, timeout=calls * 0.5 + seconds + 120)
        result["relay_frames"] = control(lab, lambda c: c.health())["ice_tcp"]["frames"]   # in/out/dropped
        busy = marks["done"] - marks["open"]
        cpu = samples["cpu_end"] - samples["cpu"]
        relayed = 2 * result["received"]
        kernel = samples["kernel"]
        per_conn = kernel["tcp_buffer_bytes"] + kernel["udp_buffer_bytes"]
        return {"calls": calls, "idle": idle, "seconds": round(busy, 2), "packets_per_call_per_s": 50,   # each way
                **result, "kernel_sockets": kernel, "kernel_sockets_idle": samples["idle_kernel"],
                "agent_rss_kib_per_idle_connection": (round((samples["idle_rss"] - rss0) / idle, 1)
                                                      if idle else None),
                "kernel_buffer_bytes_per_connection": round(per_conn / max(1, kernel["tcp_connections"])),
                "agent_cpu_fraction": round(cpu / busy, 3),
                "agent_cpu_ns_per_packet": round(cpu * 1e9 / relayed) if relayed else None,
                "packets_per_call_per_s_achieved": round(result["received"] / calls / busy, 1),
                # a call is 100 relayed packets/s (50 each way)
                "calls_per_core_at_this_cost": round(relayed / (cpu * 100)) if cpu and relayed else None,
                "agent_rss_kib_per_call": round((samples["rss"] - samples["idle_rss"]) / calls, 1),
                "setup_cpu_s": round(samples["cpu"] - cpu0, 3)}


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


def _rss_kib(pid: int) -> int:
    return next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:"))


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
