"""`splitrelay demo`: a lab, one real WebRTC voice session through XDP, live status, a summary.

The client is a plain aiortc peer in the lab's client namespace (the WHIP
probe): it opens the session with one HTTP request to a transceiver, speaks a
beep pattern and measures how long its own voice takes to come back from the
transceiver's echo handler.  Media crosses the relay only through XDP.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import click
from splitrelay.cli.errors import EXIT_DEPENDENCY, CliError, require_bcc, require_root

if TYPE_CHECKING:
    from splitrelay.lab.topology import Lab


@dataclass
class DemoReport:
    lab: str
    relay_public: str
    whip_url: str
    seconds: float
    ok: bool = False
    error: str | None = None
    offer_to_answer_ms: float | None = None
    ice_connected_ms: float | None = None
    dtls_connected_ms: float | None = None
    audio_rtt_ms: float | None = None
    datachannel_rtt_ms: float | None = None
    beeps_sent: int = 0
    beeps_heard: int = 0
    xdp_forwarded: int = 0
    xdp_dropped: int = 0
    voice: dict | None = None  # one voice-agent turn and one barge-in (splitrelay call's report)
    voice_low_latency: dict | None = None  # the same, received through the transceiver's voice path
    counters: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _counters(lab: Lab) -> dict[str, int]:
    from splitrelay.lab.stack import control

    return {f"{c['direction']}/{c['verdict']}/{c['reason']}": c["packets"]
            for c in control(lab, lambda client: client.stats())["counters"] if c["packets"]}


def run_demo(seconds: float = 10.0, on_status: Callable[[str], None] | None = None,
             turn: str | None = None) -> DemoReport:
    from splitrelay.lab.stack import control, probe, probe_result, start_lab, stop_lab
    from splitrelay.lab.topology import Lab

    status = on_status or (lambda line: None)
    voice = f"voice:turn={turn}" if turn else "voice"   # None: the agent's default end of turn
    info = start_lab(transceivers=2, handler=[voice, "echo"])  # the echo session uses the last one
    lab = Lab.load(info["name"])
    report = DemoReport(lab=lab.name, relay_public=info["relay_public"], whip_url=info["whip_urls"][-1],
                        seconds=seconds)
    try:
        proc = probe(lab, [report.whip_url], duration=seconds)
        started = time.monotonic()
        while proc.poll() is None and time.monotonic() - started < seconds + 30:
            counters = _counters(lab)
            flows = control(lab, lambda c: c.flows())
            sessions = control(lab, lambda c: c.sessions())
            forwarded = sum(v for k, v in counters.items() if "/forwarded/" in k)
            dropped = sum(v for k, v in counters.items() if "/dropped/" in k)
            live = sum(1 for s in sessions if s.get("flows"))  # the rest: ufrags registered ahead of offers
            status(f"{time.monotonic() - started:5.1f}s  sessions {live} (+{len(sessions) - live} ready)  "
                   f"flows {len(flows)}  "
                   f"xdp forwarded {forwarded}  dropped {dropped}")
            time.sleep(0.5)
        [result] = probe_result(proc, timeout=30)
        report.ok, report.error = result["ok"], result["error"]
        for name in ("offer_to_answer_ms", "ice_connected_ms", "dtls_connected_ms", "beeps_sent", "beeps_heard"):
            setattr(report, name, result[name])
        report.audio_rtt_ms = result["audio_rtt_median_ms"]
        report.datachannel_rtt_ms = result["datachannel_rtt_median_ms"]
        report.counters = _counters(lab)
        report.xdp_forwarded = sum(v for k, v in report.counters.items() if "/forwarded/" in k)
        report.xdp_dropped = sum(v for k, v in report.counters.items() if "/dropped/" in k)
        status("voice agent: one turn and one barge-in, stock aiortc client ...")
        from splitrelay.bench.voice import call_in_lab
        call = ["--say", "what time is it", "--barge-ins", "1"]
        report.voice = call_in_lab(lab, info["whip_urls"][0], call, timeout=120)
        status("voice agent: one turn and one barge-in, low-latency client ...")
        report.voice_low_latency = call_in_lab(lab, info["whip_urls"][0], [*call, "--low-latency"], timeout=120)
    finally:
        stop_lab(lab.name)
    return report


@click.command()
@click.option("--seconds", default=10.0, show_default=True, type=click.FloatRange(2, 300),
              help="How long the client talks (with --relays 2+: half before the kill, half after).")
@click.option("--relays", default=1, show_default=True, type=click.IntRange(1, 8),
              help="Relays in front of the transceiver; 2 or more: a Chromium call loses relay 1 "
                   "mid-call and the demo prints the gap until audio flows via another relay.")
@click.option("--turn", type=click.Choice(["fixed", "smart"]), default=None,
              help="The voice agent's end of turn: fixed silence window or the Smart Turn model "
                   "(default: the agent's, fixed; docs/VOICE.md says why).")
@click.option("--json", "as_json", is_flag=True, help="Print only the summary as JSON.")
def demo(seconds: float, relays: int, turn: str | None, as_json: bool) -> None:
    """Lab up, one real WebRTC voice session through XDP with a live status line, summary, teardown.

    With --relays 2 or more, the client is headless Chromium (Debian's chromium, driven by
    playwright) and the demo is a failover: the call runs via relay 1, relay 1 goes silent,
    Chromium moves to relay 2's candidate by itself, and the demo prints which relay carried
    the call before and after, and the gap (seconds from the kill until audio stopped and until
    it flowed again).

    \b
    Examples:
      sudo splitrelay demo --seconds 5
      sudo splitrelay demo --turn smart     # the turn decision with the model's score
      sudo splitrelay demo --relays 2 --json
    """
    require_root("the demo")
    require_bcc()
    def status(line: str) -> None:
        if not as_json:
            click.echo("\r" + line.ljust(90), nl=False, err=True)

    if relays > 1:
        demo_failover(relays, seconds, as_json, status)
        return
    if not as_json:
        click.echo("building lab: client, relay (XDP), 2 transceivers (aiortc: voice, echo) ...", err=True)
    report = run_demo(seconds, status, turn)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo("", err=True)
        click.echo(f"session via relay {report.relay_public} (WHIP {report.whip_url}):")
        click.echo(f"  answer {report.offer_to_answer_ms:.1f} ms, ICE connected {report.ice_connected_ms:.1f} ms, "
                   f"DTLS connected {report.dtls_connected_ms:.1f} ms after the offer"
                   if report.dtls_connected_ms else "  the session did not connect")
        if report.audio_rtt_ms is not None:
            click.echo(f"  audio round trip (mouth to ear, echo) {report.audio_rtt_ms:.0f} ms; "
                       f"data channel {report.datachannel_rtt_ms:.2f} ms; "
                       f"beeps heard {report.beeps_heard}/{report.beeps_sent}")
        voice = report.voice or {}
        for turn in voice.get("turns", []):
            click.echo(f"voice agent (WHIP {voice['whip_url']}): heard {turn['transcript']!r}, answered "
                       f"{turn['reply']!r}; voice-to-voice {turn['voice_to_voice_ms']} ms")
            click.echo(f"  turn decision: {turn_decision(turn)}")
        if voice.get("error"):
            click.echo(f"voice agent: {voice['error']}")
        echo_barge_in(report)
        click.echo(f"  XDP: {report.xdp_forwarded} packets forwarded, {report.xdp_dropped} dropped")
        click.echo("  " + ", ".join(f"{k} {v}" for k, v in report.counters.items()))
    if not report.ok:
        raise CliError(f"the demo session failed: {report.error}")


def turn_decision(turn: dict) -> str:
    """Why the agent answered when it did, in words: the pause it heard, the model's score, the wait."""
    heard = turn.get("endpoint_ms")
    model = turn.get("model")
    if heard is None:
        return "none (the agent detected no end of turn)"
    if turn.get("reason") == "silence":
        return f"{heard:.0f} ms of silence heard, the fixed window is {turn.get('silence_ms')} ms (turn=fixed)"
    said = "" if not model else (f"; the model, asked after {model['pause_ms']:.0f} ms of it, scored "
                                 + ("nothing (it failed)" if model["score"] is None else f"{model['score']:.2f}")
                                 + f" in {model['infer_ms']:.0f} ms")
    why = {"complete": "the model said finished", "max_wait": "the model said unfinished; waited the longest",
           "max_length": "the turn reached its cap"}.get(turn.get("reason") or "", turn.get("reason"))
    return f"{heard:.0f} ms of silence heard, ended because {why}{said} (turn=smart)"


def echo_barge_in(report: DemoReport) -> None:
    """Barge-in as each kind of client hears it: the low-latency receive path first (what a good client
    hears), then stock aiortc's."""
    click.echo("  barge-in (your voice's onset -> the agent's last audible frame out of the client's "
               "receive path):")
    for label, call in (("low-latency client (the transceiver's receive path, call --low-latency)",
                         report.voice_low_latency),
                        ("stock aiortc client", report.voice)):
        ms = (call or {}).get("summary", {}).get("barge_in_p50_ms")
        click.echo(f"    {label}: " + (f"{ms:.0f} ms" if ms is not None else
                                       f"not measured ({(call or {}).get('error') or 'no barge-in'})"))
    click.echo("    why they differ: aiortc's receiver holds 4 frames (~80 ms) and releases the agent's last "
               "words only as later packets push them out; the low-latency path releases each frame the moment "
               "its packet is in")


def demo_failover(relays: int, seconds: float, as_json: bool, status: Callable[[str], None]) -> None:
    from splitrelay.cli.demo_failover import echo_failover, run_failover_demo
    from splitrelay.client.browser import unavailable_reason

    reason = unavailable_reason()
    if reason:
        raise CliError(f"demo --relays {relays} needs a browser: {reason}; `demo --relays 1` works without it",
                       EXIT_DEPENDENCY)
    if not as_json:
        click.echo(f"building lab: client, {relays} relays (XDP), 1 transceiver (aiortc: echo) ...", err=True)
    report = run_failover_demo(relays, seconds, status)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo("", err=True)
        echo_failover(report)
    if not report.ok:
        raise CliError(f"the failover demo failed: {report.error}")
