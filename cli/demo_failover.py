"""`splitrelay demo --relays N`: a browser call through relay 1, relay 1 dies mid-call, the gap.

Issue 12's scenario 3a as a demo.  Every transceiver's answer offers each relay's
candidates, relay 1 preferred, so Chromium (client/browser.py, in the lab's client
namespace) calls through relay 1 and keeps the other relays' pairs alive as backups.
Relay 1 is then silenced (lab/faults.py: its switch port disabled, no link goes down) and
Chromium moves to a backup pair by itself once consent checks go unanswered (measured:
audio again ~4 s after the kill, tests/test_browser.py).  The gap is the page's own
measure (``audio_gap``: kill until the echo of its tone flows again, 100 ms resolution).
The aiortc probe and the voice turn of the one-relay demo are left out: they show nothing
about failover and would double the run on a busy machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import click

from splitrelay.errors import SplitrelayError

if TYPE_CHECKING:
    from splitrelay.client.browser import BrowserCall
    from splitrelay.lab.topology import Lab

GAP_TIMEOUT = 30.0   # bounds a failure only: Chromium moves after ~4 s (5 s without consent answers)
KILLED = 1           # the preferred relay, the one the demo kills


@dataclass
class FailoverReport:
    lab: str
    whip_url: str
    seconds: float
    relays: list[dict]                  # {index, public, public6}, relay 1 (preferred) first
    ok: bool = False
    error: str | None = None
    relay_before: int | None = None     # the relay whose candidate the call's selected pair used
    pair_before: dict | None = None     # that pair as Chromium's getStats shows it
    relay_after: int | None = None      # ... and once audio flowed again after relay 1 was killed
    pair_after: dict | None = None
    gap: dict | None = None             # seconds from the kill: {stopped_after (None: audio never
                                        # stopped), flowing_after (audio again: the gap)}
    flow_after: dict | None = None      # relay_after's flow for the call: {packets, rx_packets}

    def to_dict(self) -> dict:
        return asdict(self)


def relay_of(lab: Lab, pair: dict | None) -> int | None:
    """The relay whose public address (IPv4 or IPv6) is the remote end of a selected pair."""
    if not pair:
        return None
    address = pair["remote"].rsplit(":", 1)[0].strip("[]")
    return next((r.index for r in lab.relays if address in (r.public.ip4, r.public.ip6)), None)


def run_failover_demo(relays: int, seconds: float,
                      on_status: Callable[[str], None] | None = None) -> FailoverReport:
    from splitrelay.client.browser import Browser
    from splitrelay.lab.netns import nsenter_argv
    from splitrelay.lab.stack import start_lab, stop_lab
    from splitrelay.lab.topology import Lab

    status = on_status or (lambda line: None)
    info = start_lab(transceivers=1, relays=relays, handler="echo")
    lab = Lab.load(info["name"])
    report = FailoverReport(lab=lab.name, whip_url=info["whip_url"], seconds=seconds, relays=[
        {"index": r["index"], "public": r["relay_public"], "public6": r["relay_public6"]} for r in info["relays"]])
    try:
        status("starting Chromium in the client namespace ...")
        with Browser(nsenter_argv(lab.client.netns, [])) as browser:
            call = browser.call(report.whip_url, token=info["whip_token"])
            try:
                _kill_under_call(lab, call, report, status)
            finally:
                call.hang_up()
    except SplitrelayError as exc:
        report.error = str(exc)
    finally:
        stop_lab(lab.name)
    return report


def _kill_under_call(lab: Lab, call: BrowserCall, report: FailoverReport, status: Callable[[str], None]) -> None:
    """Talk seconds/2, kill relay 1, wait for audio on another relay, talk seconds/2; relay 1 revived."""
    from splitrelay.lab.faults import kill_relay, revive_relay
    from splitrelay.lab.stack import control

    status(f"call up; talking {report.seconds / 2:.1f} s ...")
    heard = call.wait_audio(seconds=report.seconds / 2)
    report.pair_before, report.relay_before = heard["pair"], relay_of(lab, heard["pair"])
    status(f"audio flowing via relay {report.relay_before}; killing relay {KILLED} ...")
    try:
        judged = call.measure_gap(lambda: kill_relay(lab, KILLED), timeout=GAP_TIMEOUT)
        report.gap = {k: None if v is None else round(v, 3) for k, v in asdict(judged).items()}  # to the ms
        moved = call.wait_pair(lambda pair: relay_of(lab, pair) not in (None, KILLED), 5,
                               f"the selected pair on a relay other than {KILLED}")
        report.pair_after, report.relay_after = moved["pair"], relay_of(lab, moved["pair"])
        status(f"audio again after {judged.gap:.2f} s via relay {report.relay_after}; "
               f"talking {report.seconds / 2:.1f} s ...")
        call.wait_audio(seconds=report.seconds / 2)
        report.flow_after = next(({"packets": f["packets"], "rx_packets": f["rx_packets"]}
                                  for f in control(lab, lambda c: c.flows(), report.relay_after)
                                  if f["client"] == moved["pair"]["local"]), None)
    finally:
        revive_relay(lab, KILLED)
    if report.relay_before != KILLED:
        report.error = f"the call started on relay {report.relay_before}, not on the preferred relay {KILLED}"
    else:
        report.ok = True


def echo_failover(report: FailoverReport) -> None:
    """The human summary of a failover demo, on stdout."""
    public = {r["index"]: r["public"] for r in report.relays}
    if report.relay_before is not None:
        click.echo(f"call via relay {report.relay_before} ({public.get(report.relay_before)}, "
                   f"WHIP {report.whip_url})")
    if report.relay_after is not None:
        gap = report.gap or {}
        stopped = ("audio never stopped" if gap.get("stopped_after") is None
                   else f"audio stopped {gap['stopped_after']:.2f} s after")
        click.echo(f"relay {KILLED} killed: {stopped}, flowing again after {gap['flowing_after']:.2f} s "
                   f"(the gap), via relay {report.relay_after} ({public.get(report.relay_after)})")
    if report.flow_after:
        click.echo(f"  relay {report.relay_after} carried the call: {report.flow_after['packets']} packets in, "
                   f"{report.flow_after['rx_packets']} back")
    if report.error:
        click.echo(f"failover: {report.error}")
