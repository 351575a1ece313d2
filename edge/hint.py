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
"""

from __future__ import annotations

import secrets
import string

ALPHABET = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"
_VALUE = {c: i for i, c in enumerate(ALPHABET)}

VERSION_1 = 1
V1_LENGTH = 16
ID_BITS = 18
MAX_BACKEND_ID = (1 << ID_BITS) - 1
RANDOM_CHARS = 12  # 72 bits, well above RFC 8445's 24-bit minimum


class HintError(ValueError):
    """A backend id that cannot be carried in a routing hint."""


def encode(backend_id: int, random_part: str | None = None) -> str:
    """Return a fresh version-1 ufrag that routes to ``backend_id``.

    ``random_part`` (12 ice-chars) is only for reproducible test vectors.
    """
    if not isinstance(backend_id, int) or not 1 <= backend_id <= MAX_BACKEND_ID:
        raise HintError(f"backend id must be 1..{MAX_BACKEND_ID}, got {backend_id!r}")
    if random_part is None:
        random_part = "".join(secrets.choice(ALPHABET) for _ in range(RANDOM_CHARS))
    elif len(random_part) != RANDOM_CHARS or any(c not in _VALUE for c in random_part):
        raise HintError(f"random part must be {RANDOM_CHARS} ice-chars")
    id_chars = "".join(ALPHABET[(backend_id >> shift) & 0x3F] for shift in (12, 6, 0))
    return ALPHABET[VERSION_1] + id_chars + random_part


def decode(ufrag: str | bytes) -> int | None:
    """Return the backend id a ufrag's hint names, or None if it carries no valid hint."""
    if isinstance(ufrag, bytes):
        try:
            ufrag = ufrag.decode("ascii")
        except UnicodeDecodeError:
            return None
    if len(ufrag) != V1_LENGTH or any(c not in _VALUE for c in ufrag):
        return None
    if _VALUE[ufrag[0]] != VERSION_1:
        return None
    backend_id = (_VALUE[ufrag[1]] << 12) | (_VALUE[ufrag[2]] << 6) | _VALUE[ufrag[3]]
    return backend_id or None
