"""The ICE-TCP benches' lab: a UDP echo behind one relay, and a client's UDP and ICE-TCP paths to it.

bench/ice_tcp_path.py measures through these; each path is opened with a Binding
Request for ``UFRAG`` as ICE opens it, TCP with RFC 4571 frames.
"""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

from splitrelay.lab.stack import TCP_PORT, control, start_lab, stop_lab
from splitrelay.lab.host import BACKEND_PORT
from splitrelay.lab.topology import Lab
from splitrelay.wire.stun import build_binding_request

UFRAG = "benchtcpufrag"
SPLICE_PORT = 8443                 # the splice experiment's listener, beside the agent's TCP_PORT
PAYLOAD = 172                      # RTP header + a 20 ms Opus frame at ~64 kb/s
ECHO = ("import socket,sys\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind((sys.argv[1],int(sys.argv[2])))\n"
        "while True:\n d,a=s.recvfrom(4096); s.sendto(d,a)\n")


def voice_packet(seq: int) -> bytes:
    return bytes([0x80, 0x6F]) + struct.pack("!I", seq) + bytes(PAYLOAD - 6)


class UdpPath:
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


class TcpPath:
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


def echo_block(path, seqs: range) -> list[float]:  # noqa: ANN001
    rtts = []
    for seq in seqs:
        data = voice_packet(seq)
        start = time.perf_counter_ns()
        if path.exchange(data) != data:
            raise ConnectionError(f"echo {seq} came back changed")
        rtts.append((time.perf_counter_ns() - start) / 1000)
    return rtts


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {"p50_us": at(0.50), "p99_us": at(0.99), "p999_us": at(0.999),
            "mean_us": round(statistics.mean(values), 1), "samples": len(values)}


def _agent_pid(lab: Lab) -> int:
    out = lab.run(lab.relay_public.netns, ["ss", "-Htlnp", f"sport = :{TCP_PORT}"]).stdout
    return int(out.split("pid=")[1].split(",")[0])


@contextlib.contextmanager
def echo_lab(agent_args: list[str] | None = None, impair=None) -> Iterator[tuple[Lab, int, int]]:  # noqa: ANN001
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
def splice_bridge(lab: Lab) -> Iterator[tuple[int, list[int]]]:
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
