"""Handler ``conversation``: what a voice agent's transport costs, without the agent (issue 24, profile b).

A voice agent listens most of the time: it decodes every inbound frame for its VAD, and keeps its
audio track going while it is silent.  This handler does that on a fixed schedule of
the caller's stream time (``frame.pts``, so a load client knows the phase without a side channel):
for the first ``1 - speak_share`` of each ``cycle`` seconds it listens, then it "speaks" by sending
back what it hears (the same encoder work as a TTS reply, and the caller can time it).  Every inbound
frame goes through an energy VAD (its peak, over a threshold) like a real agent's first stage.

While listening it sends the cheapest valid audio: discontinuous transmission (``OutboundAudio.dtx``:
one silent frame in 20, 400 ms apart, the RTP time running on; RFC 7587 section 3.1.3, what Chrome sends
with ``usedtx=1`` and every browser's NetEq plays through as comfort noise), and the frame it does send is
a pre-encoded Opus frame of digital silence, encoded once per process, instead of running the encoder on
silence.  Browsers decode it like any other Opus packet (it *is* one, from libopus: a 48 kHz mono frame).
The swap goes through ``OutboundAudio``'s encoder (``_encoder``, created lazily there): speech is still
encoded by the real encoder.
"""

from __future__ import annotations

from functools import cache

from splitrelay.transceiver import audio, opus   # modules, not their names: audio -> handlers -> here is a cycle
from splitrelay.transceiver.handlers import (FRAME_SAMPLES, SAMPLE_RATE, Handler, PcmFrame, SessionIO,
                                             register_handler)
from splitrelay.transceiver.opus import OpusEncoder

SILENCE = bytes(2 * FRAME_SAMPLES)
COMFORT_BITRATE = 6000  # silence in 6-7 bytes a packet at 6 kbit/s (35-36 at the outbound 32 kbit/s)


@cache
def comfort_packet() -> bytes:
    """One Opus packet of 20 ms digital silence, from an encoder that has settled on silence."""
    encoder = OpusEncoder(bitrate=COMFORT_BITRATE, loss_percent=0)
    packet = b""
    for _ in range(10):
        packet = encoder.encode(SILENCE)
    return packet


class ComfortEncoder:
    """The outbound encoder, but for 20 ms of digital silence: the pre-encoded comfort frame."""

    def __init__(self) -> None:
        self.real = OpusEncoder(application=opus.outbound_application())
        self.comfort = comfort_packet()
        self.comfort_frames = 0

    def encode(self, pcm: bytes) -> bytes:
        if pcm == SILENCE:
            self.comfort_frames += 1
            return self.comfort
        return self.real.encode(pcm)


@register_handler("conversation")
class ConversationHandler(Handler):
    """Listens ``1 - speak_share`` of every ``cycle`` s (VAD on every frame, comfort frames out), then
    speaks (sends back what it hears) for the rest."""

    def __init__(self, io: SessionIO, cycle: float = 10.0, speak_share: float = 0.4, dtx: int = 1) -> None:
        super().__init__(io)
        if not 0.1 <= cycle <= 3600:
            raise ValueError(f"conversation cycle must be 0.1..3600 s, got {cycle}")
        if not 0.0 <= speak_share <= 1.0:
            raise ValueError(f"conversation speak_share must be 0..1, got {speak_share}")
        if dtx not in (0, 1):
            raise ValueError(f"conversation dtx must be 0 or 1, got {dtx!r}")
        self.cycle_samples = round(cycle * SAMPLE_RATE)
        self.listen_samples = round(self.cycle_samples * (1.0 - speak_share))
        self.speech_frames = 0
        self.frames_heard = 0
        outbound = getattr(io, "outbound", None)
        if outbound is not None and hasattr(outbound, "_encoder"):
            outbound._encoder = ComfortEncoder()
            outbound.dtx = bool(dtx)   # dtx=0: a comfort frame in every slot (what this handler sent before DTX)

    def listening(self, pts: int) -> bool:
        return pts % self.cycle_samples < self.listen_samples

    async def on_audio(self, frame: PcmFrame) -> None:
        self.frames_heard += 1
        # speech: the send path's "not quiet" (a peak of QUIET_PEAK or more), from the samples' high bytes:
        # 1.4 µs a frame instead of 23 for array + max/min (process_time, this VM), ~10 % of a call's CPU
        if frame.samples and not audio.quiet(frame.samples):
            self.speech_frames += 1
        if not self.listening(frame.pts or 0):
            self.io.send_audio(frame)
