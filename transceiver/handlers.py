"""The hand-off between a WebRTC session and the voice-AI side: plain PCM and text.

A handler never sees WebRTC: it gets decoded PCM frames (48 kHz, signed
16-bit, interleaved) and data-channel text, and answers with PCM frames and
text through the ``SessionIO`` it is given.  One handler instance per
session; choose the implementation by name (``echo``, ``tone``).
"""

from __future__ import annotations

import asyncio
import math
import struct
from dataclasses import dataclass
from typing import Protocol
from collections.abc import Callable

SAMPLE_RATE = 48000
FRAME_SAMPLES = 960  # 20 ms


@dataclass
class PcmFrame:
    samples: bytes            # s16le, interleaved
    channels: int = 1
    sample_rate: int = SAMPLE_RATE

    @property
    def duration(self) -> float:
        return len(self.samples) / (2 * self.channels * self.sample_rate)


class SessionIO(Protocol):
    session_id: str

    def send_audio(self, frame: PcmFrame) -> None: ...

    def send_text(self, text: str) -> None: ...


class Handler:
    """Base class: override what you need.  Exceptions are counted and logged, never fatal to the call."""

    def __init__(self, io: SessionIO) -> None:
        self.io = io

    async def on_start(self) -> None: ...

    async def on_audio(self, frame: PcmFrame) -> None: ...

    async def on_text(self, text: str) -> None: ...

    async def on_stop(self) -> None: ...


class EchoHandler(Handler):
    """Plays back what it hears (after ``delay`` seconds) and echoes data-channel text."""

    delay: float = 0.0

    async def on_audio(self, frame: PcmFrame) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        self.io.send_audio(frame)

    async def on_text(self, text: str) -> None:
        self.io.send_text(text)


class ToneHandler(Handler):
    """Speaks a continuous sine (440 Hz by default); answers text with 'tone'."""

    frequency: float = 440.0

    async def on_start(self) -> None:
        self._task = asyncio.ensure_future(self._play())

    async def _play(self) -> None:
        phase = 0
        step = 2 * math.pi * self.frequency / SAMPLE_RATE
        while True:
            samples = [int(8000 * math.sin(step * (phase + i))) for i in range(FRAME_SAMPLES)]
            phase += FRAME_SAMPLES
            self.io.send_audio(PcmFrame(struct.pack(f"<{FRAME_SAMPLES}h", *samples)))
            await asyncio.sleep(0.02)

    async def on_text(self, text: str) -> None:
        self.io.send_text("tone")

    async def on_stop(self) -> None:
        self._task.cancel()


HANDLERS: dict[str, Callable[[SessionIO], Handler]] = {"echo": EchoHandler, "tone": ToneHandler}


def handler_factory(name: str) -> Callable[[SessionIO], Handler]:
    try:
        return HANDLERS[name]
    except KeyError:
        raise ValueError(f"unknown handler {name!r}; choose from {', '.join(sorted(HANDLERS))}") from None
