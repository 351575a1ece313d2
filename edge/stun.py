"""Reference STUN / RFC 7983 parser with exactly the XDP program's semantics.

``bpf/relay.c`` decides in the kernel; this module says the same thing in
Python so the two can be tested on the same vectors (RFC 5769, RFC 7983,
routing hints) and so tools (load generators, the userspace relay) build and
read packets the way the data plane does.  Every rejection carries the
counter reason the C program would count (``bpf/splitrelay.h``).
"""

from __future__ import annotations

import hmac
import os
import struct
import zlib
from dataclasses import dataclass

from splitrelay.edge.hint import ALPHABET

MAGIC_COOKIE = 0x2112A442
HEADER_LEN = 20
BINDING_REQUEST = 0x0001
ATTR_USERNAME = 0x0006
ATTR_MESSAGE_INTEGRITY = 0x0008
ATTR_FINGERPRINT = 0x8028
ATTR_PRIORITY = 0x0024
ATTR_ICE_CONTROLLING = 0x802A
FINGERPRINT_XOR = 0x5354554E

MAX_ATTRS = 16      # SR_STUN_MAX_ATTRS
MAX_MSG = 2048      # SR_STUN_MAX_MSG
UFRAG_MIN, UFRAG_MAX = 4, 32
_ICE_CHARS = frozenset(ALPHABET.encode())

# RFC 7983 classes (tests/vectors/rfc7983.txt)
STUN, ZRTP, DTLS, TURN_CHANNEL, RTP, UNKNOWN, EMPTY = (
    "stun", "zrtp", "dtls", "turn_channel", "rtp", "unknown", "empty")


class StunError(ValueError):
    """A packet the data plane drops; ``reason`` is its counter reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def classify(payload: bytes) -> str:
    """RFC 7983 class of a UDP payload from its first byte."""
    if not payload:
        return EMPTY
    b = payload[0]
    if b <= 3:
        return STUN
    if 16 <= b <= 19:
        return ZRTP
    if 20 <= b <= 63:
        return DTLS
    if 64 <= b <= 79:
        return TURN_CHANNEL
    if 128 <= b <= 191:
        return RTP
    return UNKNOWN


@dataclass(frozen=True)
class Header:
    type: int
    length: int
    transaction_id: bytes


def parse_header(payload: bytes) -> Header:
    """Validate what every STUN message must satisfy for the relay to route it."""
    if len(payload) < HEADER_LEN:
        raise StunError("bad_stun", f"{len(payload)} bytes is shorter than a STUN header")
    msg_type, length, cookie = struct.unpack_from("!HHI", payload)
    if cookie != MAGIC_COOKIE:
        raise StunError("bad_stun", f"magic cookie {cookie:#010x}")
    if length & 3:
        raise StunError("bad_stun", f"length {length} is not a multiple of 4")
    if HEADER_LEN + length > len(payload):
        raise StunError("bad_stun", f"length {length} overruns the {len(payload)}-byte datagram")
    return Header(msg_type, length, bytes(payload[8:20]))


def is_binding_request(payload: bytes) -> bool:
    return parse_header(payload).type == BINDING_REQUEST


def server_ufrag(payload: bytes) -> str | None:
    """The server ufrag a Binding Request routes by, or None for other (flow-routed) STUN."""
    header = parse_header(payload)
    if header.type != BINDING_REQUEST:
        return None
    if header.length > MAX_MSG:
        raise StunError("bad_stun", f"Binding Request of {header.length} bytes is longer than {MAX_MSG}")
    end = HEADER_LEN + header.length
    off = HEADER_LEN
    value = None
    for _ in range(MAX_ATTRS):
        if off + 4 > end:
            break
        attr_type, attr_len = struct.unpack_from("!HH", payload, off)
        if off + 4 + attr_len > end:
            raise StunError("bad_stun", f"attribute {attr_type:#06x} overruns the message")
        if attr_type == ATTR_USERNAME:
            value = payload[off + 4:off + 4 + attr_len]
            break
        off += 4 + ((attr_len + 3) & ~3)
    if value is None:
        raise StunError("no_username", f"no USERNAME in the first {MAX_ATTRS} attributes")
    ufrag = bytearray()
    for j, ch in enumerate(value[:UFRAG_MAX + 1]):
        if ch == ord(":"):
            break
        if j >= UFRAG_MAX or ch not in _ICE_CHARS:
            raise StunError("bad_username", "server ufrag is over-long or not ice-chars")
        ufrag.append(ch)
    else:
        raise StunError("bad_username", "USERNAME has no ':'")
    if len(ufrag) < UFRAG_MIN:
        raise StunError("bad_username", f"server ufrag of {len(ufrag)} chars is shorter than {UFRAG_MIN}")
    return ufrag.decode("ascii")


def _attr(attr_type: int, value: bytes) -> bytes:
    pad = (-len(value)) % 4
    return struct.pack("!HH", attr_type, len(value)) + value + b"\0" * pad


def build_binding_request(
    username: str,
    password: str | None = None,
    transaction_id: bytes | None = None,
    priority: int = 0x6E0001FF,
    fingerprint: bool = True,
) -> bytes:
    """An ICE connectivity check as a standard client sends it (RFC 8445 sec. 7.1)."""
    tid = transaction_id or os.urandom(12)
    body = _attr(ATTR_USERNAME, username.encode()) + _attr(ATTR_PRIORITY, struct.pack("!I", priority))
    body += _attr(ATTR_ICE_CONTROLLING, os.urandom(8))

    def header(length: int) -> bytes:
        return struct.pack("!HHI", BINDING_REQUEST, length, MAGIC_COOKIE) + tid

    if password is not None:
        mac = hmac.new(password.encode(), header(len(body) + 24) + body, "sha1").digest()
        body += _attr(ATTR_MESSAGE_INTEGRITY, mac)
    if fingerprint:
        crc = (zlib.crc32(header(len(body) + 8) + body) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
        body += _attr(ATTR_FINGERPRINT, struct.pack("!I", crc))
    return header(len(body)) + body
