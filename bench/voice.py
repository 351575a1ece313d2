"""The voice agent measured end to end through the relay (XDP): `python -m splitrelay.bench.voice`.

A lab with one transceiver per agent configuration, `splitrelay call` in the
lab's client namespace against each; prints a markdown section for
BENCHMARKS.md and can save the raw reports.  Configurations:

* ``commands``: the default agent (Silero VAD, pocketsphinx command grammar,
  rules, espeak-ng), the 23-phrase command set plus barge-ins;
* ``piper``: the same with piper's natural voice (first audio is later);
* ``dictation``: whisper tiny.en with the echo reply, 6 open sentences;
* ``barge``: the default agent, 12 barge-ins, each split into its steps (``barge_in_table``);
* ``smart``: ``commands`` with the semantic end of turn (``turn=smart``), beside it in the same lab.

``--turns`` adds the turn-taking set on piper speech (``splitrelay.bench.turns``, no lab): false endpoints
and voice-to-voice at the agent for the fixed window and the smart turn, and backchannels/interruptions
spoken over the agent's answer.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from splitrelay.lab.topology import Lab

CONFIGS = {  # name -> (handler spec, call arguments)
    "commands": ("voice", ["--set", "commands", "--barge-ins", "10"]),
    "piper": ("voice:tts=piper", ["--say", "what time is it", "--say", "tell me a joke", "--say", "hello",
                                  "--say", "what is the date", "--say", "how are you", "--barge-ins", "3"]),
    "dictation": ("voice:stt=whisper,reply=echo", ["--set", "dictation", "--barge-ins", "0"]),
    "barge": ("voice", ["--barge-ins", "12"]),  # barge-ins only (one turn first), for their breakdown
    "smart": ("voice:turn=smart", ["--set", "commands", "--barge-ins", "10"]),
}


def call_in_lab(lab: Lab, whip_url: str, args: list[str], timeout: float = 600.0) -> dict:
    """Run `splitrelay call --json` in the lab's client namespace, with a token of the lab's; its report."""
    from splitrelay.lab.stack import whip_token

    argv = [sys.executable, "-m", "splitrelay.cli.main", "call", whip_url, "--json", "--token", whip_token(lab),
            *args]
    proc = lab.popen(lab.client.netns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        return {"ok": False, "error": (err.strip().splitlines() or ["no output"])[-1], "turns": [],
                "barge_ins": [], "summary": {}}


def word_accuracy(said: str, heard: str) -> float:
    """1 - word error rate (Levenshtein over words), floored at 0."""
    a, b = said.lower().split(), "".join(c for c in heard.lower() if c.isalnum() or c.isspace()).split()
    row = list(range(len(b) + 1))
    for i, word in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, other in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (word != other))
    return max(0.0, 1.0 - row[-1] / max(1, len(a)))


def measure(configs: list[str], name: str | None = None, low_latency: bool = False) -> dict[str, dict]:
    """Each configuration on its own transceiver of one lab; ``low_latency``: the caller receives through
    the transceiver's voice path instead of aiortc's 4-frame buffer."""
    from splitrelay.lab.stack import start_lab, stop_lab
    from splitrelay.lab.topology import Lab

    info = start_lab(transceivers=len(configs), name=name, handler=[CONFIGS[c][0] for c in configs])
    lab = Lab.load(info["name"])
    try:
        extra = ["--low-latency"] if low_latency else []
        reports = {c: call_in_lab(lab, url, CONFIGS[c][1] + extra)
                   for c, url in zip(configs, info["whip_urls"], strict=True)}
        for c, t in zip(configs, info["transceivers"], strict=True):
            reports[c]["server"] = _sessions(lab, t["admin_url"])
        return reports
    finally:
        stop_lab(lab.name)


def _answers(samples: list[dict], quiet_ms: float = 800.0) -> list[float]:
    """Page times at which the agent's audio became audible after at least ``quiet_ms`` of quiet."""
    starts, last_loud = [], None
    for x in samples:
        if x.get("inLevel", 0) > 0.01:
            if last_loud is None or x["t"] - last_loud >= quiet_ms:
                starts.append(x["t"])
            last_loud = x["t"]
    return starts


def _neteq_per_second(samples: list[dict], start: float, seconds: int) -> list[tuple[float, float]]:
    """NetEQ's mean delay and target (ms) in each second from ``start``."""
    out = []
    for second in range(seconds):
        window = [x for x in samples if start + 1000 * second <= x["t"] <= start + 1000 * (second + 1)]
        emitted = window[-1]["jbEmitted"] - window[0]["jbEmitted"] if len(window) > 1 else 0
        if emitted > 0:
            out.append((round(1000 * (window[-1]["jbDelay"] - window[0]["jbDelay"]) / emitted, 1),
                        round(1000 * (window[-1]["jbTarget"] - window[0]["jbTarget"]) / emitted, 1)))
    return out


def browser_buffer(name: str | None = None, listen: float = 50.0, seconds: int = 6) -> dict:
    """Chromium's own receive buffer (NetEQ) while the default agent talks to it through the relay.

    Chromium's fake microphone loops a WAV that asks for a story every 15 s (so the second question
    barges in on the first story); for each of the first ``seconds`` of the first two answers the page's
    getStats() samples give NetEQ's mean delay and target (``jitterBufferDelay`` and
    ``jitterBufferTargetDelay`` per emitted sample): the agent audio a browser still holds, and plays,
    when the agent stops.  The aiortc caller cannot show this, and 100 ms samples cannot time the stop."""
    import tempfile
    import time
    import wave
    from pathlib import Path

    from splitrelay.client.browser import Browser
    from splitrelay.lab.netns import nsenter_argv
    from splitrelay.lab.stack import start_lab, stop_lab
    from splitrelay.lab.topology import Lab
    from splitrelay.voice.tts import EspeakTts

    info = start_lab(transceivers=1, name=name, handler="voice")
    lab = Lab.load(info["name"])
    samples: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="splitrelay-netEQ-") as work:
        wav = Path(work) / "ask.wav"
        with wave.open(str(wav), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(48000)
            ask = EspeakTts().synthesize("tell me a story")
            out.writeframes(bytes(2 * 48000 * 2) + ask + bytes(2 * 48000 * 12))  # 2 s, the question, 12 s
        try:
            with Browser(nsenter_argv(lab.client.netns, []), capture_wav=wav) as browser:
                call = browser.call(info["whip_urls"][0], token=info["whip_token"])
                deadline = time.monotonic() + listen
                while time.monotonic() < deadline:
                    samples = call.samples()
                    answers = _answers(samples)
                    if len(answers) >= 2 and samples[-1]["t"] - answers[1] >= 1000 * seconds + 500:
                        break
                    call.page.wait_for_timeout(250)
                call.hang_up()
        finally:
            stop_lab(lab.name)
    answers = _answers(samples)
    if not answers:
        return {"error": "the agent's answer was not heard in the browser"}
    return {f"answer_{n + 1}": {"neteq_delay_ms_per_second": [d for d, _ in stats],
                                "neteq_target_ms_per_second": [t for _, t in stats]}
            for n, start in enumerate(answers[:2]) if (stats := _neteq_per_second(samples, start, seconds))}


def _sessions(lab: Lab, admin_url: str) -> list[dict]:
    """The transceiver's records of its calls (``audio``: the send path's stages, frames cleared)."""
    from splitrelay.lab.stack import admin_get

    return [r.get("audio", {}) for r in json.loads(admin_get(lab, admin_url, "/sessions?ended=1"))]


def markdown(reports: dict[str, dict]) -> str:
    def ms(v: float | None) -> str:
        return "–" if v is None else f"{v:.0f}"

    lines = ["| agent | turns | transcripts right | voice-to-voice p50 (ms) | silence window (ms) | "
             "STT p50 | reply p50 | TTS first audio p50 | barge-in p50 (ms) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for config, r in reports.items():
        s = r.get("summary", {})
        if config == "dictation":
            scores = [word_accuracy(t["phrase"], t["transcript"] or "") for t in r["turns"]]
            right = f"word accuracy {sum(scores) / len(scores):.2f}" if scores else "–"
        else:
            right = f"{sum(t['correct'] for t in r['turns'])}/{len(r['turns'])}"
        lines.append(f"| {CONFIGS[config][0]} | {s.get('turns', 0)} | {right} | "
                     f"{ms(s.get('voice_to_voice_p50_ms'))} | {ms(s.get('silence_ms'))} | "
                     f"{ms(s.get('stt_p50_ms'))} | {ms(s.get('reply_p50_ms'))} | "
                     f"{ms(s.get('tts_p50_ms'))} | {ms(s.get('barge_in_p50_ms'))} |")
    return "\n".join(lines)


BARGE_STEPS = (("agent_onset_ms", "agent's VAD window sees speech"),
               ("agent_stop_ms", "agent flushes its queue, cancels the reply"),
               ("event_ms", "`barge_in` event at the client"),
               ("wire_ms", "last audible agent packet arrives at the client"),
               ("latency_ms", "last audible agent frame ends, out of the client's receive path"),
               ("played_ms", "... on a playout clock (audio sent ahead plays after it arrived)"))


def barge_in_table(reports: dict[str, dict]) -> str:
    """Each barge-in step after the caller's voice onset: p50 and worst over every configuration's runs."""
    runs = [b for r in reports.values() for b in r.get("barge_ins", []) if b.get("error") is None]
    lines = [f"| from the caller's voice onset to ... (n = {len(runs)}) | p50 (ms) | worst (ms) |",
             "|---|---|---|"]
    for key, what in BARGE_STEPS:
        values = sorted(b[key] for b in runs if b.get(key) is not None)
        if values:
            lines.append(f"| {what} | {values[len(values) // 2]:.0f} | {values[-1]:.0f} |")
    return "\n".join(lines)


def main() -> None:  # pragma: no cover - needs root and a lab
    parser = argparse.ArgumentParser(description="the voice agent through the relay")
    parser.add_argument("configs", nargs="*", help=f"some of {', '.join(CONFIGS)} (default: all)")
    parser.add_argument("--name", help="lab name")
    parser.add_argument("--results", help="save the raw call reports here (JSON)")
    parser.add_argument("--low-latency", action="store_true", help="the caller uses the low-latency receive path")
    parser.add_argument("--turns", action="store_true",
                        help="also the turn-taking set (piper speech, in process): fixed window vs smart turn")
    parser.add_argument("--browser-buffer", action="store_true",
                        help="only measure Chromium's receive buffer (NetEQ) while the agent talks")
    args = parser.parse_args()
    if args.browser_buffer:
        print(json.dumps(browser_buffer(args.name)))
        return
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configuration {', '.join(sorted(unknown))}; choose from {', '.join(CONFIGS)}")
    reports = measure(args.configs or list(CONFIGS), args.name, args.low_latency)
    if args.turns:
        import asyncio

        from splitrelay.bench import turns

        specs = ["voice:turn=fixed", "voice:turn=smart"]
        reports["turns"] = asyncio.run(turns.measure(specs))
        reports["backchannels"] = asyncio.run(turns.measure_barge(["voice", "voice:backchannel=on"]))
    if args.results:
        with open(args.results, "w") as f:
            json.dump(reports, f, indent=1)
    taking, backchannels = reports.pop("turns", None), reports.pop("backchannels", None)
    print(markdown(reports))
    print()
    print(barge_in_table(reports))
    for config, r in reports.items():
        for audio in r.get("server", []):
            stages = audio.get("stages", {})
            late, flush = stages.get("send_late"), stages.get("flush_to_wire")
            if late:
                print(f"{config}: reply frames left {late['p50']:.2f} / {late['p99']:.2f} ms (p50 / p99) after "
                      f"their slot, n = {late['n']}; frames cleared by barge-ins {audio.get('frames_cleared')}")
            if flush:
                print(f"{config}: flush -> the next frame encoded for the wire {flush['p50']:.2f} / "
                      f"{flush['p99']:.2f} ms (p50 / p99), n = {flush['n']}")
    if taking is not None:
        print()
        print(turns.markdown(taking))
        print()
        print(turns.barge_markdown(backchannels))
    for config, r in reports.items():
        for t in r["turns"]:
            if not t["correct"]:
                print(f"{config}: said {t['phrase']!r}, heard {t['transcript']!r}", file=sys.stderr)
        if r.get("error"):
            print(f"{config}: {r['error']}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    main()
