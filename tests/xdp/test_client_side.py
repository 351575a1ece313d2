"""xdp_public on a client's packets: routing by ufrag and hint, flows, allowances, every drop reason."""

from __future__ import annotations

import os

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from splitrelay.bpf import consts
from splitrelay.bpf.testrun import XDP_DROP, XDP_REDIRECT, XDP_TX
from splitrelay.edge.xdp.maps import XdpMaps
from splitrelay.edge.records import Backend, RelayConfig
from splitrelay.wire import hint, stun

from .. import packets as P
from ..vectors import HINT_V2_KEY
from .harness import (
    BACKEND_ID,
    LO_IFINDEX,
    V,
    assert_forwarded_to_backend,
    backend_reply_frame,
    confirm_flow,
    counts,
    instance_name,
    internal,
    public,
    set_slots,
)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_first_stun_request_routes_by_ufrag_and_learns_flow(relay, v6):
    frame = P.udp_frame(V["2.1"], v6=v6)
    pkt = assert_forwarded_to_backend(public(relay, frame), v6=v6)
    assert bytes(pkt[UDP].payload) == V["2.1"]
    assert counts(relay) == {"IN_FWD_STUN_UFRAG": 1}
    client = P.CLIENT_IP6 if v6 else P.CLIENT_IP4
    flow = relay.flow((client, P.CLIENT_PORT))
    assert flow and flow.backend_id == BACKEND_ID and flow.ufrag == "evtj"
    assert flow.client_mac == P.CLIENT_MAC and flow.packets == 1 and flow.bytes == len(frame)


def test_vlan_tag_is_stripped_toward_the_internal_network(relay):
    frame = P.udp_frame(V["2.1"], vlan=42)
    result = public(relay, frame)
    assert_forwarded_to_backend(result)
    assert len(result.data) == len(frame) - 4


@pytest.mark.parametrize("first,name", [(22, "dtls"), (0x80, "rtp"), (0x81, "rtcp"), (191, "rtp-top")])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_media_follows_the_flow_once_the_backend_answered(relay, first, name, v6):
    media = bytes([first]) + os.urandom(171)
    assert public(relay, P.udp_frame(media, v6=v6)).verdict == XDP_DROP  # no flow yet
    public(relay, P.udp_frame(V["2.1"], v6=v6))
    assert public(relay, P.udp_frame(media, v6=v6)).verdict == XDP_DROP  # pending: STUN only
    confirm_flow(relay, v6=v6)
    result = public(relay, P.udp_frame(media, v6=v6))
    assert bytes(assert_forwarded_to_backend(result, v6=v6)[UDP].payload) == media
    assert counts(relay) == {"IN_DROP_NO_FLOW": 1, "IN_FWD_STUN_UFRAG": 1, "IN_DROP_PENDING": 1,
                             "OUT_FWD_CONFIRM": 1, "IN_FWD_FLOW": 1}


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_vlan_tagged_media_after_the_flow(relay, v6):
    public(relay, P.udp_frame(V["2.1"], v6=v6, vlan=7))
    confirm_flow(relay, v6=v6)
    frame = P.udp_frame(b"\x90" + bytes(99), v6=v6, vlan=7)
    result = public(relay, frame)
    assert_forwarded_to_backend(result, v6=v6)
    assert len(result.data) == len(frame) - 4
    assert counts(relay) == {"IN_FWD_STUN_UFRAG": 1, "OUT_FWD_CONFIRM": 1, "IN_FWD_FLOW": 1}


def test_consent_check_refreshes_the_flow(relay):
    public(relay, P.udp_frame(V["2.1"]))
    first = relay.flow((P.CLIENT_IP4, P.CLIENT_PORT))
    assert_forwarded_to_backend(public(relay, P.udp_frame(V["2.1"])))
    again = relay.flow((P.CLIENT_IP4, P.CLIENT_PORT))
    assert again.packets == 2 and again.last_seen_ns > first.last_seen_ns
    assert again.created_ns == first.created_ns


def test_stun_response_from_client_routes_by_flow(relay):
    assert public(relay, P.udp_frame(V["2.2"])).verdict == XDP_DROP
    public(relay, P.udp_frame(V["2.1"]))
    assert_forwarded_to_backend(public(relay, P.udp_frame(V["2.2"])))


def test_long_term_credentials_username_is_dropped(relay):
    assert public(relay, P.udp_frame(V["2.4"])).verdict == XDP_DROP
    assert counts(relay) == {"IN_DROP_BAD_USERNAME": 1}


def test_unknown_ufrag_is_dropped_and_creates_nothing(relay):
    req = stun.build_binding_request("nobodyhome:x")
    assert public(relay, P.udp_frame(req)).verdict == XDP_DROP
    assert counts(relay) == {"IN_DROP_UNKNOWN_UFRAG": 1}
    assert relay.flows() == []


@pytest.mark.parametrize("policy,expected", [("strict", XDP_DROP), ("hint", XDP_REDIRECT)])
def test_routing_hint_obeys_policy(relay, policy, expected):
    cfg = relay.config()
    cfg.policy = policy
    relay.configure(cfg)
    req = stun.build_binding_request(hint.encode(BACKEND_ID) + ":cli1")
    result = public(relay, P.udp_frame(req))
    assert result.verdict == expected
    if policy == "hint":
        assert_forwarded_to_backend(result)
        assert counts(relay) == {"IN_FWD_STUN_HINT": 1}
    else:
        assert counts(relay) == {"IN_DROP_UNKNOWN_UFRAG": 1}
        assert relay.flows() == []


@pytest.mark.parametrize("policy", ["strict", "hint"])
def test_hint_naming_unregistered_backend_is_always_dropped(relay, policy):
    cfg = relay.config()
    cfg.policy = policy
    relay.configure(cfg)
    req = stun.build_binding_request(hint.encode(99) + ":cli1")
    assert public(relay, P.udp_frame(req)).verdict == XDP_DROP
    assert counts(relay) == {"IN_DROP_NO_BACKEND": 1}


@pytest.mark.parametrize("username,reason", [
    ("abc:x", "IN_DROP_BAD_USERNAME"),                    # 3 chars: too short
    ("a" * 33 + ":x", "IN_DROP_BAD_USERNAME"),            # 33 chars: too long to route on
    ("ab-cd:x", "IN_DROP_BAD_USERNAME"),                  # '-' is not an ice-char
    ("abcdef", "IN_DROP_BAD_USERNAME"),                   # no ':'
    ("a" * 32 + ":x", "IN_DROP_UNKNOWN_UFRAG"),           # 32 chars: routable, just unknown
    ("Ab+/9:x", "IN_DROP_UNKNOWN_UFRAG"),
])
def test_ufrag_syntax(relay, username, reason):
    assert public(relay, P.udp_frame(stun.build_binding_request(username))).verdict == XDP_DROP
    assert counts(relay) == {reason: 1}


def test_longest_ufrag_routes(relay):
    ufrag = "Zz09+/" * 5 + "ab"
    relay.set_session(ufrag, BACKEND_ID)
    assert_forwarded_to_backend(public(relay, P.udp_frame(stun.build_binding_request(ufrag + ":c"))))
    assert relay.flow((P.CLIENT_IP4, P.CLIENT_PORT)).ufrag == ufrag


def test_stun_without_username_and_with_bad_cookie(relay):
    req = bytearray(stun.build_binding_request("evtj:x"))
    req[4] ^= 0xFF  # magic cookie
    assert public(relay, P.udp_frame(bytes(req))).verdict == XDP_DROP
    # a Binding Request with only a PRIORITY attribute
    body = bytes.fromhex("002400046e0001ff")
    no_user = bytes.fromhex("00010008 2112a442") + os.urandom(12) + body
    assert public(relay, P.udp_frame(no_user)).verdict == XDP_DROP
    assert counts(relay) == {"IN_DROP_BAD_STUN": 1, "IN_DROP_NO_USERNAME": 1}


@pytest.mark.parametrize("first", [16, 19, 64, 79, 4, 100, 200, 255])
def test_zrtp_turn_and_unassigned_classes_are_dropped_even_with_a_flow(relay, first):
    public(relay, P.udp_frame(V["2.1"]))
    assert public(relay, P.udp_frame(bytes([first]) + bytes(20))).verdict == XDP_DROP
    assert counts(relay) == {"IN_FWD_STUN_UFRAG": 1, "IN_DROP_UNKNOWN_CLASS": 1}


def test_session_wins_over_a_hint_and_hint_flow_remembers_its_ufrag(relay):
    cfg = relay.config()
    cfg.policy = "hint"
    relay.configure(cfg)
    relay.set_backend(Backend(8, P.BACKEND_PORT + 1, P.BACKEND_MAC, P.RELAY_INT_MAC, ip4="10.1.0.8"))
    ufrag = hint.encode(8)
    relay.set_session(ufrag, BACKEND_ID)  # registered sessions are authoritative
    assert_forwarded_to_backend(public(relay, P.udp_frame(stun.build_binding_request(ufrag + ":c"))))
    other = hint.encode(8)
    result = public(relay, P.udp_frame(stun.build_binding_request(other + ":c"), sport=40002))
    assert Ether(result.data)[IP].dst == "10.1.0.8"
    assert relay.flow((P.CLIENT_IP4, 40002)).ufrag == other
    assert counts(relay) == {"IN_FWD_STUN_UFRAG": 1, "IN_FWD_STUN_HINT": 1}


def test_new_session_on_the_same_client_port_moves_the_flow(relay):
    relay.set_backend(Backend(8, P.BACKEND_PORT, P.BACKEND_MAC, P.RELAY_INT_MAC, ip4="10.1.0.8"))
    relay.set_session("moved", 8)
    public(relay, P.udp_frame(V["2.1"]))
    result = public(relay, P.udp_frame(stun.build_binding_request("moved:c")))
    assert Ether(result.data)[IP].dst == "10.1.0.8"
    flow = relay.flow((P.CLIENT_IP4, P.CLIENT_PORT))
    assert (flow.backend_id, flow.ufrag, flow.packets) == (8, "moved", 1)


def test_ipv6_client_to_ipv4_only_backend_is_a_family_mismatch(relay):
    relay.set_backend(Backend(BACKEND_ID, P.BACKEND_PORT, P.BACKEND_MAC, P.RELAY_INT_MAC, ip4=P.BACKEND_IP4))
    assert public(relay, P.udp_frame(V["2.1"], v6=True)).verdict == XDP_DROP
    assert counts(relay) == {"IN_DROP_FAMILY": 1}


def test_forward_counts_packets_and_bytes(relay):
    frame = P.udp_frame(V["2.1"])
    public(relay, frame)
    c = relay.counters()["IN_FWD_STUN_UFRAG"]
    assert (c.packets, c.bytes) == (1, len(frame))
    assert (c.spec.direction, c.spec.verdict, c.spec.reason) == ("ingress", "forwarded", "stun_ufrag")


def test_a_session_may_hold_only_its_allowance_of_confirmed_flows(relay):
    """Only flows its backend answered count; once they fill the allowance, new 5-tuples are refused."""
    cfg = relay.config()
    cfg.max_session_flows = 2
    relay.configure(cfg)
    for port in (41001, 41002):
        assert_forwarded_to_backend(public(relay, P.udp_frame(V["2.1"], sport=port)), sport=port)
        confirm_flow(relay, sport=port)
    for port in range(41003, 41053):  # the flood: 50 more 5-tuples
        assert public(relay, P.udp_frame(V["2.1"], sport=port)).verdict == XDP_DROP
    assert counts(relay)["IN_DROP_SESSION_FLOWS"] == 50
    assert len(relay.flows()) == 2 and relay.session("evtj").flows == 2
    # the session's own flows still work, consent checks included
    assert_forwarded_to_backend(public(relay, P.udp_frame(b"\x80" * 60, sport=41001)), sport=41001)
    assert_forwarded_to_backend(public(relay, P.udp_frame(V["2.1"], sport=41002)), sport=41002)
    # a flow that goes (ageing, NAT rebinding) gives its slot back
    assert relay.del_flow((P.CLIENT_IP4, 41001))
    assert relay.session("evtj").flows == 1
    assert_forwarded_to_backend(public(relay, P.udp_frame(V["2.1"], sport=41060)), sport=41060)


@pytest.mark.parametrize("spoofs", [4, 64])
def test_spoofed_requests_with_a_sessions_ufrag_cannot_lock_its_client_out(relay, spoofs):
    """Attack (a): requests naming a live session's ufrag from other ports, before the client's own
    and during its call.  Each opens only a pending flow (STUN, no media), a ufrag holds at most
    PENDING_FLOWS of them (a new one replaces the oldest), and none counts against the allowance."""
    for port in range(43000, 43000 + spoofs):                  # before the client connects
        assert_forwarded_to_backend(public(relay, P.udp_frame(V["2.1"], sport=port)), sport=port)
    assert all(f.pending for f in relay.flows()) and len(relay.flows()) == min(spoofs, consts.PENDING_FLOWS)
    assert relay.session("evtj").flows == 0
    assert_forwarded_to_backend(public(relay, P.udp_frame(V["2.1"])))   # the real client gets in
    confirm_flow(relay)                                                 # ... and its backend answers
    assert relay.session("evtj").flows == 1
    for port in range(44000, 44000 + spoofs):                  # during the call
        public(relay, P.udp_frame(V["2.1"], sport=port))
        assert public(relay, P.udp_frame(b"\x80" * 40, sport=port)).verdict == XDP_DROP   # no media from them
    flow = relay.flow((P.CLIENT_IP4, P.CLIENT_PORT))
    assert flow and not flow.pending                          # the call's flow is untouched
    assert_forwarded_to_backend(public(relay, P.udp_frame(b"\x80" * 40)))
    assert len([f for f in relay.flows() if f.pending]) == min(spoofs, consts.PENDING_FLOWS)
    assert counts(relay)["IN_DROP_PENDING"] == spoofs and "IN_DROP_SESSION_FLOWS" not in counts(relay)


def test_a_request_naming_another_backends_session_does_not_move_a_live_call(relay):
    """Attack (b), RTP-Bleed style: from the live call's own 5-tuple, a request with the ufrag of a
    session on another backend.  The flow stays, counted flow_takeover; a pending flow may move."""
    relay.set_backend(Backend(8, P.BACKEND_PORT, P.BACKEND_MAC, P.RELAY_INT_MAC, ip4="10.1.0.8"))
    relay.set_session("othr", 8)
    public(relay, P.udp_frame(V["2.1"]))
    confirm_flow(relay)
    takeover = public(relay, P.udp_frame(stun.build_binding_request("othr:evil")))
    assert takeover.verdict == XDP_DROP and counts(relay)["IN_DROP_TAKEOVER"] == 1
    flow = relay.flow((P.CLIENT_IP4, P.CLIENT_PORT))
    assert flow.backend_id == BACKEND_ID and flow.ufrag == "evtj" and not flow.pending
    assert_forwarded_to_backend(public(relay, P.udp_frame(b"\x80" * 40)))
    public(relay, P.udp_frame(V["2.1"], sport=45000))                   # a pending flow is nobody's call yet
    assert public(relay, P.udp_frame(stun.build_binding_request("othr:evil"), sport=45000)).verdict == XDP_REDIRECT
    assert relay.flow((P.CLIENT_IP4, 45000)).backend_id == 8


def test_one_genuine_hint_without_a_session_holds_at_most_its_allowance(relay):
    """Attack (c): under the hint policy one ufrag the backend really answers, from many ports,
    confirms at most max_session_flows flows and holds at most PENDING_FLOWS pending ones."""
    cfg = relay.config()
    cfg.policy = "hint"
    relay.configure(cfg)
    ufrag = hint.encode(BACKEND_ID)
    request = stun.build_binding_request(ufrag + ":evil")
    for port in range(46000, 46100):
        public(relay, P.udp_frame(request, sport=port))
        internal(relay, backend_reply_frame(V["2.2"], dport=port))     # the backend answers every one
    allowance = consts.DEFAULT_SESSION_FLOWS
    assert len(relay.flows()) == allowance and not any(f.pending for f in relay.flows())
    assert counts(relay) == {"IN_FWD_STUN_HINT": allowance, "OUT_FWD_CONFIRM": allowance,
                             "IN_DROP_SESSION_FLOWS": 100 - allowance, "OUT_DROP_NO_FLOW": 100 - allowance}


def test_answers_beyond_the_allowance_confirm_nothing(relay):
    """Requests first, answers after: the ring keeps the last PENDING_FLOWS pending flows, and the
    backend's answers confirm only as many as the allowance; the rest are dropped, not reflected."""
    cfg = relay.config()
    cfg.policy, cfg.max_session_flows = "hint", 2
    relay.configure(cfg)
    request = stun.build_binding_request(hint.encode(BACKEND_ID) + ":evil")
    ports = range(47000, 47006)
    for port in ports:
        public(relay, P.udp_frame(request, sport=port))
    assert sorted(f.client_port for f in relay.flows()) == list(ports[-consts.PENDING_FLOWS:])
    for port in ports:
        internal(relay, backend_reply_frame(V["2.2"], dport=port))
    assert sorted(f.client_port for f in relay.flows() if not f.pending) == list(ports[2:4])
    c = counts(relay)
    assert (c["OUT_DROP_NO_FLOW"], c["OUT_FWD_CONFIRM"], c["OUT_DROP_SESSION_FLOWS"]) == (2, 2, 2)


def test_full_flow_table_refuses_new_flows_and_keeps_live_ones(links, pin_root):
    small = XdpMaps(instance=instance_name(), pin_root=pin_root, max_flows=8)
    try:
        small.load()
        set_slots(small, links)
        small.configure(RelayConfig(relay_port=P.RELAY_PORT, public_mac=P.RELAY_PUB_MAC, gateway_mac=P.GATEWAY_MAC,
                                    public_ip4=P.PUBLIC_IP4,
                                    max_session_flows=0))
        small.set_backend(Backend(BACKEND_ID, P.BACKEND_PORT, P.BACKEND_MAC, P.RELAY_INT_MAC, ip4=P.BACKEND_IP4))
        small.set_session("evtj", BACKEND_ID)
        for port in range(42000, 42008):
            assert public(small, P.udp_frame(V["2.1"], sport=port)).verdict == XDP_REDIRECT
            confirm_flow(small, sport=port)
        for port in range(42008, 42020):
            assert public(small, P.udp_frame(V["2.1"], sport=port)).verdict == XDP_DROP
        assert counts(small)["IN_DROP_FLOW_FULL"] == 12
        for port in range(42000, 42008):  # nothing live was evicted to make room
            assert public(small, P.udp_frame(b"\x80" * 40, sport=port)).verdict == XDP_REDIRECT
        assert len(small.flows()) == 8
    finally:
        small.destroy()


def test_forged_keyed_hints_cost_no_flow(relay):
    cfg = relay.config()
    cfg.policy, cfg.hint_key = "hint", HINT_V2_KEY
    relay.configure(cfg)
    genuine = hint.encode(BACKEND_ID, key=HINT_V2_KEY)
    for n in range(200):  # forgeries: right format and backend, random tags
        forged = hint.encode(BACKEND_ID, key=bytes(16 - len(str(n))) + str(n).encode())
        public(relay, P.udp_frame(stun.build_binding_request(forged + ":x"), sport=44000 + n))
    assert relay.flows() == []
    assert counts(relay)["IN_DROP_FORGED_HINT"] == 200   # 24-bit tags: a collision is ~1e-5 here
    assert_forwarded_to_backend(public(relay, P.udp_frame(stun.build_binding_request(genuine + ":x"))))


def test_backend_behind_the_ingress_interface_gets_xdp_tx(relay, links):
    """One interface for both sides: the slot holds the ingress device, so XDP_TX, not a redirect."""
    set_slots(relay, links, slot1=LO_IFINDEX)
    result = public(relay, P.udp_frame(V["2.1"]))
    assert result.verdict == XDP_TX
    pkt = Ether(result.data)
    assert pkt.dst == P.BACKEND_MAC and pkt[IP].dst == P.BACKEND_IP4 and pkt[UDP].dport == P.BACKEND_PORT
    assert P.checksums_valid(result.data)
    assert counts(relay) == {"IN_FWD_STUN_UFRAG": 1}


def test_empty_backend_slot_is_a_counted_redirect_failure(relay, links):
    set_slots(relay, links, slot1=0)
    assert public(relay, P.udp_frame(V["2.1"])).verdict == XDP_DROP
    assert counts(relay) == {"IN_DROP_REDIRECT": 1}
