"""Translation on both sides (issue 12 §1) through BPF_PROG_TEST_RUN: both programs, the port pool, forged replies.

With ``translate`` the transceiver sees (relay internal address, a per-flow
port) as its peer and needs no route to the client; its replies come back to
that port and only the flow's own backend may use it.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from splitrelay.bpf import consts
from splitrelay.bpf.testrun import XDP_DROP, XDP_PASS, XDP_REDIRECT
from splitrelay.edge.xdp.maps import Backend

from .. import packets as P
from .harness import INTERNAL_IP4, INTERNAL_IP6, PORTS, V, counts, internal, public

RTP = bytes([0x80, 0x6F]) + bytes(30)
OTHER_BACKEND = 8


def client_frame(payload: bytes, *, v6=False, port=P.CLIENT_PORT) -> bytes:
    return P.udp_frame(payload, v6=v6, sport=port)


def reply_frame(payload: bytes, dport: int, *, v6=False, src=None, sport=P.BACKEND_PORT) -> bytes:
    return P.udp_frame(payload, v6=v6, src=src or (P.BACKEND_IP6 if v6 else P.BACKEND_IP4),
                       dst=INTERNAL_IP6 if v6 else INTERNAL_IP4, sport=sport, dport=dport,
                       src_mac=P.BACKEND_MAC, dst_mac=P.RELAY_INT_MAC)


def open_flow(dp, *, v6=False, port=P.CLIENT_PORT, answer=True) -> int:
    """Send the client's Binding Request (and the backend's answer, confirming the flow); the
    internal port the backend saw it from."""
    result = public(dp, client_frame(V["2.1"], v6=v6, port=port))
    assert result.verdict == XDP_REDIRECT, result.name
    pkt = Ether(result.data)
    l3 = pkt[IPv6] if v6 else pkt[IP]
    assert l3.src == (INTERNAL_IP6 if v6 else INTERNAL_IP4)      # the transceiver never sees the client
    assert l3.dst == (P.BACKEND_IP6 if v6 else P.BACKEND_IP4)
    assert pkt[UDP].dport == P.BACKEND_PORT
    assert P.checksums_valid(result.data)
    if answer:
        assert internal(dp, reply_frame(V["2.2"], pkt[UDP].sport, v6=v6)).verdict == XDP_REDIRECT
    return pkt[UDP].sport


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_a_new_flow_takes_a_port_of_the_pool_and_its_packets_keep_it(xlate, v6):
    port = open_flow(xlate, v6=v6)
    assert PORTS[0] <= port <= PORTS[1]
    flow = xlate.flow((P.CLIENT_IP6 if v6 else P.CLIENT_IP4, P.CLIENT_PORT))
    assert flow.internal_port == port
    media = Ether(public(xlate, client_frame(RTP, v6=v6)).data)
    assert media[UDP].sport == port and P.checksums_valid(bytes(media))


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_a_reply_to_the_flows_port_goes_back_to_the_client_from_the_relay(xlate, v6):
    port = open_flow(xlate, v6=v6)
    result = internal(xlate, reply_frame(RTP, port, v6=v6))
    assert result.verdict == XDP_REDIRECT, result.name
    pkt = Ether(result.data)
    l3 = pkt[IPv6] if v6 else pkt[IP]
    assert (l3.src, pkt[UDP].sport) == (P.PUBLIC_IP6 if v6 else P.PUBLIC_IP4, P.RELAY_PORT)
    assert (l3.dst, pkt[UDP].dport) == (P.CLIENT_IP6 if v6 else P.CLIENT_IP4, P.CLIENT_PORT)
    assert pkt.dst == P.CLIENT_MAC and pkt.src == P.RELAY_PUB_MAC
    assert P.checksums_valid(result.data)
    assert xlate.flow((l3.dst, P.CLIENT_PORT)).rx_packets == 2   # the backend's answer, then this
    assert counts(xlate)["OUT_FWD"] == 1


def test_two_clients_get_two_ports_and_each_reply_reaches_its_own(xlate):
    a, b = open_flow(xlate, port=40001), open_flow(xlate, port=40002)
    assert a != b
    for port, client_port in ((a, 40001), (b, 40002)):
        pkt = Ether(internal(xlate, reply_frame(RTP, port)).data)
        assert pkt[UDP].dport == client_port


# Forged or stray packets on the internal side: (id, how the reply differs, counter).  Each opens nothing.
FORGED = [
    ("to a port no flow holds", dict(dport=PORTS[0] + 2), "OUT_DROP_UNALLOCATED_PORT"),
    ("from an address that is not the backend", dict(src="10.1.0.99"), "OUT_DROP_NOT_FLOW_BACKEND"),
    ("from the backend's address but another port", dict(sport=P.BACKEND_PORT + 1), "OUT_DROP_NOT_FLOW_BACKEND"),
    ("from another registered backend", dict(src="10.1.0.8"), "OUT_DROP_NOT_FLOW_BACKEND"),
]


@pytest.mark.parametrize("change, counter", [c[1:] for c in FORGED], ids=[c[0] for c in FORGED])
def test_a_forged_reply_is_dropped_counted_and_opens_nothing(xlate, change, counter):
    xlate.set_backend(Backend(OTHER_BACKEND, P.BACKEND_PORT, P.BACKEND_MAC, P.RELAY_INT_MAC, ip4="10.1.0.8"))
    port = open_flow(xlate)
    change = dict(change)
    dport = change.pop("dport", port)   # the pool is FIFO: the flow holds PORTS[0]
    flows_before = [(f.client_ip, f.client_port) for f in xlate.flows()]
    result = internal(xlate, reply_frame(RTP, dport, **change))
    assert result.verdict == XDP_DROP, result.name
    assert counts(xlate)[counter] == 1
    assert [(f.client_ip, f.client_port) for f in xlate.flows()] == flows_before


def test_a_reply_for_a_deleted_flow_is_dropped_and_its_port_waits_out_the_quarantine(xlate):
    port = open_flow(xlate)
    assert xlate.del_flow((P.CLIENT_IP4, P.CLIENT_PORT))
    assert internal(xlate, reply_frame(RTP, port)).verdict == XDP_DROP
    assert counts(xlate)["OUT_DROP_UNALLOCATED_PORT"] == 1
    assert port in xlate.ports.quarantined
    others = {open_flow(xlate, port=40010 + i) for i in range(3)}   # the other 3 ports of the pool
    assert port not in others
    assert public(xlate, client_frame(V["2.1"], port=40020)).verdict == XDP_DROP   # the 5th: pool empty
    assert xlate.ports.return_due(now=xlate.ports.quarantined[port]) == 1
    assert open_flow(xlate, port=40020) == port


def test_an_empty_pool_refuses_new_flows_counts_them_and_evicts_no_live_call(xlate):
    held = {open_flow(xlate, port=40001 + i): 40001 + i for i in range(4)}
    assert len(held) == 4
    for i in range(3):
        assert public(xlate, client_frame(V["2.1"], port=40100 + i)).verdict == XDP_DROP
    assert counts(xlate)["IN_DROP_PORT_POOL_EMPTY"] == 3
    assert xlate.flow((P.CLIENT_IP4, 40100)) is None
    for port, client_port in held.items():   # every live call still has its port, both ways
        assert Ether(public(xlate, client_frame(RTP, port=client_port)).data)[UDP].sport == port
        assert Ether(internal(xlate, reply_frame(RTP, port)).data)[UDP].dport == client_port


def test_a_consent_check_on_a_live_flow_keeps_its_port(xlate):
    port = open_flow(xlate)
    assert open_flow(xlate) == port
    assert counts(xlate).get("IN_DROP_PORT_POOL_EMPTY") is None


def test_a_refill_after_a_restart_skips_the_ports_live_flows_hold(xlate):
    """An agent that restarts over pinned maps must not push a held port a second time."""
    held = {open_flow(xlate, port=40001), open_flow(xlate, port=40002)}
    xlate._ports = None   # a new agent: no memory of what it released
    assert xlate.ports.refill() == 2
    fresh = {open_flow(xlate, port=40003), open_flow(xlate, port=40004)}
    assert not fresh & held and len(fresh) == 2
    assert public(xlate, client_frame(V["2.1"], port=40005)).verdict == XDP_DROP


def test_a_packet_to_the_internal_address_outside_the_port_range_is_the_hosts_own(xlate):
    open_flow(xlate)
    assert internal(xlate, reply_frame(RTP, PORTS[1] + 1)).verdict == XDP_PASS
    assert internal(xlate, reply_frame(RTP, PORTS[1] + 1, src="10.1.0.99")).verdict == XDP_PASS
    assert counts(xlate)["OUT_PASS_LOCAL"] == 1 and counts(xlate)["OUT_PASS_OTHER"] == 1


@pytest.mark.parametrize("spoofs", [4, 64])
def test_spoofed_requests_cannot_take_the_pool_or_lock_the_client_out(xlate, spoofs):
    """Attack (a) translating: each spoofed request's pending flow holds a port, but a ufrag holds at
    most PENDING_FLOWS of them and a new one hands the oldest's port back, so the pool never runs dry
    and the real client gets a port, then media once its backend answered."""
    for i in range(spoofs):
        open_flow(xlate, port=43000 + i, answer=False)
    assert len(xlate.flows()) == min(spoofs, consts.PENDING_FLOWS) and all(f.pending for f in xlate.flows())
    port = open_flow(xlate)                          # the real client: a port, and its backend's answer
    assert Ether(public(xlate, client_frame(RTP)).data)[UDP].sport == port
    assert "IN_DROP_PORT_POOL_EMPTY" not in counts(xlate)


def test_a_backend_talks_to_clients_only_through_a_flows_port(xlate):
    """Translating, a backend's packet to anywhere but the relay is dropped: no reflector."""
    frame = P.udp_frame(b"\x80" * 200, src=P.BACKEND_IP4, dst="198.51.100.9", sport=P.BACKEND_PORT, dport=9,
                        src_mac=P.BACKEND_MAC, dst_mac=P.RELAY_INT_MAC)
    assert internal(xlate, frame).verdict == XDP_DROP
    assert counts(xlate) == {"OUT_DROP_NO_FLOW": 1}


def test_dnat_mode_is_unchanged_and_takes_no_port(relay):
    relay.ports.clear_slots()
    result = public(relay, client_frame(V["2.1"]))
    pkt = Ether(result.data)
    assert pkt[IP].src == P.CLIENT_IP4 and pkt[UDP].sport == P.CLIENT_PORT
    assert relay.flow((P.CLIENT_IP4, P.CLIENT_PORT)).internal_port == 0
    assert relay.ports.slots() == {}


def test_a_flow_aged_out_gives_its_port_back_only_after_the_quarantine(xlate):
    port = open_flow(xlate)
    assert xlate.age_flows(idle_s=0) == 1
    assert xlate.ports.quarantined.get(port)
    assert xlate.ports.slots() == {}
    assert internal(xlate, reply_frame(RTP, port)).verdict == XDP_DROP
