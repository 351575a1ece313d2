"""The shared vector files for the tests, through tests/vector_files.py (the one reader of their formats)."""

from __future__ import annotations

from .vector_files import VECTOR_DIR, hint_key, load_classes, load_hex, load_hints

VECTORS = VECTOR_DIR
HINT_V2_KEY = hint_key("hint_v2.txt")
assert HINT_V2_KEY == bytes.fromhex("000102030405060708090a0b0c0d0e0f")


def rfc5769() -> dict[str, bytes]:
    """RFC 5769 messages keyed by section number ("2.1" .. "2.4")."""
    return {name: vec.data for name, vec in load_hex("rfc5769.txt").items()}


def hint_v1() -> list[tuple[str, int | None, str]]:
    return [(v.ufrag, v.expected, v.comment) for v in load_hints("hint_v1.txt")]  # type: ignore[misc]


def hint_v2() -> list[tuple[str, int | str | None, str]]:
    """Keyed hints under HINT_V2_KEY; the expectation is a backend id, None, or "forged"."""
    return [(v.ufrag, v.expected, v.comment) for v in load_hints("hint_v2.txt")]


def rfc7983() -> dict[int, str]:
    return dict(load_classes("rfc7983.txt"))
