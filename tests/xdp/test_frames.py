"""Frame parsing and rewriting: ports, fragments, IP options, VLAN, checksums, what passes untouched."""

from __future__ import annotations


from scapy.layers.inet import IP, TCP, UDP, IPOption_RR
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt
from scapy.layers.l2 import ARP, Ether
from splitrelay.bpf.testrun import XDP_DROP, XDP_PASS

from .. import packets as P
from .harness import (
    V,
    assert_forwarded_to_backend,
    confirm_flow,
    counts,
    public,
)


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


def test_ipv4_options_are_skipped_and_kept(relay):
    frame = Ether(src=P.CLIENT_MAC, dst=P.RELAY_PUB_MAC) / IP(
        src=P.CLIENT_IP4, dst=P.PUBLIC_IP4, options=[IPOption_RR(routers=["192.0.2.1", "192.0.2.2"])]
    ) / UDP(sport=P.CLIENT_PORT, dport=P.RELAY_PORT) / V["2.1"]
    result = public(relay, bytes(frame))
    pkt = assert_forwarded_to_backend(result)
    assert pkt[IP].ihl > 5 and bytes(pkt[UDP].payload) == V["2.1"]


def test_ipv4_udp_checksum_never_becomes_zero(relay):
    """A rewrite whose true checksum is 0 must send 0xffff (RFC 768); find such a payload by search."""
    base = P.udp_frame(b"\x80\x00" + bytes(30))
    public(relay, P.udp_frame(V["2.1"]))
    confirm_flow(relay)
    # the forwarded checksum is base's minus a fixed delta: pick the payload word that makes it 0
    out = Ether(public(relay, base).data)
    word = out[UDP].chksum  # adding ~sum to the sum gives 0xffff: a true checksum of 0
    payload = b"\x80\x00" + bytes(28) + word.to_bytes(2, "big")
    result = public(relay, P.udp_frame(payload))
    pkt = assert_forwarded_to_backend(result)
    assert pkt[UDP].chksum == 0xFFFF


def test_lying_udp_length_is_malformed(relay):
    frame = bytearray(P.udp_frame(V["2.1"]))
    frame[14 + 20 + 4:14 + 20 + 6] = (len(V["2.1"]) + 100).to_bytes(2, "big")
    assert public(relay, bytes(frame)).verdict == XDP_DROP
    assert counts(relay) == {"IN_DROP_MALFORMED": 1}


def test_non_udp_and_extension_headers_pass_untouched_and_counted(relay):
    arp = bytes(Ether(src=P.CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=P.CLIENT_IP4, pdst=P.PUBLIC_IP4))
    tcp = bytes(Ether() / IP(src=P.CLIENT_IP4, dst=P.PUBLIC_IP4) / TCP(dport=P.RELAY_PORT))
    ext = bytes(Ether() / IPv6(src=P.CLIENT_IP6, dst=P.PUBLIC_IP6) / IPv6ExtHdrDestOpt()
                / UDP(sport=P.CLIENT_PORT, dport=P.RELAY_PORT) / V["2.1"])
    for frame in (arp, tcp, ext):
        result = public(relay, frame)
        assert result.verdict == XDP_PASS and result.data == frame
    assert counts(relay) == {"IN_PASS_OTHER": 2, "IN_PASS_IPV6_EXT": 1}   # told apart from other ports' traffic


def test_result_unpacks_to_verdict_and_bytes(relay):
    frame = P.udp_frame(b"x", dport=53)
    verdict, data = public(relay, frame)
    assert verdict == XDP_PASS and data == frame
