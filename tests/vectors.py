"""Loaders for the shared vector files in tests/vectors/ (used by the C and the Python tests alike)."""

from __future__ import annotations

from pathlib import Path

VECTORS = Path(__file__).parent / "vectors"


def rfc5769() -> dict[str, bytes]:
    """RFC 5769 messages keyed by section number ("2.1" .. "2.4")."""
    out: dict[str, bytes] = {}
    current = None
    for line in (VECTORS / "rfc5769.txt").read_text().splitlines():
        if line.startswith("## ") and line[3:4].isdigit():
            current = line.split()[1]
            out[current] = b""
        elif line.startswith("#") or not line.strip():
            continue
        elif current:
            out[current] += bytes.fromhex(line)
    return out


HINT_V2_KEY = bytes.fromhex("000102030405060708090a0b0c0d0e0f")


def _hint_rows(name: str) -> list[tuple[str, int | str | None, str]]:
    rows = []
    for line in (VECTORS / name).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        ufrag, expected, *comment = line.split()
        value = None if expected == "none" else expected if expected == "forged" else int(expected)
        rows.append((ufrag, value, " ".join(comment)))
    return rows


def hint_v1() -> list[tuple[str, int | None, str]]:
    return _hint_rows("hint_v1.txt")


def hint_v2() -> list[tuple[str, int | str | None, str]]:
    """Keyed hints under HINT_V2_KEY; the expectation is a backend id, None, or "forged"."""
    return _hint_rows("hint_v2.txt")


def rfc7983() -> dict[int, str]:
    table: dict[int, str] = {}
    for line in (VECTORS / "rfc7983.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        span, cls = line.split()
        first, last = (int(x) for x in span.split("-"))
        for b in range(first, last + 1):
            table[b] = cls
    assert sorted(table) == list(range(256)), "rfc7983.txt must cover every byte once"
    return table
