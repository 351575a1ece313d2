"""The userspace relay (edge/userspace/plane.py) with real packets across a lab.

Three parts: the agent as a process (``edge serve --plane userspace``) in a
lab, driven through the control API and plain UDP sockets in the client and
transceiver namespaces; the ``UserspacePlane`` in this process (on its own
event loop in the relay namespace) for what the agent's 15 s minimum idle time
makes slow (ageing) or what needs its internals named (flow sockets); and one
real aiortc WebRTC call through it.
"""

from __future__ import annotations

import asyncio
import collections
import random
import re
import socket
import struct
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families
from splitrelay.lab.stack import (
    BACKEND_PORT,
    control,
    control_key_file,
    control_url,
    log_file,
    probe,
    probe_result,
    start_agent,
    start_transceiver,
    wait_ready,
    whip_url,
)
from splitrelay.bpf import consts
from splitrelay.wire import hint, stun
from splitrelay.wire.control_client import ControlError
from splitrelay.edge.counters import counter_specs
from splitrelay.edge.records import Backend, DataPlaneError, RelayConfig
from splitrelay.lab.topology import Lab
from splitrelay.edge.plane import PlaneConfig
from splitrelay.edge.routing import RoutingTables, route
from splitrelay.edge.userspace.plane import NO_MAC, OVERHEAD, TableFullError, UserspacePlane

from .conftest import needs_root, relay_ufrags
from .test_relay_lab import EchoServer, client_socket, ping
from .test_webrtc_lab import assert_clean_call
from .waiting import wait_for

pytestmark = needs_root

RTP = bytes([0x80, 0x6F]) + b"\0" * 170
DTLS = bytes([22, 0xFE, 0xFD]) + b"\1" * 90
V4 = OVERHEAD[socket.AF_INET]
V6 = OVERHEAD[socket.AF_INET6]
INGRESS = [spec.name for spec in counter_specs() if spec.direction == "ingress"]
# what the routing decision sees of the relay under test: backends 1 and 2, no session a datagram names, strict
REGISTERED = RoutingTables(backends={i: Backend(i, BACKEND_PORT, NO_MAC, NO_MAC, ip4=f"10.0.0.{i}")
                                     for i in (1, 2)})


def media(i: int) -> bytes:
    return RTP[:2] + i.to_bytes(4, "big") + RTP[6:]


# -- the agent as a process, restartable with other options --------------------------------------

class Relay:
    """The lab's edge agent on the userspace data plane; ``ensure`` restarts it when options change."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.proc: subprocess.Popen | None = None
        self.options: tuple | None = None

    def ensure(self, policy: str = "strict", *extra: str) -> None:
        if self.proc is not None and self.proc.poll() is None and self.options == (policy, extra):
            return
        self.stop()
        self.proc = start_agent(self.lab, policy, list(extra), plane="userspace")
        self.options = (policy, extra)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        proc.wait(timeout=10)
        self.lab.pids.remove(proc.pid)
        self.lab.pid_starts.pop(str(proc.pid), None)

    def call(self, fn):
        return control(self.lab, fn)

    def stats(self) -> dict[str, tuple[int, int]]:
        return {c["name"]: (c["packets"], c["bytes"]) for c in self.call(lambda c: c.stats())["counters"]}

    def register(self, *backend_ids: int) -> None:
        for t in self.lab.transceivers:
            if t.backend_id in backend_ids:
                self.call(lambda c, t=t: c.put_backend(t.backend_id, t.ip4, BACKEND_PORT, t.ip6))

    @property
    def public4(self) -> tuple[str, int]:
        return self.lab.relay_public.ip4, self.lab.relay_port

    @property
    def public6(self) -> tuple[str, int]:
        return self.lab.relay_public.ip6, self.lab.relay_port


def delta(before: dict, after: dict) -> dict[str, tuple[int, int]]:
    """The counters that moved, by how many packets and bytes."""
    out = {}
    for name, (packets, bytes_) in after.items():
        moved = (packets - before[name][0], bytes_ - before[name][1])
        if moved != (0, 0):
            out[name] = moved
    return out


def udp_sockets(lab: Lab, ip: str) -> list[str]:
    """Local addresses of the UDP sockets bound to ``ip`` in the relay namespace (``ss``, not our view)."""
    out = lab.run(lab.relay_public.netns, ["ss", "-Hnau"]).stdout
    return [line.split()[3] for line in out.splitlines() if line.split()[3].rsplit(":", 1)[0].strip("[]") == ip]


@pytest.fixture(scope="module")
def relay_module():
    lab = Lab.create(transceivers=2)
    relay = Relay(lab)
    try:
        yield relay
    finally:
        try:
            lab.destroy()
        finally:
            log_file(lab, "agent").unlink(missing_ok=True)


@pytest.fixture
def relay(relay_module):
    """The strict agent (tests may ``ensure`` other options); every backend, session and flow removed after."""
    relay_module.ensure("strict")
    try:
        yield relay_module
    finally:
        if relay_module.proc is not None and relay_module.proc.poll() is None:
            for b in relay_module.call(lambda c: c.backends()):
                relay_module.call(lambda c, b=b: c.delete_backend(b["id"]))   # sessions and flows go too
            assert relay_module.call(lambda c: c.flows()) == []
            assert relay_module.call(lambda c: c.sessions()) == []


@pytest.fixture
def servers(relay_module):
    """Echo servers on every transceiver's backend port, IPv4 and IPv6: {(backend_id, 4|6): server}."""
    lab = relay_module.lab
    made = {}
    try:
        for t in lab.transceivers:
            made[(t.backend_id, 4)] = EchoServer(t.netns, t.ip4)
            made[(t.backend_id, 6)] = EchoServer(t.netns, t.ip6, socket.AF_INET6)
        yield made
    finally:
        for server in made.values():
            server.close()


@pytest.fixture
def sockets(relay_module):
    """Client sockets in the client namespace, all closed after: ``sockets(family=AF_INET)``."""
    made: list[socket.socket] = []

    def make(family: int = socket.AF_INET) -> socket.socket:
        made.append(client_socket(relay_module.lab, family))
        return made[-1]

    try:
        yield make
    finally:
        for s in made:
            s.close()


class Barrier:
    """A client with a live flow: one echoed packet through the same public socket proves that
    the relay has judged every datagram queued before it (one socket, one thread, in order)."""

    COUNTS = {"IN_FWD_FLOW": 1, "OUT_FWD": 1}

    def __init__(self, relay: Relay, sock: socket.socket, backend_id: int = 1) -> None:
        self.relay, self.sock, self.uses = relay, sock, 0
        relay.call(lambda c: c.put_session("barrierSess", backend_id))
        ping(sock, stun.build_binding_request("barrierSess:bar"), relay.public4)

    def __call__(self) -> None:
        assert ping(self.sock, RTP, self.relay.public4)[0] == RTP
        self.uses += 1

    def subtract(self, moved: dict) -> dict:
        out = dict(moved)
        for name, n in self.COUNTS.items():
            packets, bytes_ = out.pop(name, (0, 0))
            packets -= n * self.uses
            bytes_ -= n * self.uses * (len(RTP) + V4)
            if (packets, bytes_) != (0, 0):
                out[name] = (packets, bytes_)
        return out


# -- the agent: health, metrics, forwarding ------------------------------------------------------

def test_health_stats_and_metrics_name_the_userspace_data_plane(relay):
    health = relay.call(lambda c: c.health())
    assert health["datapath"] == "userspace" and health["policy"] == "strict"
    stats = relay.call(lambda c: c.stats())["counters"]
    assert [c["name"] for c in stats] == [spec.name for spec in counter_specs()]   # the XDP shape
    families = {f.name: f for f in text_string_to_metric_families(relay.call(lambda c: c.metrics()))}
    assert [s.labels for s in families["splitrelay_edge_datapath_info"].samples] == [{"kind": "userspace"}]
    assert families["splitrelay_edge_xdp_info"].samples == []                        # nothing attached
    labelsets = {(s.labels["direction"], s.labels["verdict"], s.labels["reason"])
                 for s in families["splitrelay_edge_packets"].samples}
    assert labelsets == {(spec.direction, spec.verdict, spec.reason) for spec in counter_specs()}
    capacity = {s.labels["map"]: s.value for s in families["splitrelay_edge_map_capacity_entries"].samples}
    assert capacity["sessions"] == 65536 and capacity["backends"] == 1024 and capacity["flows"] >= 1
    up = families["splitrelay_edge_datapath_up"].samples
    assert [s.value for s in up] == [1]


def test_backend_put_needs_no_mac_but_a_route(relay):
    t = relay.lab.transceivers[0]
    answer = relay.call(lambda c: c.put_backend(t.backend_id, t.ip4, BACKEND_PORT, t.ip6))
    assert answer["mac"] == NO_MAC
    with pytest.raises(ControlError) as err:       # outside the internal networks: refused before routing
        relay.call(lambda c: c.put_backend(5, "203.0.113.5", BACKEND_PORT))
    assert err.value.status == 403 and "outside the allowed networks" in str(err.value)
    relay.ensure("strict", "--backend-cidr", "203.0.113.0/24", *[
        arg for net in relay.lab.networks["internal"] for arg in ("--backend-cidr", net)])
    relay.call(lambda c: c.put_backend(t.backend_id, t.ip4, BACKEND_PORT, t.ip6))
    with pytest.raises(ControlError) as err:       # allowed, but the relay has no route to it: not stored
        relay.call(lambda c: c.put_backend(5, "203.0.113.5", BACKEND_PORT))  # outside every lab network
    assert err.value.status == 422 and "no route" in str(err.value)
    assert [b["id"] for b in relay.call(lambda c: c.backends())] == [t.backend_id]


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_first_stun_then_every_class_follows_the_flow(relay, servers, sockets, v6):
    lab = relay.lab
    family, overhead = (socket.AF_INET6, V6) if v6 else (socket.AF_INET, V4)
    public = relay.public6 if v6 else relay.public4
    internal_ip = lab.relay_internal.ip6 if v6 else lab.relay_internal.ip4
    relay.register(1, 2)
    relay.call(lambda c: c.put_session("sessionTwo", 2))
    before = relay.stats()
    client = sockets(family)
    request = stun.build_binding_request("sessionTwo:cli1")
    data, source = ping(client, request, public)
    assert data == request and source[:2] == public                  # the client only sees the relay
    owner = servers[(2, 6 if v6 else 4)]
    [(peer_ip, peer_port)] = owner.peers
    assert peer_ip == internal_ip and peer_port != client.getsockname()[1]   # the relay's flow socket
    assert internal_ip + ":" + str(peer_port) in [a.replace("[", "").replace("]", "")
                                                  for a in udp_sockets(lab, internal_ip)]
    assert all(s.count == 0 for key, s in servers.items() if key[0] == 1)    # only the owner got it
    consent_answer = stun.build_message(stun.BINDING_SUCCESS, [(stun.ATTR_SOFTWARE, b"test")])
    packets = [media(i) for i in range(100)] + [DTLS] * 10 + [consent_answer] + [request]
    for packet in packets:
        data, source = ping(client, packet, public)
        assert data == packet and source[:2] == public
    assert owner.peers == {(peer_ip, peer_port)}                      # one flow, one socket, throughout
    moved = delta(before, relay.stats())
    sent = [request] + packets
    by_flow = sent[1:-1]
    assert moved == {
        "IN_FWD_STUN_UFRAG": (2, 2 * (len(request) + overhead)),     # the first request and the refresh
        "IN_FWD_FLOW": (len(by_flow), sum(len(p) + overhead for p in by_flow)),
        "OUT_FWD_CONFIRM": (1, len(request) + overhead),             # the echoed request: the backend's check
        "OUT_FWD": (len(sent) - 1, sum(len(p) + overhead for p in sent[1:])),
    }
    [flow] = relay.call(lambda c: c.flows())
    client_ip = lab.client.ip6 if v6 else lab.client.ip4
    host = f"[{client_ip}]" if v6 else client_ip
    assert flow["client"] == f"{host}:{client.getsockname()[1]}" and flow["backend"] == 2
    assert flow["packets"] == flow["rx_packets"] == len(sent)
    assert flow["bytes"] == flow["rx_bytes"] == sum(len(p) + overhead for p in sent)
    assert flow["ufrag"] == "sessionTwo" and 0 <= flow["idle_s"] <= flow["age_s"]
    assert [s["flows"] for s in relay.call(lambda c: c.sessions())] == [1]


def unregistered_hint() -> str:
    return hint.encode(77) + ":cli"


DROPS = {
    "unknown-ufrag": (lambda: stun.build_binding_request("strangerX:cli1"), "IN_DROP_UNKNOWN_UFRAG"),
    "hint-strict": (lambda: stun.build_binding_request(hint.encode(1) + ":c"), "IN_DROP_UNKNOWN_UFRAG"),
    "hint-unregistered-backend": (lambda: stun.build_binding_request(unregistered_hint()), "IN_DROP_NO_BACKEND"),
    "rtp-first": (lambda: media(1), "IN_DROP_NO_FLOW"),
    "dtls-first": (lambda: DTLS, "IN_DROP_NO_FLOW"),
    "stun-answer-first": (lambda: stun.build_message(stun.BINDING_SUCCESS), "IN_DROP_NO_FLOW"),
    "zrtp": (lambda: bytes([16]) + b"\0" * 30, "IN_DROP_UNKNOWN_CLASS"),
    "turn-channel": (lambda: bytes([0x40, 0, 0, 4]) + b"\0" * 4, "IN_DROP_UNKNOWN_CLASS"),
    "unassigned": (lambda: b"\xff" * 20, "IN_DROP_UNKNOWN_CLASS"),
    "empty": (lambda: b"", "IN_DROP_UNKNOWN_CLASS"),
    "bad-cookie": (lambda: struct.pack("!HHI", 1, 0, 0x12345678) + b"\0" * 12, "IN_DROP_BAD_STUN"),
    "short-header": (lambda: b"\x00\x01\x00\x00\x21\x12", "IN_DROP_BAD_STUN"),
    "length-overrun": (lambda: struct.pack("!HHI", 1, 400, stun.MAGIC_COOKIE) + b"\0" * 12, "IN_DROP_BAD_STUN"),
    "no-username": (lambda: stun.build_message(stun.BINDING_REQUEST, [(stun.ATTR_PRIORITY, b"\0\0\0\1")]),
                    "IN_DROP_NO_USERNAME"),
    "short-ufrag": (lambda: stun.build_binding_request("abc:cli1"), "IN_DROP_BAD_USERNAME"),
    "no-colon": (lambda: stun.build_binding_request("sessionWithoutColon"), "IN_DROP_BAD_USERNAME"),
    "bad-char": (lambda: stun.build_binding_request("bad-ufrag:cli1"), "IN_DROP_BAD_USERNAME"),
}


def test_drops_are_counted_with_the_xdp_names_and_reach_nobody(relay, servers, sockets):
    relay.register(1)
    barrier = Barrier(relay, sockets())
    before = relay.stats()
    expected: collections.Counter = collections.Counter()
    expected_bytes: collections.Counter = collections.Counter()
    for case, (build, counter) in DROPS.items():
        payload = build()
        assert route(payload, REGISTERED).counter == counter, case   # the routing decision agrees with the table
        sockets().sendto(payload, relay.public4)    # a fresh client each: no flow to follow
        expected[counter] += 1
        expected_bytes[counter] += len(payload) + V4
    barrier()
    moved = barrier.subtract(delta(before, relay.stats()))
    assert moved == {name: (expected[name], expected_bytes[name]) for name in expected}
    served = servers[(1, 4)]
    assert served.count == 1 + barrier.uses and len(served.peers) == 1   # only the barrier's flow
    assert [f["ufrag"] for f in relay.call(lambda c: c.flows())] == ["barrierSess"]


def fuzz_datagrams(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    bases = [stun.build_binding_request(u) for u in
             ("fuzzUfrag1:cli", hint.encode(1) + ":x", hint.encode(99) + ":x", "ab:cd", "x" * 40 + ":y")]
    out = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            data = rng.randbytes(rng.randrange(0, 300))
        elif kind == 1:
            first = rng.choice([0, 1, 2, 3, 16, 20, 63, 64, 79, 80, 127, 128, 191, 192, 255])
            data = bytes([first]) + rng.randbytes(rng.randrange(0, 200))
        elif kind == 2:
            data = bytearray(rng.choice(bases))
            if rng.random() < 0.5:
                data = data[:rng.randrange(0, len(data))]
            else:
                for _ in range(rng.randrange(1, 4)):
                    data[rng.randrange(0, len(data))] = rng.randrange(256)
            data = bytes(data)
        else:
            cookie = stun.MAGIC_COOKIE if rng.random() < 0.8 else rng.getrandbits(32)
            data = struct.pack("!HHI", rng.choice([1, 1, 0x101, 0x111, rng.getrandbits(14)]),
                               rng.choice([0, 4, 8, rng.randrange(0, 300)]), cookie)
            data += rng.randbytes(12) + rng.randbytes(rng.randrange(0, 120))
        out.append(data)
    return out


def test_any_bytes_are_judged_like_the_reference_and_never_stop_the_relay(relay, servers, sockets):
    relay.register(1, 2)
    barrier = Barrier(relay, sockets())
    fuzzer = sockets()
    datagrams = fuzz_datagrams(800, seed=7983)
    expected = collections.Counter(route(d, REGISTERED).counter for d in datagrams)   # no flow, no session matches
    assert len(expected) >= 7                      # the corpus reaches most drop reasons
    before = relay.stats()
    for start in range(0, len(datagrams), 50):     # bounded bursts: the relay's socket buffer never overflows
        for d in datagrams[start:start + 50]:
            fuzzer.sendto(d, relay.public4)
        barrier()                                  # the relay judged them all and still forwards
    moved = barrier.subtract(delta(before, relay.stats()))
    assert {name: packets for name, (packets, _) in moved.items()} == dict(expected)
    assert relay.proc.poll() is None
    assert servers[(1, 4)].count == 1 + barrier.uses and servers[(2, 4)].count == 0


def test_requests_nobody_answers_hold_only_the_pending_ring_and_carry_no_media(relay, sockets):
    """As in XDP (relay.c enter_pending_ring): a backend that never answers (no server behind it)
    leaves each flow pending, a ufrag keeps its last PENDING_FLOWS of them, and none carries media."""
    relay.register(1)
    relay.call(lambda c: c.put_session("pendSess", 1))
    spoofers = [sockets() for _ in range(consts.PENDING_FLOWS + 2)]
    before = relay.stats()
    for s in spoofers:
        s.sendto(stun.build_binding_request("pendSess:evil"), relay.public4)
    wait_for(lambda: delta(before, relay.stats()).get("IN_FWD_STUN_UFRAG", (0, 0))[0] == len(spoofers), 5,
             "every request forwarded")
    flows = relay.call(lambda c: c.flows())
    assert len(flows) == consts.PENDING_FLOWS and all(f["pending"] for f in flows)
    assert [s["flows_opened"] for s in relay.call(lambda c: c.sessions())] == [0]   # no allowance used
    for s in spoofers:
        s.sendto(RTP, relay.public4)
    wait_for(lambda: delta(before, relay.stats()).get("IN_DROP_PENDING", (0, 0))[0] == consts.PENDING_FLOWS, 5,
             "media of the pending flows dropped")
    assert delta(before, relay.stats())["IN_DROP_NO_FLOW"][0] == 2              # the two the ring replaced
    relay.call(lambda c: c.delete_session("pendSess"))
    assert relay.call(lambda c: c.flows()) == []                                # pending flows go with it


def test_session_flow_allowance_then_session_delete_closes_its_flows(relay, servers, sockets):
    lab = relay.lab
    relay.register(1)
    relay.call(lambda c: c.put_session("allowance", 1))
    clients = [sockets() for _ in range(6)]
    before = relay.stats()
    request = stun.build_binding_request("allowance:cli")
    for s in clients[:4]:
        assert ping(s, request, relay.public4)[0] == request
    for s in clients[4:]:                          # beyond the allowance of 4: refused, counted
        s.sendto(request, relay.public4)
    wait_for(lambda: delta(before, relay.stats()).get("IN_DROP_SESSION_FLOWS", (0, 0))[0] == 2, 5,
             "two refusals")
    assert [s["flows"] for s in relay.call(lambda c: c.sessions())] == [4]
    assert len(relay.call(lambda c: c.flows())) == 4
    for s in clients[:4]:
        assert ping(s, RTP, relay.public4)[0] == RTP
    assert len(udp_sockets(lab, lab.relay_internal.ip4)) == 4     # one socket per flow
    relay.call(lambda c: c.delete_session("allowance"))
    assert relay.call(lambda c: c.flows()) == []
    assert udp_sockets(lab, lab.relay_internal.ip4) == []         # their sockets closed
    before = relay.stats()
    for s in clients[:4]:
        s.sendto(RTP, relay.public4)
    wait_for(lambda: delta(before, relay.stats()).get("IN_DROP_NO_FLOW", (0, 0))[0] == 4, 5, "four no_flow drops")
    assert servers[(1, 4)].count == 4 + 4


def test_flow_table_full_refuses_new_flows_and_never_evicts(relay, servers, sockets):
    relay.ensure("strict", "--max-flows", "3")
    relay.register(1, 2)
    relay.call(lambda c: c.put_session("firstSess", 1))
    relay.call(lambda c: c.put_session("secondSes", 2))
    live = [sockets() for _ in range(3)]
    for s in live:
        ping(s, stun.build_binding_request("firstSess:c"), relay.public4)
    before = relay.stats()
    late = sockets()
    late.sendto(stun.build_binding_request("secondSes:c"), relay.public4)
    wait_for(lambda: "IN_DROP_FLOW_FULL" in delta(before, relay.stats()), 5, "a flow_table_full drop")
    for s in live:                                 # every live call goes on
        assert ping(s, RTP, relay.public4)[0] == RTP
    assert {f["ufrag"] for f in relay.call(lambda c: c.flows())} == {"firstSess"}
    families = {f.name: f for f in text_string_to_metric_families(relay.call(lambda c: c.metrics()))}
    fill = {s.labels["map"]: s.value for s in families["splitrelay_edge_map_entries"].samples}
    capacity = {s.labels["map"]: s.value for s in families["splitrelay_edge_map_capacity_entries"].samples}
    assert fill["flows"] == capacity["flows"] == 3
    relay.call(lambda c: c.delete_session("firstSess"))   # room again: the next request gets in
    request = stun.build_binding_request("secondSes:c")
    assert ping(late, request, relay.public4)[0] == request
    assert servers[(2, 4)].count == 1


def test_hint_policy_routes_without_a_session_and_backend_delete_removes_the_flow(relay, servers, sockets):
    relay.ensure("hint")
    relay.register(1, 2)
    assert relay.call(lambda c: c.health())["policy"] == "hint"
    ufrag = hint.encode(2)
    request = stun.build_binding_request(ufrag + ":cli")
    client = sockets()
    before = relay.stats()
    assert ping(client, request, relay.public4)[0] == request
    assert ping(client, RTP, relay.public4)[0] == RTP
    moved = delta(before, relay.stats())
    assert moved["IN_FWD_STUN_HINT"][0] == 1 and moved["IN_FWD_FLOW"][0] == 1 and moved["OUT_FWD"][0] == 1 \
        and moved["OUT_FWD_CONFIRM"][0] == 1   # the echoed request confirmed the flow
    assert servers[(2, 4)].count == 2 and servers[(1, 4)].count == 0
    assert relay.call(lambda c: c.sessions()) == []
    assert [(f["ufrag"], f["backend"]) for f in relay.call(lambda c: c.flows())] == [(ufrag, 2)]
    stray = sockets()
    before = relay.stats()
    stray.sendto(stun.build_binding_request(unregistered_hint()), relay.public4)
    wait_for(lambda: "IN_DROP_NO_BACKEND" in delta(before, relay.stats()), 5, "an unregistered_backend drop")
    relay.call(lambda c: c.delete_backend(2))      # the hint-opened flow goes with its backend
    assert relay.call(lambda c: c.flows()) == []
    before = relay.stats()
    client.sendto(RTP, relay.public4)
    wait_for(lambda: "IN_DROP_NO_FLOW" in delta(before, relay.stats()), 5, "a no_flow drop")


def test_keyed_hints_route_and_forged_ones_are_dropped(relay, servers, sockets, tmp_path):
    key = bytes(range(16))
    key_file = tmp_path / "hint.key"
    key_file.write_text(key.hex())
    relay.ensure("hint", "--hint-key-file", str(key_file))
    relay.register(1)
    good = hint.encode(1, key=key)
    forged = good[:12] + ("AAAA" if good[12:] != "AAAA" else "BBBB")
    assert hint.inspect(forged, key) == hint.FORGED
    request = stun.build_binding_request(good + ":cli")
    before = relay.stats()
    assert ping(sockets(), request, relay.public4)[0] == request
    sockets().sendto(stun.build_binding_request(forged + ":cli"), relay.public4)
    sockets().sendto(stun.build_binding_request(hint.encode(1) + ":cli"), relay.public4)   # v1: not with a key
    wait_for(lambda: {"IN_DROP_FORGED_HINT", "IN_DROP_UNKNOWN_UFRAG"} <= set(delta(before, relay.stats())), 5,
             "the forged and the unkeyed hint dropped")
    moved = delta(before, relay.stats())
    assert {k: v[0] for k, v in moved.items()} == {"IN_FWD_STUN_HINT": 1, "OUT_FWD_CONFIRM": 1,
                                                   "IN_DROP_FORGED_HINT": 1, "IN_DROP_UNKNOWN_UFRAG": 1}
    assert [f["ufrag"] for f in relay.call(lambda c: c.flows())] == [good]


NO_BCC = ("import sys; sys.modules['bcc'] = None; "      # any `import bcc` now raises ImportError
          "from splitrelay.cli.main import main; main(prog_name='splitrelay')")


def test_the_userspace_agent_needs_no_bcc(relay_module, servers, sockets):
    relay = relay_module
    relay.stop()                                     # this agent takes the relay port and the control port
    lab = relay.lab
    argv = [sys.executable, "-c", NO_BCC, "-v", "edge", "serve", lab.relay_public.ifname,
            "--internal", lab.relay_internal.ifname, "--public-ip", lab.relay_public.ip4,
            "--listen", f"{control_url(lab).removeprefix('http://')}", "--instance", lab.name,
            "--plane", "userspace", "--token-file", str(control_key_file(lab))]  # no gateway: kernel routes
    path = log_file(lab, "nobcc")
    with path.open("w") as out:
        proc = lab.popen(lab.relay_public.netns, argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    try:
        wait_ready(proc, path, "edge agent ready", "edge agent without bcc")
        relay.register(1)
        relay.call(lambda c: c.put_session("noBccSess", 1))
        request = stun.build_binding_request("noBccSess:c")
        assert ping(sockets(), request, relay.public4)[0] == request
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        lab.pids.remove(proc.pid)
        path.unlink(missing_ok=True)
    assert proc.returncode == 0


# -- the data path in this process ---------------------------------------------------------------

INPROC_PORT = 3490


def run_relay_here(lab: Lab, scenario, max_flows: int | None = None):
    """``scenario(dp)`` on a fresh event loop in the relay namespace, with a UserspacePlane on
    INPROC_PORT (beside the agent's), every socket closed after."""
    async def main():
        common = PlaneConfig(public_iface=lab.relay_public.ifname, internal_iface=lab.relay_internal.ifname,
                             public_ip4=lab.relay_public.ip4, instance="inproc", max_flows=max_flows,
                             internal_ip4=lab.relay_internal.ip4, internal_ip6=lab.relay_internal.ip6)
        dp = UserspacePlane(common)
        dp.configure(RelayConfig(relay_port=INPROC_PORT, public_ip4=lab.relay_public.ip4,
                                 public_ip6=lab.relay_public.ip6))
        for t in lab.transceivers:
            dp.set_backend(Backend(t.backend_id, BACKEND_PORT, NO_MAC, NO_MAC, ip4=t.ip4, ip6=t.ip6))
        dp.relay.start()
        try:
            return await asyncio.wait_for(scenario(dp), 30)
        finally:
            dp.relay.close()

    return lab.in_netns(lab.relay_public.netns, lambda: asyncio.run(main()), timeout=60)


async def aping(sock: socket.socket, payload: bytes, dest: tuple, timeout: float = 2.0) -> bytes:
    loop = asyncio.get_running_loop()
    await loop.sock_sendto(sock, payload, dest)
    data, _ = await asyncio.wait_for(loop.sock_recvfrom(sock, 4096), timeout)
    return data


def test_ageing_removes_idle_flows_and_closes_their_sockets(relay_module, servers, sockets):
    lab = relay_module.lab
    client = sockets()
    client.setblocking(False)
    dest = (lab.relay_public.ip4, INPROC_PORT)

    async def scenario(dp: UserspacePlane) -> None:
        dp.set_session("ageMe123", 1)
        request = stun.build_binding_request("ageMe123:c")
        assert await aping(client, request, dest) == request
        internal = dp.flow_socket_name((lab.client.ip4, client.getsockname()[1]))
        assert internal is not None and internal[0] == lab.relay_internal.ip4
        assert dp.age_flows(60) == 0                          # not idle long enough
        assert dp.age_flows(0) == 1 and dp.flows() == []
        assert dp.sessions()[0].flows == 0                    # the allowance is back
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as reuse:
            reuse.bind(internal)                              # its port is free again: the socket closed
        await asyncio.get_running_loop().sock_sendto(client, RTP, dest)
        while dp.counters()["IN_DROP_NO_FLOW"].packets == 0:  # judged on this loop: yield until it is
            await asyncio.sleep(0.01)

    run_relay_here(lab, scenario)
    assert servers[(1, 4)].count == 1


def test_a_moved_backend_takes_its_flows_along(relay_module, servers, sockets):
    lab = relay_module.lab
    t1 = lab.transceivers[0]
    client = sockets()
    client.setblocking(False)
    dest = (lab.relay_public.ip4, INPROC_PORT)

    def make_server() -> socket.socket:
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        other.bind((t1.ip4, BACKEND_PORT + 1))
        other.setblocking(False)
        return other

    other = lab.in_netns(t1.netns, make_server)

    async def scenario(dp: UserspacePlane) -> int:
        loop = asyncio.get_running_loop()
        dp.set_session("moveMe12", 1)
        await aping(client, stun.build_binding_request("moveMe12:c"), dest)
        before = dp.flow_socket_name((lab.client.ip4, client.getsockname()[1]))
        dp.set_backend(Backend(1, BACKEND_PORT + 1, NO_MAC, NO_MAC, ip4=t1.ip4))   # moved, and no IPv6 now
        await loop.sock_sendto(client, RTP, dest)
        data, peer = await asyncio.wait_for(loop.sock_recvfrom(other, 4096), 2)
        assert data == RTP and peer == before                 # same flow socket, new destination
        await loop.sock_sendto(other, b"\x80reply", peer)     # and its answer still reaches the client
        reply, source = await asyncio.wait_for(loop.sock_recvfrom(client, 4096), 2)
        assert reply == b"\x80reply" and source == dest
        return dp.flows()[0].packets

    try:
        assert run_relay_here(lab, scenario) == 2
    finally:
        other.close()
    assert servers[(1, 4)].count == 1


def test_a_taken_relay_port_fails_start_and_leaves_nothing_bound(relay_module):
    lab = relay_module.lab

    def scenario() -> None:
        taken = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        taken.bind((lab.relay_public.ip6, INPROC_PORT))
        try:
            async def main() -> None:
                dp = UserspacePlane(PlaneConfig(public_iface="pub", internal_iface="int", public_ip4="192.0.2.1",
                                                max_flows=4))
                dp.configure(RelayConfig(relay_port=INPROC_PORT, public_ip4=lab.relay_public.ip4,
                                         public_ip6=lab.relay_public.ip6))
                taken_port = re.escape(f"cannot bind the relay port [{lab.relay_public.ip6}]:3490")
                with pytest.raises(DataPlaneError, match=taken_port):
                    dp.relay.start()
                assert not dp.relay.running
            asyncio.run(main())
        finally:
            taken.close()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as free:
            free.bind((lab.relay_public.ip4, INPROC_PORT))   # the IPv4 socket it had bound was closed

    lab.in_netns(lab.relay_public.netns, scenario, timeout=30)


def test_tables_refuse_when_full_with_typed_errors():
    dp = UserspacePlane(PlaneConfig(public_iface="pub", internal_iface="int", public_ip4="192.0.2.1", max_flows=8))
    dp.max_sessions, dp.max_backends = 2, 1
    dp.set_backend(Backend(1, 5000, NO_MAC, NO_MAC, ip4="198.18.0.1"))
    with pytest.raises(TableFullError):
        dp.set_backend(Backend(2, 5000, NO_MAC, NO_MAC, ip4="198.18.0.2"))
    dp.set_backend(Backend(1, 5001, NO_MAC, NO_MAC, ip4="198.18.0.1"))        # an update still fits
    dp.set_session("first1", 1)
    dp.set_session("second", 1)
    dp.set_session("first1", 1)
    with pytest.raises(TableFullError):
        dp.set_session("third3", 1)
    with pytest.raises(DataPlaneError):
        dp.set_session("abc", 1)
    assert dp.map_fill() == {"backends": (1, 1), "backend_addrs": (1, 2), "sessions": (2, 2), "flows": (0, 8)}
    assert [c.packets for c in dp.counters().values()] == [0] * len(counter_specs())
    with pytest.raises(DataPlaneError):
        dp.relay.start()                                  # not configured


# -- a real WebRTC call -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def voice_lab():
    lab = Lab.create(transceivers=1)
    try:
        start_agent(lab, plane="userspace")
        start_transceiver(lab, lab.transceivers[0], "echo")
        yield lab
    finally:
        try:
            lab.destroy()
        finally:
            for name in ("agent", "t1"):
                log_file(lab, name).unlink(missing_ok=True)


def test_voice_session_through_the_userspace_relay(voice_lab):
    lab = voice_lab
    before = {c["name"]: c["packets"] for c in control(lab, lambda c: c.stats())["counters"]}
    proc = probe(lab, [whip_url(lab.transceivers[0])], duration=3)
    flows = wait_for(lambda: control(lab, lambda c: c.flows()), 20, "the session's flow", proc)
    assert {f["backend"] for f in flows} == {1}
    assert all(f["client"].startswith(lab.client.ip4 + ":") for f in flows)  # the relay sees the client
    [report] = probe_result(proc, 60)
    assert_clean_call(report)
    after = {c["name"]: c["packets"] for c in control(lab, lambda c: c.stats())["counters"]}
    assert after["IN_FWD_STUN_UFRAG"] > before["IN_FWD_STUN_UFRAG"]
    assert after["IN_FWD_FLOW"] - before["IN_FWD_FLOW"] > 100        # media went through the userspace relay
    assert after["OUT_FWD"] - before["OUT_FWD"] > 100
    assert not {f["ufrag"] for f in flows} & relay_ufrags(lab)           # DELETE ended it on the relay too
    assert control(lab, lambda c: c.flows()) == []
    assert control(lab, lambda c: c.health())["datapath"] == "userspace"
