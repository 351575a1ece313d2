"""What the probe says and how it recognises its own voice coming back.

The probe speaks a beep pattern (a 1 kHz burst every ``interval``) with, for loss
counting, a quiet carrier tone under it; it finds the beeps' onsets in the audio it
receives (Goertzel power per 20 ms frame) and counts the frames that carry the
carrier.  ``ClientBuffering`` measures what the client's own receive path holds, so
a round trip splits into the far end's share and the client's.
"""

from __future__ import annotations

import asyncio
import fractions
import math
import struct
import time
from typing import Any

from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from splitrelay.transceiver.audio import AIORTC_JITTER_BUFFER, check_aiortc

try:  # optional: the same sums vectorised, which keeps a client of many sessions cheap
    import numpy as _np
except ImportError:  # pragma: no cover - numpy is not a dependency
    _np = None

SAMPLE_RATE = 48000
FRAME_SAMPLES = 960  # 20 ms
BEEP_HZ = 1000.0
CARRIER_HZ = 400.0        # 8 whole periods per 20 ms frame (the beep has 20): the two do not mix
CARRIER_AMPLITUDE = 3000  # of 32767; with a beep on top the frame peaks at 15000

def goertzel_power(samples: tuple[int, ...], freq: float = BEEP_HZ, rate: int = SAMPLE_RATE) -> float:
    """Normalised power of one frequency in a block of s16 samples (0..~1 for a full-scale tone)."""
    n = len(samples)
    if n == 0:
        return 0.0
    coeff = 2.0 * math.cos(2.0 * math.pi * freq / rate)
    s1 = s2 = 0.0
    for x in samples:
        s0 = x + coeff * s1 - s2
        s2, s1 = s1, s0
    power = s1 * s1 + s2 * s2 - coeff * s1 * s2
    return power / (n * n * 32768.0 * 32768.0 / 4.0)


_BASES: dict[tuple[float, int, int], Any] = {}


def tone_power(samples: Any, freq: float = BEEP_HZ, rate: int = SAMPLE_RATE) -> float:  # noqa: ANN401
    """``goertzel_power`` (the same value up to rounding), vectorised when ``samples`` is a numpy array."""
    if _np is None or not isinstance(samples, _np.ndarray):
        return goertzel_power(samples, freq, rate)
    n = len(samples)
    if n == 0:
        return 0.0
    basis = _BASES.get((freq, rate, n))
    if basis is None:
        phase = 2.0 * math.pi * freq / rate * _np.arange(n)
        basis = _BASES[(freq, rate, n)] = _np.stack([_np.cos(phase), _np.sin(phase)])
    re, im = basis @ samples
    return float(re * re + im * im) / (n * n * 32768.0 * 32768.0 / 4.0)


def _sine(freq: float, amplitude: int) -> list[int]:
    return [int(amplitude * math.sin(2 * math.pi * freq * i / SAMPLE_RATE)) for i in range(FRAME_SAMPLES)]


def _pack(samples: list[int]) -> bytes:
    return struct.pack(f"<{FRAME_SAMPLES}h", *samples)


class BeepTrack(MediaStreamTrack):
    """48 kHz mono audio: a 1 kHz burst of ``beep_ms`` every ``interval`` seconds, silence between.

    With ``carrier``, a quiet ``CARRIER_HZ`` tone runs under everything (every frame carries it) until
    ``quiet`` is set; ``quiet`` silences the track (no beeps, no carrier).
    """

    kind = "audio"

    def __init__(self, interval: float = 0.5, beep_ms: int = 60, carrier: bool = False) -> None:
        super().__init__()
        self.interval_frames = max(2, round(interval / 0.02))
        self.beep_frames = max(1, beep_ms // 20)
        self.sent_at: list[float] = []  # wall-clock time each beep's first frame left recv()
        self.carrier = carrier
        self.quiet = False
        self.frames = 0           # frames returned by recv()
        self.carrier_frames = 0   # of which carried the carrier
        self._index = 0
        self._start: float | None = None
        tone = _sine(BEEP_HZ, 12000)
        self._tone = _pack(tone)
        self._silence = bytes(2 * FRAME_SAMPLES)
        carrier_wave = _sine(CARRIER_HZ, CARRIER_AMPLITUDE)
        self._carrier = _pack(carrier_wave)
        self._tone_carrier = _pack([a + b for a, b in zip(tone, carrier_wave, strict=True)])

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            wait = self._start + self._index * 0.02 - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        phase = self._index % self.interval_frames
        # the first beep starts after a short lead-in so ICE/DTLS are surely up
        beeping = not self.quiet and self._index >= self.interval_frames and phase < self.beep_frames
        if beeping and phase == 0:
            self.sent_at.append(time.monotonic())
        if self.carrier and not self.quiet:
            pcm = self._tone_carrier if beeping else self._carrier
            self.carrier_frames += 1
        else:
            pcm = self._tone if beeping else self._silence
        frame = s16_frame(pcm, self._index)
        self._index += 1
        self.frames += 1
        return frame


def s16_frame(pcm: bytes, index: int) -> AudioFrame:
    """Frame number ``index`` of a 48 kHz mono stream of 20 ms frames, for aiortc's encoder."""
    frame = AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
    frame.planes[0].update(pcm)
    frame.pts = index * FRAME_SAMPLES
    frame.sample_rate = SAMPLE_RATE
    frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
    return frame


def mono_samples(frame: AudioFrame) -> Any:  # noqa: ANN401
    """The first channel of a decoded s16 frame (a float numpy array when numpy is there, else a tuple)."""
    pcm = bytes(frame.planes[0])
    channels = len(frame.layout.channels)
    count = frame.samples * channels
    if _np is not None:
        return _np.frombuffer(pcm, dtype="<i2", count=count)[::channels].astype(_np.float64)
    return struct.unpack(f"<{count}h", pcm[: 2 * count])[::channels]


class CarrierCounter:
    """Counts received frames that carry the probe's carrier: at least half of its echoed level.

    The echoed level is not the sent one (each Opus mono -> stereo pass costs 3 dB: the echo comes
    back at about half the amplitude), so it is taken from the frames themselves: the median
    amplitude of the frames that carry the carrier clearly (above a tenth of the sent amplitude).
    A frame only partly covered by the echo (the first and last of a stretch, the echo being shifted
    by codec delay) counts when more than half of it is: of the two edge frames of an unbroken
    stretch one counts, so an unbroken echo counts exactly the frames that were sent.
    """

    def __init__(self, freq: float = CARRIER_HZ, amplitude: int = CARRIER_AMPLITUDE) -> None:
        self.freq = freq
        self.floor = 0.1 * amplitude
        self.amplitudes: list[float] = []  # the carrier's amplitude in every received frame

    def feed_samples(self, samples: Any, rate: int) -> None:  # noqa: ANN401 - see mono_samples
        self.amplitudes.append(math.sqrt(tone_power(samples, self.freq, rate)) * 32768.0)

    @property
    def level(self) -> float | None:
        """The echoed carrier's amplitude (median over the frames that clearly carry it)."""
        present = sorted(a for a in self.amplitudes if a >= self.floor)
        return present[len(present) // 2] if present else None

    @property
    def frames(self) -> int:
        level = self.level
        return 0 if level is None else sum(1 for a in self.amplitudes if a >= 0.5 * level)


class BeepDetector:
    """Finds beep onsets in received audio and pairs each with the beep that was sent."""

    THRESHOLD = 0.01

    def __init__(self, sent_at: list[float]) -> None:
        self.sent_at = sent_at
        self.rtts_ms: list[float] = []
        self.matched: set[int] = set()
        self._in_beep = False

    def feed(self, frame: AudioFrame, now: float) -> None:
        self.feed_samples(mono_samples(frame), frame.sample_rate, now)

    def feed_samples(self, samples: Any, rate: int, now: float) -> None:  # noqa: ANN401 - see mono_samples
        loud = tone_power(samples, rate=rate) > self.THRESHOLD
        if loud and not self._in_beep:
            self._onset(now)
        self._in_beep = loud

    def _onset(self, now: float) -> None:
        # the newest beep sent before now that has not been matched yet
        for index in range(len(self.sent_at) - 1, -1, -1):
            sent = self.sent_at[index]
            if sent <= now and index not in self.matched:
                self.matched.add(index)
                self.rtts_ms.append((now - sent) * 1000.0)
                return


class ClientBuffering:
    """How long each received frame sat in the client's own receive path (its jitter buffer and
    decoder): packet arrival to frame out, so the audio round trip splits into what the far end and
    the network took and what this client adds.  Observes aiortc's buffer (the same private attribute
    the transceiver's voice path replaces, guarded by its check) or, with ``low_latency``, replaces it
    with the transceiver's own voice receive path."""

    def __init__(self) -> None:
        self.arrivals: dict[int, float] = {}   # frame pts (RTP time from the stream's first packet) -> arrival
        self.held_ms: list[float] = []
        self._first_ts: int | None = None

    def observe(self, receiver: Any) -> None:  # noqa: ANN401 - aiortc RTCRtpReceiver
        check_aiortc()
        stock = getattr(receiver, AIORTC_JITTER_BUFFER)
        buffering = self

        class Observed:
            def add(self, packet: Any) -> Any:  # noqa: ANN401 - aiortc RtpPacket / its return
                buffering.arrived(packet.timestamp)
                return stock.add(packet)

        setattr(receiver, AIORTC_JITTER_BUFFER, Observed())

    def arrived(self, timestamp: int) -> None:
        if self._first_ts is None:
            self._first_ts = timestamp
        if len(self.arrivals) > 500:
            del self.arrivals[next(iter(self.arrivals))]
        self.arrivals[(timestamp - self._first_ts) & 0xFFFFFFFF] = time.monotonic()

    def arrival(self, pts: int | None, now: float) -> float | None:
        """When the packet of the frame at ``pts`` arrived; notes how long the frame was held."""
        arrived = self.arrivals.pop(pts, None) if pts is not None else None
        if arrived is not None:
            self.held_ms.append((now - arrived) * 1000.0)
        return arrived

    def summary(self) -> dict[str, float] | None:
        if not self.held_ms:
            return None
        ordered = sorted(self.held_ms)
        return {"p50": round(ordered[len(ordered) // 2], 3),
                "p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3), "n": len(ordered)}
