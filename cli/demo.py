"""`splitrelay demo`: a lab, one media session through XDP, a live status line, a summary.

Until the aiortc transceiver lands (issue: transceiver), the session is a
voice-shaped UDP stream: the client opens it with a real ICE STUN Binding
Request carrying the server ufrag, then sends 50 packets/s of RTP-sized
datagrams that a responder on the transceiver host echoes back.  Every packet
crosses the relay only through XDP (its kernel forwards nothing).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from splitrelay.cli.labstack import BACKEND_PORT, control, start_lab, stop_lab
from splitrelay.edge import hint, stun
from splitrelay.edge.lab import Lab, in_netns


@dataclass
class DemoReport:
    lab: str
    relay_public: str
    seconds: float
    first_packet_rtt_ms: float | None = None
    packets_sent: int = 0
    packets_echoed: int = 0
    rtt_ms_p50: float | None = None
    rtt_ms_p99: float | None = None
    counters: dict[str, int] = field(default_factory=dict)
    transceiver_saw_client: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def run_demo(seconds: float = 10.0, on_status: Callable[[str], None] | None = None) -> DemoReport:
    info = start_lab(transceivers=2, handler=None)
    lab = Lab.load(info["name"])
    try:
        return _session(lab, info, seconds, on_status or (lambda line: None))
    finally:
        stop_lab(lab.name)


def _session(lab: Lab, info: dict, seconds: float, on_status: Callable[[str], None]) -> DemoReport:
    owner = lab.transceivers[-1]
    ufrag = hint.encode(owner.backend_id)
    control(lab, lambda c: c.put_session(ufrag, owner.backend_id))
    report = DemoReport(lab=lab.name, relay_public=info["relay_public"], seconds=seconds)

    responder = in_netns(owner.netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    responder.bind((owner.ip4, BACKEND_PORT))
    responder.settimeout(0.2)
    stop = threading.Event()
    seen: list[str] = []

    def echo() -> None:
        while not stop.is_set():
            try:
                data, peer = responder.recvfrom(2048)
            except TimeoutError:
                continue
            seen.append(f"{peer[0]}:{peer[1]}")
            responder.sendto(data, peer)

    worker = threading.Thread(target=echo, daemon=True)
    worker.start()
    client = in_netns(lab.client.netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    client.settimeout(1.0)
    relay = (lab.relay_public.ip4, lab.relay_port)
    rtts: list[float] = []
    try:
        t0 = time.perf_counter()
        client.sendto(stun.build_binding_request(f"{ufrag}:demo"), relay)
        client.recvfrom(2048)
        report.first_packet_rtt_ms = round((time.perf_counter() - t0) * 1000, 3)
        deadline = time.monotonic() + seconds
        next_send = time.monotonic()
        last_status = 0.0
        while time.monotonic() < deadline:
            packet = bytes([0x80, 0x6F]) + report.packets_sent.to_bytes(4, "big") + b"\x55" * 160
            sent_at = time.perf_counter()
            client.sendto(packet, relay)
            report.packets_sent += 1
            try:
                data, source = client.recvfrom(2048)
                if data == packet and source[:2] == relay:
                    report.packets_echoed += 1
                    rtts.append((time.perf_counter() - sent_at) * 1000)
            except TimeoutError:
                pass
            if time.monotonic() - last_status >= 0.5:
                last_status = time.monotonic()
                flows = control(lab, lambda c: c.flows())
                stats = {c["name"]: c["packets"] for c in control(lab, lambda c: c.stats())["counters"]}
                on_status(f"sent {report.packets_sent}  echoed {report.packets_echoed}  "
                          f"xdp in {stats['IN_FWD_FLOW'] + stats['IN_FWD_STUN_UFRAG']}  "
                          f"out {stats['OUT_FWD']}  flows {len(flows)}  "
                          f"rtt p50 {_percentile(rtts, 0.5)} ms")
            next_send += 0.02  # 50 packets/s, like 20 ms Opus frames
            time.sleep(max(0.0, next_send - time.monotonic()))
        counters = control(lab, lambda c: c.stats())["counters"]
        report.counters = {f"{c['direction']}/{c['verdict']}/{c['reason']}": c["packets"]
                           for c in counters if c["packets"]}
        report.rtt_ms_p50 = _percentile(rtts, 0.5)
        report.rtt_ms_p99 = _percentile(rtts, 0.99)
        report.transceiver_saw_client = seen[0] if seen else None
    finally:
        stop.set()
        worker.join(timeout=2)
        responder.close()
        client.close()
    return report
