"""The answer names the transceiver's DTLS certificate by one fingerprint, SHA-256 (as browsers do).

aiortc lists sha-256, sha-384 and sha-512; libdatachannel (v0.24.5, npm node-datachannel 0.33.4)
keeps the last one, sha-512.  It hands the answer to its ICE agent before it stores the answer for
DTLS (``PeerConnection::setRemoteDescription``): when our check reached the client before the
answer (it usually does: we check as soon as we answer), ICE can connect in between, and the DTLS
transport then starts with its default algorithm, sha-256, while the fingerprint check compares
algorithms with the stored sha-512 and refuses our certificate without a log line ("DTLS alert:
unknown CA", then "Got a remote candidate without ICE transport" when the failure closed ICE under
the answer's candidates).  12 libdatachannel callers at once on loopback, no relay: 25 of 240 calls
failed so; with the sha-256 line alone 2 of 240, both libdatachannel's rarer form of the same race
(our certificate arrived before it had stored the answer at all; upstream libdatachannel PR #1612).
With one sha-256 line both of its algorithms agree.
"""

from __future__ import annotations

from aiortc import RTCSessionDescription

ALGORITHM = "sha-256"   # every WebRTC stack verifies it (RFC 8827 6.5)
_PREFIX = "a=fingerprint:"


def sha256_only(description: RTCSessionDescription) -> RTCSessionDescription:
    """``description`` without its ``a=fingerprint`` lines of other algorithms (unchanged if it
    has no sha-256 line: a certificate named by some fingerprint beats one named by none)."""
    lines = description.sdp.split("\r\n")
    kept = [line for line in lines
            if not line.startswith(_PREFIX) or line[len(_PREFIX):].lower().startswith(ALGORITHM + " ")]
    if not any(line.startswith(_PREFIX) for line in kept):
        return description
    return RTCSessionDescription(sdp="\r\n".join(kept), type=description.type)
