"""PCM plumbing shared by the voice stages: resampling, levels, 20 ms framing.

The transceiver hands handlers 48 kHz s16 mono; the models want 16 kHz
(Silero, pocketsphinx, whisper) and espeak-ng speaks 22.05 kHz.  Resampling
goes through PyAV's libswresample (already a dependency of aiortc), which is
streaming and keeps its filter state between calls, so a turn cut into 20 ms
frames resamples exactly like the whole turn at once.
"""

from __future__ import annotations

import fractions
from array import array

import av

SAMPLE_RATE = 48000          # the transceiver's rate
MODEL_RATE = 16000           # what VAD and STT take
FRAME_SAMPLES = 960          # 20 ms at 48 kHz
FRAME_BYTES = 2 * FRAME_SAMPLES


class Resampler:
    """Any rate/channel count of s16 PCM in, ``rate`` Hz s16 mono out (streaming).

    A remote track whose format changes mid-call (a 16 kHz or stereo track)
    gets a fresh converter instead of an exception.
    """

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._key: tuple[int, int] | None = None
        self._resampler: av.AudioResampler | None = None
        self._pts = 0

    def feed(self, pcm: bytes, rate: int, channels: int = 1) -> bytes:
        if channels not in (1, 2):  # the session gives mono; anything else keeps its first channel
            pcm = array("h", pcm[: len(pcm) - len(pcm) % (2 * channels)])[::channels].tobytes()
            channels = 1
        count = len(pcm) // (2 * channels)
        if count == 0:
            return b""
        if rate == self.rate and channels == 1:
            return pcm[: 2 * count]
        if self._key != (rate, channels):
            self._key = (rate, channels)
            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=self.rate)
            self._pts = 0
        frame = av.AudioFrame(format="s16", layout="mono" if channels == 1 else "stereo", samples=count)
        frame.planes[0].update(pcm[: 2 * count * channels])
        frame.sample_rate = rate
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, rate)
        self._pts += count
        assert self._resampler is not None
        return b"".join(bytes(out.planes[0])[: 2 * out.samples] for out in self._resampler.resample(frame))


def resample(pcm: bytes, rate: int, to_rate: int) -> bytes:
    """One-shot: a whole mono s16 buffer from ``rate`` to ``to_rate`` (flushes the filter's tail)."""
    if rate == to_rate:
        return pcm
    r = Resampler(to_rate)
    out = r.feed(pcm, rate)
    assert r._resampler is not None
    return out + b"".join(bytes(f.planes[0])[: 2 * f.samples] for f in r._resampler.resample(None))


def rms(pcm: bytes) -> float:
    """Root mean square of s16 PCM as a fraction of full scale (0..1)."""
    samples = array("h", pcm[: len(pcm) & ~1])
    if not samples:
        return 0.0
    return (sum(s * s for s in samples) / len(samples)) ** 0.5 / 32768.0


def frames_of(pcm: bytes, frame_bytes: int = FRAME_BYTES) -> list[bytes]:
    """``pcm`` cut into whole frames, the last one padded with silence."""
    pcm += bytes(-len(pcm) % frame_bytes)
    return [pcm[i:i + frame_bytes] for i in range(0, len(pcm), frame_bytes)]
