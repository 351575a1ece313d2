"""Translation over several internal addresses (issue 12 §1, the 1M-flow case): the pool hands out
(address, port) pairs, replies to any of the addresses find their flow, and forged replies to an
unallocated pair open nothing.  The package's relay is built for two address sets (conftest.py).
"""

from __future__ import annotations

import dataclasses
import subprocess

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from splitrelay.bpf.testrun import XDP_DROP, XDP_PASS, XDP_REDIRECT
from splitrelay.edge.records import DataPlaneError, check_internal_sets
from splitrelay.edge.plane import PlaneConfig
from splitrelay.edge.xdp.plane import _internal_addresses

from .. import packets as P
from .harness import (INTERNAL_IP4, INTERNAL_IP4_B, INTERNAL_IP6, INTERNAL_IP6_B, PORTS, RELAY_OWN_IP4, V, VETH,
                      counts, internal, public)

RTP = bytes([0x80, 0x6F]) + bytes(30)
PAIRS = 2 * (PORTS[1] - PORTS[0] + 1)   # two address sets x the port range


def open_flow(dp, *, v6=False, port=P.CLIENT_PORT) -> tuple[str, int]:
    """The client's Binding Request and the backend's answer (confirming the flow); the (internal
    address, port) the backend saw it from."""
    result = public(dp, P.udp_frame(V["2.1"], v6=v6, sport=port))
    assert result.verdict == XDP_REDIRECT, result.name
    pkt = Ether(result.data)
    assert P.checksums_valid(result.data)
    to = (pkt[IPv6] if v6 else pkt[IP]).src, pkt[UDP].sport
    assert reply(dp, to, v6=v6, payload=V["2.2"]).verdict == XDP_REDIRECT
    return to


def reply(dp, to: tuple[str, int], *, v6=False, src=None, payload=RTP):
    return internal(dp, P.udp_frame(payload, v6=v6, src=src or (P.BACKEND_IP6 if v6 else P.BACKEND_IP4), dst=to[0],
                                    sport=P.BACKEND_PORT, dport=to[1], src_mac=P.BACKEND_MAC,
                                    dst_mac=P.RELAY_INT_MAC))


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_flows_take_pairs_on_both_addresses_and_each_reply_reaches_its_own_client(xlate2, v6):
    held = {open_flow(xlate2, v6=v6, port=40001 + i): 40001 + i for i in range(PAIRS)}
    assert len(held) == PAIRS
    addrs = (INTERNAL_IP6, INTERNAL_IP6_B) if v6 else (INTERNAL_IP4, INTERNAL_IP4_B)
    assert {addr for addr, _ in held} == set(addrs)
    for to, client_port in held.items():
        result = reply(xlate2, to, v6=v6)
        assert result.verdict == XDP_REDIRECT, result.name
        pkt = Ether(result.data)
        l3 = pkt[IPv6] if v6 else pkt[IP]
        assert (l3.src, pkt[UDP].sport) == (P.PUBLIC_IP6 if v6 else P.PUBLIC_IP4, P.RELAY_PORT)
        assert pkt[UDP].dport == client_port and P.checksums_valid(result.data)
    assert counts(xlate2)["OUT_FWD"] == PAIRS


def test_media_after_the_request_keeps_the_flows_address_and_port(xlate2):
    first = open_flow(xlate2, port=40001)
    second = open_flow(xlate2, port=40002)
    assert first[0] != second[0]   # the pool interleaves the sets: consecutive flows spread
    media = Ether(public(xlate2, P.udp_frame(RTP, sport=40002)).data)
    assert (media[IP].src, media[UDP].sport) == second


def test_a_reply_to_the_flows_port_on_the_other_address_is_unallocated(xlate2):
    addr, port = open_flow(xlate2)
    other = INTERNAL_IP4_B if addr == INTERNAL_IP4 else INTERNAL_IP4
    flows_before = len(xlate2.flows())
    assert reply(xlate2, (other, port)).verdict == XDP_DROP
    assert counts(xlate2)["OUT_DROP_UNALLOCATED_PORT"] == 1
    assert len(xlate2.flows()) == flows_before


def test_a_reply_on_the_second_address_from_another_host_is_not_the_flows_backend(xlate2):
    open_flow(xlate2, port=40001)
    to = open_flow(xlate2, port=40002)
    assert to[0] == INTERNAL_IP4_B
    assert reply(xlate2, to, src="10.1.0.99").verdict == XDP_DROP
    assert counts(xlate2)["OUT_DROP_NOT_FLOW_BACKEND"] == 1


def test_exhausting_every_pair_is_refused_counted_and_evicts_no_live_call(xlate2):
    held = {open_flow(xlate2, port=40001 + i): 40001 + i for i in range(PAIRS)}
    for i in range(2):
        assert public(xlate2, P.udp_frame(V["2.1"], sport=40100 + i)).verdict == XDP_DROP
    assert counts(xlate2)["IN_DROP_PORT_POOL_EMPTY"] == 2
    for to, client_port in held.items():
        assert Ether(reply(xlate2, to).data)[UDP].dport == client_port


def test_a_refill_after_a_restart_skips_the_pairs_live_flows_hold_on_either_address(xlate2):
    held = {open_flow(xlate2, port=40001 + i) for i in range(3)}
    xlate2._ports = None   # a new agent: no memory of what it released
    assert xlate2.ports.refill() == PAIRS - 3
    fresh = {open_flow(xlate2, port=40010 + i) for i in range(PAIRS - 3)}
    assert not fresh & held
    assert public(xlate2, P.udp_frame(V["2.1"], sport=40099)).verdict == XDP_DROP


def test_a_deleted_flows_pair_waits_out_the_quarantine_then_returns(xlate2):
    open_flow(xlate2, port=40001)
    to = open_flow(xlate2, port=40002)
    assert xlate2.del_flow((P.CLIENT_IP4, 40002))
    assert reply(xlate2, to).verdict == XDP_DROP
    pair = (1 << 16) | to[1]
    assert pair in xlate2.ports.quarantined
    assert xlate2.ports.return_due(now=xlate2.ports.quarantined[pair]) == 1


def test_the_config_reads_back_every_internal_address(xlate2):
    cfg = xlate2.config()
    assert cfg.internal_sets() == [(INTERNAL_IP4, INTERNAL_IP6), (INTERNAL_IP4_B, INTERNAL_IP6_B)]


def test_more_address_sets_than_the_maps_hold_are_refused(xlate2):
    cfg = dataclasses.replace(xlate2.config(), internal_more=("10.1.0.2", "10.1.0.3", "fd00:1::2", "fd00:1::3"))
    with pytest.raises(DataPlaneError) as exc:
        xlate2.configure(cfg)
    assert str(exc.value) == (f"3 internal address sets, but the pinned translation maps hold 2: destroy instance "
                              f"{xlate2.instance!r} or use another instance name")


def test_a_backends_packet_to_an_address_of_no_set_passes_only_if_it_is_the_relays_own(xlate2):
    open_flow(xlate2)
    assert reply(xlate2, (RELAY_OWN_IP4, PORTS[0])).verdict == XDP_PASS
    assert reply(xlate2, ("10.1.0.3", PORTS[0])).verdict == XDP_DROP   # anywhere else: no reflector
    assert counts(xlate2) == {"IN_FWD_STUN_UFRAG": 1, "OUT_FWD_CONFIRM": 1, "OUT_PASS_LOCAL": 1,
                              "OUT_DROP_NO_FLOW": 1}


def test_internal_addresses_must_pair_up_by_family():
    with pytest.raises(DataPlaneError) as exc:
        check_internal_sets("10.1.0.1", "fd00:1::1", ("10.1.0.2",))
    assert str(exc.value) == ("internal addresses pair up by position: give as many IPv4 as IPv6 "
                              "(or none of one family), got 2 IPv4 and 1 IPv6")
    many = tuple(f"10.1.0.{i}" for i in range(2, 18))
    with pytest.raises(DataPlaneError, match="^at most 16 internal addresses per family, got 17$"):
        check_internal_sets("10.1.0.1", None, many)
    check_internal_sets("10.1.0.1", None, many[:15])


def test_an_internal_address_not_on_the_internal_interface_is_refused_in_one_line(links):
    iface = VETH[1]
    subprocess.run(["ip", "addr", "add", f"{INTERNAL_IP4}/24", "dev", iface], check=True)
    try:
        options = PlaneConfig(public_iface=VETH[0], internal_iface=iface, public_ip4=P.PUBLIC_IP4,
                              internal_ip4=INTERNAL_IP4, internal_more=(INTERNAL_IP4_B,))
        with pytest.raises(DataPlaneError) as exc:
            _internal_addresses(iface, options)
        assert str(exc.value) == f"internal address {INTERNAL_IP4_B} is not configured on {iface}"
        subprocess.run(["ip", "addr", "add", f"{INTERNAL_IP4_B}/24", "dev", iface], check=True)
        assert _internal_addresses(iface, options) == {4: INTERNAL_IP4, 6: None}
    finally:
        subprocess.run(["ip", "addr", "flush", "dev", iface], check=True)
