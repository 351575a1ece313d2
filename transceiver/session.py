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

from aioice import Candidate
from aioice.ice import CandidatePair
from aiortc import (RTCConfiguration, RTCDataChannel, RTCDtlsTransport, RTCIceTransport, RTCPeerConnection,
                    RTCRtpReceiver, RTCRtpSender, RTCRtpTransceiver, RTCSctpTransport, RTCSessionDescription)
from aiortc.mediastreams import MediaStreamTrack

from splitrelay.transceiver.audio import OutboundAudio, RtpArrivals, StageTimes, VoiceReceiver
from splitrelay.transceiver.dtls_fingerprint import sha256_only
from splitrelay.transceiver.dtls_role import DEFAULT_ROLE, PASSIVE, answer_passive, dtls_transports
from splitrelay.transceiver.garbage import break_cycles
from splitrelay.transceiver.handlers import SAMPLE_RATE, Handler, PcmFrame
from splitrelay.transceiver.history import StateChange, StateHistory
from splitrelay.transceiver.ice import new_password, restart_ice, session_ice
from splitrelay.transceiver import limits
from splitrelay.transceiver.ice_connection import MuxedConnection
from splitrelay.transceiver.rtp_in import DirectRtp
from splitrelay.transceiver.mux import UdpMux
from splitrelay.transceiver.whip import OfferRejected
from splitrelay.wire.sdpfrag import IceFragment, SdpFragError
from splitrelay.errors import SplitrelayError

log = logging.getLogger(__name__)

# why a session ended (Session.end_reason)
DELETED = "deleted"                  # WHIP DELETE
CLIENT_CLOSED = "client closed"      # DTLS close_notify from the client
FAILED = "failed"                    # ICE or DTLS failed
CONSENT_EXPIRED = "consent expired"  # the client stopped answering consent checks (RFC 7675)
CONNECT_TIMEOUT = "connect timeout"  # answered, but never connected
SHUTDOWN = "shutdown"                # the transceiver stopped
MAX_CALL = "max call"                # its offer token's max_call_s ran out


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
class IceRestart:
    """A restart under way: our SDP fragment for the client, the task that ends with the new
    generation's nominated pair, and when it started (loop time)."""

    fragment: str
    generation: asyncio.Task[CandidatePair]
    started: float


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
    on_end: Callable[[Session], None] | None = None  # called once when the session ends by itself
    _channel: Any = None
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _closed: bool = False
    _released: bool = False

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

    # -- answering an offer (``for_offer``, then ``answer``) ---------------------------

    @classmethod
    def for_offer(cls, ufrag: str, make_handler: Callable[[Session], Handler], offer_at: float | None = None,
                  on_end: Callable[[Session], None] | None = None) -> Session:
        """A new session for an offer that arrived at ``offer_at`` (time.monotonic(), the origin of the
        setup timings), with ``ufrag`` as its server ufrag and its own handler.  ``on_end`` is called
        once when the session ends by itself (failure, consent expiry, client hang-up, connect
        timeout); ``end_reason`` says which."""
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no public STUN: the relay is the candidate
        session = cls(session_id=secrets.token_urlsafe(12), ufrag=ufrag, pc=pc, on_end=on_end,
                      timings=SessionTimings(offer_at if offer_at is not None else time.monotonic()))
        session.handler = make_handler(session)
        pc.on("iceconnectionstatechange", session._ice_changed)
        pc.on("icegatheringstatechange", session._gathering_changed)
        pc.on("connectionstatechange", session._connection_changed)
        pc.on("track", session._track_added)
        pc.on("datachannel", session._channel_opened)
        return session

    async def answer(self, offer_sdp: str, mux: UdpMux,
                     candidates: list[tuple[tuple[str, int], int]] | None = None,
                     before_answer: Callable[[Session], Awaitable[None]] | None = None,
                     connect_timeout: float | None = limits.CONNECT_TIMEOUT, dtls_role: str = DEFAULT_ROLE) -> str:
        """The complete SDP answer to ``offer_sdp``; OfferError if aiortc cannot use the offer.

        ``candidates``: the (address, ICE local preference) pairs to advertise
        (relays.ordered_candidates), default the mux's public candidates.  ``before_answer`` runs once
        the answer is made and before it is set (that is where the session is registered with the
        relay); if it raises, the session is torn down and the exception propagates.  A session that
        has not connected ``connect_timeout`` seconds after the answer ends by itself.  ``dtls_role``:
        our a=setup where the offer lets us choose (dtls_role.ROLES)."""
        pc = self.pc
        try:
            if not _bundled(offer_sdp):
                raise OfferError("the offer's m-lines are not all in one BUNDLE group (WHIP requires BUNDLE)")
            with session_ice(mux, self.ufrag, new_password(), candidates) as self.ice_connections:
                try:
                    await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
                except Exception as exc:  # noqa: BLE001 - aiortc raises many kinds on bad SDP
                    raise OfferError(f"{type(exc).__name__}: {exc}".splitlines()[0][:200]) from None
                if not any(t.kind == "audio" for t in pc.getTransceivers()):
                    raise OfferError("the offer has no audio m-line")
                for connection in self.ice_connections:  # created by setRemoteDescription
                    self.arrivals.watch(connection)
                for dtls in dtls_transports(pc):  # one transport with BUNDLE
                    dtls.on("statechange", lambda dtls=dtls: self.record("dtls", dtls.state))
                if dtls_role == PASSIVE:
                    answer_passive(pc)  # the client starts DTLS once its own ICE is done (dtls_role.py)
                self.outbound.bind(pc.addTrack(self.outbound))  # its RTP: audio.py, rtp_out.py
                answer = await pc.createAnswer()
                if before_answer:
                    await before_answer(self)
                await pc.setLocalDescription(answer)  # gathers: instant, the candidates are the public ones
        except BaseException:
            self.end(DELETED)
            self._closed = True
            await pc.close()
            mux.unregister(self.ufrag)
            raise
        self.timings.answer_ms = self.timings.since_offer()
        if connect_timeout:
            self.keep(self._end_unless_connected(connect_timeout))
        return sha256_only(pc.localDescription).sdp  # one fingerprint (dtls_fingerprint.py)

    def keep(self, coro: Awaitable[None]) -> asyncio.Task:
        """Run ``coro`` for as long as the session lives (cancelled when it closes)."""
        task = asyncio.ensure_future(coro)
        self._tasks.append(task)
        return task

    def _ended_by_itself(self, reason: str) -> None:
        if self.end(reason) and self.on_end:
            self.on_end(self)

    async def _end_unless_connected(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.connected.wait(), timeout)
        except TimeoutError:
            self._ended_by_itself(CONNECT_TIMEOUT)

    # -- ICE restart (RFC 9725 4.3.2) --------------------------------------------------

    async def restart_ice(self, if_match: str, fragment: IceFragment, mux: UdpMux,
                          new_ufrag: Callable[[], Awaitable[str]]) -> IceRestart:
        """Move the call to a new ICE generation with the client's ``fragment``; ``new_ufrag`` gives
        the generation's ufrag (registered with the relays).  Raises OfferRejected (412, 400, 409,
        422, or ``new_ufrag``'s) and then the call goes on untouched on its current pair."""
        if if_match.strip() != "*" and if_match.strip() != f'"{self.etag}"':
            raise OfferRejected(412, "If-Match does not name this session's current ETag")
        try:
            remote_ufrag, remote_pwd = fragment.check_credentials()
            remote_candidates = [Candidate.from_sdp(c[len("candidate:"):]) for c in fragment.candidates]
        except SdpFragError as exc:
            raise OfferRejected(400, str(exc)) from None
        except (ValueError, IndexError):
            raise OfferRejected(400, "the fragment has an a=candidate line that is not a candidate") from None
        async with self.restart_lock:
            connections = [c for c in self.ice_connections if not c._closing]  # BUNDLE closed the others
            if not connections or self.ended.is_set():
                raise OfferRejected(409, "the session has no ICE transport to restart")
            if remote_ufrag == connections[0].remote_username:
                raise OfferRejected(422, "the fragment's ICE ufrag is the current one: trickle ICE is not "
                                         "supported, an ICE restart needs a new ufrag and password")
            ufrag, password = await new_ufrag(), new_password()
            started = asyncio.get_running_loop().time()
            local, generation = restart_ice(connections, mux, ufrag, password, remote_ufrag, remote_pwd,
                                            remote_candidates)
            self.retired_ufrags.append(self.ufrag)
            self.ufrag = ufrag
            self.etag = secrets.token_urlsafe(12)
        answer = IceFragment(ufrag=ufrag, pwd=password, candidates=[f"candidate:{c.to_sdp()}" for c in local],
                             mid=fragment.mid, media=fragment.media, end_of_candidates=True)
        return IceRestart(answer.serialize(), generation, started)

    # -- the peer connection's events ------------------------------------------------

    def _ice_changed(self) -> None:
        state = self.pc.iceConnectionState
        self.record("ice", state)
        if state in ("connected", "completed") and self.timings.ice_connected_ms is None:
            self.timings.ice_connected_ms = self.timings.since_offer()

    def _gathering_changed(self) -> None:
        self.record("gathering", self.pc.iceGatheringState)

    async def _connection_changed(self) -> None:
        state = self.pc.connectionState
        self.record("connection", state)
        if state == "connected" and self.timings.dtls_connected_ms is None:
            self.timings.dtls_connected_ms = self.timings.since_offer()
            self.connected.set()
            assert self.handler is not None
            await self._guard(self.handler.on_start())
        elif state in ("failed", "closed"):  # and not closed by us: close() ends first
            if any(c.consent_expired for c in self.ice_connections):
                self._ended_by_itself(CONSENT_EXPIRED)
            else:  # "closed" without a consent expiry: the client's DTLS close_notify
                self._ended_by_itself(FAILED if state == "failed" else CLIENT_CLOSED)

    def _track_added(self, track: MediaStreamTrack) -> None:
        # fired inside setRemoteDescription, before any packet can arrive: the voice path takes the
        # receiver's audio from its first packet
        receiver = next((t.receiver for t in self.pc.getTransceivers() if t.receiver.track is track), None)
        if track.kind == "audio" and receiver is not None and self.voice is None:
            self.voice = VoiceReceiver(receiver, self.arrivals, self.stages)
            self.keep(self._consume(self.voice))

    def _channel_opened(self, channel: Any) -> None:  # noqa: ANN401 - RTCDataChannel
        self._channel = channel
        channel.on("message", self._message)

    def _message(self, message: str | bytes) -> None:
        self.messages_in += 1
        assert self.handler is not None
        coro = self.handler.on_text(message) if isinstance(message, str) else self.handler.on_bytes(message)
        # finished message tasks are let go: a data-channel flood must not grow this list without bound
        self._tasks[:] = [t for t in self._tasks if not t.done()]
        self.keep(self._guard(coro))

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

    # what one session makes for itself alone (garbage.break_cycles empties them at its release)
    OWNED = (RTCPeerConnection, RTCRtpTransceiver, RTCRtpSender, RTCRtpReceiver, RTCDtlsTransport, RTCIceTransport,
             RTCSctpTransport, RTCDataChannel, MuxedConnection, DirectRtp)

    def release(self) -> bool:
        """Break the cycles an ended session is made of (its peer connection, its transports and their
        callbacks, its handler), so that reference counting frees it and no full collection, which walks
        every live call, is needed (garbage.py).  Only for a closed session whose closing tasks are done:
        it leaves nothing usable.  True the first time."""
        if not self._closed or self._released:
            return False
        self._released = True
        break_cycles(self.pc, self.OWNED)
        self.handler = self.voice = self._channel = self.on_end = None
        self.ice_connections.clear()
        self._tasks.clear()
        return True

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
                   frames_skipped=self.outbound.skipped_frames, frames_dtx=self.outbound.dtx_slots,
                   stages=self.stages.summary())
        return out


def _bundled(sdp: str) -> bool:
    """Every m-line's mid is in one BUNDLE group (or there is only one m-line)."""
    lines = sdp.replace("\r\n", "\n").split("\n")
    mids = [line[6:].strip() for line in lines if line.startswith("a=mid:")]
    if sum(1 for line in lines if line.startswith("m=")) <= 1:
        return True
    groups = [line.split()[1:] for line in lines if line.startswith("a=group:BUNDLE")]
    return any(set(mids) <= set(group) for group in groups)
