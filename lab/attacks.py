"""Attacks on a running lab's data plane, each against a live call: ``splitrelay lab attack``.

Issue 22 §3/§5: every attack a stranger can send at the relay's public port is run here the way an
operator would try it, from inside the lab's client namespace (never the host), while an aiortc
call through relay 1 talks (``stack.probe``).  Each reports what it sent, the flows the relay made
for it, the bytes that reached an address that never asked for them, and whether the call kept its
audio (its echoed beeps); ``defended`` says the defence held.

``ATTACKS`` is a small table (name, what it tries, the function that runs it).  Besides the data
plane's, two try the signaling a stranger reaches: listing the calls on the public WHIP listener, and
ending or moving someone else's call with a valid offer token of the stranger's own.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from ipaddress import ip_address

from splitrelay.bpf import consts
from splitrelay.bpf.consts import Policy
from splitrelay.lab import stack
from splitrelay.lab.netns import LabError, in_netns, netns_socket
from splitrelay.lab.host import BACKEND_PORT
from splitrelay.lab.topology import Lab
from splitrelay.wire import hint, stun
from splitrelay.wire.udp import ipv4_udp

CALL_SECONDS = 5.0          # a live call talks this long; the attack runs in its first half
CONNECT_TIMEOUT_S = 20.0    # a call's confirmed flow appears within this (a loaded machine: seconds)
AUDIO_KEPT = 0.8            # a call kept its audio if at least this share of its beeps came back
SETTLE_S = 1.0              # after an attack, how long its effects (retransmitted checks) are counted
VICTIM_HOST = 200           # the non-consenting address: host .200 of the client's public network


@dataclass
class AttackReport:
    name: str
    description: str
    packets_sent: int = 0
    bytes_sent: int = 0
    flows_created: int = 0
    bytes_reflected: int = 0         # bytes the relay sent to an address that never asked for them
    call_kept_audio: bool | None = None
    defended: bool = False
    skipped: str | None = None
    details: dict = field(default_factory=dict)

    @property
    def amplification(self) -> float:
        return self.bytes_reflected / self.bytes_sent if self.bytes_sent else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "amplification": round(self.amplification, 3)}


class Target:
    """What an attack reaches: the lab's client namespace to send from, relay 1's agent to observe."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.relay = (lab.relay_public.ip4, lab.relay_port)
        self.owner = lab.transceivers[0]            # the live call's transceiver (lab.stack.whip_url)

    def control(self, fn):  # noqa: ANN001, ANN201
        return stack.control(self.lab, fn)

    def flows(self) -> list[dict]:
        return self.control(lambda c: c.flows(limit=100000))

    def sessions(self) -> list[dict]:
        return self.control(lambda c: c.sessions())

    def counters(self) -> dict[str, tuple[int, int]]:
        return {c["name"]: (c["packets"], c["bytes"]) for c in self.control(lambda c: c.stats())["counters"]}

    def policy(self) -> str:
        return self.control(lambda c: c.health())["policy"]

    def send_from_ports(self, payload: bytes, ports: int, repeat: int = 1) -> tuple[int, int]:
        """``payload`` to the relay's public port from ``ports`` fresh sockets of the client namespace."""
        socks = [netns_socket(self.lab.client.netns) for _ in range(ports)]
        try:
            for _ in range(repeat):
                for s in socks:
                    s.sendto(payload, self.relay)
        finally:
            for s in socks:
                s.close()
        return ports * repeat, ports * repeat * len(payload)

    def send_spoofed(self, payload: bytes, src: tuple[str, int], dst: tuple[str, int],
                     repeat: int = 1) -> tuple[int, int]:
        """``payload`` from a source (address, port) the client namespace does not own (IPv4, raw socket)."""
        frame = ipv4_udp(src, dst, payload)
        raw = netns_socket(self.lab.client.netns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        try:
            for _ in range(repeat):
                raw.sendto(frame, (dst[0], 0))
        finally:
            raw.close()
        return repeat, repeat * len(payload)


# -- a live call ----------------------------------------------------------------------------------

class LiveCall:
    """An aiortc call through relay 1 (``stack.probe``) and its confirmed flow at the relay."""

    def __init__(self, target: Target, seconds: float = CALL_SECONDS) -> None:
        self.target = target
        self.known = {f["client"] for f in target.flows()}
        self.proc = stack.probe(target.lab, [stack.whip_url(target.owner)], seconds)
        self.flow = self._await_flow(self.known)

    def media_flow(self) -> dict:
        """The call's flow that carries its media now (the busiest of its confirmed flows)."""
        time.sleep(0.5)   # the call talks: its nominated pair's flow pulls ahead
        mine = [f for f in self.target.flows() if f["client"] not in self.known and not f.get("pending")
                and f["client"].startswith(self.target.lab.client.ip4 + ":")]
        self.flow = max(mine, key=lambda f: f["packets"]) if mine else self.flow
        return self.flow

    def _await_flow(self, known: set[str]) -> dict:
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            mine = [f for f in self.target.flows() if f["client"] not in known and not f.get("pending")
                    and f["client"].startswith(self.target.lab.client.ip4 + ":")]
            if mine:
                return max(mine, key=lambda f: f["packets"])
            time.sleep(0.1)
        self.proc.kill()
        raise LabError("the live call did not connect through relay 1 (no confirmed flow)")

    @property
    def client(self) -> tuple[str, int]:
        host, port = self.flow["client"].rsplit(":", 1)
        return host, int(port)

    def kept_audio(self) -> tuple[bool, dict]:
        [report] = stack.probe_result(self.proc, timeout=CALL_SECONDS + CONNECT_TIMEOUT_S + 10)
        sent, heard = report["beeps_sent"], report["beeps_heard"]
        kept = bool(report["ok"] and sent and heard >= AUDIO_KEPT * sent)
        return kept, {"beeps_sent": sent, "beeps_heard": heard}


def _new_flows(before: list[dict], after: list[dict], ufrag: str | None = None) -> list[dict]:
    seen = {f["client"] for f in before}
    return [f for f in after if f["client"] not in seen and (ufrag is None or f["ufrag"] == ufrag)]


# -- the attacks -----------------------------------------------------------------------------------

def lockout_during(spoofs: int) -> Callable[[Target, AttackReport], None]:
    """(a) during a call: requests naming its ufrag from ``spoofs`` other ports."""
    def run(target: Target, report: AttackReport) -> None:
        call = LiveCall(target)
        before = target.flows()
        request = stun.build_binding_request(call.flow["ufrag"] + ":evil")
        report.packets_sent, report.bytes_sent = target.send_from_ports(request, spoofs, repeat=3)
        time.sleep(SETTLE_S)
        report.flows_created = len(_new_flows(before, target.flows(), call.flow["ufrag"]))
        report.call_kept_audio, report.details = call.kept_audio()
        report.defended = report.call_kept_audio
    return run


def lockout_before(spoofs: int) -> Callable[[Target, AttackReport], None]:
    """(a) before a call: requests naming every ufrag the transceiver has ready, then the call connects."""
    def run(target: Target, report: AttackReport) -> None:
        owner = target.owner.backend_id
        ready = [s["ufrag"] for s in target.sessions() if s["backend"] == owner and not s["flows_opened"]]
        before = target.flows()
        for ufrag in ready:
            packets, size = target.send_from_ports(stun.build_binding_request(ufrag + ":evil"), spoofs)
            report.packets_sent += packets
            report.bytes_sent += size
        report.flows_created = len(_new_flows(before, target.flows()))
        try:
            call = LiveCall(target)
        except LabError as exc:
            report.call_kept_audio, report.details = False, {"error": str(exc), "ready_ufrags": len(ready)}
            return
        report.call_kept_audio, report.details = call.kept_audio()
        report.details["ready_ufrags"] = len(ready)
        report.defended = report.call_kept_audio
    return run


def takeover(target: Target, report: AttackReport) -> None:
    """(b) RTP-Bleed style: from the call's own 5-tuple, requests naming another backend's session."""
    call = LiveCall(target)
    call.media_flow()
    other = next((s["ufrag"] for s in target.sessions() if s["backend"] != call.flow["backend"]), None)
    if other is None:
        report.skipped = "needs a session on a second transceiver (lab up --transceivers 2)"
        call.kept_audio()
        return
    before = target.counters().get("IN_DROP_TAKEOVER", (0, 0))[0]
    moved = False
    for _ in range(5):       # over ~1.5 s: a consent check in between must not hide a move
        packets, size = target.send_spoofed(stun.build_binding_request(other + ":evil"), call.client, target.relay)
        report.packets_sent, report.bytes_sent = report.packets_sent + packets, report.bytes_sent + size
        time.sleep(0.3)
        after = next((f for f in target.flows() if f["client"] == call.flow["client"]), None)
        moved = moved or after is None or after["backend"] != call.flow["backend"]
    report.flows_created = int(moved)
    report.call_kept_audio, report.details = call.kept_audio()
    report.details["counted_flow_takeover"] = target.counters().get("IN_DROP_TAKEOVER", (0, 0))[0] - before
    report.defended = not moved and report.call_kept_audio


def hint_flood(target: Target, report: AttackReport) -> None:
    """(c) under the hint policy, one routing-hint ufrag no session holds, from 100 ports."""
    if target.policy() != Policy.HINT:
        report.skipped = "needs a lab with --policy hint"
        return
    call = LiveCall(target)
    ufrag = hint.encode(target.owner.backend_id)
    before = target.flows()
    report.packets_sent, report.bytes_sent = target.send_from_ports(
        stun.build_binding_request(ufrag + ":evil"), 100)
    time.sleep(SETTLE_S)
    report.flows_created = len(_new_flows(before, target.flows(), ufrag))
    report.call_kept_audio, report.details = call.kept_audio()
    report.details["allowance"] = consts.DEFAULT_SESSION_FLOWS
    report.defended = report.flows_created <= consts.DEFAULT_SESSION_FLOWS and report.call_kept_audio


class Sink:
    """The non-consenting address: an extra address in the client namespace counting what reaches it."""

    def __init__(self, lab: Lab, ports: range) -> None:
        self.lab = lab
        net = ip_address(lab.client.ip4)
        self.ip = str(ip_address(int(net) - (int(net) & 0xFF) + VICTIM_HOST))
        lab.run(lab.client.netns, ["ip", "addr", "add", f"{self.ip}/32", "dev", lab.client.ifname])
        self.socks = [netns_socket(lab.client.netns) for _ in ports]
        for s, port in zip(self.socks, ports, strict=True):
            s.bind((self.ip, port))
            s.settimeout(0.05)
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._count, daemon=True)
        self._thread.start()

    def _count(self) -> None:
        while not self._stop.is_set():
            for s in self.socks:
                try:
                    self.bytes += len(s.recv(65536)) + 42   # as the relay counts: Ethernet + IPv4 + UDP headers
                except (TimeoutError, OSError):
                    pass

    def close(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        for s in self.socks:
            s.close()
        self.lab.run(self.lab.client.netns, ["ip", "addr", "del", f"{self.ip}/32", "dev", self.lab.client.ifname])
        return self.bytes


def reflector_offer(target: Target, report: AttackReport, candidates: int = 50) -> None:
    """(d) a WHIP offer whose candidates all name an address that never asked: does the relay carry the
    transceiver's checks there, and how many bytes per byte the attacker sent?"""
    call = LiveCall(target)
    ports = range(47000, 47000 + candidates)
    sink = Sink(target.lab, ports)
    before = target.flows()
    try:
        offer = in_netns(target.lab.client.netns, lambda: asyncio.run(_offer_sdp()))
        offer = _with_candidates(offer, [(sink.ip, p) for p in ports])
        # a caller the app let in (a valid offer token) who names a victim instead of itself
        token = stack.whip_token(target.lab)
        location = in_netns(target.lab.client.netns, lambda: _post(stack.whip_url(target.owner), offer, token))
        report.packets_sent, report.bytes_sent = 1, len(offer)
        time.sleep(3 * SETTLE_S + 1.0)        # the transceiver's checks and their retransmissions
        report.flows_created = len([f for f in _new_flows(before, target.flows())
                                    if f["client"].startswith(sink.ip + ":")])
        if location:
            in_netns(target.lab.client.netns, lambda: _delete(location))
    finally:
        report.bytes_reflected = sink.close()
    report.call_kept_audio, report.details = call.kept_audio()
    report.details["candidates"] = candidates
    report.defended = report.amplification <= 1.0 and report.call_kept_audio


def backend_spoof(target: Target, report: AttackReport) -> None:
    """(d) datagrams from a transceiver's own (address, port), sent at the relay's public side, to a third
    party: a relay that SNATs them is a reflector hiding the attacker."""
    call = LiveCall(target)
    before = target.counters()
    third_party = ("198.51.100.77", 9)    # TEST-NET-2: routed to the relay by the client's default route
    packets, size = 0, 0
    for _ in range(20):
        p, s = target.send_spoofed(b"\x80" * 160, (target.owner.ip4, BACKEND_PORT), third_party)
        packets, size = packets + p, size + s
    time.sleep(SETTLE_S)
    report.packets_sent, report.bytes_sent = packets, size
    after = target.counters()
    reflected = after.get("OUT_FWD_NO_FLOW", (0, 0))[1] - before.get("OUT_FWD_NO_FLOW", (0, 0))[1]
    report.bytes_reflected = reflected
    report.call_kept_audio, report.details = call.kept_audio()
    report.details["counted_backend_on_public"] = (after.get("IN_DROP_BACKEND_SPOOF", (0, 0))[0]
                                                   - before.get("IN_DROP_BACKEND_SPOOF", (0, 0))[0])
    report.defended = reflected == 0 and report.call_kept_audio


async def _offer_sdp() -> str:
    from aiortc import RTCPeerConnection

    pc = RTCPeerConnection()
    try:
        pc.addTransceiver("audio")
        await pc.setLocalDescription(await pc.createOffer())
        return pc.localDescription.sdp
    finally:
        await pc.close()


def _with_candidates(sdp: str, targets: list[tuple[str, int]]) -> str:
    """``sdp`` with its candidates replaced by host candidates naming ``targets``."""
    lines = [line for line in sdp.splitlines() if not line.startswith(("a=candidate", "a=end-of-candidates"))]
    at = max(i for i, line in enumerate(lines) if line.startswith("a=ice-pwd")) + 1
    fake = [f"a=candidate:{i} 1 udp {2130706431 - i} {ip} {port} typ host" for i, (ip, port) in enumerate(targets)]
    return "\r\n".join(lines[:at] + fake + ["a=end-of-candidates"] + lines[at:]) + "\r\n"


def _post(url: str, sdp: str, token: str) -> str | None:
    headers = {"Content-Type": "application/sdp", "Authorization": f"Bearer {token}"}
    request = urllib.request.Request(url, data=sdp.encode(), method="POST", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as resp:
        location = resp.headers.get("Location")
    return urllib.parse.urljoin(url, location) if location else None


def _status(method: str, url: str, token: str | None = None) -> tuple[int, bytes]:
    """An HTTP request's status and body; an error status is an answer, not an exception."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if method == "PATCH":
        headers.update({"Content-Type": "application/trickle-ice-sdpfrag", "If-Match": "*"})
    body = b"a=ice-ufrag:evil\r\na=ice-pwd:evilevilevilevilevilevil\r\n" if method == "PATCH" else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method=method, headers=headers),
                                    timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def list_calls(target: Target, report: AttackReport) -> None:
    """§1: with no credential, ask the public WHIP listener for the calls, the ended ones and the metrics."""
    call = LiveCall(target)
    base = stack.whip_url(target.owner).removesuffix("/whip")
    answers = {}
    for path in ("/sessions", "/sessions?ended=1", "/metrics", "/whip/sessions", "/workers"):
        status, body = in_netns(target.lab.client.netns, lambda path=path: _status("GET", base + path))
        answers[path] = status
        report.packets_sent += 1
        report.bytes_sent += len(f"GET {path} HTTP/1.1\r\n\r\n")
        leaked = call.flow["ufrag"].encode() in body
        answers[path + " names the call"] = leaked
    report.call_kept_audio, report.details = call.kept_audio()
    report.details["answers"] = answers
    report.defended = (all(status == 404 for path, status in answers.items() if not path.endswith("call"))
                       and not any(v for k, v in answers.items() if k.endswith("call")) and report.call_kept_audio)


def stranger_hangup(target: Target, report: AttackReport) -> None:
    """§1: a stranger with an offer token of its own DELETEs and PATCHes someone's call by every name it
    could have learnt (its public id from a log, its ufrag from the wire, a guessed capability)."""
    call = LiveCall(target)
    mine = [s for s in json.loads(stack.admin_get(target.lab, stack.admin_url(target.owner), "/sessions"))
            if s["ufrag"] == call.flow["ufrag"]]
    names = [s["id"] for s in mine] + [call.flow["ufrag"], "0" * 22, "AAAAAAAAAAAAAAAAAAAAAA"]
    token = stack.whip_token(target.lab)
    answers = {}
    for name in names:
        for method in ("DELETE", "PATCH"):
            url = f"{stack.whip_url(target.owner)}/sessions/{urllib.parse.quote(name, safe='')}"
            status, _ = in_netns(target.lab.client.netns, lambda m=method, u=url: _status(m, u, token))
            answers[f"{method} {name}"] = status
            report.packets_sent += 1
    report.call_kept_audio, report.details = call.kept_audio()
    report.details["answers"] = answers
    report.defended = all(status == 404 for status in answers.values()) and report.call_kept_audio


def _delete(url: str) -> None:
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=5).close()
    except OSError:
        pass


@dataclass(frozen=True)
class Attack:
    name: str
    description: str
    run: Callable[[Target, AttackReport], None]


ATTACKS: dict[str, Attack] = {a.name: a for a in (
    Attack("lockout-4", "4 requests with a live call's ufrag from other ports, during it", lockout_during(4)),
    Attack("lockout-64", "64 requests with a live call's ufrag from other ports, during it", lockout_during(64)),
    Attack("lockout-before-4", "4 requests per ready ufrag from other ports, then a call", lockout_before(4)),
    Attack("lockout-before-64", "64 requests per ready ufrag from other ports, then a call", lockout_before(64)),
    Attack("takeover", "requests from a live call's 5-tuple naming another transceiver's session", takeover),
    Attack("hint-flood", "one routing-hint ufrag no session holds, from 100 ports (--policy hint)", hint_flood),
    Attack("reflector-offer", "a WHIP offer with 50 candidates naming an address that never asked",
           reflector_offer),
    Attack("backend-spoof", "a transceiver's source address sent at the public side, toward a third party",
           backend_spoof),
    Attack("list-calls", "GET the calls, ended calls and metrics from the public WHIP listener, no credential",
           list_calls),
    Attack("stranger-hangup", "DELETE and PATCH a live call by its public id, ufrag or a guess, with the "
           "stranger's own offer token", stranger_hangup),
)}


def run_attacks(lab: Lab, names: list[str] | None = None) -> list[AttackReport]:
    """Run the named attacks (all by default) one after another against ``lab``; one report each."""
    unknown = [n for n in names or [] if n not in ATTACKS]
    if unknown:
        raise LabError(f"no such attack: {', '.join(unknown)} (known: {', '.join(ATTACKS)})")
    target = Target(lab)
    reports = []
    for name in names or list(ATTACKS):
        attack = ATTACKS[name]
        report = AttackReport(attack.name, attack.description)
        attack.run(target, report)
        reports.append(report)
    return reports


def reports_json(reports: list[AttackReport]) -> str:
    return json.dumps([r.to_dict() for r in reports])
