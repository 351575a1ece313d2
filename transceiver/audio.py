"""The session's media path, cut for voice: a receive path with its own buffer and push-paced sending.

Measured on the echo through two stock aiortc peers, the ~200 ms round trip was almost
all buffering: aiortc's audio receiver holds four frames before it releases one (twice
on an echo, ~160 ms), the session's fixed 20 ms send clock added 3-29 ms, and each
frame crossed two thread hops (decoder thread, encoder executor).  Here:

* ``VoiceReceiver`` takes over an aiortc ``RTCRtpReceiver``'s audio after SRTP: its
  packets go to an ``AdaptiveJitterBuffer`` (jitter.py) and are decoded on the loop
  with libopus (opus.py), lost ones concealed (FEC or PLC) and counted.  aiortc has no
  public hook for its receiver's buffer, so this replaces the private one (see
  ``check_aiortc``); RTCP, statistics and SRTP stay aiortc's.
* ``OutboundAudio`` sends the handler's audio as soon as it is pushed, paced by RTP
  time: frame ``n`` may leave from ``anchor + n * 20 ms - lead``, so a burst goes out
  at real-time rate and nothing waits for a clock tick; silence fills in only when
  the handler is ``GRACE`` late; the first frame after silence re-anchors the clock, so
  a late frame never delays the ones after it (no sleep that adds up).  The lead is
  three frames for live audio (a caller's bursts) and one for generated audio (a
  reply: what was sent ahead still plays after a barge-in); ``clear()`` drops every
  frame not yet sent at once.  It encodes on the loop and sends from loop callbacks straight
  to the DTLS transport (rtp_out.py), or with ``SPLITRELAY_SEND_PATH=aiortc`` hands aiortc's
  sender task encoded packets, which it packs without its executor.
* ``StageTimes`` records where each frame's time goes (RTP at the mux, buffer,
  decode, handler, outbound queue, encode), reported in ``Session.to_dict()["audio"]``
  and by ``splitrelay bench-audio``.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from array import array
from collections import deque
from collections.abc import Callable
from typing import Any

from aioice.ice import Connection
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcrtpreceiver import RTCRtpReceiver
from aiortc.rtcrtpsender import RTCRtpSender
from av.packet import Packet

from splitrelay.errors import SplitrelayError
from splitrelay.transceiver.handlers import FRAME_SAMPLES, FRAME_SECONDS, SAMPLE_RATE, PcmFrame
from splitrelay.transceiver.jitter import AdaptiveJitterBuffer
from splitrelay.transceiver import opus, rtp_in, rtp_out
from splitrelay.transceiver.opus import OpusDecoder, OpusEncoder
from splitrelay.transceiver.rtp_in import DirectRtp
from splitrelay.transceiver.rtp_out import DirectSend

MAX_BACKLOG = 50  # frames (1 s) of handler audio waiting to be sent
FRAME_BYTES = 2 * FRAME_SAMPLES
# The stream may run this far ahead of real time (a token bucket of 3 frames): a caller whose sender
# stalled and then caught up with 2-3 frames at once (the stock aiortc client does, at start and on a
# busy loop) is echoed at once; with one frame of lead such a burst left a fixed 20-40 ms queue behind
# it (outbound queue p50 34.7 ms, measured).
LEAD = 3 * FRAME_SECONDS
# Generated audio (a TTS reply: pushes without an arrival time) runs only one frame ahead: what was sent
# ahead is at the client when the caller barges in, and plays there after the agent has stopped.  Its
# frames are queued well before their time, so the lead only covers the sender's own wake-up lateness
# (stage ``send_late``): 0.6-0.9 ms p50, 3.4-12.7 ms p99 through the lab (bench.voice, load 0.8-2.7); one
# frame covers that, and costs at most 20 ms of audio after a barge-in (three cost 60 ms; the barge-in
# p50 went from 192 to 72 ms with this and clear()'s on-time silence).  At load 3.5 the p99 was 99.5 ms:
# loop stalls that no lead worth its barge-in cost covers; the listener's own buffer has to.
REPLY_LEAD = FRAME_SECONDS
GRACE = 3 * FRAME_SECONDS   # silence replaces the handler's audio once it is this late (loss concealment
#                             in the receive buffer makes an echoed frame up to ~1 frame late)
# Discontinuous transmission (RFC 7587 section 3.1.3; what Chrome sends with ``usedtx=1``), for a handler that
# asks for it: in a pause only every DTX_EVERY-th silent frame goes out, 400 ms apart like libopus's own DTX
# updates, and the RTP time still advances over the slots left empty, so the listener's buffer sees a pause
# (no sequence gap: nothing counts as lost) and plays comfort noise or silence through it.
DTX_EVERY = 20
TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
AIORTC_JITTER_BUFFER = "_RTCRtpReceiver__jitter_buffer"
STAGES = ("mux_to_receiver", "jitter_buffer", "decode", "handler", "outbound_queue", "encode", "in_to_out",
          "send_late", "flush_to_wire")


class AudioPathError(SplitrelayError):
    """aiortc or aioice changed the internals the voice path relies on (one-line reason)."""


def check_aiortc() -> None:
    """Fail loudly, at start, if the aiortc/aioice internals the voice path depends on have moved:

    * ``RTCRtpReceiver.__jitter_buffer`` (name-mangled), set in ``__init__`` and fed by
      ``_handle_rtp_packet`` with each depayloaded packet as ``add(packet) -> (pli, frame)``;
    * aioice ``Connection.data_received(data, component)``, which the mux's protocol calls
      for every non-STUN datagram (wrapped per connection to stamp RTP arrival at the mux);
    * those ``DirectRtp`` takes SRTP past aioice's queue with (rtp_in.py);
    * those ``DirectSend`` sends RTP past aiortc's sender task with (rtp_out.py), and that
      ``$SPLITRELAY_SEND_PATH`` names a send path.
    """
    rtp_out.send_path()
    missing = [name for name, ok in (
        ("RTCRtpReceiver.__jitter_buffer", AIORTC_JITTER_BUFFER in RTCRtpReceiver.__init__.__code__.co_names
         and AIORTC_JITTER_BUFFER in RTCRtpReceiver._handle_rtp_packet.__code__.co_names),
        ("aioice Connection.data_received", callable(getattr(Connection, "data_received", None))),
    ) if not ok] + rtp_in.missing_internals() + rtp_out.missing_internals()
    if missing:
        import aiortc

        raise AudioPathError(f"aiortc {getattr(aiortc, '__version__', '?')} lacks {', '.join(missing)}; "
                             "the transceiver's voice path needs aiortc 1.9..1.16")


# A caller that stalled and caught up delivers its frames in a burst; passed through as they are (an
# echo, a handler forwarding live audio), the part beyond the lead becomes a queue the call carries to
# its end (measured on this busy machine: 47-109 ms p50 in the outbound queue).  Live audio (frames
# that carry their packet's arrival time) waiting for its RTP time with another frame behind it is
# dropped when quiet (like NetEq's accelerate, which also picks low-energy audio); speech and tones are
# never dropped, and generated audio (a TTS reply, no arrival time) is paced whole.
QUIET_PEAK = 1024  # of 32767, about -30 dBFS: a frame is quiet when every sample is in -1024..1023
# Frames of each pause that are always sent: shedding a whole pause glued two echoed beeps into one
# (the probe then heard one beep fewer); speech keeps a 40 ms gap between its words.
KEEP_QUIET = 2


# A s16le sample is in -1024..1023 exactly when its high byte is -4..3: deleting those bytes from the frame's
# high bytes leaves nothing for a quiet frame.  Two C passes instead of 960 Python ints twice (array, max and
# min): 1.3 µs of CPU a frame instead of 20 µs (process_time, best of 3, this machine); every frame sent is
# checked, so ~0.9 ms per call-second, ~5 % of an echo call's transceiver CPU.
_QUIET_HIGH_BYTES = bytes([0, 1, 2, 3, 0xFC, 0xFD, 0xFE, 0xFF])


def quiet(pcm: bytes | bytearray) -> bool:
    return not pcm[1::2].translate(None, _QUIET_HIGH_BYTES)


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class StageTimes:
    """Milliseconds per stage per frame, the newest ``keep`` of each; ``summary()`` gives p50/p99."""

    def __init__(self, keep: int = 500) -> None:  # 10 s of frames: ~100 KB a session for all stages
        self.samples: dict[str, deque[float]] = {stage: deque(maxlen=keep) for stage in STAGES}
        self._observers: dict[str, Callable[[float], None]] = {}

    def watch(self, stage: str, observe: Callable[[float], None]) -> None:
        """Also hand every sample of ``stage`` (seconds) to ``observe`` (a Prometheus histogram's)."""
        self._observers[stage] = observe

    def add(self, stage: str, seconds: float) -> None:
        self.samples[stage].append(seconds * 1000.0)
        observe = self._observers.get(stage)
        if observe is not None:
            observe(seconds)

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for stage, values in self.samples.items():
            if values:
                ordered = sorted(values)
                out[stage] = {"p50": round(ordered[len(ordered) // 2], 3),
                              "p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3),
                              "n": len(ordered)}
        return out


class RtpArrivals:
    """When each RTP packet reached the mux: aioice hands every non-STUN datagram of a connection to
    ``Connection.data_received`` synchronously from the mux's socket callback, before the queue and
    task hops to SRTP; the RTP header is clear text there, so the sequence number keys the time."""

    LIMIT = 256

    def __init__(self) -> None:
        self.times: dict[int, float] = {}

    def watch(self, connection: Connection) -> None:
        original = connection.data_received

        def stamped(data: bytes, component: int) -> None:
            if len(data) >= 12 and 128 <= data[0] < 192 and not 64 <= (data[1] & 0x7F) < 96:  # RTP, not RTCP
                if len(self.times) >= self.LIMIT:
                    del self.times[next(iter(self.times))]
                self.times[int.from_bytes(data[2:4], "big")] = time.monotonic()
            original(data, component)

        connection.data_received = stamped  # type: ignore[method-assign]

    def pop(self, seq: int) -> float | None:
        return self.times.pop(seq, None)


class _Feed:
    """Stands in for aiortc's audio jitter buffer: takes each packet, returns no frame to aiortc's decoder."""

    def __init__(self, voice: VoiceReceiver) -> None:
        self.voice = voice

    def add(self, packet: Any) -> tuple[bool, None]:  # noqa: ANN401 - aiortc.rtp.RtpPacket
        self.voice.put(packet.sequence_number, packet.timestamp, packet.payload)
        return False, None


class VoiceReceiver:
    """Decoded, concealed, evenly released 48 kHz mono frames from one aiortc audio receiver."""

    def __init__(self, receiver: RTCRtpReceiver | None = None, arrivals: RtpArrivals | None = None,
                 stages: StageTimes | None = None, min_delay: float = 0.02) -> None:
        self.buffer = AdaptiveJitterBuffer(min_delay=min_delay)
        self.decoder = OpusDecoder()
        self.arrivals = arrivals
        self.stages = stages
        self._waiter: asyncio.Future | None = None
        self.direct: DirectRtp | None = None  # its SRTP from the mux's callback, past aioice's queue (rtp_in.py)
        if receiver is not None:
            check_aiortc()
            setattr(receiver, AIORTC_JITTER_BUFFER, _Feed(self))
            self.direct = DirectRtp(receiver)
            if not self.direct.attach():
                self.direct = None

    def put(self, seq: int, timestamp: int, payload: bytes) -> None:
        now = time.monotonic()
        at_mux = self.arrivals.pop(seq) if self.arrivals else None
        if at_mux is not None and self.stages:
            self.stages.add("mux_to_receiver", now - at_mux)
        self.buffer.put(seq, timestamp, payload, at_mux if at_mux is not None else now)
        if self._waiter is not None:
            _wake(self._waiter)

    async def recv(self) -> PcmFrame:
        loop = asyncio.get_running_loop()
        while True:
            now = time.monotonic()
            out = self.buffer.pop(now)
            if out is not None:
                if out.arrival is not None and self.stages:
                    self.stages.add("jitter_buffer", now - out.arrival)
                if out.payload is not None:
                    pcm = self.decoder.decode(out.payload)
                else:
                    pcm = self.decoder.conceal(out.samples, out.next_payload)
                decoded = time.monotonic()
                if self.stages:
                    self.stages.add("decode", decoded - now)
                return PcmFrame(pcm, 1, SAMPLE_RATE, pts=out.timestamp, time=decoded, received=out.arrival)
            self._waiter = loop.create_future()
            deadline = self.buffer.next_deadline()
            timer = loop.call_at(deadline, _wake, self._waiter) if deadline is not None else None
            try:
                await self._waiter
            finally:
                if timer is not None:
                    timer.cancel()
                self._waiter = None

    def to_dict(self) -> dict[str, Any]:
        b = self.buffer
        return {"frames_concealed": b.concealed, "frames_late": b.late, "frames_released": b.released,
                "frames_lost_in_outages": b.skipped,
                "receive_delay_ms": round(b.delay * 1000, 3), "receive_jitter_ms": round(b.jitter * 1000, 3),
                "receive_resets": b.resets}


class OutboundAudio(MediaStreamTrack):
    """The handler's voice: PCM re-framed to 20 ms, sent when pushed (paced by RTP time), Opus-encoded
    here; silence when the handler has nothing to say."""

    kind = "audio"

    def __init__(self, stages: StageTimes | None = None) -> None:
        super().__init__()
        self.buffer = bytearray()
        self.stages = stages
        self.frames_out = 0
        self.silent_frames = 0
        self.overflow_frames = 0  # dropped because the handler ran more than 1 s ahead
        self.cleared_frames = 0   # dropped by clear_audio()
        self.skipped_frames = 0   # quiet live audio dropped to catch up after a burst
        self.dtx = False          # send one silent frame in DTX_EVERY in a pause (set by a handler that wants it)
        self.dtx_slots = 0        # silent frames left unsent by DTX
        self._pause_slots = 0     # silent slots since the last frame of the handler's audio
        self._quiet_run = 0       # quiet frames sent in a row (a pause is shortened, never closed)
        self._encoder: OpusEncoder | None = None
        self._anchor: float | None = None
        self._index = 0
        self._idle = True         # the last frame sent was silence: the next content re-anchors the clock
        self._waiter: asyncio.Future | None = None
        self._taken = 0           # bytes of the stream taken (sent or dropped)
        self._live = False        # the push the next frame belongs to is live audio (it carries arrival times)
        self._flushed = False     # clear() cut audio that was being sent: silence goes on time until more audio
        self._late: float | None = None  # how late the frame being sent left its slot (generated audio)
        self._cleared_at: float | None = None  # when clear() cut audio being sent, until the next frame leaves
        self._marks: deque[tuple[int, float, float | None]] = deque()  # (stream offset, pushed at, received)
        self._mark: tuple[int, float, float | None] | None = None      # the one of the frame being sent
        self.direct: DirectSend | None = None  # sends past aiortc's sender task (rtp_out.py), once bound

    def bind(self, sender: RTCRtpSender) -> None:
        """The aiortc sender this track was added to: unless ``$SPLITRELAY_SEND_PATH`` is ``aiortc``, its
        first ``recv()`` hands the sending to ``DirectSend``."""
        opus.outbound_application()   # a bad $SPLITRELAY_OPUS_MODE fails the session's setup, not its first frame
        if rtp_out.send_path() == "direct":
            check_aiortc()
            self.direct = DirectSend(self, sender, FRAME_SAMPLES)

    def push(self, pcm: PcmFrame) -> None:
        if pcm.sample_rate != SAMPLE_RATE:
            raise ValueError(f"send_audio takes {SAMPLE_RATE} Hz PCM, got {pcm.sample_rate} Hz")
        samples = pcm.samples
        if pcm.channels != 1:
            samples = array("h", samples)[::pcm.channels].tobytes()
        now = time.monotonic()
        if pcm.time is not None and self.stages:
            self.stages.add("handler", now - pcm.time)
        if len(self._marks) < 2 * MAX_BACKLOG:
            self._marks.append((self._taken + len(self.buffer), now, pcm.received))
        self.buffer += samples[: len(samples) & ~1]
        excess = len(self.buffer) - MAX_BACKLOG * FRAME_BYTES
        if excess > 0:  # keep the newest second: a late voice is worse than a clipped one
            drop = -(-excess // FRAME_BYTES) * FRAME_BYTES
            self._drop(drop)
            self.overflow_frames += drop // FRAME_BYTES
        if len(self.buffer) >= FRAME_BYTES:
            if self._waiter is not None:
                _wake(self._waiter)
            elif self.direct is not None:
                self.direct.wake()

    def _drop(self, count: int) -> None:
        del self.buffer[:count]
        self._taken += count
        while self._marks and self._marks[0][0] < self._taken:
            self._live = self._marks.popleft()[2] is not None

    def _live_head(self) -> bool:
        """The next frame to send starts a push of live audio (one that carries its arrival time)."""
        return bool(self._marks) and self._marks[0][0] == self._taken and self._marks[0][2] is not None

    def _lead(self) -> float:
        """How far ahead of its RTP time the next frame may leave: LEAD for live audio, REPLY_LEAD else."""
        if self._marks and self._marks[0][0] == self._taken:
            return LEAD if self._marks[0][2] is not None else REPLY_LEAD
        return LEAD if self._live else REPLY_LEAD

    def clear(self) -> float:
        """Drop everything waiting to be sent (barge-in); the seconds dropped.

        Until the handler speaks again, silence then goes in each frame's own slot, not ``GRACE`` late: a
        stream that stalls mid-word makes the listener's decoder conceal (extrapolate the speech); the
        codec's tail of the cut word (Opus overlap, ~-30 dBFS, in the first silent frame) came ``LEAD +
        GRACE`` late (measured: the last audible agent packet reached the client 130 ms after the agent had
        stopped); and a client whose buffer counts frames (aiortc's holds four) releases the last words
        only as later packets push them out (measured with it: 233 ms p50 from onset to silence)."""
        dropped = self.backlog
        self.cleared_frames += round(dropped / FRAME_SECONDS)
        self._drop(len(self.buffer))
        if not self._idle and self._cleared_at is None:
            self._cleared_at = time.monotonic()
        self._flushed = self._flushed or not self._idle
        return dropped

    @property
    def backlog(self) -> float:
        """Seconds of handler audio waiting to be sent."""
        return len(self.buffer) / (2 * SAMPLE_RATE)

    async def _until(self, when: float) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        timer = loop.call_at(when, _wake, self._waiter)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _next_pcm(self, now: float) -> tuple[bytes | None, float]:
        """The frame to send at ``now`` (None: not yet) and otherwise when to look again (``now``: a slot
        passed without a frame, shed or left empty by DTX)."""
        assert self._anchor is not None
        if len(self.buffer) >= FRAME_BYTES:
            if self._idle:  # the first frame after silence leaves now and sets the clock
                self._anchor = now - self._index * FRAME_SECONDS
                self._idle = False
            due = self._anchor + self._index * FRAME_SECONDS - self._lead()
            if now < due:
                if (self._quiet_run >= KEEP_QUIET and self._live_head() and len(self.buffer) >= 2 * FRAME_BYTES
                        and quiet(self.buffer[:FRAME_BYTES])):
                    self._drop(FRAME_BYTES)
                    self.skipped_frames += 1
                    return None, now
                return None, due
            pcm = bytes(self.buffer[:FRAME_BYTES])
            self._quiet_run = self._quiet_run + 1 if quiet(pcm) else 0
            # the push that starts in this frame, if any: its timing follows the frame to the wire
            self._mark = mark = next((m for m in self._marks if m[0] < self._taken + FRAME_BYTES), None)
            # generated audio that waited for its slot: how late the sender woke up for it (REPLY_LEAD's figure)
            self._late = now - due if mark is not None and mark[2] is None and mark[1] <= due else None
            self._flushed = False
            self._pause_slots = 0
            self._drop(FRAME_BYTES)
            return pcm, now
        due = self._anchor + self._index * FRAME_SECONDS + (-self._lead() if self._flushed else GRACE)
        if now < due:
            return None, due
        self._idle = True
        self._quiet_run += 1
        self._mark = None
        self._pause_slots += 1
        if self.dtx and (self._pause_slots - 1) % DTX_EVERY:   # a slot DTX leaves empty: its RTP time passes
            self._index += 1
            self.dtx_slots += 1
            return None, now
        self.silent_frames += 1
        return bytes(FRAME_BYTES), now

    async def recv(self) -> Packet:
        if self.readyState != "live":
            raise MediaStreamError
        if self._anchor is None:
            self._anchor = time.monotonic()
        if self.direct is not None and self.direct.start():
            try:   # aiortc's sender task waits here while the direct path sends (rtp_out.py)
                await self.direct.finished  # type: ignore[misc]
            finally:
                self.direct.stop()
            raise MediaStreamError
        while True:
            now = time.monotonic()
            pcm, when = self._next_pcm(now)
            if pcm is not None:
                break
            await self._until(when)
        packet = Packet(self._take(pcm, now))
        packet.pts = (self._index - 1) * FRAME_SAMPLES
        packet.time_base = TIME_BASE
        return packet

    def stop(self) -> None:
        super().stop()
        if self.direct is not None:
            self.direct.stop()

    def _take(self, pcm: bytes, now: float) -> bytes:
        """The Opus packet of the frame ``_next_pcm`` gave at ``now`` (RTP time ``_index``, then counted)."""
        if self._encoder is None:
            self._encoder = OpusEncoder(application=opus.outbound_application())
        payload = self._encoder.encode(pcm)
        self._index += 1
        self.frames_out += 1
        mark = self._mark
        late, self._late = self._late, None
        cleared, self._cleared_at = self._cleared_at, None
        if self.stages:
            if late is not None:
                self.stages.add("send_late", late)
            if cleared is not None:  # barge-in: the flush -> the frame after it (the cut word's codec tail)
                self.stages.add("flush_to_wire", time.monotonic() - cleared)
        if mark is not None and self.stages:
            done = time.monotonic()
            self.stages.add("outbound_queue", now - mark[1])
            self.stages.add("encode", done - now)
            if mark[2] is not None:
                self.stages.add("in_to_out", done - mark[2])
        return payload
