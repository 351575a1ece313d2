"""An IPv4/UDP datagram with any source and right checksums: what the lab's attacks and the benchmarks send
through raw sockets or BPF_PROG_TEST_RUN (the relay itself only ever rewrites them, bpf/csum.h)."""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address


def internet_checksum(data: bytes) -> int:
    """RFC 1071 one's-complement sum."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_udp(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> bytes:
    """IPv4 header (DF, TTL 64) + UDP header + payload; a computed UDP checksum of 0 is sent as 0xffff."""
    s, d = IPv4Address(src[0]).packed, IPv4Address(dst[0]).packed
    length = 8 + len(payload)
    udp = struct.pack("!HHHH", src[1], dst[1], length, 0) + payload
    check = internet_checksum(s + d + struct.pack("!BBH", 0, socket.IPPROTO_UDP, length) + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", check) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 1, 0x4000, 64, socket.IPPROTO_UDP, 0, s, d)
    return ip[:10] + struct.pack("!H", internet_checksum(ip)) + ip[12:] + udp
