"""`splitrelay call`: be the caller of a voice agent (``--handler voice``) and time it.

The work is in splitrelay.client.caller; this module is the command line.
"""

from __future__ import annotations

import asyncio
import json

import click

from splitrelay.cli.errors import CliError
from splitrelay.tokens import TOKEN_ENV

DICTATION = ["the quick brown fox jumps over the lazy dog",
             "please send the report to my office before noon",
             "the weather will be sunny with a light breeze",
             "our meeting has been moved to thursday afternoon",
             "she bought three apples and a loaf of bread",
             "turn left at the next corner and park by the river"]


def command_phrases() -> list[str]:
    from splitrelay.voice.reply import COMMANDS
    return list(COMMANDS)


@click.command("call")
@click.argument("whip_url")
@click.option("--say", "phrases", multiple=True, metavar="TEXT",
              help="A phrase to say (one turn each; repeatable).  Default: one 'what time is it'.")
@click.option("--set", "phrase_set", type=click.Choice(["commands", "dictation"]),
              help="Say a fixed set: the agent's 23 commands (accuracy), or 6 dictation sentences "
                   "(for --handler voice:stt=whisper,reply=echo).")
@click.option("--barge-ins", default=1, show_default=True, type=click.IntRange(0, 100),
              help="After the turns: ask for a story and interrupt it this many times.")
@click.option("--token", envvar=TOKEN_ENV, help="Bearer token for WHIP.")
@click.option("--low-latency", is_flag=True,
              help="Receive through the transceiver's voice path (adaptive buffer) instead of aiortc's 4-frame "
                   "buffer: what a low-latency client hears.")
@click.option("--timeout", default=20.0, show_default=True, type=click.FloatRange(1, 300))
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
def call(whip_url: str, phrases: tuple[str, ...], phrase_set: str | None, barge_ins: int, token: str | None,
         low_latency: bool, timeout: float, as_json: bool) -> None:
    """Call a voice agent: speak espeak-ng phrases into it, record what comes back, time each turn.

    Per turn: voice-to-voice latency (end of your voice to the agent's first
    audible audio, at the client), the agent's silence window, its STT, reply
    and TTS times (from its data-channel events) and whether the transcript
    was right; per barge-in: from your voice's onset to the agent falling
    silent at the client.

    \b
    Example (lab transceiver 1 started with --handler voice, called from the lab's
    client namespace; `lab up --json` prints both, lab/addresses.py the plan):
      ip netns exec <client_netns> splitrelay call http://198.18.2.11:8080/whip \\
          --set commands --barge-ins 5
    """
    from splitrelay.client.caller import run_call

    said = list(phrases)
    if phrase_set == "commands":
        said += command_phrases()
    elif phrase_set == "dictation":
        said += DICTATION
    if not said:
        said = ["what time is it"]
    report = asyncio.run(run_call(whip_url, said, barge_ins, token, timeout, low_latency))
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        for t in report.turns:
            mark = "ok " if t.correct else "BAD"
            click.echo(f"{mark} {t.phrase!r:30} heard {t.transcript!r:30} "
                       f"voice-to-voice {_ms(t.voice_to_voice_ms)} (silence {_ms(t.silence_ms)}, "
                       f"stt {_ms(t.stt_ms)}, reply {_ms(t.reply_ms)}, "
                       f"tts {_ms(t.tts_ms)})" + (f"  error: {t.error}" if t.error else ""))
        for b in report.barge_ins:
            click.echo(f"barge-in {_ms(b.latency_ms)} (event at the client {_ms(b.event_ms)}, "
                       f"flushed {_ms(b.dropped_ms)})" + (f"  error: {b.error}" if b.error else ""))
        s = report.summary()
        acc = "-" if s["accuracy"] is None else f"{100 * s['accuracy']:.0f} %"
        click.echo(f"summary: {s['turns']} turns, accuracy {acc}, voice-to-voice p50 "
                   f"{_ms(s['voice_to_voice_p50_ms'])}, barge-in p50 {_ms(s['barge_in_p50_ms'])}")
    if not report.ok:
        raise CliError(report.error or "the call failed")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"
