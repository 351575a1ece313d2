"""Frame builders and an independent checksum check for the data-plane tests (scapy)."""

from __future__ import annotations

from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw, raw

CLIENT_MAC = "02:c1:00:00:00:01"
RELAY_PUB_MAC = "02:a0:00:00:00:01"
RELAY_INT_MAC = "02:a0:00:00:00:02"
GATEWAY_MAC = "02:9a:7e:00:00:01"
BACKEND_MAC = "02:b0:00:00:00:07"
PUBLIC_IP4, PUBLIC_IP6 = "198.51.100.1", "2001:db8::1"
CLIENT_IP4, CLIENT_IP6 = "203.0.113.5", "2001:db8:c::5"
BACKEND_IP4, BACKEND_IP6 = "10.1.0.7", "fd00:1::7"
RELAY_PORT, BACKEND_PORT, CLIENT_PORT = 3478, 5000, 40000


def udp_frame(payload: bytes, *, v6: bool = False, vlan: int | None = None, src=None, dst=None,
              sport: int = CLIENT_PORT, dport: int = RELAY_PORT, src_mac: str = CLIENT_MAC,
              dst_mac: str = RELAY_PUB_MAC, udp_checksum: int | None = None) -> bytes:
    eth = Ether(src=src_mac, dst=dst_mac)
    if vlan is not None:
        eth = eth / Dot1Q(vlan=vlan)
    if v6:
        l3 = IPv6(src=src or CLIENT_IP6, dst=dst or PUBLIC_IP6)
    else:
        l3 = IP(src=src or CLIENT_IP4, dst=dst or PUBLIC_IP4)
    udp = UDP(sport=sport, dport=dport)
    if udp_checksum is not None:
        udp.chksum = udp_checksum
    return raw(eth / l3 / udp / Raw(payload))


def checksums_valid(frame: bytes) -> bool:
    """Recompute IP and UDP checksums from scratch and compare with what the frame carries."""
    pkt = Ether(frame)
    l3 = pkt[IP] if IP in pkt else pkt[IPv6]
    udp = pkt[UDP]
    fresh = Ether(raw(pkt))
    if IP in pkt:
        del fresh[IP].chksum
    if udp.chksum != 0 or IPv6 in pkt:
        del fresh[UDP].chksum
    fresh = Ether(raw(fresh))
    ok_ip = IP not in pkt or fresh[IP].chksum == l3.chksum
    ok_udp = fresh[UDP].chksum == udp.chksum
    return ok_ip and ok_udp
