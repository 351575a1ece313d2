"""Loaders for the shared test-vector files in ``tests/vectors/`` (a test shim, not library code).

The XDP program (through its C tests) and the Python reference are held to the
same files, so the formats are plain text a C test reads with ``fgets`` and
``sscanf``; this module is the one Python reader of them.  Formats:

* hex files (``rfc5769.txt``): a line starting ``## `` opens a vector named by
  its first word (``## 2.1 sample request ...``); further ``## `` lines right
  after it continue its title.  Other lines starting with ``#`` are comments.
  Every other non-blank line is whitespace-separated hex bytes of the current
  vector.
* hint files (``hint_v1.txt``, ``hint_v2.txt``): ``<ufrag> <expected> <comment...>``
  per line, whitespace-separated; ``expected`` is a decimal backend id, ``none``
  or ``forged``.  A ``# key <32 hex digits>`` line gives the SipHash key the
  expectations assume (keyed files only).
* class files (``rfc7983.txt``): ``<first>-<last> <class>`` (decimal, inclusive);
  every byte 0..255 exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from splitrelay.wire.stun import PacketClass

VECTOR_DIR = Path(__file__).resolve().parent / "vectors"
FORGED = "forged"


class VectorFileError(ValueError):
    """A vector file that does not follow its format (file:line in the message)."""


@dataclass(frozen=True)
class HexVector:
    name: str
    title: str
    data: bytes


@dataclass(frozen=True)
class HintVector:
    ufrag: str
    expected: int | str | None   # backend id, None ("none"), or FORGED
    comment: str


def _path(name: str | Path) -> Path:
    path = Path(name)
    return path if path.is_absolute() or path.exists() else VECTOR_DIR / path


def _lines(path: Path) -> list[tuple[int, str]]:
    return list(enumerate(path.read_text(encoding="utf-8").splitlines(), start=1))


def load_hex(name: str | Path) -> dict[str, HexVector]:
    """Named hex vectors, in file order."""
    path = _path(name)
    names: list[str] = []
    titles: dict[str, list[str]] = {}
    data: dict[str, bytearray] = {}
    previous_heading = False
    for lineno, line in _lines(path):
        if line.startswith("## "):
            text = line[3:].strip()
            if previous_heading and names:
                titles[names[-1]].append(text)
            else:
                if not text:
                    raise VectorFileError(f"{path}:{lineno}: heading without a name")
                vec_name = text.split()[0]
                if vec_name in data:
                    raise VectorFileError(f"{path}:{lineno}: vector {vec_name!r} appears twice")
                names.append(vec_name)
                titles[vec_name] = [text[len(vec_name):].strip()]
                data[vec_name] = bytearray()
            previous_heading = True
            continue
        previous_heading = False
        if not line.strip() or line.startswith("#"):
            continue
        if not names:
            raise VectorFileError(f"{path}:{lineno}: hex before the first '## ' heading")
        for tok in line.split():
            if len(tok) != 2 or any(c not in "0123456789abcdefABCDEF" for c in tok):
                raise VectorFileError(f"{path}:{lineno}: {tok!r} is not one hex byte")
            data[names[-1]].append(int(tok, 16))
    for vec_name in names:
        if not data[vec_name]:
            raise VectorFileError(f"{path}: vector {vec_name!r} has no bytes")
    return {n: HexVector(n, " ".join(t for t in titles[n] if t), bytes(data[n])) for n in names}


def load_hints(name: str | Path) -> list[HintVector]:
    path = _path(name)
    rows = []
    for lineno, line in _lines(path):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 2:
            raise VectorFileError(f"{path}:{lineno}: want '<ufrag> <expected> <comment...>'")
        ufrag, expected = fields[0], fields[1]
        value: int | str | None
        if expected == "none":
            value = None
        elif expected == FORGED:
            value = FORGED
        elif expected.isdigit():
            value = int(expected)
        else:
            raise VectorFileError(f"{path}:{lineno}: expected {expected!r} is not an id, none or forged")
        rows.append(HintVector(ufrag, value, " ".join(fields[2:])))
    return rows


def hint_key(name: str | Path) -> bytes | None:
    """The key a keyed hint file's expectations assume (its ``# key <hex>`` line), or None."""
    for _, line in _lines(_path(name)):
        if line.startswith("# key "):
            return bytes.fromhex(line.split()[2])
    return None


def load_classes(name: str | Path = "rfc7983.txt") -> dict[int, PacketClass]:
    path = _path(name)
    table: dict[int, PacketClass] = {}
    for lineno, line in _lines(path):
        if not line.strip() or line.startswith("#"):
            continue
        try:
            span, cls = line.split()
            first, last = (int(x) for x in span.split("-"))
            klass = PacketClass(cls)
        except ValueError as exc:
            raise VectorFileError(f"{path}:{lineno}: want '<first>-<last> <class>': {exc}") from None
        for b in range(first, last + 1):
            if b in table or not 0 <= b <= 255:
                raise VectorFileError(f"{path}:{lineno}: byte {b} repeated or out of range")
            table[b] = klass
    if sorted(table) != list(range(256)):
        raise VectorFileError(f"{path}: bytes {sorted(set(range(256)) - set(table))} have no class")
    return table
