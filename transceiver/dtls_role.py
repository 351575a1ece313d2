"""The transceiver answers ``a=setup:passive``: the client, which knows when its own ICE is done, starts DTLS.

As the DTLS client (aiortc's default answer, ``setup:active``) the transceiver sent its ClientHello
as soon as *its* side of ICE was connected.  werift drops DTLS that arrives before its own ICE is
connected, so its handshake waited for our first retransmission: measured through the XDP relay,
DTLS connected 1.0-1.15 s after werift's ICE in 5 and 11 of 20 calls (two runs).  As the DTLS
server we never send first; what the client sends before our ICE is connected waits in aioice's
queue (``Connection.data_received``) until the handshake reads it.  An offer that insists on a
role keeps it: after ``setup:active`` aiortc has already made us the server; after ``setup:passive``
we stay the client (``answer_passive`` must look at the offer for that: aiortc leaves our role
"auto" in both the actpass and the passive case).

aiortc has no public way to choose the answerer's role: ``createAnswer`` writes ``setup:active``
for any DTLS transport whose private ``_role`` is still ``"auto"``.  ``answer_passive`` sets
``"server"`` on those between setRemoteDescription and createAnswer; ``check_dtls_role`` fails at
start if aiortc moved that.
"""

from __future__ import annotations

from aiortc import RTCPeerConnection
from aiortc.rtcdtlstransport import RTCDtlsTransport

from splitrelay.errors import SplitrelayError

AUTO = "auto"        # RTCDtlsTransport._role before the offer chose one (it said actpass)
SERVER = "server"    # written as a=setup:passive (aiortc.sdp.DTLS_ROLE_SETUP)


class DtlsRoleError(SplitrelayError):
    """This aiortc no longer chooses the answer's DTLS role the way answer_passive relies on."""


def dtls_transports(pc: RTCPeerConnection) -> set[RTCDtlsTransport]:
    """The peer connection's DTLS transports (one with BUNDLE): its transceivers' and SCTP's."""
    transports = {t.receiver.transport for t in pc.getTransceivers()}
    if pc.sctp is not None:
        transports.add(pc.sctp.transport)
    return transports


def answer_passive(pc: RTCPeerConnection) -> None:
    """Make the coming answer say ``setup:passive`` where the offer (applied) left the choice to us."""
    from aiortc import sdp

    offered = {m.dtls.role for m in sdp.SessionDescription.parse(pc.remoteDescription.sdp).media if m.dtls}
    if SERVER in offered:   # the client said setup:passive: it waits for our ClientHello
        return
    for dtls in dtls_transports(pc):
        if dtls._role == AUTO:
            dtls._set_role(SERVER)


def check_dtls_role() -> None:
    """Fail loudly, at start, if the aiortc internals ``answer_passive`` uses have moved."""
    from aiortc import sdp

    missing = [name for name, ok in (
        ("RTCDtlsTransport._role", "_role" in RTCDtlsTransport.__init__.__code__.co_names),
        ("RTCDtlsTransport._set_role", callable(getattr(RTCDtlsTransport, "_set_role", None))),
        ("RTCPeerConnection.createAnswer reading _role",
         "_role" in RTCPeerConnection.createAnswer.__code__.co_names),
        ("sdp.DTLS_ROLE_SETUP server=passive", getattr(sdp, "DTLS_ROLE_SETUP", {}).get(SERVER) == "passive"),
    ) if not ok]
    if missing:
        import aiortc

        raise DtlsRoleError(f"aiortc {getattr(aiortc, '__version__', '?')} lacks {', '.join(missing)}; "
                            "the transceiver's passive DTLS answer needs aiortc 1.16")
