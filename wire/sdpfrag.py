"""The ICE part of an SDP fragment (RFC 8840 ``application/trickle-ice-sdpfrag``), as WHIP's
PATCH carries it (RFC 9725 4.3): credentials, candidates, end-of-candidates.

Shared by the transceiver (parses the client's restart, writes its own) and the
client's restart helper.  Only what ICE restart needs is kept: the first m-line
and its mid, ``a=ice-ufrag``/``a=ice-pwd`` (session or media level) and the
``a=candidate`` lines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from splitrelay.errors import SplitrelayError

MEDIA_TYPE = "application/trickle-ice-sdpfrag"
# RFC 8839 5.4: ice-char = ALPHA / DIGIT / "+" / "/"; ufrag 4..256, pwd 22..256 chars
_UFRAG = re.compile(r"^[A-Za-z0-9+/]{4,256}$")
_PWD = re.compile(r"^[A-Za-z0-9+/]{22,256}$")


class SdpFragError(SplitrelayError, ValueError):
    """A fragment that cannot be an ICE restart (one-line reason)."""


@dataclass
class IceFragment:
    ufrag: str | None = None
    pwd: str | None = None
    candidates: list[str] = field(default_factory=list)   # "candidate:..." attribute values
    mid: str | None = None
    media: str = "m=audio 9 UDP/TLS/RTP/SAVPF 0"
    end_of_candidates: bool = False

    @classmethod
    def parse(cls, text: str) -> IceFragment:
        frag = cls()
        media_seen = False
        for raw in text.replace("\r\n", "\n").split("\n"):
            line = raw.strip()
            if line.startswith("m="):
                if media_seen:
                    break  # max-bundle: only the first m-line gathers candidates
                media_seen, frag.media = True, line
            elif line.startswith("a=ice-ufrag:"):
                frag.ufrag = line[len("a=ice-ufrag:"):]
            elif line.startswith("a=ice-pwd:"):
                frag.pwd = line[len("a=ice-pwd:"):]
            elif line.startswith("a=mid:"):
                frag.mid = line[len("a=mid:"):]
            elif line.startswith("a=candidate:"):
                frag.candidates.append(line[2:])
            elif line == "a=end-of-candidates":
                frag.end_of_candidates = True
        return frag

    def check_credentials(self) -> tuple[str, str]:
        """The fragment's (ufrag, pwd), which an ICE restart must carry, well-formed."""
        if not self.ufrag or not self.pwd:
            raise SdpFragError("the fragment has no ICE credentials (a=ice-ufrag / a=ice-pwd)")
        if not _UFRAG.match(self.ufrag):
            raise SdpFragError("the fragment's a=ice-ufrag is not 4..256 ice-chars")
        if not _PWD.match(self.pwd):
            raise SdpFragError("the fragment's a=ice-pwd is not 22..256 ice-chars")
        return self.ufrag, self.pwd

    def serialize(self) -> str:
        lines = []
        if self.ufrag:
            lines.append(f"a=ice-ufrag:{self.ufrag}")
        if self.pwd:
            lines.append(f"a=ice-pwd:{self.pwd}")
        lines.append(self.media)
        if self.mid is not None:
            lines.append(f"a=mid:{self.mid}")
        lines += [f"a={c}" for c in self.candidates]
        if self.end_of_candidates:
            lines.append("a=end-of-candidates")
        return "\r\n".join(lines) + "\r\n"
