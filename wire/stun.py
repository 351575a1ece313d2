"""Reference STUN / RFC 7983 parser with exactly the XDP program's semantics.

``bpf/relay.c`` decides in the kernel; this module says the same thing in
Python so that the two can be tested on the same vectors (RFC 5769, RFC 7983,
routing hints) and fuzzed against each other, and so that tools (load
generators, the transceiver's UDP mux) build and read packets the way the data
plane does.  Every rejection is a ``StunError`` subclass whose ``reason`` is the
counter reason the C program counts (``SR_STATS`` in ``bpf/splitrelay.h``).

It is deliberately not a general STUN library (aioice has one): it validates
only what the relay validates, and it walks at most ``MAX_ATTRS`` attributes,
as the verifier-bounded C loop does.
"""

from __future__ import annotations

import hmac
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

from splitrelay.bpf import consts
from splitrelay.errors import SplitrelayError
from splitrelay.wire.hint import ALPHABET

MAGIC_COOKIE = 0x2112A442
HEADER_LEN = 20
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
ATTR_USERNAME = 0x0006
ATTR_MESSAGE_INTEGRITY = 0x0008
ATTR_PRIORITY = 0x0024
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028
ATTR_ICE_CONTROLLED = 0x8029
ATTR_ICE_CONTROLLING = 0x802A
FINGERPRINT_XOR = 0x5354554E

MAX_ATTRS = consts.STUN_MAX_ATTRS   # attributes visited before giving up on USERNAME
MAX_MSG = consts.STUN_MAX_MSG       # longest Binding Request body routed by ufrag
UFRAG_MIN, UFRAG_MAX = consts.UFRAG_MIN, consts.UFRAG_MAX
UFRAG_RULE = f"ufrag must be {UFRAG_MIN}..{UFRAG_MAX} ice-chars (A-Z a-z 0-9 + /)"
_ICE_CHARS = frozenset(ALPHABET.encode())
_COLON = ord(":")


class PacketClass(StrEnum):
    """RFC 7983 demultiplexing class of a UDP payload (tests/vectors/rfc7983.txt).

    A ``StrEnum``: members compare equal to their names ("stun", "rtp", ...), as
    the vector file spells them.
    """

    STUN = "stun"                  # 0..3
    ZRTP = "zrtp"                  # 16..19, dropped
    DTLS = "dtls"                  # 20..63
    TURN_CHANNEL = "turn_channel"  # 64..79, dropped
    RTP = "rtp"                    # 128..191, RTP and RTCP
    UNKNOWN = "unknown"            # everything else, dropped
    EMPTY = "empty"                # zero-length payload, dropped as unknown_class


STUN, ZRTP, DTLS, TURN_CHANNEL, RTP, UNKNOWN, EMPTY = PacketClass
ROUTED_BY_FLOW = frozenset({PacketClass.DTLS, PacketClass.RTP})


class StunError(SplitrelayError, ValueError):
    """A STUN packet the data plane drops; ``reason`` is its counter reason in splitrelay.h."""

    reason: ClassVar[str] = "bad_stun"

    def __init__(self, detail: str) -> None:
        super().__init__(f"{self.reason}: {detail}")
        self.detail = detail


class BadStun(StunError):
    """Header or attribute layout the relay will not parse (IN_DROP_BAD_STUN)."""

    reason = "bad_stun"


class NoUsername(StunError):
    """A Binding Request without USERNAME among its first MAX_ATTRS attributes (IN_DROP_NO_USERNAME)."""

    reason = "no_username"


class BadUsername(StunError):
    """A USERNAME whose server ufrag is not 4..32 ice-chars before a ':' (IN_DROP_BAD_USERNAME)."""

    reason = "bad_username"


REASONS = tuple(cls.reason for cls in (BadStun, NoUsername, BadUsername))


def classify(payload: bytes) -> PacketClass:
    """RFC 7983 class of a UDP payload from its first byte."""
    if not payload:
        return PacketClass.EMPTY
    b = payload[0]
    if b <= 3:
        return PacketClass.STUN
    if 16 <= b <= 19:
        return PacketClass.ZRTP
    if 20 <= b <= 63:
        return PacketClass.DTLS
    if 64 <= b <= 79:
        return PacketClass.TURN_CHANNEL
    if 128 <= b <= 191:
        return PacketClass.RTP
    return PacketClass.UNKNOWN


@dataclass(frozen=True)
class Header:
    type: int
    length: int            # body length, excluding the 20-byte header
    transaction_id: bytes

    @property
    def is_binding_request(self) -> bool:
        return self.type == BINDING_REQUEST


@dataclass(frozen=True)
class Attribute:
    type: int
    offset: int            # of the value, from the start of the message
    value: bytes           # without padding


def parse_header(payload: bytes) -> Header:
    """Validate what every STUN message must satisfy before the relay looks further.

    The relay only gets here for first bytes 0..3 (``classify``), which already
    implies the two leading zero bits; they are checked for direct callers.
    """
    if len(payload) < HEADER_LEN:
        raise BadStun(f"{len(payload)} bytes is shorter than a STUN header")
    msg_type, length, cookie = struct.unpack_from("!HHI", payload)
    if msg_type & 0xC000:
        raise BadStun(f"message type {msg_type:#06x} does not start with two zero bits")
    if cookie != MAGIC_COOKIE:
        raise BadStun(f"magic cookie {cookie:#010x}")
    if length & 3:
        raise BadStun(f"length {length} is not a multiple of 4")
    if HEADER_LEN + length > len(payload):
        raise BadStun(f"length {length} overruns the {len(payload)}-byte datagram")
    return Header(msg_type, length, bytes(payload[8:HEADER_LEN]))


def is_binding_request(payload: bytes) -> bool:
    """True for a valid STUN header of type Binding Request: the only STUN the relay routes by ufrag.

    Never raises: anything else (other STUN, bad headers) is False.
    """
    try:
        return parse_header(payload).is_binding_request
    except StunError:
        return False


def iter_attributes(payload: bytes, header: Header | None = None, limit: int = MAX_ATTRS) -> Iterator[Attribute]:
    """The first ``limit`` attributes inside the declared message length, in order.

    Stops quietly when fewer than 4 bytes of the message remain; raises BadStun
    as soon as an attribute's value runs past the declared length (padding is
    never checked: the declared length is a multiple of 4, so it always fits).
    """
    header = header or parse_header(payload)
    end = HEADER_LEN + header.length
    off = HEADER_LEN
    for _ in range(limit):
        if off + 4 > end:
            return
        attr_type, attr_len = struct.unpack_from("!HH", payload, off)
        if off + 4 + attr_len > end:
            raise BadStun(f"attribute {attr_type:#06x} of {attr_len} bytes overruns the message")
        yield Attribute(attr_type, off + 4, bytes(payload[off + 4:off + 4 + attr_len]))
        off += 4 + ((attr_len + 3) & ~3)


def _username(payload: bytes) -> bytes | None:
    """USERNAME of a Binding Request, None for other valid STUN (stun_find_username in relay.c)."""
    header = parse_header(payload)
    if not header.is_binding_request:
        return None
    if header.length > MAX_MSG:
        raise BadStun(f"Binding Request of {header.length} bytes is longer than {MAX_MSG}")
    for attr in iter_attributes(payload, header):
        if attr.type == ATTR_USERNAME:
            return attr.value
    raise NoUsername(f"no USERNAME in the first {MAX_ATTRS} attributes")


def _ufrag_at(value: bytes, start: int, ends_at_colon: bool) -> str | None:
    """copy_ufrag in bpf/stun.h, a deliberate oracle: 4..32 ice-chars from value[start].

    Ended by ':' or by the value's end.
    The C gets a pointer already moved to ``start``; here the start is an index.
    """
    out = bytearray()
    colon = False
    for j, ch in enumerate(value[start:start + UFRAG_MAX + 1]):
        if ch == _COLON:
            colon = True
            break
        if j >= UFRAG_MAX or ch not in _ICE_CHARS:
            return None
        out.append(ch)
    if colon != ends_at_colon or len(out) < UFRAG_MIN:
        return None
    return out.decode("ascii")


def confirms_flow(payload: bytes) -> bool:
    """Does a backend's datagram confirm the relay's pending flow it goes to (``stun_confirms_flow``)?

    A Binding success response (the transceiver checked that client's MESSAGE-INTEGRITY, which a
    relay cannot) or the transceiver's own Binding Request toward it; the header alone decides.
    """
    if len(payload) < HEADER_LEN:
        return False
    msg_type, _, cookie = struct.unpack_from("!HHI", payload)
    return cookie == MAGIC_COOKIE and msg_type in (BINDING_SUCCESS, BINDING_REQUEST)


def is_ufrag(text: str) -> bool:
    """True for a server ufrag the relay routes by: 4..32 ice-chars, the one syntax check of the project.

    The control API, both data planes and the parsers above (``_ufrag_at``) accept exactly these.
    """
    raw = text.encode("ascii", "replace")
    return UFRAG_MIN <= len(raw) <= UFRAG_MAX and _ufrag_at(raw, 0, ends_at_colon=False) == text


def server_ufrag(payload: bytes) -> str | None:
    """The server ufrag a client's Binding Request is routed by (USERNAME "server:client").

    Returns None for valid STUN that is not a Binding Request (the relay routes
    that by flow); raises BadStun, NoUsername or BadUsername for what it drops.
    Callers check ``classify(payload) == STUN`` first, as the relay does.
    """
    value = _username(payload)
    if value is None:
        return None
    ufrag = _ufrag_at(value, 0, ends_at_colon=True)
    if ufrag is None:
        raise BadUsername(f"USERNAME {value[:UFRAG_MAX + 2]!r}... has no {UFRAG_MIN}..{UFRAG_MAX} ice-char "
                          "ufrag before a ':'")
    return ufrag


def backend_check_ufrag(payload: bytes) -> str | None:
    """The server ufrag of a transceiver's own Binding Request to a client (USERNAME "client:server").

    The relay learns a flow from it (xdp_internal, stun_check_ufrag_of_backend):
    the ufrag after the first ':' (found within the first 33 bytes), 4..32
    ice-chars to the end of the value.  None when nothing is learned; never raises.
    """
    if classify(payload) != PacketClass.STUN:
        return None
    try:
        value = _username(payload)
    except StunError:
        return None
    if value is None:
        return None
    colon = value.find(b":", 0, UFRAG_MAX + 1)
    if colon < 0:
        return None
    return _ufrag_at(value, colon + 1, ends_at_colon=False)


# --- building messages (tests, load generators) ---------------------------------------------

def encode_attribute(attr_type: int, value: bytes, pad: bytes = b"\0") -> bytes:
    """TLV with the value padded to 4 bytes by repeating ``pad`` (RFC 5769 pads with spaces)."""
    return struct.pack("!HH", attr_type, len(value)) + value + pad * ((-len(value)) % 4)


def build_message(
    msg_type: int,
    attributes: Iterable[tuple[int, bytes]] = (),
    *,
    transaction_id: bytes | None = None,
    password: bytes | str | None = None,
    fingerprint: bool = False,
    pad: bytes = b"\0",
) -> bytes:
    """Any STUN message; with ``password`` a MESSAGE-INTEGRITY (HMAC-SHA1, short-term
    credential), with ``fingerprint`` a FINGERPRINT (CRC-32 xor 0x5354554E), in that order."""
    tid = os.urandom(12) if transaction_id is None else bytes(transaction_id)
    if len(tid) != 12:
        raise ValueError(f"transaction id must be 12 bytes, got {len(tid)}")
    if len(pad) != 1:
        raise ValueError("pad is one byte")
    body = b"".join(encode_attribute(t, v, pad) for t, v in attributes)

    def header(length: int) -> bytes:
        return struct.pack("!HHI", msg_type, length, MAGIC_COOKIE) + tid

    if password is not None:
        key = password.encode() if isinstance(password, str) else password
        mac = hmac.new(key, header(len(body) + 24) + body, "sha1").digest()
        body += encode_attribute(ATTR_MESSAGE_INTEGRITY, mac)
    if fingerprint:
        crc = (zlib.crc32(header(len(body) + 8) + body) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
        body += encode_attribute(ATTR_FINGERPRINT, struct.pack("!I", crc))
    return header(len(body)) + body


def build_binding_request(
    username: str | bytes,
    *,
    password: bytes | str | None = None,
    transaction_id: bytes | None = None,
    priority: int = 0x6E0001FF,
    tie_breaker: int | None = None,
    controlling: bool = True,
    fingerprint: bool = True,
    before_username: Iterable[tuple[int, bytes]] = (),
    extra_attributes: Iterable[tuple[int, bytes]] = (),
) -> bytes:
    """An ICE connectivity check as a standard client sends it (RFC 8445 sec. 7.1.1).

    Attribute order: ``before_username`` (to test the walk bound), USERNAME,
    PRIORITY, ICE-CONTROLLING/CONTROLLED, ``extra_attributes``, then
    MESSAGE-INTEGRITY and FINGERPRINT.  Random transaction id and tie-breaker
    unless given (give both for reproducible bytes).
    """
    user = username.encode() if isinstance(username, str) else bytes(username)
    tie = os.urandom(8) if tie_breaker is None else struct.pack("!Q", tie_breaker)
    attrs = [*before_username,
             (ATTR_USERNAME, user),
             (ATTR_PRIORITY, struct.pack("!I", priority)),
             (ATTR_ICE_CONTROLLING if controlling else ATTR_ICE_CONTROLLED, tie),
             *extra_attributes]
    return build_message(BINDING_REQUEST, attrs, transaction_id=transaction_id, password=password,
                         fingerprint=fingerprint)
