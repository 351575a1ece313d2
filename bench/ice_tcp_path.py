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
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import subprocess
import sys
import time

from splitrelay.bench.forwarding import _prog_ids, _prog_stats
from splitrelay.bench.system import bpf_run_time_stats, machine, process_cpu_s
from splitrelay.lab.stack import TCP_PORT, control, start_lab, stop_lab
from splitrelay.lab.topology import BACKEND_PORT, Lab
from splitrelay.wire.stun import build_binding_request

UFRAG = "benchtcpufrag"
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
        self.sock.send(data)
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
        self.sock.sendall(len(data).to_bytes(2, "big") + data)
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


def measure(count: int, blocks: int) -> dict:
    info = start_lab(transceivers=1, translate=True, handler=None)
    lab = Lab.load(info["name"])
    try:
        t = lab.transceivers[0]
        echo = lab.popen(t.netns, [sys.executable, "-c", ECHO, t.ip4, str(BACKEND_PORT)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        control(lab, lambda c: c.put_session(UFRAG, t.backend_id))
        time.sleep(0.5)   # the echo binds (a lost first request would only be retried by hand)
        pid, progs = _agent_pid(lab), _prog_ids(lab)
        per_block = count // blocks
        rtts: dict[str, list[float]] = {"udp": [], "tcp": []}
        cpu = {"udp": 0.0, "tcp": 0.0}
        xdp = {"udp": 0, "tcp": 0}

        def run() -> None:
            paths = {"udp": _UdpPath((lab.relay_public.ip4, lab.relay_port)),
                     "tcp": _TcpPath((lab.relay_public.ip4, TCP_PORT))}
            with bpf_run_time_stats():
                for b in range(blocks):
                    for name, path in paths.items():
                        cpu0, xdp0 = process_cpu_s(pid), _prog_stats(progs).run_time_ns
                        rtts[name] += _block(path, range(b * per_block, (b + 1) * per_block))
                        cpu[name] += process_cpu_s(pid) - cpu0
                        xdp[name] += _prog_stats(progs).run_time_ns - xdp0

        lab.in_netns(lab.client.netns, run, timeout=count * 0.1 + 120)
        echo.terminate()
        relayed = 2 * per_block * blocks
        udp, tcp = _percentiles(rtts["udp"]), _percentiles(rtts["tcp"])
        return {
            "machine": machine(), "count": per_block * blocks, "blocks": blocks, "payload_bytes": PAYLOAD,
            "rtt": {"udp_xdp": udp, "tcp_userspace": tcp},
            "added_rtt_us": {k: round(tcp[k] - udp[k], 1) for k in ("p50_us", "p99_us", "p999_us")},
            "relay_cpu_ns_per_packet": {
                "udp_xdp_program": round(xdp["udp"] / relayed),
                "tcp_agent_process": round(cpu["tcp"] * 1e9 / relayed),
                "udp_agent_process": round(cpu["udp"] * 1e9 / relayed)},   # ~0: XDP never wakes the agent
        }
    finally:
        stop_lab(info["name"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=6000, help="echoes per path (default 6000)")
    parser.add_argument("--blocks", type=int, default=6, help="alternating blocks per path (default 6)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = measure(args.count, args.blocks)
    print(json.dumps(report, indent=2) if args.json else
          f"RTT p50/p99/p99.9 us: UDP {report['rtt']['udp_xdp']}, TCP {report['rtt']['tcp_userspace']}; "
          f"added {report['added_rtt_us']}; relay ns/packet {report['relay_cpu_ns_per_packet']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
