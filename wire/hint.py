"""Routing hint carried inside the server's ICE ufrag.

A relay that has never heard of a session (restarted, or a second relay with no
shared state) can still route the session's first STUN Binding Request: the
transceiver chose its ufrag so that the XDP program can decode the owning
backend from it.  The format is versioned so it can grow (for example a keyed
tag) without breaking relays that only know older versions.  The C decoder is
``bpf/hint.h``; both are tested on ``tests/vectors/hint_v1.txt``.

Version 1, 16 ice-chars, base64 order ``A-Z a-z 0-9 + /`` (one char = 6 bits)::

    [0]      version (1 -> 'B')
    [1..3]   backend id, 18 bits big-endian, 1..262143 (0 is reserved)
    [4..15]  72 random bits

Version 2 (keyed, for relays that accept hints from anyone on the internet)::

    [0]      version (2 -> 'C')
    [1..3]   backend id
    [4..11]  48 random bits
    [12..15] tag: low 24 bits of SipHash-2-4(key, ASCII bytes [0..11]), big-endian

A relay holding the key routes only v2 hints whose tag checks: a forged ufrag is
dropped before it costs a flow entry.  Without a key, v1 hints route.
"""

from __future__ import annotations

import secrets
import string

from splitrelay.bpf import consts
from splitrelay.errors import SplitrelayError

ALPHABET = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"
_VALUE = {c: i for i, c in enumerate(ALPHABET)}

VERSION_1 = consts.HINT_V1
VERSION_2 = consts.HINT_V2
V1_LENGTH = consts.HINT_V1_LEN
KEY_LENGTH = 16
MSG_LENGTH = consts.HINT_MSG_LEN
V2_RANDOM_CHARS = 8
ID_BITS = consts.HINT_ID_BITS
MAX_BACKEND_ID = consts.MAX_BACKEND_ID
RANDOM_CHARS = 12  # 72 bits, well above RFC 8445's 24-bit minimum


class HintError(SplitrelayError, ValueError):
    """A backend id that cannot be carried in a routing hint."""


def siphash24(key: bytes, message: bytes) -> int:
    """SipHash-2-4 (Aumasson and Bernstein), the keyed hash the C side computes in XDP."""
    if len(key) != KEY_LENGTH:
        raise HintError(f"hint key must be {KEY_LENGTH} bytes, got {len(key)}")
    mask = (1 << 64) - 1

    def rotl(x: int, b: int) -> int:
        return ((x << b) | (x >> (64 - b))) & mask

    k0, k1 = int.from_bytes(key[:8], "little"), int.from_bytes(key[8:], "little")
    v = [0x736F6D6570736575 ^ k0, 0x646F72616E646F6D ^ k1, 0x6C7967656E657261 ^ k0, 0x7465646279746573 ^ k1]

    def rounds(n: int) -> None:
        for _ in range(n):
            v[0] = (v[0] + v[1]) & mask
            v[1] = rotl(v[1], 13) ^ v[0]
            v[0] = rotl(v[0], 32)
            v[2] = (v[2] + v[3]) & mask
            v[3] = rotl(v[3], 16) ^ v[2]
            v[0] = (v[0] + v[3]) & mask
            v[3] = rotl(v[3], 21) ^ v[0]
            v[2] = (v[2] + v[1]) & mask
            v[1] = rotl(v[1], 17) ^ v[2]
            v[2] = rotl(v[2], 32)

    tail = len(message) % 8
    blocks = [int.from_bytes(message[i:i + 8], "little") for i in range(0, len(message) - tail, 8)]
    blocks.append(((len(message) & 0xFF) << 56) | int.from_bytes(message[len(message) - tail:], "little"))
    for b in blocks:
        v[3] ^= b
        rounds(2)
        v[0] ^= b
    v[2] ^= 0xFF
    rounds(4)
    return v[0] ^ v[1] ^ v[2] ^ v[3]


def _chars(value: int, count: int) -> str:
    return "".join(ALPHABET[(value >> (6 * (count - 1 - i))) & 0x3F] for i in range(count))


def _value(chars: str) -> int:
    out = 0
    for c in chars:
        out = (out << 6) | _VALUE[c]
    return out


def _random_chars(count: int, given: str | None) -> str:
    if given is None:
        return "".join(secrets.choice(ALPHABET) for _ in range(count))
    if len(given) != count or any(c not in _VALUE for c in given):
        raise HintError(f"random part must be {count} ice-chars")
    return given


def encode(backend_id: int, random_part: str | None = None, key: bytes | None = None) -> str:
    """Return a fresh ufrag that routes to ``backend_id``: v2 (tagged) with a key, else v1.

    ``random_part`` (12 ice-chars for v1, 8 for v2) is only for reproducible test vectors.
    """
    if not isinstance(backend_id, int) or not 1 <= backend_id <= MAX_BACKEND_ID:
        raise HintError(f"backend id must be 1..{MAX_BACKEND_ID}, got {backend_id!r}")
    if key is None:
        return ALPHABET[VERSION_1] + _chars(backend_id, 3) + _random_chars(RANDOM_CHARS, random_part)
    head = ALPHABET[VERSION_2] + _chars(backend_id, 3) + _random_chars(V2_RANDOM_CHARS, random_part)
    return head + _chars(siphash24(key, head.encode()) & 0xFFFFFF, 4)


FORGED = "forged"


def inspect(ufrag: str | bytes, key: bytes | None = None) -> int | str | None:
    """The backend id a ufrag's hint names, None when it carries no hint this relay accepts,
    or FORGED for a v2 hint whose tag does not check (exactly the XDP program's decision)."""
    if isinstance(ufrag, bytes):
        try:
            ufrag = ufrag.decode("ascii")
        except UnicodeDecodeError:
            return None
    if len(ufrag) != V1_LENGTH or any(c not in _VALUE for c in ufrag):
        return None
    version, backend_id = _VALUE[ufrag[0]], _value(ufrag[1:4])
    if not backend_id:
        return None
    if version == VERSION_1:
        return None if key else backend_id
    if version != VERSION_2 or not key:
        return None
    tag = siphash24(key, ufrag[:MSG_LENGTH].encode()) & 0xFFFFFF
    return backend_id if _value(ufrag[12:]) == tag else FORGED


def decode(ufrag: str | bytes, key: bytes | None = None) -> int | None:
    """Return the backend id a ufrag's hint names, or None if it carries no valid hint."""
    found = inspect(ufrag, key)
    return found if isinstance(found, int) else None


def load_key(path: str) -> bytes:
    """A hint key file: 32 hex digits (16 bytes), shared by every relay and transceiver."""
    try:
        text = open(path).read().strip()
        key = bytes.fromhex(text)
    except (OSError, ValueError) as exc:
        raise HintError(f"cannot read hint key {path}: {exc}") from None
    if len(key) != KEY_LENGTH:
        raise HintError(f"hint key {path} must hold {2 * KEY_LENGTH} hex digits")
    return key
