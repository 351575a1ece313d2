"""Conversions between Python values and the network-byte-order fields of the shared map structs.

Every address and port in ``bpf/splitrelay.h`` is stored exactly as on the wire,
so the XDP program copies them without conversion; ctypes reads those bytes as
native integers, which is what these helpers produce and undo.
"""

from __future__ import annotations

import ipaddress
import sys

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def be16(port: int) -> int:
    """A port as the native integer whose memory holds it in network order."""
    return int.from_bytes(port.to_bytes(2, "big"), sys.byteorder)


def from_be16(value: int) -> int:
    return int.from_bytes(value.to_bytes(2, sys.byteorder), "big")


def be32_words(addr: IPAddress) -> list[int]:
    """An address as native u32 words holding its network-order bytes (1 word for v4, 4 for v6)."""
    packed = addr.packed
    return [int.from_bytes(packed[i:i + 4], sys.byteorder) for i in range(0, len(packed), 4)]


def addr_from_words(words: list[int], family: int) -> IPAddress:
    raw = b"".join(int(w).to_bytes(4, sys.byteorder) for w in words)
    return ipaddress.IPv4Address(raw[:4]) if family == 4 else ipaddress.IPv6Address(raw[:16])


def mac_bytes(mac: str | bytes) -> bytes:
    if isinstance(mac, bytes):
        if len(mac) != 6:
            raise ValueError(f"MAC must be 6 bytes, got {len(mac)}")
        return mac
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return bytes(int(p, 16) for p in parts)


def mac_str(raw: bytes | list[int]) -> str:
    return ":".join(f"{b:02x}" for b in bytes(raw))
