"""One WebRTC session on the transceiver: the aiortc peer connection and its media glue.

The session answers an offer with the public candidates as its only
candidates (through the mux, see ``ice.py``), feeds decoded audio and
data-channel messages to its handler, paces the handler's audio back out in
20 ms frames, and records what an operator needs: every state change (ICE,
DTLS, peer connection, gathering) with its time, how long each setup phase
took, and why it ended.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from splitrelay.wire import hint
from splitrelay.transceiver.audio import OutboundAudio, RtpArrivals, StageTimes, VoiceReceiver
from splitrelay.transceiver.dtls_role import answer_passive, dtls_transports
from splitrelay.transceiver.handlers import SAMPLE_RATE, Handler, PcmFrame
from splitrelay.transceiver.history import StateChange, StateHistory
from splitrelay.transceiver.ice import new_password, session_ice
from splitrelay.transceiver import limits
from splitrelay.transceiver.ice_connection import MuxedConnection
from splitrelay.transceiver.mux import UdpMux
from splitrelay.errors import SplitrelayError

log = logging.getLogger(__name__)

# why a session ended (Session.end_reason)
DELETED = "deleted"                  # WHIP DELETE
CLIENT_CLOSED = "client closed"      # DTLS close_notify from the client
FAILED = "failed"                    # ICE or DTLS failed
CONSENT_EXPIRED = "consent expired"  # the client stopped answering consent checks (RFC 7675)
CONNECT_TIMEOUT = "connect timeout"  # answered, but never connected
SHUTDOWN = "shutdown"                # the transceiver stopped


class OfferError(SplitrelayError, ValueError):
    """aiortc could not use the offer (one-line reason; the request gets a 4xx)."""


@dataclass
class SessionTimings:
    """Milliseconds from the offer's arrival (``offer_at``, time.monotonic()) to each phase."""

    offer_at: float
    answer_ms: float | None = None
    ice_connected_ms: float | None = None
    dtls_connected_ms: float | None = None
    ended_ms: float | None = None

    def since_offer(self) -> float:
        return (time.monotonic() - self.offer_at) * 1000.0


@dataclass
class Session:
    """A live session; ``ufrag`` is its server ICE ufrag (with the routing hint)."""

    session_id: str
    ufrag: str
    pc: RTCPeerConnection
    handler: Handler | None = None
    timings: SessionTimings = field(default_factory=lambda: SessionTimings(time.monotonic()))
    states: StateHistory = field(default_factory=StateHistory)
    end_reason: str | None = None
    frames_in: int = 0
    handler_errors: int = 0
    messages_in: int = 0
    messages_out: int = 0
    stages: StageTimes = field(default_factory=StageTimes)
    arrivals: RtpArrivals = field(default_factory=RtpArrivals)
    outbound: OutboundAudio = field(default_factory=OutboundAudio)
    voice: VoiceReceiver | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    ice_connections: list[MuxedConnection] = field(default_factory=list)
    etag: str = field(default_factory=lambda: secrets.token_urlsafe(12))  # this ICE generation (RFC 9725)
    retired_ufrags: list[str] = field(default_factory=list)  # earlier generations' ufrags (ICE restarts)
    restart_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _channel: Any = None
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _closed: bool = False

    # -- SessionIO for the handler ----------------------------------------------------

    def send_audio(self, frame: PcmFrame) -> None:
        self.outbound.push(frame)

    def clear_audio(self) -> float:
        return self.outbound.clear()

    def send_text(self, text: str) -> None:
        self._send(text)

    def send_bytes(self, data: bytes) -> None:
        self._send(bytes(data))

    def _send(self, message: str | bytes) -> None:
        if self._channel is not None and self._channel.readyState == "open":
            self._channel.send(message)
            self.messages_out += 1

    # -- state -----------------------------------------------------------------------

    def record(self, kind: str, state: str) -> None:
        self.states.record(kind, state)

    @property
    def history(self) -> list[StateChange]:
        return self.states.changes

    @property
    def ice_states(self) -> list[str]:
        return self.states.states["ice"]

    @property
    def dtls_states(self) -> list[str]:
        return self.states.states["dtls"]

    @property
    def connection_states(self) -> list[str]:
        return self.states.states["connection"]

    @property
    def gathering_states(self) -> list[str]:
        return self.states.states["gathering"]

    def end(self, reason: str) -> bool:
        """Mark the session over (the first reason wins); True if this call ended it."""
        if self.ended.is_set():
            return False
        self.end_reason = reason
        self.timings.ended_ms = self.timings.since_offer()
        self.ended.set()
        return True

    async def _guard(self, coro: Awaitable[None]) -> None:
        try:
            await coro
        except Exception:  # noqa: BLE001 - a handler bug must not end the call
            self.handler_errors += 1
            log.exception("handler error in session %s", self.session_id)

    def __post_init__(self) -> None:
        self.outbound.stages = self.stages
        self.states.origin = self.timings.offer_at  # state times count from the offer, like the phases

    async def _consume(self, voice: VoiceReceiver) -> None:
        assert self.handler is not None
        while True:
            frame = await voice.recv()
            self.frames_in += 1
            await self._guard(self.handler.on_audio(frame))

    async def close(self, reason: str = DELETED) -> None:
        """End the call: stop the handler, close the peer connection (which frees its mux routes)."""
        self.end(reason)
        if self._closed:
            return
        self._closed = True
        if self.handler:
            await self._guard(self.handler.on_stop())
        for task in self._tasks:
            task.cancel()
        await self.pc.close()
        self.record("connection", self.pc.connectionState)
        self.record("ice", self.pc.iceConnectionState)

    async def stats(self) -> dict[str, Any]:
        """Media figures from aiortc's getStats: RTT (RTCP), inbound jitter and loss, packets/bytes."""
        out: dict[str, Any] = {"rtt_ms": None, "jitter_ms": None, "packets_lost": 0, "packets_received": 0,
                               "packets_sent": 0, "bytes_received": 0, "bytes_sent": 0}
        for sender in self.pc.getSenders():
            if sender.track is None:
                continue
            for item in (await sender.getStats()).values():
                if item.type == "outbound-rtp":
                    out["packets_sent"] += item.packetsSent
                    out["bytes_sent"] += item.bytesSent
                elif item.type == "remote-inbound-rtp" and item.roundTripTime is not None:
                    out["rtt_ms"] = item.roundTripTime * 1000
        for receiver in self.pc.getReceivers():
            for item in (await receiver.getStats()).values():
                if item.type == "inbound-rtp":
                    out["packets_received"] += item.packetsReceived
                    out["bytes_received"] += getattr(item, "bytesReceived", 0)  # aiortc 1.16 has none
                    out["packets_lost"] += item.packetsLost
                    out["jitter_ms"] = item.jitter * 1000 / SAMPLE_RATE if item.jitter is not None else None
        return out

    def to_dict(self) -> dict[str, Any]:
        t = self.timings
        return {"id": self.session_id, "ufrag": self.ufrag,
                **{f"{kind}_states": list(states) for kind, states in self.states.states.items()},
                "history": [asdict(change) for change in self.history], "end_reason": self.end_reason,
                "answer_ms": t.answer_ms, "ice_connected_ms": t.ice_connected_ms,
                "dtls_connected_ms": t.dtls_connected_ms, "ended_ms": t.ended_ms,
                "frames_in": self.frames_in, "frames_out": self.outbound.frames_out,
                "messages_in": self.messages_in, "messages_out": self.messages_out,
                "handler_errors": self.handler_errors, "paths": self.path_changes(),
                "audio": self.audio()}

    def path_changes(self) -> list[dict[str, Any]]:
        """Each time the media moved to another client address (paths.py): when, why, where."""
        return [{"at_ms": round((at - self.timings.offer_at) * 1000.0, 3), "reason": reason,
                 "remote": f"{addr[0]}:{addr[1]}"}
                for c in self.ice_connections for at, reason, addr in c.paths.changes]

    def audio(self) -> dict[str, Any]:
        """The media path's own figures: receive buffer, concealment, pacing, per-stage times (ms)."""
        out = self.voice.to_dict() if self.voice else {}
        out.update(frames_silent=self.outbound.silent_frames, frames_cleared=self.outbound.cleared_frames,
                   frames_overflow=self.outbound.overflow_frames,
                   frames_skipped=self.outbound.skipped_frames, stages=self.stages.summary())
        return out


def _bundled(sdp: str) -> bool:
    """Every m-line's mid is in one BUNDLE group (or there is only one m-line)."""
    lines = sdp.replace("\r\n", "\n").split("\n")
    mids = [line[6:].strip() for line in lines if line.startswith("a=mid:")]
    if sum(1 for line in lines if line.startswith("m=")) <= 1:
        return True
    groups = [line.split()[1:] for line in lines if line.startswith("a=group:BUNDLE")]
    return any(set(mids) <= set(group) for group in groups)


async def answer_offer(
    offer_sdp: str,
    mux: UdpMux,
    backend_id: int,
    make_handler: Callable[[Session], Handler],
    before_answer: Callable[[Session], Awaitable[None]] | None = None,
    on_end: Callable[[Session], None] | None = None,
    hint_key: bytes | None = None,
    offer_at: float | None = None,
    connect_timeout: float | None = limits.CONNECT_TIMEOUT,
    candidates: list[tuple[tuple[str, int], int]] | None = None,
    ufrag: str | None = None,
) -> tuple[Session, str]:
    """Create a session for an offer; returns it with the complete SDP answer.

    ``before_answer`` runs once the ufrag is known and before the answer leaves
    (that is where the session is registered with the relay); if it raises, the
    session is torn down and the exception propagates.  ``on_end`` is called once
    when the session ends on its own (failure, consent expiry, client hang-up,
    connect timeout); ``end_reason`` says which.  ``offer_at`` (time.monotonic())
    is when the offer arrived, the origin of the setup timings.  ``candidates``: the
    (address, ICE local preference) pairs to advertise (relays.ordered_candidates), default
    the mux's public candidates.  ``ufrag``: the session's server ufrag, already registered
    (ufrag_pool.py); default a new one.
    """
    if not _bundled(offer_sdp):
        raise OfferError("the offer's m-lines are not all in one BUNDLE group (WHIP requires BUNDLE)")
    ufrag = ufrag or hint.encode(backend_id, key=hint_key)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no public STUN: the relay is the candidate
    session = Session(session_id=secrets.token_urlsafe(12), ufrag=ufrag, pc=pc,
                      timings=SessionTimings(offer_at if offer_at is not None else time.monotonic()))
    session.handler = make_handler(session)

    def ended_by_itself(reason: str) -> None:
        if session.end(reason) and on_end:
            on_end(session)

    @pc.on("iceconnectionstatechange")
    def _ice() -> None:
        state = pc.iceConnectionState
        session.record("ice", state)
        if state in ("connected", "completed") and session.timings.ice_connected_ms is None:
            session.timings.ice_connected_ms = session.timings.since_offer()

    @pc.on("icegatheringstatechange")
    def _gathering() -> None:
        session.record("gathering", pc.iceGatheringState)

    @pc.on("connectionstatechange")
    async def _conn() -> None:
        state = pc.connectionState
        session.record("connection", state)
        if state == "connected" and session.timings.dtls_connected_ms is None:
            session.timings.dtls_connected_ms = session.timings.since_offer()
            session.connected.set()
            await session._guard(session.handler.on_start())
        elif state in ("failed", "closed"):  # and not closed by us: session.close() ends first
            if any(c.consent_expired for c in session.ice_connections):
                ended_by_itself(CONSENT_EXPIRED)
            else:  # "closed" without a consent expiry: the client's DTLS close_notify
                ended_by_itself(FAILED if state == "failed" else CLIENT_CLOSED)

    @pc.on("track")
    def _track(track: MediaStreamTrack) -> None:
        # fired inside setRemoteDescription, before any packet can arrive: the voice path takes the
        # receiver's audio from its first packet
        receiver = next((t.receiver for t in pc.getTransceivers() if t.receiver.track is track), None)
        if track.kind == "audio" and receiver is not None and session.voice is None:
            session.voice = VoiceReceiver(receiver, session.arrivals, session.stages)
            session._tasks.append(asyncio.ensure_future(session._consume(session.voice)))

    @pc.on("datachannel")
    def _datachannel(channel: Any) -> None:  # noqa: ANN401 - RTCDataChannel
        session._channel = channel

        @channel.on("message")
        def _message(message: str | bytes) -> None:
            session.messages_in += 1
            handler = session.handler
            coro = handler.on_text(message) if isinstance(message, str) else handler.on_bytes(message)
            # finished message tasks are let go: a data-channel flood must not grow this list without bound
            session._tasks[:] = [t for t in session._tasks if not t.done()]
            session._tasks.append(asyncio.ensure_future(session._guard(coro)))

    try:
        with session_ice(mux, ufrag, new_password(), candidates) as session.ice_connections:
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            except Exception as exc:  # noqa: BLE001 - aiortc raises many kinds on bad SDP
                raise OfferError(f"{type(exc).__name__}: {exc}".splitlines()[0][:200]) from None
            if not any(t.kind == "audio" for t in pc.getTransceivers()):
                raise OfferError("the offer has no audio m-line")
            for connection in session.ice_connections:  # created by setRemoteDescription
                session.arrivals.watch(connection)
            _watch_dtls(session, pc)
            answer_passive(pc)  # the client starts DTLS once its own ICE is done (dtls_role.py)
            pc.addTrack(session.outbound)
            answer = await pc.createAnswer()
            if before_answer:
                await before_answer(session)
            await pc.setLocalDescription(answer)  # gathers: instant, the candidates are the public ones
    except BaseException:
        session.end(DELETED)
        session._closed = True
        await pc.close()
        mux.unregister(ufrag)
        raise
    session.timings.answer_ms = session.timings.since_offer()
    if connect_timeout:
        session._tasks.append(asyncio.ensure_future(_connect_watchdog(session, connect_timeout, ended_by_itself)))
    return session, pc.localDescription.sdp


def _watch_dtls(session: Session, pc: RTCPeerConnection) -> None:
    """Record the DTLS transport's states (one transport with BUNDLE)."""
    for dtls in dtls_transports(pc):
        dtls.on("statechange", lambda dtls=dtls: session.record("dtls", dtls.state))


async def _connect_watchdog(session: Session, timeout: float, end: Callable[[str], None]) -> None:
    try:
        await asyncio.wait_for(session.connected.wait(), timeout)
    except TimeoutError:
        end(CONNECT_TIMEOUT)
