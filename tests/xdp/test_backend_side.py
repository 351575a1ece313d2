"""xdp_internal on a backend's packets: SNAT toward the client, the gateway fallback, flows it teaches."""

from __future__ import annotations


import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from splitrelay.bpf import consts
from splitrelay.bpf.testrun import XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX
from splitrelay.edge.records import Backend, RelayConfig
from splitrelay.wire import stun

from .. import packets as P
from .harness import (
    BACKEND_ID,
    RELAY_OWN_IP4,
    RELAY_OWN_IP6,
    LO_IFINDEX,
    V,
    assert_forwarded_to_backend,
    backend_reply_frame,
    counts,
    internal,
    public,
    set_slots,
)


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
    assert counts(relay)["OUT_FWD_CONFIRM"] == 1   # the success response confirmed the flow


def test_backend_check_to_a_client_without_a_flow_goes_out_only_for_a_live_session(relay):
    """The transceiver's own ICE checks can leave before the client's first request arrives; anything
    else a backend sends to an address no flow names is dropped (no reflector)."""
    for payload in (stun.build_binding_request("cli1:BAAH"), V["2.2"], b"\x80" * 100):   # no session, no check
        assert internal(relay, backend_reply_frame(payload)).verdict == XDP_DROP
    assert counts(relay) == {"OUT_DROP_NO_FLOW": 3}
    result = internal(relay, backend_reply_frame(stun.build_binding_request("cli1:evtj")))
    assert result.verdict == XDP_REDIRECT
    pkt = Ether(result.data)
    assert pkt.dst == P.GATEWAY_MAC and pkt[IP].src == P.PUBLIC_IP4
    assert P.checksums_valid(result.data)
    assert counts(relay)["OUT_FWD_NO_FLOW"] == 1


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_a_backends_packet_to_the_relays_own_address_goes_to_the_kernel(relay, v6):
    """Sockets on the relay's internal address (e.g. an ICE-TCP bridge) get what backends send them."""
    frame = P.udp_frame(b"\x80" * 40, v6=v6, src=P.BACKEND_IP6 if v6 else P.BACKEND_IP4,
                        dst=RELAY_OWN_IP6 if v6 else RELAY_OWN_IP4, sport=P.BACKEND_PORT, dport=50000,
                        src_mac=P.BACKEND_MAC, dst_mac=P.RELAY_INT_MAC)
    result = internal(relay, frame)
    assert result.verdict == XDP_PASS and result.data == frame
    assert counts(relay) == {"OUT_PASS_LOCAL": 1}


def test_one_interface_serves_both_directions(relay):
    """With a single interface (the backend behind the public one), xdp_public itself SNATs its replies."""
    relay.set_backend(Backend(BACKEND_ID, P.BACKEND_PORT, P.BACKEND_MAC, P.RELAY_INT_MAC, ip4=P.BACKEND_IP4,
                              tx_slot=0))
    public(relay, P.udp_frame(V["2.1"]))
    reply = P.udp_frame(b"\x80" * 60, src=P.BACKEND_IP4, dst=P.CLIENT_IP4, sport=P.BACKEND_PORT,
                        dport=P.CLIENT_PORT, src_mac=P.BACKEND_MAC, dst_mac=P.RELAY_INT_MAC)
    result = public(relay, reply)
    assert result.verdict == XDP_REDIRECT
    pkt = Ether(result.data)
    assert pkt[IP].src == P.PUBLIC_IP4 and pkt[UDP].sport == P.RELAY_PORT and pkt.dst == P.CLIENT_MAC
    assert P.checksums_valid(result.data)


def test_a_backends_source_on_the_public_side_of_two_interfaces_is_forged(relay):
    """Nobody on the internet may send as a backend: not reflected to a victim, not confirming a flow."""
    public(relay, P.udp_frame(V["2.1"]))
    for dst, payload in ((P.CLIENT_IP4, V["2.2"]), ("198.51.100.9", b"\x80" * 200)):
        forged = P.udp_frame(payload, src=P.BACKEND_IP4, dst=dst, sport=P.BACKEND_PORT, dport=P.CLIENT_PORT)
        assert public(relay, forged).verdict == XDP_DROP
    assert counts(relay)["IN_DROP_BACKEND_SPOOF"] == 2
    assert relay.flow((P.CLIENT_IP4, P.CLIENT_PORT)).pending


def test_internal_traffic_that_is_not_a_backend_passes_untouched(relay):
    frame = P.udp_frame(b"GET /", src=P.BACKEND_IP4, sport=8080, dst="10.1.0.1", dport=8470)
    result = internal(relay, frame)
    assert result.verdict == XDP_PASS and result.data == frame
    assert counts(relay) == {"OUT_PASS_OTHER": 1}


def test_reply_out_of_the_ingress_interface_gets_xdp_tx(relay, links):
    set_slots(relay, links, slot0=LO_IFINDEX)
    public(relay, P.udp_frame(V["2.1"]))
    result = internal(relay, backend_reply_frame(b"\x80" * 40))
    assert result.verdict == XDP_TX
    assert Ether(result.data)[IP].src == P.PUBLIC_IP4


def test_empty_public_slot_is_a_counted_redirect_failure(relay, links):
    set_slots(relay, links, slot0=0)
    public(relay, P.udp_frame(V["2.1"]))
    assert internal(relay, backend_reply_frame(b"\x80" * 40)).verdict == XDP_DROP
    assert counts(relay)["OUT_DROP_REDIRECT"] == 1


def test_reply_without_a_public_address_of_its_family_is_dropped(relay):
    relay.configure(RelayConfig(relay_port=P.RELAY_PORT, public_mac=P.RELAY_PUB_MAC, gateway_mac=P.GATEWAY_MAC,
                                public_ip4=P.PUBLIC_IP4))
    public(relay, P.udp_frame(V["2.1"], v6=True))
    assert internal(relay, backend_reply_frame(b"\x80" * 20, v6=True)).verdict == XDP_DROP
    assert counts(relay) == {"IN_FWD_STUN_UFRAG": 1, "OUT_DROP_FAMILY": 1}


def test_reply_counts_rx_on_the_flow(relay):
    public(relay, P.udp_frame(V["2.1"]))
    reply = backend_reply_frame(b"\x80" * 100)
    internal(relay, reply)
    internal(relay, reply)
    flow = relay.flow((P.CLIENT_IP4, P.CLIENT_PORT))
    assert (flow.rx_packets, flow.rx_bytes) == (2, 2 * len(reply))
    c = relay.counters()["OUT_FWD"]
    assert (c.packets, c.bytes) == (2, 2 * len(reply))


def test_a_backend_cannot_send_to_a_client_of_another_backend(relay):
    """A flow owned by backend 7 carries nothing from backend 8."""
    relay.set_backend(Backend(8, P.BACKEND_PORT, P.BACKEND_MAC, P.RELAY_INT_MAC, ip4="10.1.0.8"))
    public(relay, P.udp_frame(V["2.1"]))
    reply = P.udp_frame(b"\x80" * 20, src="10.1.0.8", dst=P.CLIENT_IP4, sport=P.BACKEND_PORT,
                        dport=P.CLIENT_PORT, src_mac=P.BACKEND_MAC, dst_mac=P.RELAY_INT_MAC)
    assert internal(relay, reply).verdict == XDP_DROP
    assert counts(relay) == {"IN_FWD_STUN_UFRAG": 1, "OUT_DROP_NOT_FLOW_BACKEND": 1}


def test_transceivers_own_check_teaches_the_flow_for_the_clients_answer(relay):
    """The transceiver may check a client candidate first: the client's answer (a STUN success
    response, which carries no USERNAME) must then be routed at once, not dropped."""
    check = stun.build_binding_request("cliX:evtj")          # client ufrag : server ufrag
    out = P.udp_frame(check, src=P.BACKEND_IP4, dst=P.CLIENT_IP4, sport=P.BACKEND_PORT, dport=P.CLIENT_PORT,
                      src_mac=P.BACKEND_MAC, dst_mac=P.RELAY_INT_MAC)
    assert internal(relay, out).verdict == XDP_REDIRECT
    flow = relay.flow((P.CLIENT_IP4, P.CLIENT_PORT))
    assert flow and flow.backend_id == BACKEND_ID and flow.ufrag == "evtj"
    assert not flow.pending                           # the backend chose to talk there: confirmed
    assert_forwarded_to_backend(public(relay, P.udp_frame(V["2.2"])))   # the answer goes straight in
    assert relay.session("evtj").flows == 1           # charged to the session's allowance
    relay.del_session("evtj")
    assert relay.flows() == []                        # and it goes with its session


@pytest.mark.parametrize("username", ["cliX", "cliX:", "cliX:ev", "cliX:ev-j", "cliX:evtj:more"])
def test_backend_check_without_a_clean_server_ufrag_teaches_nothing(relay, username):
    out = P.udp_frame(stun.build_binding_request(username), src=P.BACKEND_IP4, dst=P.CLIENT_IP4,
                      sport=P.BACKEND_PORT, dport=P.CLIENT_PORT, src_mac=P.BACKEND_MAC, dst_mac=P.RELAY_INT_MAC)
    assert internal(relay, out).verdict == XDP_DROP      # and is not sent: no flow names the client
    assert relay.flows() == []


def test_backend_checks_open_at_most_the_sessions_allowance(relay):
    """Attack (d), the WHIP offer whose candidates name a stranger: the transceiver's checks toward
    them open flows charged to its session, so at most max_session_flows addresses get any."""
    sent = 0
    for port in range(48000, 48050):
        frame = backend_reply_frame(stun.build_binding_request("cliX:evtj"), dport=port)
        sent += internal(relay, frame).verdict == XDP_REDIRECT
    assert sent == consts.DEFAULT_SESSION_FLOWS and relay.session("evtj").flows == sent
    assert counts(relay)["OUT_DROP_SESSION_FLOWS"] == 50 - sent


def test_the_backends_answer_confirms_the_pending_flow(relay):
    public(relay, P.udp_frame(V["2.1"]))
    assert relay.flow((P.CLIENT_IP4, P.CLIENT_PORT)).pending
    for payload in (b"\x80" * 40, stun.build_message(0x0111)):   # media, an error response: still pending
        assert internal(relay, backend_reply_frame(payload)).verdict == XDP_REDIRECT
        assert relay.flow((P.CLIENT_IP4, P.CLIENT_PORT)).pending
    assert internal(relay, backend_reply_frame(V["2.2"])).verdict == XDP_REDIRECT
    assert not relay.flow((P.CLIENT_IP4, P.CLIENT_PORT)).pending
    assert counts(relay)["OUT_FWD_CONFIRM"] == 1 and relay.session("evtj").flows == 1
