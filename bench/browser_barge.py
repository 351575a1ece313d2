"""Barge-in heard in Chromium: the caller's voice onset -> the agent falling silent at the browser's output.

``python -m splitrelay.bench.browser_barge`` (root; a lab, Debian's chromium).  The voice agent answers a
headless Chromium in the lab's client namespace, through the relay.  The fake microphone plays a script
(``script_wav``): "tell me a story", then, 2.6 s later, while the agent tells it, "wait"; a few times.  The
page watches two levels on one clock, from one AudioContext's 5.3 ms callbacks: the caller's outgoing audio
and the decoded audio it plays (after Chromium's jitter buffer, NetEQ).  A barge-in is a caller onset
while the agent is audible; its latency runs to the agent's last audible callback before it fell silent.
So the figure holds the uplink, the agent's VAD and stop, the downlink and NetEQ's queue; getStats'
jitter-buffer delay over the call says how much of it NetEQ was.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import wave
from dataclasses import asdict, dataclass, field
from pathlib import Path

from splitrelay.voice.audio import SAMPLE_RATE

QUESTION, INTERRUPTION = "tell me a story", "wait"
LEAD_S, OVER_S, AFTER_S = 5.0, 2.6, 4.0   # before the first question (the call connects); question end ->
                                          # interruption (the story has started: ~0.5 s after the question);
                                          # after it (the agent is silent again)
AGENT_GAP_MS = 600      # quieter stretches inside the agent's speech (between its sentences) join one span
CALLER_GAP_MS = 250


def script_wav(path: Path, cycles: int) -> Path:
    """The caller's side, spoken by espeak-ng (the agent's recogniser knows its voice)."""
    from splitrelay.voice.tts import EspeakTts

    tts = EspeakTts()

    def silence(seconds: float) -> bytes:
        return bytes(2 * int(SAMPLE_RATE * seconds))

    cycle = tts.synthesize(QUESTION) + silence(OVER_S) + tts.synthesize(INTERRUPTION) + silence(AFTER_S)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(silence(LEAD_S) + cycle * cycles + silence(60.0))  # no loop back within a run
    return path


def spans(levels: list[dict], which: str, gap_ms: float) -> list[tuple[float, float]]:
    """Loud stretches (start, end) of one side, page ms; quiet gaps shorter than ``gap_ms`` joined."""
    out: list[list[float]] = []
    start = None
    for level in (x for x in levels if x["which"] == which):
        if level["loud"] and start is None:
            start = level["t"]
            if out and start - out[-1][1] < gap_ms:
                start = out.pop()[0]
        elif not level["loud"] and start is not None:
            out.append([start, level["t"]])
            start = None
    return [(a, b) for a, b in out]


def barge_ins(levels: list[dict]) -> list[float]:
    """Milliseconds from each caller onset that came while the agent was audible to the agent's silence."""
    agent = spans(levels, "agent", AGENT_GAP_MS)
    out = []
    for onset, _ in spans(levels, "caller", CALLER_GAP_MS):
        over = [end for start, end in agent if start < onset < end]
        if over:
            out.append(round(over[0] - onset, 1))
    return out


@dataclass
class ChromiumBargeIn:
    cycles: int
    latencies_ms: list[float] = field(default_factory=list)
    jitter_buffer_ms: float | None = None   # getStats: NetEQ's mean delay per emitted sample, the call
    load: tuple[float, float, float] | None = None
    error: str | None = None

    def summary(self) -> dict:
        ms = sorted(self.latencies_ms)
        return {"barge_ins": len(ms), "of": self.cycles, "p50_ms": ms[len(ms) // 2] if ms else None,
                "worst_ms": ms[-1] if ms else None, "jitter_buffer_ms": self.jitter_buffer_ms}


def measure(cycles: int = 5, handler: str = "voice", name: str | None = None) -> ChromiumBargeIn:
    """A lab with the voice agent, one Chromium call that barges in ``cycles`` times; torn down after."""
    import os

    from splitrelay.client.browser import Browser
    from splitrelay.lab.netns import nsenter_argv
    from splitrelay.lab.stack import start_lab, stop_lab
    from splitrelay.lab.topology import Lab

    result = ChromiumBargeIn(cycles)
    info = start_lab(transceivers=1, handler=[handler], name=name)
    try:
        lab = Lab.load(info["name"])
        with tempfile.TemporaryDirectory(prefix="splitrelay-barge-") as tmp:
            wav = script_wav(Path(tmp) / "caller.wav", cycles)
            with Browser(nsenter_argv(lab.client.netns, []), capture_wav=wav) as browser:
                call = browser.call(info["whip_urls"][0], token=info["whip_token"])
                try:
                    seconds = LEAD_S + cycles * (OVER_S + AFTER_S + 2.5)
                    deadline = time.monotonic() + seconds
                    while time.monotonic() < deadline:     # bounded: the script's length
                        call.page.wait_for_timeout(500)
                    result.latencies_ms = barge_ins(call.levels())
                    last = call.latest() or {}
                    if last.get("jbEmitted"):
                        result.jitter_buffer_ms = round(1000 * last["jbDelay"] / last["jbEmitted"], 1)
                finally:
                    call.hang_up()
    except Exception as exc:  # noqa: BLE001 - a bench reports what failed, in one line
        result.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    finally:
        stop_lab(info["name"])
    result.load = os.getloadavg()
    return result


def main() -> None:  # pragma: no cover - a lab and a browser
    parser = argparse.ArgumentParser(description="barge-in heard in Chromium, through the relay")
    parser.add_argument("--cycles", type=int, default=5, help="questions and interruptions in the call")
    parser.add_argument("--handler", default="voice", help="the transceiver's --handler spec")
    parser.add_argument("--name", help="the lab's name (default: a fresh one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.cycles, args.handler, args.name)
    if args.json:
        print(json.dumps({**asdict(result), "summary": result.summary()}, indent=1))
        return
    s = result.summary()
    print(f"Chromium barge-in (`{args.handler}`): {s['barge_ins']}/{s['of']} measured, p50 {s['p50_ms']} ms, "
          f"worst {s['worst_ms']} ms; NetEQ mean delay {s['jitter_buffer_ms']} ms; load {result.load}"
          + (f"; error: {result.error}" if result.error else ""))


if __name__ == "__main__":  # pragma: no cover
    main()
