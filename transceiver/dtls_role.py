"""Who sends the first DTLS flight (``--dtls-role``): the transceiver, resent at the client's nomination
(``active``, the default), or the client (``passive``).

``active`` (aiortc's own answer, ``setup:active``): we send our ClientHello as soon as *our* side of ICE
is connected, on the first valid pair (ice_connection.py), which is before the client's side: werift
and libdatachannel drop a ClientHello that arrives before their own ICE is done, and waited for our
1 s (OpenSSL) retransmission, 1.0-1.15 s in 5 and 11 of 20 werift calls.  ``FirstFlightResender``
therefore sends the same datagram again 5, 20 and 50 ms after the client's nominating check (the
moment werift's ICE, and with it its DTLS server, comes up), until the client answers with any DTLS.
Measured through the XDP relay (BENCHMARKS.md): werift's gap 17 ms p50, 19-20 of 20 within 50 ms.

``passive``: the client, which knows when its own ICE is done, starts DTLS; what it sends before our
ICE is connected waits in aioice's queue (``Connection.data_received``).  Chromium and libdatachannel
are as quick either way, but werift as the DTLS *client* sleeps 100 ms before its ClientHello (its
``RTCDtlsTransport.start()``): 113-118 ms p50, 0 of 20 within 50 ms.

An offer that insists on a role keeps it: after ``setup:active`` aiortc has already made us the
server; after ``setup:passive`` we stay the client (``answer_passive`` must look at the offer for that:
aiortc leaves our role "auto" in both the actpass and the passive case).  aiortc has no public way to
choose the answerer's role: ``createAnswer`` writes ``setup:active`` for any DTLS transport whose private
``_role`` is still ``"auto"``.  ``answer_passive`` sets ``"server"`` on those between
setRemoteDescription and createAnswer; ``check_dtls_role`` fails at start if aiortc moved that.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from splitrelay.errors import SplitrelayError

if TYPE_CHECKING:   # aiortc is imported where it is used: the CLI reads ROLES without loading it
    from aiortc import RTCPeerConnection
    from aiortc.rtcdtlstransport import RTCDtlsTransport

PASSIVE, ACTIVE = "passive", "active"   # the answer's a=setup where the offer leaves it to us (--dtls-role)
ROLES = (PASSIVE, ACTIVE)
DEFAULT_ROLE = ACTIVE
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
    from aiortc import RTCPeerConnection, sdp
    from aiortc.rtcdtlstransport import RTCDtlsTransport

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


# the first flight's resends after the client's nomination, seconds after it: werift builds its DTLS
# server a few ms after its nominating check is answered (its ICE connect() returns then)
RESEND_AFTER_NOMINATION = (0.005, 0.020, 0.050)
# and after the flight itself, for a client whose nomination comes late: libdatachannel with a dead best
# pair dropped our ClientHello and nominated only 2 s later; it waited 0.9 s for OpenSSL's retransmission
RESEND_AFTER_FLIGHT = (0.025, 0.050, 0.100, 0.200)
HANDSHAKE, CLIENT_HELLO = 22, 1   # DTLS record content type, handshake message type (RFC 6347 4.1, 4.2)


def is_client_hello(datagram: bytes) -> bool:
    """A DTLS record holding a ClientHello: content type at 0, handshake type after the 13-byte header."""
    return len(datagram) > 13 and datagram[0] == HANDSHAKE and datagram[13] == CLIENT_HELLO


def is_dtls(datagram: bytes) -> bool:
    """RFC 7983 demultiplexing: a first byte in 20..63 is DTLS."""
    return bool(datagram) and 20 <= datagram[0] <= 63


class FirstFlightResender:
    """As the DTLS client, send our first flight (the ClientHello as OpenSSL wrote it, seen leaving
    at the ICE connection's send) again shortly after the client nominates, until the client answers
    with any DTLS; and 25, 50, 100 and 200 ms after the flight itself, for a client that nominates
    late.  An identical copy of a flight is what a DTLS retransmission is (RFC 6347 4.2.4),
    so a client that already had it treats it as one.  One burst per connection: a nomination
    repeated on later checks does not send it again; as the DTLS server we send no ClientHello, so
    ``passive`` never resends."""

    def __init__(self, send: Callable[[bytes], Awaitable[None]]) -> None:
        self._send = send
        self.flight: bytes | None = None      # our first ClientHello, once sent
        self.nominated = False                # the client's USE-CANDIDATE came
        self.heard = False                    # the client sent DTLS: the handshake is under way
        self.resent = 0                       # copies sent
        self._tasks: list[asyncio.Task] = []

    def sent(self, datagram: bytes) -> None:
        if self.flight is None and is_client_hello(datagram):
            self.flight = datagram
            self._tasks.append(asyncio.ensure_future(self._resend(datagram, RESEND_AFTER_FLIGHT)))
            self._maybe_start()

    def received(self, datagram: bytes) -> None:
        if not self.heard and is_dtls(datagram):
            self.heard = True

    def nomination(self) -> None:
        if not self.nominated:
            self.nominated = True
            self._maybe_start()

    def _maybe_start(self) -> None:
        if self.flight is not None and self.nominated and not self.heard and len(self._tasks) == 1:
            self._tasks.append(asyncio.ensure_future(self._resend(self.flight, RESEND_AFTER_NOMINATION)))

    async def _resend(self, flight: bytes, schedule: tuple[float, ...]) -> None:
        waited = 0.0
        for after in schedule:
            await asyncio.sleep(after - waited)
            waited = after
            if self.heard:
                return
            try:
                await self._send(flight)
            except ConnectionError:   # the connection closed meanwhile
                return
            self.resent += 1

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
