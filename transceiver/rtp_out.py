"""A session's outbound audio from ``OutboundAudio`` to the wire without aiortc's RTP sender task per frame.

aiortc's ``RTCRtpSender._run_rtp`` task pulls each frame with ``await track.recv()``: so every 20 ms
frame of every call cost a future and a timer for pacing, a task wake-up, an ``av.Packet``, an
``RtpPacket`` with header extensions, two NTP clock reads (~2 µs each) and a chain of coroutines down
to ``sendto``.  The echo profile (docs/bench/profile.md) put that send task at ~64 % of a transceiver's
non-idle Python samples, half of it the encode.  ``DirectSend`` does the same work from loop callbacks:
when the handler pushes a frame (one ``call_soon``) or when the next frame or its silence falls due (one
timer, re-armed only when it has to fire earlier), it encodes (opus.py), writes the RTP header from a
template aiortc itself serialized once for this sender (same SSRC, payload type, marker and header
extensions: only ``mid`` for audio; a sender with abs-send-time negotiated stays on aiortc's task),
and hands the packet to the DTLS transport's ``_send_rtp`` -- the call aiortc's task makes, so SRTP
protect, the transport's counters and the ICE connection's send path (path probes, first-flight
resends) are aiortc's and the project's own.  It then sets the sender's packet/octet counters and
last (NTP, RTP) timestamps as ``_run_rtp`` does, so ``_run_rtcp``'s sender reports and ``getStats``
stay right.  Pacing, ``clear()``, backlog and stage timings are ``OutboundAudio``'s, unchanged.

aiortc's task still runs: its first ``recv()`` starts the direct path and then waits until the track
ends (a ``MediaStreamError`` ends the task as aiortc expects).  A ``ConnectionError`` from the
transport ends the track, as it ends aiortc's task; so does any other error, logged once.  Not kept: the
RTP history for NACK retransmission (aiortc negotiates no NACK for audio; a NACK finds nothing).

Relies on ``RTCRtpSender._ssrc``, its name-mangled counters, ``_run_rtp`` pulling the track through
``_next_encoded_frame``, ``RTCPeerConnection`` starting senders with ``sender.send(parameters)``, and
``RTCDtlsTransport._send_rtp`` (``missing_internals``, tests/test_rtp_out.py; both pinned).
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcpeerconnection import RTCPeerConnection
from aiortc.rtcrtpparameters import RTCRtpSendParameters
from aiortc.rtcrtpsender import RTCRtpSender, random_sequence_number
from aiortc.rtp import HeaderExtensionsMap, RtpPacket
from aiortc.utils import random32

from splitrelay.transceiver.rtp_in import _finish

if TYPE_CHECKING:
    from splitrelay.transceiver.audio import OutboundAudio

log = logging.getLogger(__name__)

SEND_PATH_ENV = "SPLITRELAY_SEND_PATH"
SEND_PATHS = ("direct", "aiortc")
DEFAULT_SEND_PATH = "direct"
NTP_TIMESTAMP = "_RTCRtpSender__ntp_timestamp"
RTP_TIMESTAMP = "_RTCRtpSender__rtp_timestamp"
OCTET_COUNT = "_RTCRtpSender__octet_count"
PACKET_COUNT = "_RTCRtpSender__packet_count"
NTP_OFFSET_NS = 2_208_988_800 * 1_000_000_000   # 1900-01-01 (NTP's epoch) to 1970-01-01, in ns
# Frames one callback sends before it lets the loop run: a loop stalled for a second owes 50 silent frames
# (aiortc's task sent such a catch-up burst in one go too); more than that waits for the next iteration.
MAX_FRAMES_PER_CALLBACK = 64
# Sends whose coroutine suspended (the mux's send path never does today) finished by tasks, at most.
MAX_SUSPENDED = 16
_SEQ_TS = struct.Struct("!HI")


def send_path() -> str:
    """The send path asked for by ``$SPLITRELAY_SEND_PATH`` (``DEFAULT_SEND_PATH`` when unset)."""
    from splitrelay.transceiver.audio import AudioPathError

    name = os.environ.get(SEND_PATH_ENV) or DEFAULT_SEND_PATH
    if name not in SEND_PATHS:
        raise AudioPathError(f"{SEND_PATH_ENV}={name!r}: choose from {', '.join(SEND_PATHS)}")
    return name


def _names(cls: type, function: str) -> tuple[str, ...]:
    """The names ``cls.function``'s code uses (() when there is no such function)."""
    return getattr(getattr(cls.__dict__.get(function), "__code__", None), "co_names", ())


def missing_internals() -> list[str]:
    """Names of the aiortc internals ``DirectSend`` uses that this install lacks ([] = all present)."""
    init, rtcp = _names(RTCRtpSender, "__init__"), _names(RTCRtpSender, "_run_rtcp")
    run_rtp = _names(RTCRtpSender, "_run_rtp")
    counters = (NTP_TIMESTAMP, RTP_TIMESTAMP, OCTET_COUNT, PACKET_COUNT)
    checks = (
        ("RTCRtpSender._ssrc", "_ssrc" in init and "_ssrc" in rtcp),
        ("RTCRtpSender.__packet_count/__octet_count/__ntp_timestamp/__rtp_timestamp",
         all(name in init and name in rtcp and name in run_rtp for name in counters)
         and {PACKET_COUNT, OCTET_COUNT} <= set(_names(RTCRtpSender, "getStats"))),
        ("RTCRtpSender._run_rtp pulling track.recv()", "_next_encoded_frame" in run_rtp
         and "recv" in _names(RTCRtpSender, "_next_encoded_frame")),
        ("RTCPeerConnection starting senders with sender.send()",
         "send" in _names(RTCPeerConnection, "_RTCPeerConnection__connect")),
        ("RTCDtlsTransport._send_rtp", callable(getattr(RTCDtlsTransport, "_send_rtp", None))
         and "_send_rtp" in run_rtp),
    )
    return [name for name, ok in checks if not ok]


def ntp_now() -> int:
    """``aiortc.clock.current_ntp_time()`` (64-bit NTP time, µs resolution) from one clock read, no datetime."""
    seconds, ns = divmod(time.time_ns() + NTP_OFFSET_NS, 1_000_000_000)
    return (seconds << 32) | (ns // 1000 << 32) // 1_000_000


def header_template(parameters: RTCRtpSendParameters, ssrc: int) -> tuple[bytes, bytes] | None:
    """The bytes of the RTP header aiortc's ``_run_rtp`` writes for this sender, before and after the
    sequence number and timestamp; None when a header extension would change per packet (abs-send-time)."""
    extensions = HeaderExtensionsMap()
    extensions.configure(parameters)
    headers = []
    for abs_send_time in (0, 0xABCDEF):
        packet = RtpPacket(payload_type=parameters.codecs[0].payloadType, marker=1, ssrc=ssrc)
        packet.extensions.mid = parameters.muxId
        packet.extensions.abs_send_time = abs_send_time
        headers.append(packet.serialize(extensions))
    if headers[0] != headers[1]:
        return None
    return headers[0][:2], headers[0][8:]


class DirectSend:
    """Sends one ``OutboundAudio``'s frames on its aiortc sender's transport from loop callbacks."""

    def __init__(self, audio: OutboundAudio, sender: RTCRtpSender, frame_samples: int) -> None:
        self.audio = audio
        self.frame_samples = frame_samples   # RTP clock ticks per frame
        self.sender = sender
        self.parameters: RTCRtpSendParameters | None = None
        self.declined: str | None = None   # why aiortc's task sends instead (None: it does not)
        self.packets = 0                   # RTP packets sent here
        self.suspended = 0                 # sends that awaited something and were finished by a task
        self.dropped = 0                   # frames not sent: too many sends were suspended
        self.finished: asyncio.Future[None] | None = None   # done once this path stops for good
        self._started = self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._soon: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._tasks: set[asyncio.Task] = set()
        self._sequence = random_sequence_number()
        self._origin = random32()
        self._head = self._tail = b""
        original = sender.send

        async def send(parameters: RTCRtpSendParameters) -> None:
            self.parameters = parameters
            await original(parameters)

        sender.send = send  # type: ignore[method-assign]

    @property
    def running(self) -> bool:
        return self._started and not self._stopped

    def start(self) -> bool:
        """Take the sending over from aiortc's task (its first ``recv()``); False: leave it to that task."""
        if self._started or self._stopped:
            return self.running
        parameters = self.parameters
        if parameters is None or not parameters.codecs:
            self.declined = "the sender was started without send parameters"
            return False
        template = header_template(parameters, self.sender._ssrc)
        if template is None:
            self.declined = "a per-packet header extension (abs-send-time) is negotiated"
            return False
        self._head, self._tail = template
        self._state: dict[str, Any] = self.sender.__dict__
        self._send_rtp: Callable[[bytes], Any] = self.sender.transport._send_rtp
        self._loop = loop = asyncio.get_running_loop()
        self.finished = loop.create_future()
        self._started = True
        self._soon = loop.call_soon(self._on_soon)
        return True

    def wake(self) -> None:
        """A frame was pushed: look at once (in this loop iteration's callbacks, not inside ``push``)."""
        if self._soon is None and self.running:
            self._soon = self._loop.call_soon(self._on_soon)  # type: ignore[union-attr]

    def stop(self) -> None:
        """Stop for good: no timer, callback or send task is left behind."""
        if self._stopped:   # not ``finished.done()``: cancelling aiortc's task cancels ``finished`` too
            return
        self._stopped = True
        if self.finished is not None and not self.finished.done():
            self.finished.set_result(None)
        for handle in (self._soon, self._timer):
            if handle is not None:
                handle.cancel()
        self._soon = self._timer = None
        for task in self._tasks:
            task.cancel()

    def _on_soon(self) -> None:
        self._soon = None
        self._pump()

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    def _pump(self) -> None:
        """Send every frame that is due; arm the timer for the next look."""
        audio = self.audio
        try:
            now = time.monotonic()
            when = now
            for _ in range(MAX_FRAMES_PER_CALLBACK):
                pcm, when = audio._next_pcm(now)
                if pcm is None:
                    if when > now:
                        break
                else:   # when == now: a quiet frame was shed, look again
                    timestamp = (self._origin + audio._index * self.frame_samples) & 0xFFFFFFFF
                    if not self._send(audio._take(pcm, now), timestamp):
                        return
                now = time.monotonic()
            if self.running:
                self._arm(when)
        except Exception:  # noqa: BLE001 - aiortc's task logs such an error and ends the track; so do we
            log.warning("direct RTP send failed; the session's audio stops", exc_info=True)
            audio.stop()

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            if self._timer_at <= when:   # it fires early: the look then finds nothing due and re-arms
                return
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_timer)  # type: ignore[union-attr]

    def _send(self, payload: bytes, timestamp: int) -> bool:
        """One RTP packet through the DTLS transport's ``_send_rtp``; False: the transport is gone."""
        data = self._head + _SEQ_TS.pack(self._sequence, timestamp) + self._tail + payload
        coro = self._send_rtp(data)
        try:
            yielded = coro.send(None)
        except StopIteration:
            pass
        except ConnectionError:   # closed or no ICE pair: aiortc's task ends here too
            self.audio.stop()
            return False
        else:
            if len(self._tasks) >= MAX_SUSPENDED:
                coro.close()
                self.dropped += 1
                return True
            self.suspended += 1
            task = asyncio.ensure_future(_finish(coro, yielded))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        state = self._state
        state[NTP_TIMESTAMP] = ntp_now()
        state[RTP_TIMESTAMP] = timestamp
        state[OCTET_COUNT] += len(payload)
        state[PACKET_COUNT] += 1
        self._sequence = (self._sequence + 1) & 0xFFFF
        self.packets += 1
        return True
