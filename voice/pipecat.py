"""``pipecat``: run a user's Pipecat pipeline behind the transceiver (``splitrelay[pipecat]``).

Pipecat's own WebRTC transport is aiortc too; here the transceiver owns
WebRTC (and the relay), and the pipeline gets a Pipecat *transport* whose
input and output are the session:

* caller audio (48 kHz s16 mono 20 ms) → ``InputAudioRawFrame`` pushed by
  the transport's input (so Pipecat's VAD, interruptions and audio filters
  work as with any transport);
* ``OutputAudioRawFrame`` / ``TTSAudioRawFrame`` reaching the output →
  ``SessionIO.send_audio`` (resampled to 48 kHz), paced on the clock at most
  ``AHEAD`` seconds before the listener like Pipecat's websocket transports;
* data-channel messages → ``InputTransportMessageFrame`` (JSON parsed when it
  is JSON, else the text); ``OutputTransportMessageFrame`` → one JSON line on
  the data channel;
* ``InterruptionFrame`` at the output → ``SessionIO.clear_audio`` (the
  session's queued audio is dropped with Pipecat's own).

The user's code is ``def make_pipeline(transport) -> Pipeline`` (or a list of
processors, which gets ``transport.input()`` before and ``transport.output()``
after), chosen with ``--handler pipecat:pipeline=package.module:function``.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import time
from collections.abc import Callable
from typing import Any

from pipecat.frames.frames import (
    InputAudioRawFrame,
    InputTransportMessageFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputTransportMessageFrame,
    OutputTransportMessageUrgentFrame,
    StartFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_input import BaseInputTransport
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import BaseTransport, TransportParams
from pipecat.workers.runner import WorkerRunner

from splitrelay.transceiver.handlers import SAMPLE_RATE, Handler, PcmFrame, SessionIO, register_handler
from splitrelay.voice.audio import Resampler

AHEAD = 0.1  # seconds of pipeline audio handed to the session before the listener hears it


class SessionInput(BaseInputTransport):
    """Caller audio and messages into the pipeline; dropped until the pipeline has started."""

    def __init__(self, params: TransportParams) -> None:
        super().__init__(params)
        self.started = asyncio.Event()

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self.set_transport_ready(frame)
        self.started.set()

    async def push_pcm(self, frame: PcmFrame) -> None:
        if not self.started.is_set():
            return
        await self.push_audio_frame(InputAudioRawFrame(audio=frame.samples, sample_rate=frame.sample_rate,
                                                       num_channels=frame.channels))

    async def push_message(self, message: Any) -> None:  # noqa: ANN401
        if not self.started.is_set():
            return
        await self.push_frame(InputTransportMessageFrame(message=message))


class SessionOutput(BaseOutputTransport):
    def __init__(self, io: SessionIO, params: TransportParams) -> None:
        super().__init__(params)
        self._io = io
        self._resampler = Resampler(SAMPLE_RATE)
        self._playing_until = 0.0

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        pcm = self._resampler.feed(frame.audio, frame.sample_rate, frame.num_channels)
        if pcm:
            self._io.send_audio(PcmFrame(pcm))
            now = time.monotonic()
            self._playing_until = max(self._playing_until, now) + len(pcm) / (2 * SAMPLE_RATE)
            ahead = self._playing_until - now - AHEAD
            if ahead > 0:
                await asyncio.sleep(ahead)
        return True

    async def send_message(self, frame: OutputTransportMessageFrame | OutputTransportMessageUrgentFrame) -> None:
        message = frame.message
        self._io.send_text(message if isinstance(message, str) else json.dumps(message, separators=(",", ":")))

    async def process_frame(self, frame: Any, direction: FrameDirection) -> None:  # noqa: ANN401
        if isinstance(frame, InterruptionFrame):
            self._io.clear_audio()
            self._playing_until = 0.0
        await super().process_frame(frame, direction)


class SessionTransport(BaseTransport):
    """A Pipecat transport whose far end is a splitrelay session."""

    def __init__(self, io: SessionIO, params: TransportParams | None = None) -> None:
        super().__init__()
        self.params = params or TransportParams(
            audio_in_enabled=True, audio_out_enabled=True,
            audio_in_sample_rate=SAMPLE_RATE, audio_out_sample_rate=SAMPLE_RATE)
        self._input = SessionInput(self.params)
        self._output = SessionOutput(io, self.params)

    def input(self) -> SessionInput:
        return self._input

    def output(self) -> SessionOutput:
        return self._output


def load_pipeline(spec: str) -> Callable[[SessionTransport], Any]:
    module, colon, name = spec.partition(":")
    if not colon:
        raise ValueError(f"pipeline {spec!r}: use package.module:function")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"pipeline {spec!r}: {exc}") from None


@register_handler("pipecat")
class PipecatHandler(Handler):
    """Runs ``pipeline`` (``package.module:function`` of the transport) for the length of the call."""

    def __init__(self, io: SessionIO, pipeline: str = "") -> None:
        super().__init__(io)
        if not pipeline:
            raise ValueError("pipecat handler needs pipeline=package.module:function")
        self.make_pipeline = load_pipeline(pipeline)
        self.transport: SessionTransport | None = None
        self.task: PipelineWorker | None = None
        self._run: asyncio.Task | None = None

    async def on_start(self) -> None:
        self.transport = SessionTransport(self.io)
        built = self.make_pipeline(self.transport)
        if isinstance(built, list | tuple):
            built = Pipeline([self.transport.input(), *built, self.transport.output()])
        self.task = PipelineWorker(built, params=PipelineParams(audio_in_sample_rate=SAMPLE_RATE,
                                                                audio_out_sample_rate=SAMPLE_RATE),
                                   enable_rtvi=False, idle_timeout_secs=None)
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(self.task)
        self._run = asyncio.ensure_future(runner.run())

    async def on_audio(self, frame: PcmFrame) -> None:
        if self.transport is not None:
            await self.transport.input().push_pcm(frame)

    async def on_text(self, text: str) -> None:
        if self.transport is None:
            return
        try:
            message: Any = json.loads(text)
        except ValueError:
            message = text
        await self.transport.input().push_message(message)

    async def on_stop(self) -> None:
        if self.task is not None:
            await self.task.cancel()
        if self._run is not None:
            try:
                await asyncio.wait_for(self._run, 5.0)
            except (TimeoutError, asyncio.CancelledError):
                self._run.cancel()


class EchoProcessor(FrameProcessor):
    """A minimal offline processor (for tests and as an example): caller audio back, messages answered."""

    async def process_frame(self, frame: Any, direction: FrameDirection) -> None:  # noqa: ANN401
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            await self.push_frame(OutputAudioRawFrame(audio=frame.audio, sample_rate=frame.sample_rate,
                                                      num_channels=frame.num_channels))
        elif isinstance(frame, InputTransportMessageFrame):
            await self.push_frame(OutputTransportMessageUrgentFrame(message={"echo": frame.message}))
        else:
            await self.push_frame(frame, direction)


def echo_pipeline(transport: SessionTransport) -> list[FrameProcessor]:
    return [EchoProcessor()]
