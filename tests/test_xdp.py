"""The XDP programs on crafted packets, through BPF_PROG_TEST_RUN: verdicts, bytes and counters."""

from __future__ import annotations

import os
import uuid

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether
from splitrelay.edge import hint, stun
from splitrelay.edge.datapath import Backend, Datapath, DatapathError, RelayConfig
from splitrelay.edge.testrun import XDP_DROP, XDP_PASS, XDP_REDIRECT, run_xdp

from . import packets as P
from .vectors import hint_v1, rfc5769, rfc7983

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="BPF needs root")

V = rfc5769()
BACKEND_ID = 7


@pytest.fixture(scope="module")
def dp():
    datapath = Datapath(instance=f"test-{uuid.uuid4().hex[:8]}")
    try:
        datapath.load()
        # test_run never transmits, but redirect_map needs a live device in the slot
        datapath._set_slot(0, 1)
        datapath._set_slot(1, 1)
        yield datapath
    finally:
        datapath.destroy()


@pytest.fixture
def relay(dp):
    """A configured relay with one dual-stack backend and session 'evtj', fresh maps and counters."""
    for table in ("flows", "sessions", "backend_addrs", "backends"):
        dp.bpf[table.encode()].clear()
    dp.reset_counters()
    dp.configure(RelayConfig(P.RELAY_PORT, P.RELAY_PUB_MAC, P.GATEWAY_MAC,
                             public_ip4=P.PUBLIC_IP4, public_ip6=P.PUBLIC_IP6))
    dp.set_backend(Backend(BACKEND_ID, P.BACKEND_PORT, P.BACKEND_MAC, P.RELAY_INT_MAC,
                           ip4=P.BACKEND_IP4, ip6=P.BACKEND_IP6))
    dp.set_session("evtj", BACKEND_ID)
    return dp


def public(dp, frame):
    return run_xdp(dp._programs["xdp_public"].fd, frame)


def internal(dp, frame):
    return run_xdp(dp._programs["xdp_internal"].fd, frame)


def counts(dp):
    return {name: c.packets for name, c in dp.counters().items() if c.packets}


def assert_forwarded_to_backend(result, *, v6=False, sport=P.CLIENT_PORT):
    assert result.verdict == XDP_REDIRECT, result.name
    pkt = Ether(result.data)
    assert pkt.src == P.RELAY_INT_MAC and pkt.dst == P.BACKEND_MAC
    assert Dot1Q not in pkt
    l3 = pkt[IPv6] if v6 else pkt[IP]
    assert l3.dst == (P.BACKEND_IP6 if v6 else P.BACKEND_IP4)
    assert l3.src == (P.CLIENT_IP6 if v6 else P.CLIENT_IP4)  # the transceiver sees the real client
    assert pkt[UDP].dport == P.BACKEND_PORT and pkt[UDP].sport == sport
    assert P.checksums_valid(result.data)
    return pkt


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
def test_media_follows_the_flow(relay, first, name, v6):
    media = bytes([first]) + os.urandom(171)
    assert public(relay, P.udp_frame(media, v6=v6)).verdict == XDP_DROP  # no flow yet
    public(relay, P.udp_frame(V["2.1"], v6=v6))
    result = public(relay, P.udp_frame(media, v6=v6))
    assert bytes(assert_forwarded_to_backend(result, v6=v6)[UDP].payload) == media
    assert counts(relay) == {"IN_DROP_NO_FLOW": 1, "IN_FWD_STUN_UFRAG": 1, "IN_FWD_FLOW": 1}


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


def test_c_and_python_hint_decoders_agree_on_the_vectors(relay):
    cfg = relay.config()
    cfg.policy = "hint"
    relay.configure(cfg)
    relay.del_session("evtj")  # only hints route here
    vectors = hint_v1()
    for backend_id in {e for _, e, _ in vectors if e}:
        relay.set_backend(Backend(backend_id, P.BACKEND_PORT + 1, P.BACKEND_MAC, P.RELAY_INT_MAC,
                                  ip4=P.BACKEND_IP4))
    for ufrag, expected, comment in vectors:
        assert hint.decode(ufrag) == expected, comment
        req = stun.build_binding_request(ufrag + ":cli1")
        result = public(relay, P.udp_frame(req, sport=41000))
        assert (result.verdict == XDP_REDIRECT) == (expected is not None), comment
        if expected is not None:
            assert relay.flow((P.CLIENT_IP4, 41000)).backend_id == expected, comment


def test_rfc7983_classes_match_the_python_reference(relay):
    public(relay, P.udp_frame(V["2.1"]))  # a flow, so every routable class would be forwarded
    forwardable = {"dtls", "rtp"}
    for first, cls in rfc7983().items():
        assert stun.classify(bytes([first])) == cls
        if cls == "stun":
            continue  # STUN bodies are judged by the parser, below
        result = public(relay, P.udp_frame(bytes([first]) + b"\0" * 40))
        assert (result.verdict == XDP_REDIRECT) == (cls in forwardable), (first, cls)


def test_c_and_python_stun_parsers_agree_on_truncations(relay):
    """Every prefix of a valid request: the C verdict and reason equal the reference parser's."""
    reasons = {"bad_stun": "IN_DROP_BAD_STUN", "no_username": "IN_DROP_NO_USERNAME",
               "bad_username": "IN_DROP_BAD_USERNAME"}
    raw = V["2.1"]
    for cut in range(1, len(raw) + 1):
        relay.reset_counters()
        relay.bpf[b"flows"].clear()
        payload = raw[:cut]
        try:
            ufrag = stun.server_ufrag(payload)
            expected = "IN_FWD_STUN_UFRAG" if ufrag else "IN_DROP_NO_FLOW"
        except stun.StunError as err:
            expected = reasons[err.reason]
        public(relay, P.udp_frame(payload))
        assert counts(relay) == {expected: 1}, cut


def test_other_ports_pass_untouched(relay):
    for frame in (P.udp_frame(V["2.1"], dport=53), P.udp_frame(b"\x80" * 40, v6=True, dport=443)):
        result = public(relay, frame)
        assert result.verdict == XDP_PASS and result.data == frame
    assert counts(relay) == {"IN_PASS_OTHER": 2}


def test_ipv4_udp_checksum_zero_stays_zero(relay):
    result = public(relay, P.udp_frame(V["2.1"], udp_checksum=0))
    pkt = assert_forwarded_to_backend(result)
    assert pkt[UDP].chksum == 0


def test_ipv4_fragment_for_relay_port_is_dropped(relay):
    frame = Ether(P.udp_frame(V["2.1"]))
    frame[IP].flags = "MF"
    del frame[IP].chksum
    assert public(relay, bytes(frame)).verdict == XDP_DROP
    assert counts(relay) == {"IN_DROP_FRAGMENT": 1}


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_reply_is_snatted_to_the_relay_and_sent_to_the_learned_client_mac(relay, v6):
    public(relay, P.udp_frame(V["2.1"], v6=v6))
    reply = P.udp_frame(V["2.2"], v6=v6, src=P.BACKEND_IP6 if v6 else P.BACKEND_IP4,
                        dst=P.CLIENT_IP6 if v6 else P.CLIENT_IP4, sport=P.BACKEND_PORT,
                        dport=P.CLIENT_PORT, src_mac=P.BACKEND_MAC, dst_mac=P.RELAY_INT_MAC)
    result = internal(relay, reply)
    assert result.verdict == XDP_REDIRECT
    pkt = Ether(result.data)
    l3 = pkt[IPv6] if v6 else pkt[IP]
    assert l3.src == (P.PUBLIC_IP6 if v6 else P.PUBLIC_IP4)
    assert pkt[UDP].sport == P.RELAY_PORT and pkt[UDP].dport == P.CLIENT_PORT
    assert pkt.dst == P.CLIENT_MAC and pkt.src == P.RELAY_PUB_MAC
    assert P.checksums_valid(result.data)
    flow = relay.flow((P.CLIENT_IP6 if v6 else P.CLIENT_IP4, P.CLIENT_PORT))
    assert flow.rx_packets == 1
    assert counts(relay)["OUT_FWD"] == 1


def test_backend_may_send_before_any_flow_exists(relay):
    """The transceiver's own ICE checks can leave before the client's first request arrives."""
    reply = P.udp_frame(stun.build_binding_request("cli1:BAAH"), src=P.BACKEND_IP4, dst=P.CLIENT_IP4,
                        sport=P.BACKEND_PORT, dport=P.CLIENT_PORT, src_mac=P.BACKEND_MAC,
                        dst_mac=P.RELAY_INT_MAC)
    result = internal(relay, reply)
    assert result.verdict == XDP_REDIRECT
    pkt = Ether(result.data)
    assert pkt.dst == P.GATEWAY_MAC and pkt[IP].src == P.PUBLIC_IP4
    assert P.checksums_valid(result.data)
    assert counts(relay) == {"OUT_FWD_NO_FLOW": 1}


def test_one_interface_serves_both_directions(relay):
    """With a single interface, xdp_public itself SNATs the backends' replies."""
    public(relay, P.udp_frame(V["2.1"]))
    reply = P.udp_frame(b"\x80" * 60, src=P.BACKEND_IP4, dst=P.CLIENT_IP4, sport=P.BACKEND_PORT,
                        dport=P.CLIENT_PORT, src_mac=P.BACKEND_MAC, dst_mac=P.RELAY_INT_MAC)
    result = public(relay, reply)
    assert result.verdict == XDP_REDIRECT
    pkt = Ether(result.data)
    assert pkt[IP].src == P.PUBLIC_IP4 and pkt[UDP].sport == P.RELAY_PORT and pkt.dst == P.CLIENT_MAC
    assert P.checksums_valid(result.data)


def test_internal_traffic_that_is_not_a_backend_passes_untouched(relay):
    frame = P.udp_frame(b"GET /", src=P.BACKEND_IP4, sport=8080, dst="10.1.0.1", dport=8470)
    result = internal(relay, frame)
    assert result.verdict == XDP_PASS and result.data == frame
    assert counts(relay) == {"OUT_PASS_OTHER": 1}


def test_unconfigured_relay_passes_everything(dp):
    dp.bpf[b"config"].clear()
    frame = P.udp_frame(V["2.1"])
    assert public(dp, frame).verdict == XDP_PASS


def test_maps_survive_a_reload_through_pins(relay):
    public(relay, P.udp_frame(V["2.1"]))
    again = Datapath(instance=relay.instance)
    again.load()
    assert [s.ufrag for s in again.sessions()] == ["evtj"]
    assert again.flow((P.CLIENT_IP4, P.CLIENT_PORT)).backend_id == BACKEND_ID


def test_ageing_removes_only_idle_flows(relay):
    public(relay, P.udp_frame(V["2.1"], sport=40001))
    assert relay.age_flows(idle_s=60) == 0
    assert relay.age_flows(idle_s=0) == 1
    assert relay.flows() == []
    assert [s.ufrag for s in relay.sessions()] == ["evtj"]  # ageing never touches sessions


def test_refuses_hosts_own_interfaces(dp):
    with pytest.raises(DatapathError, match="eth0"):
        dp.attach("eth0")
