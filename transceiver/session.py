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
import fractions
import logging
import secrets
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from splitrelay.wire import hint
from splitrelay.transceiver.handlers import FRAME_SAMPLES, FRAME_SECONDS, SAMPLE_RATE, Handler, PcmFrame
from splitrelay.transceiver.ice import new_password, session_ice
from splitrelay.transceiver.mux import MuxedConnection, UdpMux

log = logging.getLogger(__name__)
MAX_BACKLOG = 50  # frames (1 s) of handler audio waiting to be sent
FRAME_BYTES = 2 * FRAME_SAMPLES

# why a session ended (Session.end_reason)
DELETED = "deleted"                  # WHIP DELETE
CLIENT_CLOSED = "client closed"      # DTLS close_notify from the client
FAILED = "failed"                    # ICE or DTLS failed
CONSENT_EXPIRED = "consent expired"  # the client stopped answering consent checks (RFC 7675)
CONNECT_TIMEOUT = "connect timeout"  # answered, but never connected
SHUTDOWN = "shutdown"                # the transceiver stopped


class OfferError(ValueError):
    """aiortc could not use the offer (one-line reason; the request gets a 4xx)."""


def to_mono(frame: AudioFrame) -> PcmFrame:
    """Decoded Opus arrives as interleaved stereo; handlers get one channel (the left)."""
    channels = len(frame.layout.channels)
    raw = bytes(frame.planes[0])[: 2 * frame.samples * channels]
    if channels != 1:
        raw = array("h", raw)[::channels].tobytes()
    return PcmFrame(raw, 1, frame.sample_rate, pts=frame.pts, time=time.monotonic())


class OutboundAudio(MediaStreamTrack):
    """The handler's voice: PCM re-framed to 20 ms and paced, silence when it has nothing to say."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.buffer = bytearray()
        self._start: float | None = None
        self._index = 0
        self.frames_out = 0
        self.overflow_frames = 0  # dropped because the handler ran more than 1 s ahead
        self.cleared_frames = 0   # dropped by clear_audio()

    def push(self, pcm: PcmFrame) -> None:
        if pcm.sample_rate != SAMPLE_RATE:
            raise ValueError(f"send_audio takes {SAMPLE_RATE} Hz PCM, got {pcm.sample_rate} Hz")
        samples = pcm.samples
        if pcm.channels != 1:
            samples = array("h", samples)[::pcm.channels].tobytes()
        self.buffer += samples[: len(samples) & ~1]
        excess = len(self.buffer) - MAX_BACKLOG * FRAME_BYTES
        if excess > 0:  # keep the newest second: a late voice is worse than a clipped one
            drop = -(-excess // FRAME_BYTES) * FRAME_BYTES
            del self.buffer[:drop]
            self.overflow_frames += drop // FRAME_BYTES

    def clear(self) -> float:
        """Drop everything waiting to be sent (barge-in); the seconds dropped."""
        dropped = self.backlog
        self.buffer.clear()
        self.cleared_frames += round(dropped / FRAME_SECONDS)
        return dropped

    @property
    def backlog(self) -> float:
        """Seconds of handler audio waiting to be sent."""
        return len(self.buffer) / (2 * SAMPLE_RATE)

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._index * 0.02 - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        if len(self.buffer) >= FRAME_BYTES:
            pcm = bytes(self.buffer[:FRAME_BYTES])
            del self.buffer[:FRAME_BYTES]
        else:  # a partial frame waits for the rest; the encoder wants one fixed format
            pcm = bytes(FRAME_BYTES)
        frame = AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(pcm)
        frame.pts = self._index * FRAME_SAMPLES
        frame.sample_rate = SAMPLE_RATE
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        self._index += 1
        self.frames_out += 1
        return frame


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


@dataclass(frozen=True)
class StateChange:
    at_ms: float   # since the offer arrived
    kind: str      # "ice", "dtls", "connection" or "gathering"
    state: str


@dataclass
class Session:
    """A live session; ``ufrag`` is its server ICE ufrag (with the routing hint)."""

    session_id: str
    ufrag: str
    pc: RTCPeerConnection
    handler: Handler | None = None
    timings: SessionTimings = field(default_factory=lambda: SessionTimings(time.monotonic()))
    history: list[StateChange] = field(default_factory=list)
    ice_states: list[str] = field(default_factory=lambda: ["new"])
    dtls_states: list[str] = field(default_factory=lambda: ["new"])
    connection_states: list[str] = field(default_factory=lambda: ["new"])
    gathering_states: list[str] = field(default_factory=lambda: ["new"])
    end_reason: str | None = None
    frames_in: int = 0
    handler_errors: int = 0
    messages_in: int = 0
    messages_out: int = 0
    outbound: OutboundAudio = field(default_factory=OutboundAudio)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    ice_connections: list[MuxedConnection] = field(default_factory=list)
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
        states = {"ice": self.ice_states, "dtls": self.dtls_states, "connection": self.connection_states,
                  "gathering": self.gathering_states}[kind]
        if states[-1] != state:
            states.append(state)
            self.history.append(StateChange(round(self.timings.since_offer(), 3), kind, state))

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

    async def _consume(self, track: MediaStreamTrack) -> None:
        assert self.handler is not None
        try:
            while True:
                frame = await track.recv()
                self.frames_in += 1
                await self._guard(self.handler.on_audio(to_mono(frame)))
        except MediaStreamError:
            return

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
        return {"id": self.session_id, "ufrag": self.ufrag, "ice_states": list(self.ice_states),
                "dtls_states": list(self.dtls_states), "connection_states": list(self.connection_states),
                "gathering_states": list(self.gathering_states),
                "history": [asdict(change) for change in self.history], "end_reason": self.end_reason,
                "answer_ms": t.answer_ms, "ice_connected_ms": t.ice_connected_ms,
                "dtls_connected_ms": t.dtls_connected_ms, "ended_ms": t.ended_ms,
                "frames_in": self.frames_in, "frames_out": self.outbound.frames_out,
                "messages_in": self.messages_in, "messages_out": self.messages_out,
                "handler_errors": self.handler_errors}


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
    connect_timeout: float | None = 30.0,
) -> tuple[Session, str]:
    """Create a session for an offer; returns it with the complete SDP answer.

    ``before_answer`` runs once the ufrag is known and before the answer leaves
    (that is where the session is registered with the relay); if it raises, the
    session is torn down and the exception propagates.  ``on_end`` is called once
    when the session ends on its own (failure, consent expiry, client hang-up,
    connect timeout); ``end_reason`` says which.  ``offer_at`` (time.monotonic())
    is when the offer arrived, the origin of the setup timings.
    """
    if not _bundled(offer_sdp):
        raise OfferError("the offer's m-lines are not all in one BUNDLE group (WHIP requires BUNDLE)")
    ufrag = hint.encode(backend_id, key=hint_key)
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
        if track.kind == "audio":
            session._tasks.append(asyncio.ensure_future(session._consume(track)))

    @pc.on("datachannel")
    def _datachannel(channel: Any) -> None:  # noqa: ANN401 - RTCDataChannel
        session._channel = channel

        @channel.on("message")
        def _message(message: str | bytes) -> None:
            session.messages_in += 1
            handler = session.handler
            coro = handler.on_text(message) if isinstance(message, str) else handler.on_bytes(message)
            session._tasks.append(asyncio.ensure_future(session._guard(coro)))

    try:
        with session_ice(mux, ufrag, new_password()) as session.ice_connections:
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            except Exception as exc:  # noqa: BLE001 - aiortc raises many kinds on bad SDP
                raise OfferError(f"{type(exc).__name__}: {exc}".splitlines()[0][:200]) from None
            if not any(t.kind == "audio" for t in pc.getTransceivers()):
                raise OfferError("the offer has no audio m-line")
            _watch_dtls(session, pc)
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
    transports = {t.receiver.transport for t in pc.getTransceivers()}
    if pc.sctp is not None:
        transports.add(pc.sctp.transport)
    for dtls in transports:
        dtls.on("statechange", lambda dtls=dtls: session.record("dtls", dtls.state))


async def _connect_watchdog(session: Session, timeout: float, end: Callable[[str], None]) -> None:
    try:
        await asyncio.wait_for(session.connected.wait(), timeout)
    except TimeoutError:
        end(CONNECT_TIMEOUT)
