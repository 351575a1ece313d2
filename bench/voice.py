"""The voice agent measured end to end through the relay (XDP): `python -m splitrelay.bench.voice`.

A lab with one transceiver per agent configuration, `splitrelay call` in the
lab's client namespace against each; prints a markdown section for
BENCHMARKS.md and can save the raw reports.  Configurations:

* ``commands``: the default agent (Silero VAD, pocketsphinx command grammar,
  rules, espeak-ng), the 23-phrase command set plus barge-ins;
* ``piper``: the same with piper's natural voice (first audio is later);
* ``dictation``: whisper tiny.en with the echo reply, 6 open sentences.
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
}


def call_in_lab(lab: Lab, whip_url: str, args: list[str], timeout: float = 600.0) -> dict:
    """Run `splitrelay call --json` in the lab's client namespace; its report."""
    argv = [sys.executable, "-m", "splitrelay.cli.main", "call", whip_url, "--json", *args]
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
        return {c: call_in_lab(lab, url, CONFIGS[c][1] + extra)
                for c, url in zip(configs, info["whip_urls"], strict=True)}
    finally:
        stop_lab(lab.name)


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


def main() -> None:  # pragma: no cover - needs root and a lab
    parser = argparse.ArgumentParser(description="the voice agent through the relay")
    parser.add_argument("configs", nargs="*", help=f"some of {', '.join(CONFIGS)} (default: all)")
    parser.add_argument("--name", help="lab name")
    parser.add_argument("--results", help="save the raw call reports here (JSON)")
    parser.add_argument("--low-latency", action="store_true", help="the caller uses the low-latency receive path")
    args = parser.parse_args()
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configuration {', '.join(sorted(unknown))}; choose from {', '.join(CONFIGS)}")
    reports = measure(args.configs or list(CONFIGS), args.name, args.low_latency)
    if args.results:
        with open(args.results, "w") as f:
            json.dump(reports, f, indent=1)
    print(markdown(reports))
    for config, r in reports.items():
        for t in r["turns"]:
            if not t["correct"]:
                print(f"{config}: said {t['phrase']!r}, heard {t['transcript']!r}", file=sys.stderr)
        if r.get("error"):
            print(f"{config}: {r['error']}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    main()
