"""One WebRTC session on the transceiver: the aiortc peer connection and its media glue.

The session answers an offer with the relay's public address as its only
candidate, feeds decoded audio and data-channel text to its handler, paces the
handler's audio back out in 20 ms frames, and records what an operator needs:
the state history and how long each setup phase took.
"""

from __future__ import annotations

import asyncio
from array import array
import fractions
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from collections.abc import Callable

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from splitrelay.edge import hint
from splitrelay.transceiver.handlers import FRAME_SAMPLES, SAMPLE_RATE, Handler, PcmFrame
from splitrelay.transceiver.ice import new_password, session_ice
from splitrelay.transceiver.mux import UdpMux

log = logging.getLogger(__name__)
MAX_BACKLOG = 50  # frames (1 s) of handler audio waiting to be sent


def to_mono(frame: AudioFrame) -> PcmFrame:
    """Decoded Opus arrives as interleaved stereo; handlers get one channel (the left)."""
    raw = bytes(frame.planes[0])[: 2 * frame.samples * len(frame.layout.channels)]
    channels = len(frame.layout.channels)
    if channels == 1:
        return PcmFrame(raw, 1, frame.sample_rate)
    return PcmFrame(array("h", raw)[::channels].tobytes(), 1, frame.sample_rate)


class OutboundAudio(MediaStreamTrack):
    """The handler's voice: queued PCM paced at 20 ms, silence when it has nothing to say."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.queue: deque[PcmFrame] = deque(maxlen=MAX_BACKLOG)
        self._start: float | None = None
        self._index = 0
        self.frames_out = 0

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._index * 0.02 - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        pcm = self.queue.popleft() if self.queue else None
        if pcm is None or pcm.channels != 1 or len(pcm.samples) != 2 * FRAME_SAMPLES:
            pcm = PcmFrame(bytes(2 * FRAME_SAMPLES))  # the encoder wants one fixed format: 20 ms mono
        frame = AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(pcm.samples)
        frame.pts = self._index * FRAME_SAMPLES
        frame.sample_rate = SAMPLE_RATE
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        self._index += 1
        self.frames_out += 1
        return frame


@dataclass
class SessionTimings:
    offer_at: float
    answer_ms: float | None = None
    ice_connected_ms: float | None = None
    dtls_connected_ms: float | None = None


@dataclass
class Session:
    """A live session; ``ufrag`` is its server ICE ufrag (with the routing hint)."""

    session_id: str
    ufrag: str
    pc: RTCPeerConnection
    handler: Handler | None = None
    timings: SessionTimings = field(default_factory=lambda: SessionTimings(time.monotonic()))
    ice_states: list[str] = field(default_factory=list)
    connection_states: list[str] = field(default_factory=list)
    frames_in: int = 0
    handler_errors: int = 0
    outbound: OutboundAudio = field(default_factory=OutboundAudio)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    _channel: object | None = None
    _tasks: list[asyncio.Task] = field(default_factory=list)

    # SessionIO for the handler
    def send_audio(self, frame: PcmFrame) -> None:
        self.outbound.queue.append(frame)

    def send_text(self, text: str) -> None:
        if self._channel is not None and self._channel.readyState == "open":
            self._channel.send(text)

    async def _guard(self, coro) -> None:  # noqa: ANN001
        try:
            await coro
        except Exception:  # noqa: BLE001 - a handler bug must not end the call
            self.handler_errors += 1
            log.exception("handler error in session %s", self.session_id)

    async def _consume(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                self.frames_in += 1
                pcm = to_mono(frame)
                await self._guard(self.handler.on_audio(pcm))
        except MediaStreamError:
            return

    async def close(self) -> None:
        if self.handler:
            await self._guard(self.handler.on_stop())
        for task in self._tasks:
            task.cancel()
        await self.pc.close()
        self.ended.set()

    async def stats(self) -> dict:
        out = {"rtt_ms": None, "jitter_ms": None, "packets_lost": 0, "packets_received": 0,
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

    def to_dict(self) -> dict:
        t = self.timings
        return {"id": self.session_id, "ufrag": self.ufrag, "ice_states": self.ice_states,
                "connection_states": self.connection_states, "answer_ms": t.answer_ms,
                "ice_connected_ms": t.ice_connected_ms, "dtls_connected_ms": t.dtls_connected_ms,
                "frames_in": self.frames_in, "frames_out": self.outbound.frames_out,
                "handler_errors": self.handler_errors}


async def answer_offer(
    offer_sdp: str,
    mux: UdpMux,
    backend_id: int,
    make_handler: Callable[[Session], Handler],
    before_answer: Callable[[Session], asyncio.Future | None] | None = None,
    on_end: Callable[[Session], None] | None = None,
    hint_key: bytes | None = None,
) -> tuple[Session, str]:
    """Create a session for an offer; returns it with the SDP answer.

    ``before_answer`` runs once the ufrag is known and before the answer leaves
    (that is where the session is registered with the relay).
    """
    ufrag = hint.encode(backend_id, key=hint_key)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    session = Session(session_id=secrets.token_urlsafe(12), ufrag=ufrag, pc=pc)
    session.handler = make_handler(session)
    t0 = session.timings.offer_at

    @pc.on("iceconnectionstatechange")
    def _ice() -> None:
        session.ice_states.append(pc.iceConnectionState)
        if pc.iceConnectionState in ("connected", "completed") and session.timings.ice_connected_ms is None:
            session.timings.ice_connected_ms = (time.monotonic() - t0) * 1000

    @pc.on("connectionstatechange")
    async def _conn() -> None:
        state = pc.connectionState
        session.connection_states.append(state)
        if state == "connected" and session.timings.dtls_connected_ms is None:
            session.timings.dtls_connected_ms = (time.monotonic() - t0) * 1000
            session.connected.set()
            await session._guard(session.handler.on_start())
        if state in ("failed", "closed") and not session.ended.is_set():
            session.ended.set()
            if on_end:
                on_end(session)

    @pc.on("track")
    def _track(track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            session._tasks.append(asyncio.ensure_future(session._consume(track)))

    @pc.on("datachannel")
    def _datachannel(channel) -> None:  # noqa: ANN001
        session._channel = channel

        @channel.on("message")
        def _message(message) -> None:  # noqa: ANN001
            if isinstance(message, str):
                session._tasks.append(asyncio.ensure_future(session._guard(session.handler.on_text(message))))

    with session_ice(mux, ufrag, new_password()):
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        if not any(t.kind == "audio" for t in pc.getTransceivers()):
            await pc.close()
            raise ValueError("the offer has no audio m-line")
        pc.addTrack(session.outbound)
        answer = await pc.createAnswer()
        if before_answer:
            await before_answer(session)
        await pc.setLocalDescription(answer)
    session.timings.answer_ms = (time.monotonic() - t0) * 1000
    return session, pc.localDescription.sdp
