"""xdp_internal on a backend's packets: SNAT toward the client, the gateway fallback, flows it teaches."""

from __future__ import annotations


import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from splitrelay.bpf.testrun import XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX
from splitrelay.edge.records import Backend, RelayConfig
from splitrelay.wire import stun

from .. import packets as P
from .harness import (
    BACKEND_ID,
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


def test_reply_out_of_the_ingress_interface_gets_xdp_tx(relay, links):
    set_slots(relay, links, slot0=LO_IFINDEX)
    public(relay, P.udp_frame(V["2.1"]))
    result = internal(relay, backend_reply_frame(b"\x80" * 40))
    assert result.verdict == XDP_TX
    assert Ether(result.data)[IP].src == P.PUBLIC_IP4


def test_empty_public_slot_is_a_counted_redirect_failure(relay, links):
    set_slots(relay, links, slot0=0)
    assert internal(relay, backend_reply_frame(b"\x80" * 40)).verdict == XDP_DROP
    assert counts(relay) == {"OUT_DROP_REDIRECT": 1}


def test_reply_without_a_public_address_of_its_family_is_dropped(relay):
    relay.configure(RelayConfig(P.RELAY_PORT, P.RELAY_PUB_MAC, P.GATEWAY_MAC, public_ip4=P.PUBLIC_IP4))
    assert internal(relay, backend_reply_frame(b"\x80" * 20, v6=True)).verdict == XDP_DROP
    assert counts(relay) == {"OUT_DROP_FAMILY": 1}


def test_reply_counts_rx_on_the_flow(relay):
    public(relay, P.udp_frame(V["2.1"]))
    reply = backend_reply_frame(b"\x80" * 100)
    internal(relay, reply)
    internal(relay, reply)
    flow = relay.flow((P.CLIENT_IP4, P.CLIENT_PORT))
    assert (flow.rx_packets, flow.rx_bytes) == (2, 2 * len(reply))
    c = relay.counters()["OUT_FWD"]
    assert (c.packets, c.bytes) == (2, 2 * len(reply))


def test_reply_to_a_client_of_another_backend_uses_the_gateway(relay):
    """A flow owned by backend 7 does not lend its client MAC to backend 8's packets."""
    relay.set_backend(Backend(8, P.BACKEND_PORT, P.BACKEND_MAC, P.RELAY_INT_MAC, ip4="10.1.0.8"))
    public(relay, P.udp_frame(V["2.1"]))
    reply = P.udp_frame(b"\x80" * 20, src="10.1.0.8", dst=P.CLIENT_IP4, sport=P.BACKEND_PORT,
                        dport=P.CLIENT_PORT, src_mac=P.BACKEND_MAC, dst_mac=P.RELAY_INT_MAC)
    result = internal(relay, reply)
    assert Ether(result.data).dst == P.GATEWAY_MAC
    assert counts(relay) == {"IN_FWD_STUN_UFRAG": 1, "OUT_FWD_NO_FLOW": 1}


def test_transceivers_own_check_teaches_the_flow_for_the_clients_answer(relay):
    """The transceiver may check a client candidate first: the client's answer (a STUN success
    response, which carries no USERNAME) must then be routed at once, not dropped."""
    check = stun.build_binding_request("cliX:evtj")          # client ufrag : server ufrag
    out = P.udp_frame(check, src=P.BACKEND_IP4, dst=P.CLIENT_IP4, sport=P.BACKEND_PORT, dport=P.CLIENT_PORT,
                      src_mac=P.BACKEND_MAC, dst_mac=P.RELAY_INT_MAC)
    assert internal(relay, out).verdict == XDP_REDIRECT
    flow = relay.flow((P.CLIENT_IP4, P.CLIENT_PORT))
    assert flow and flow.backend_id == BACKEND_ID and flow.ufrag == "evtj"
    assert_forwarded_to_backend(public(relay, P.udp_frame(V["2.2"])))   # the answer goes straight in
    assert relay.session("evtj").flows == 0           # learned from the backend: no client allowance used
    relay.del_session("evtj")
    assert relay.flows() == []                        # and it goes with its session


@pytest.mark.parametrize("username", ["cliX", "cliX:", "cliX:ev", "cliX:ev-j", "cliX:evtj:more"])
def test_backend_check_without_a_clean_server_ufrag_teaches_nothing(relay, username):
    out = P.udp_frame(stun.build_binding_request(username), src=P.BACKEND_IP4, dst=P.CLIENT_IP4,
                      sport=P.BACKEND_PORT, dport=P.CLIENT_PORT, src_mac=P.BACKEND_MAC, dst_mac=P.RELAY_INT_MAC)
    assert internal(relay, out).verdict == XDP_REDIRECT   # still sent
    assert relay.flows() == []
