"""A user's Pipecat pipeline behind the handler interface: audio and data-channel messages both ways."""

from __future__ import annotations

import asyncio
import json
import math
import time
from array import array

import pytest

pytest.importorskip("pipecat", reason="splitrelay[pipecat] is not installed (make setup installs it)")

from splitrelay.transceiver.handlers import FRAME_SAMPLES, PcmFrame, handler_factory  # noqa: E402


class RecordingIO:
    session_id = "pipecat-test"

    def __init__(self) -> None:
        self.audio = bytearray()
        self.text: list[str] = []
        self.clears = 0

    def send_audio(self, frame: PcmFrame) -> None:
        self.audio += frame.samples

    def clear_audio(self) -> float:
        self.clears += 1
        return 0.0

    def send_text(self, text: str) -> None:
        self.text.append(text)

    def send_bytes(self, data: bytes) -> None: ...


async def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


async def test_a_pipecat_pipeline_hears_the_caller_and_answers_on_both_channels():
    io = RecordingIO()
    handler = handler_factory("pipecat:pipeline=splitrelay.voice.pipecat:echo_pipeline")(io)
    await handler.on_start()
    try:
        await asyncio.wait_for(handler.transport.input().started.wait(), 10)
        tone = array("h", (int(8000 * math.sin(2 * math.pi * 440 * i / 48000)) for i in range(FRAME_SAMPLES)))
        for i in range(25):  # half a second of caller audio, at the pace a session delivers it
            await handler.on_audio(PcmFrame(tone.tobytes(), pts=i * FRAME_SAMPLES, time=time.monotonic()))
            await asyncio.sleep(0.02)
        await handler.on_text('{"hello": 1}')
        await until(lambda: len(io.audio) >= 20 * 2 * FRAME_SAMPLES and io.text)
        assert json.loads(io.text[0]) == {"echo": {"hello": 1}}
        back = array("h", bytes(io.audio))
        assert max(back) > 6000  # the caller's tone came back through the pipeline
    finally:
        await handler.on_stop()


def test_a_pipecat_handler_without_a_pipeline_is_refused_at_configuration():
    with pytest.raises(ValueError, match="pipeline=package.module:function"):
        handler_factory("pipecat")
