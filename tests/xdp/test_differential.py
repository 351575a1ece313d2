"""The XDP program against the routing decision it implements (``edge.routing.route``), on fuzzed payloads.

Every payload a client could send to the relay port goes through ``xdp_public``
(BPF_PROG_TEST_RUN) and through ``route``: the counter, the verdict, the
rewrite and the flow's ufrag must agree; the same translating (the source
becomes the relay's internal address and the flow's port).  Every packet a
backend or a forger could send on the internal side of a translating relay goes
through ``xdp_internal`` and ``route_reply``, likewise.  ``make fuzz FUZZ_EXAMPLES=N`` runs N
cases with no per-test timeout and prints a progress line as it goes
(SPLITRELAY_FUZZ_PROGRESS=1) and the count of cases run at the end.
"""

from __future__ import annotations

import os
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import raw
from splitrelay.bpf.testrun import XDP_REDIRECT
from splitrelay.edge.records import Backend
from splitrelay.edge.routing import PortHolder, RoutingTables, route, route_reply
from splitrelay.wire import hint, stun

from .. import packets as P
from .harness import INTERNAL_IP4, INTERNAL_IP4_B, PORTS, V, counts, internal, public

INTERNAL_IP4S = (INTERNAL_IP4, INTERNAL_IP4_B)   # translating: the relay's two internal address sets
OTHER_BACKEND, OTHER_BACKEND_IP = 8, "10.1.0.8"   # a second backend with session 'othr'

EXAMPLES = int(os.environ.get("SPLITRELAY_FUZZ_EXAMPLES", "1500"))
PROGRESS = os.environ.get("SPLITRELAY_FUZZ_PROGRESS") == "1"
PROGRESS_EVERY_S = 10.0

_usernames = st.text(alphabet=st.sampled_from("evtjBA+/:xyz09 -é\x00"), max_size=40)


@st.composite
def client_payloads(draw):
    """Valid requests, requests with odd usernames, and byte-level mutations and truncations of them."""
    username = draw(st.one_of(st.just("evtj:h6vY"), st.just("othr:h6vY"), _usernames,
                              st.builds(lambda b: hint.encode(b) + ":c", st.integers(1, 300))))
    raw_ = bytearray(stun.build_binding_request(username, fingerprint=draw(st.booleans())))
    for _ in range(draw(st.integers(0, 3))):
        raw_[draw(st.integers(0, len(raw_) - 1))] = draw(st.integers(0, 255))
    whole = draw(st.booleans())   # half the cases whole: a uniform cut made a routable request rare
    return bytes(raw_) if whole else bytes(raw_[: draw(st.integers(0, len(raw_)))])


class Progress:
    """Counts the cases run; with SPLITRELAY_FUZZ_PROGRESS=1 prints a line every PROGRESS_EVERY_S."""

    def __init__(self) -> None:
        self.cases = 0
        self.started = self.last = time.monotonic()

    def tick(self) -> None:
        self.cases += 1
        now = time.monotonic()
        if PROGRESS and now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            print(f"fuzz: {self.cases} cases, {self.cases / (now - self.started):.0f}/s, no disagreement so far",
                  file=sys.stderr, flush=True)

    def report(self) -> str:
        return f"fuzz: {self.cases} cases run in {time.monotonic() - self.started:.0f} s: XDP and route() agreed"


# The client's flow before the fuzzed packet: none, pending or confirmed toward the session's backend (7),
# or confirmed toward another backend's session (RTP-Bleed: a request naming 'evtj' must not move it).
FLOW_STATES = {"none": None, "pending": ("evtj", False), "confirmed": ("evtj", True), "other": ("othr", True)}


def _set_up_flow(relay, state: str, translate: bool) -> None:
    """Put the client's flow in ``state`` the way a client and its backend would: a request, an answer."""
    if FLOW_STATES[state] is None:
        return
    ufrag, answered = FLOW_STATES[state]
    result = public(relay, P.udp_frame(stun.build_binding_request(ufrag + ":h6vY")))
    assert result.verdict == XDP_REDIRECT, result.name
    if answered:
        sent = Ether(result.data)
        backend = relay.backend(relay.flow((P.CLIENT_IP4, P.CLIENT_PORT)).backend_id)
        to = (sent[IP].src, sent[UDP].sport) if translate else (P.CLIENT_IP4, P.CLIENT_PORT)
        answer = P.udp_frame(V["2.2"], src=backend.ip4, dst=to[0], sport=backend.port, dport=to[1],
                             src_mac=P.BACKEND_MAC, dst_mac=P.RELAY_INT_MAC)
        assert internal(relay, answer).verdict == XDP_REDIRECT
    relay.reset_counters()


@pytest.mark.parametrize("translate", [False, True], ids=["dnat", "translate"])
def test_differential_fuzz_xdp_agrees_with_the_routing_decision(request, translate):
    relay = request.getfixturevalue("xlate2" if translate else "relay")   # translating: two internal addresses
    relay.set_backend(Backend(OTHER_BACKEND, P.BACKEND_PORT, P.BACKEND_MAC, P.RELAY_INT_MAC, ip4=OTHER_BACKEND_IP))
    relay.set_session("othr", OTHER_BACKEND)
    tables = RoutingTables.snapshot(relay)   # nothing below changes them but the client's one flow
    progress = Progress()

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(payload=client_payloads(), state=st.sampled_from(sorted(FLOW_STATES)))
    def one_case(payload: bytes, state: str) -> None:
        relay.reset_counters()
        if translate:   # the last case's flow gives its port straight back (no reply can be on its way)
            relay.ports.release([f.internal_pair for f in relay.flows()])
            relay.ports.return_due(now=float("inf"))
        relay.bpf[b"flows"].clear()
        relay.bpf[b"pending"].clear()
        relay.recount_session_flows()  # give the session its allowance back
        _set_up_flow(relay, state, translate)
        before = relay.flow((P.CLIENT_IP4, P.CLIENT_PORT))
        result = public(relay, P.udp_frame(payload))
        expected = route(payload, tables, flow_backend=before.backend_id if before else None,
                         flow_pending=bool(before and before.pending))
        assert counts(relay) == {expected.counter: 1}, payload.hex()
        assert (result.verdict == XDP_REDIRECT) == expected.forwarded, payload.hex()
        if not expected.forwarded:
            assert result.data == P.udp_frame(payload)  # a dropped packet is not rewritten
        else:  # the reference rewrite: DNAT + MACs, checksums computed from scratch by scapy
            after = relay.flow((P.CLIENT_IP4, P.CLIENT_PORT))
            assert after.ufrag == (expected.ufrag or before.ufrag)
            assert after.pending == (expected.opens_flow or before.pending)
            backend = tables.backends[expected.backend_id]
            want = Ether(P.udp_frame(payload))
            want.src, want.dst = backend.smac, backend.dmac
            want[IP].dst, want[UDP].dport = backend.ip4, backend.port
            if translate:   # from an internal address and a port of the pool: the pair the flow holds
                flow = relay.flow((P.CLIENT_IP4, P.CLIENT_PORT))
                assert PORTS[0] <= flow.internal_port <= PORTS[1]
                want[IP].src, want[UDP].sport = INTERNAL_IP4S[flow.internal_set], flow.internal_port
                used_sets.add(flow.internal_set)
            del want[IP].chksum
            del want[UDP].chksum
            assert result.data == raw(want)
        progress.tick()

    used_sets: set[int] = set()
    one_case()
    sets = f", forwarded from internal address sets {sorted(used_sets)}" if translate else ""
    print(progress.report() + sets, file=sys.stderr, flush=True)


OTHER_IP = "10.1.0.99"


@st.composite
def internal_packets(draw):
    """A packet on the internal side: from the backend, another host or another port, to the relay's
    internal addresses (either set) or not, to a held port, a free one or one outside the range."""
    src_ip = draw(st.sampled_from([P.BACKEND_IP4, OTHER_IP]))
    sport = draw(st.sampled_from([P.BACKEND_PORT, P.BACKEND_PORT + 1, 53]))
    dst_ip = draw(st.sampled_from([INTERNAL_IP4, INTERNAL_IP4_B, INTERNAL_IP4, INTERNAL_IP4_B, P.CLIENT_IP4]))
    dport = draw(st.one_of(st.integers(PORTS[0], PORTS[1]), st.sampled_from([PORTS[0] - 1, PORTS[1] + 1, 5000])))
    payload = draw(st.binary(min_size=1, max_size=64))
    flows = draw(st.integers(0, 3))           # clients that opened flows (held ports) first
    deleted = draw(st.booleans())             # ... and whether the agent then deleted the first one
    return src_ip, sport, dst_ip, dport, payload, flows, deleted


def test_differential_fuzz_translated_replies_agree_with_route_reply(xlate2):
    xlate = xlate2   # two internal address sets: pairs on both, replies to either address
    backends = {b.backend_id: b for b in xlate.backends()}
    progress = Progress()

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(case=internal_packets())
    def one_case(case) -> None:
        src_ip, sport, dst_ip, dport, payload, n_flows, deleted = case
        xlate.ports.release([f.internal_pair for f in xlate.flows()])   # the last case's pairs go back
        xlate.ports.return_due(now=float("inf"))
        xlate.bpf[b"flows"].clear()
        xlate.bpf[b"pending"].clear()
        holders = {}
        for i in range(n_flows):
            client = (P.CLIENT_IP4, 42000 + i)
            public(xlate, P.udp_frame(stun.build_binding_request("evtj:h6vY"), sport=client[1]))
            pair = xlate.flow(client).internal_pair
            holders[pair] = PortHolder(client, 7, pair)
        if deleted and holders:
            first = min(holders)
            xlate.del_flow(holders.pop(first).client)   # slot cleared, port quarantined
        xlate.reset_counters()
        frame = P.udp_frame(payload, src=src_ip, dst=dst_ip, sport=sport, dport=dport,
                            src_mac=P.BACKEND_MAC, dst_mac=P.RELAY_INT_MAC)
        result = internal(xlate, frame)
        expected = route_reply((src_ip, sport), (dst_ip, dport), internal_ips=INTERNAL_IP4S, ports=PORTS,
                               holders=holders, backends=backends)
        assert counts(xlate) == {expected.counter: 1}, case
        assert (result.verdict == XDP_REDIRECT) == expected.forwarded, case
        if expected.forwarded:   # the reference rewrite: to the client, from the relay's public side
            client = holders[(INTERNAL_IP4S.index(dst_ip) << 16) | dport].client
            want = Ether(frame)
            want.src, want.dst = P.RELAY_PUB_MAC, P.CLIENT_MAC
            want[IP].src, want[UDP].sport = P.PUBLIC_IP4, P.RELAY_PORT
            want[IP].dst, want[UDP].dport = client
            del want[IP].chksum
            del want[UDP].chksum
            assert result.data == raw(want)
        else:
            assert result.data == frame
        progress.tick()

    one_case()
    print(progress.report(), file=sys.stderr, flush=True)
