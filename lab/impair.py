"""A lossy, slow link for the lab: one-way delay, jitter and random loss on UDP, with a bounded queue.

This kernel has no netem qdisc (htb, tbf and clsact exist, none of which delays
or drops at random), so the lab puts a small forwarder on the link instead: a
namespace of its own with two veths, ``ia`` towards side A and ``ib`` towards
side B, and one process that copies every Ethernet frame from one to the other
through AF_PACKET sockets.  It is a transparent L2 wire: neither side sees an
address change, only time and loss.

API (everything else in this module is the forwarder's own business)::

    Impairment(delay_ms=0, jitter_ms=0, loss=0.0, queue=1000, directions="both", seed=None)
        what each impaired direction does to a UDP frame: drop it with probability
        ``loss`` (0..1), else hold it delay_ms ± jitter_ms (uniform, never < 0) and
        send it; frames keep their order (a frame never leaves before the one ahead
        of it, as a jitter buffer sees a real path).  A direction holds at most
        ``queue`` frames; a frame arriving at a full queue is dropped and counted
        (``overflow``).  ``directions``: "both", "ab" (A to B only) or "ba".
        ``seed`` makes the loss and jitter draws repeatable; ``tcp`` impairs TCP as well.
    Lab.create(..., impair=Impairment(...))         # the client's link (A = client, B = relay)
    start_forwarder(lab, link, Impairment(...))    # what Lab.create runs for each impaired link
    start_lab(..., impair=Impairment(...)) / `splitrelay lab up --delay-ms --jitter-ms --loss`
    set_impairment(lab, link, Impairment(...))     # change it while the lab runs (SIGHUP)
    read_stats(lab, link) -> {"ab": {...}, "ba": {...}}   # received, forwarded, lost, overflow, queued, peak
    ``link`` names an impaired link of the lab: "client" (relay 1's), or "relayN" (lab/topology.py).

Only UDP (IPv4 protocol 17, IPv6 next header 17), and TCP with ``tcp``, is impaired; ARP, neighbour
discovery and everything else cross at once, so a lossy link never breaks
neighbour resolution (netem would: the agent resolves its gateway at start).
The delay is one-way: with "both", a round trip grows by twice ``delay_ms``.

The forwarder stops by itself: after ``--lifetime`` seconds, when one of its
interfaces disappears (the lab's namespaces were deleted), or on SIGTERM; the lab
also stops it by PID like every daemon it starts.  Stats are written to a file
at most every 0.2 s and at exit.  Its cost: one Python process, about 20 µs of
CPU per frame, which is plenty for voice (50 frames/s each way per call) and not
meant for the benchmark's packet rates.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import json
import os
import random
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from splitrelay.lab.netns import LabError
from splitrelay.lab.state import STATE_DIR

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_OUTGOING = 4
DIRECTIONS = ("both", "ab", "ba")
STATS_EVERY = 0.2
SO_RCVBUFFORCE = 33
RCVBUF = 4 << 20


@dataclass(frozen=True)
class Impairment:
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    queue: int = 1000
    directions: str = "both"
    seed: int | None = None
    tcp: bool = False              # TCP too (ICE-TCP's head-of-line blocking; issue 20)

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise LabError(f"delay and jitter must be >= 0 ms, got {self.delay_ms} and {self.jitter_ms}")
        if not 0.0 <= self.loss <= 1.0:
            raise LabError(f"loss is a probability 0..1, got {self.loss}")
        if not 1 <= self.queue <= 1_000_000:
            raise LabError(f"queue must hold 1..1000000 frames, got {self.queue}")
        if self.directions not in DIRECTIONS:
            raise LabError(f"directions must be one of {', '.join(DIRECTIONS)}, got {self.directions!r}")

    def applies(self, direction: str) -> bool:
        return self.directions in ("both", direction)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Impairment:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


# -- driving it from the lab --------------------------------------------------------------

def config_path(lab, link: str) -> Path:  # noqa: ANN001 - a lab.topology.Lab
    return STATE_DIR / f"{lab.name}-{link}.impair"


def stats_path(lab, link: str) -> Path:  # noqa: ANN001
    return config_path(lab, link).with_suffix(".impair-stats")


def argv(config: Path, stats: Path, lifetime: float | None = None) -> list[str]:
    """The forwarder's command line (run it inside the link's impairment namespace)."""
    args = [sys.executable, "-m", "splitrelay.lab.impair", "--config", str(config), "--stats", str(stats)]
    return args + (["--lifetime", str(lifetime)] if lifetime else [])


def start_forwarder(lab, link: str, impairment: Impairment) -> None:  # noqa: ANN001 - a lab.topology.Lab
    """The forwarder of an impaired link, running once its stats file appears."""
    config, stats = config_path(lab, link), stats_path(lab, link)
    config.write_text(json.dumps(impairment.to_json()))
    proc = lab.popen(lab.impaired[link]["netns"], argv(config, stats),
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lab.impaired[link]["pid"] = proc.pid
    lab.save()
    deadline = time.monotonic() + 10.0
    while not stats.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            why = proc.stderr.read().strip() if proc.poll() is not None else "no stats after 10 s"
            raise LabError(f"impairment forwarder of link {link} did not start: {why}")
        time.sleep(0.02)


def set_impairment(lab, link: str, impairment: Impairment) -> None:  # noqa: ANN001
    """Change a running link's impairment; it applies to frames that arrive from now on."""
    entry = lab.impaired.get(link)
    if entry is None:
        links = ", ".join(lab.impaired) or "none"
        raise LabError(f"lab {lab.name} has no impaired link {link!r} (it has: {links})")
    path = config_path(lab, link)
    generation = _stats(lab, link).get("generation", 0)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(impairment.to_json()))
    tmp.replace(path)
    os.kill(entry["pid"], signal.SIGHUP)
    deadline = time.monotonic() + 5.0
    while _stats(lab, link).get("generation", 0) <= generation:   # applied: stats say so at once
        if time.monotonic() > deadline:
            raise LabError(f"the forwarder of link {link!r} did not take the new impairment within 5 s")
        time.sleep(0.01)


def _stats(lab, link: str) -> dict:  # noqa: ANN001
    try:
        return json.loads(stats_path(lab, link).read_text())
    except (OSError, ValueError):
        return {}


def read_stats(lab, link: str) -> dict[str, dict[str, int]]:  # noqa: ANN001
    """Per direction ("ab", "ba"), UDP frames: received, forwarded, lost, overflow (queue full), queued now,
    peak (the most queued since the impairment was last set)."""
    stats = _stats(lab, link)
    if "directions" not in stats:
        raise LabError(f"no stats for impaired link {link!r} of lab {lab.name}")
    return stats["directions"]


# -- the forwarder ------------------------------------------------------------------------

def _ip_protocol(frame: bytes) -> int | None:
    """The IPv4 protocol or IPv6 next header of an Ethernet frame (17 UDP, 6 TCP), None if not IP."""
    ethertype, offset = struct.unpack_from("!H", frame, 12)[0], 14
    if ethertype == 0x8100 and len(frame) >= 18:      # one 802.1Q tag
        ethertype, offset = struct.unpack_from("!H", frame, 16)[0], 18
    if ethertype == 0x0800 and len(frame) > offset + 9:
        return frame[offset + 9]
    if ethertype == 0x86DD and len(frame) > offset + 6:
        return frame[offset + 6]
    return None


def _packet_socket(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((ifname, ETH_P_ALL))
    mreq = struct.pack("iHH8s", socket.if_nametoindex(ifname), PACKET_MR_PROMISC, 0, b"")
    sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)   # frames for either side's MACs
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)   # a burst waits here, not in the kernel's drops
    sock.setblocking(False)
    return sock


class Forwarder:
    """Copies frames between two interfaces, holding and dropping UDP as the impairment says."""

    def __init__(self, a: str, b: str, config: Path, stats: Path) -> None:
        self.config, self.stats_file = config, stats
        self.socks = {"ab": (_packet_socket(a), _packet_socket(b)), "ba": (_packet_socket(b), _packet_socket(a))}
        self.load()
        self.heap: list[tuple[float, int, str, bytes]] = []
        self.queued = {"ab": 0, "ba": 0}
        self.last_release = {"ab": 0.0, "ba": 0.0}
        self.counts = {d: {"received": 0, "forwarded": 0, "lost": 0, "overflow": 0, "peak": 0} for d in self.socks}
        self.seq = 0
        self.reload = False

    def load(self) -> None:
        self.impairment = Impairment.from_json(json.loads(self.config.read_text()))
        self.rng = random.Random(self.impairment.seed)
        self.generation = getattr(self, "generation", 0) + 1
        for count in getattr(self, "counts", {}).values():
            count["peak"] = 0       # the peak is per impairment setting

    def receive(self, direction: str, now: float) -> None:
        inbound, outbound = self.socks[direction]
        for _ in range(64):   # bounded batch, so the other direction and the timers are not starved
            try:
                frame, addr = inbound.recvfrom(65535)
            except BlockingIOError:
                return
            except OSError as exc:
                raise SystemExit(f"impair: the link went away ({exc.strerror})") from None
            if addr[2] == PACKET_OUTGOING:
                continue       # our own transmission on this interface
            imp = self.impairment
            if not (imp.applies(direction) and _ip_protocol(frame) in ((17, 6) if imp.tcp else (17,))):
                self._send(outbound, frame)
                continue
            count = self.counts[direction]
            count["received"] += 1
            if imp.loss and self.rng.random() < imp.loss:
                count["lost"] += 1
                continue
            if self.queued[direction] >= imp.queue:
                count["overflow"] += 1
                continue
            hold = max(0.0, imp.delay_ms + self.rng.uniform(-imp.jitter_ms, imp.jitter_ms)) / 1000
            release = max(now + hold, self.last_release[direction])   # in order
            self.last_release[direction] = release
            self.seq += 1
            heapq.heappush(self.heap, (release, self.seq, direction, frame))
            self.queued[direction] += 1
            count["peak"] = max(count["peak"], self.queued[direction])

    def release_due(self, now: float) -> None:
        while self.heap and self.heap[0][0] <= now:
            _, _, direction, frame = heapq.heappop(self.heap)
            self.queued[direction] -= 1
            self._send(self.socks[direction][1], frame)
            self.counts[direction]["forwarded"] += 1

    @staticmethod
    def _send(sock: socket.socket, frame: bytes) -> None:
        try:
            sock.send(frame)
        except OSError as exc:
            if exc.errno in (errno.ENETDOWN, errno.ENODEV, errno.ENXIO):
                raise SystemExit(f"impair: the link went away ({exc.strerror})") from None
            # full veth queue (EAGAIN) or a GRO-merged frame over the MTU (EMSGSIZE): lost, as on a wire

    def write_stats(self) -> None:
        data = {"pid": os.getpid(), "generation": self.generation, "impairment": self.impairment.to_json(),
                "directions": {d: {**c, "queued": self.queued[d]} for d, c in self.counts.items()}}
        tmp = self.stats_file.with_suffix(".tmp-stats")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.stats_file)

    def run(self, lifetime: float | None) -> None:
        stop = False

        def on_term(*_: object) -> None:
            nonlocal stop
            stop = True

        def on_hup(*_: object) -> None:
            self.reload = True

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGHUP, on_hup)
        selector = selectors.DefaultSelector()
        for direction, (inbound, _) in self.socks.items():
            selector.register(inbound, selectors.EVENT_READ, direction)
        deadline = time.monotonic() + lifetime if lifetime else float("inf")
        next_stats = 0.0
        try:
            while not stop:
                now = time.monotonic()
                if now >= deadline:
                    break
                if self.reload:
                    self.reload = False
                    self.load()
                    next_stats = now      # tell set_impairment() at once
                self.release_due(now)
                if now >= next_stats:
                    self.write_stats()
                    next_stats = now + STATS_EVERY
                wake = min(deadline, next_stats, self.heap[0][0] if self.heap else float("inf"))
                try:
                    events = selector.select(max(0.0, wake - time.monotonic()))
                except InterruptedError:
                    continue
                now = time.monotonic()
                for key, mask in events:
                    if mask & selectors.EVENT_READ:
                        self.receive(key.data, now)
                # an interface that vanished (namespace deleted) makes recv/send fail: SystemExit above
        finally:
            self.write_stats()


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="splitrelay.lab.impair", description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", default="ia", help="interface towards side A")
    parser.add_argument("--b", default="ib", help="interface towards side B")
    parser.add_argument("--config", type=Path, required=True, help="JSON Impairment, re-read on SIGHUP")
    parser.add_argument("--stats", type=Path, required=True, help="where the counters are written")
    parser.add_argument("--lifetime", type=float, help="stop after this many seconds")
    opts = parser.parse_args(args)
    try:
        forwarder = Forwarder(opts.a, opts.b, opts.config, opts.stats)
    except OSError as exc:
        raise SystemExit(f"impair: {exc}") from None
    print(f"impair ready: {opts.a} <-> {opts.b} {forwarder.impairment}", file=sys.stderr, flush=True)
    forwarder.run(opts.lifetime)


if __name__ == "__main__":
    main()
