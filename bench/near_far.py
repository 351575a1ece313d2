"""First-hop latency: a client's media goes by its near relay, and what the far one costs.

Issue 12 §2's lab measurement.  One two-relay lab whose relay 2 is far (the client's link to it
delays UDP by ``--far-delay-ms`` each way, lab/impair.py), and three echo transceivers:

* ``near``: both relays, and the default chooser (``--prefer PREFIX=RELAY`` on the WHIP request's
  source network) names relay 1 for the client's network, as an operator would configure it;
* ``far-preferred``: both relays, the chooser names relay 2 for the client;
* ``far-only``: only relay 2 advertised: the client is forced onto the far relay.

Calls go one at a time (plain aiortc probes), rotating over the three; for each the bench records
the relay that carried the media (the one whose IN_FWD_FLOW counter grew most during the call)
and the median beep round trip heard back.  aioice, as the controlling agent, nominates the
first pair whose check succeeds, so ``far-preferred`` shows whether latency or the preference
wins for an aiortc client (browsers follow the priorities, tests/test_browser.py).

    python -m splitrelay.bench.near_far --runs 3            # a markdown table on stdout
    python -m splitrelay.bench.near_far --runs 3 --json     # every call
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass

CALL_SECONDS = 4.0
PROBE_TIMEOUT = 90.0     # bounds a failure only
SETUPS = ("near", "far-preferred", "far-only")


@dataclass
class Call:
    setup: str                # one of SETUPS
    carried_by: int | None    # the relay whose IN_FWD_FLOW grew most during the call
    audio_rtt_ms: float | None
    beeps_heard: int


def _forwarded(lab) -> dict[int, int]:  # noqa: ANN001
    from splitrelay.lab.stack import control

    def packets(relay: int) -> int:
        counters = control(lab, lambda c: c.stats(), relay)["counters"]
        return next(c["packets"] for c in counters if c["name"] == "IN_FWD_FLOW")
    return {r.index: packets(r.index) for r in lab.relays}


def measure(runs: int = 3, far_delay_ms: float = 40.0, say=lambda _: None) -> list[Call]:  # noqa: ANN001
    from splitrelay.lab.impair import Impairment
    from splitrelay.lab.stack import probe, probe_result, start_lab, start_transceiver, stop_lab, whip_url
    from splitrelay.lab.topology import Lab

    info = start_lab(transceivers=3, relays=2, handler=None, far=Impairment(delay_ms=far_delay_ms))
    lab = Lab.load(info["name"])
    procs = []
    try:
        prefer = f"{lab.client_signal_ip4}/32"
        near, far = lab.relays
        t_near, t_far_preferred, t_far_only = lab.transceivers
        procs.append(start_transceiver(lab, t_near, "echo", ["--prefer", f"{prefer}={near.link}"]))
        procs.append(start_transceiver(lab, t_far_preferred, "echo", ["--prefer", f"{prefer}={far.link}"]))
        procs.append(start_transceiver(lab, t_far_only, "echo", relays=[far.index]))
        calls = []
        for i in range(runs):
            for t, setup in zip(lab.transceivers, SETUPS, strict=True):
                before = _forwarded(lab)
                [report] = probe_result(probe(lab, [whip_url(t)], duration=CALL_SECONDS), PROBE_TIMEOUT)
                grew = {r: n - before[r] for r, n in _forwarded(lab).items()}
                carried_by = max(grew, key=grew.get) if max(grew.values()) > 0 else None
                call = Call(setup, carried_by, report.get("audio_rtt_median_ms"), report.get("beeps_heard", 0))
                calls.append(call)
                rtt = "n/a" if call.audio_rtt_ms is None else f"{call.audio_rtt_ms:.1f} ms"
                say(f"near_far: run {i + 1}/{runs} {setup}: media by relay {carried_by}, audio RTT {rtt}")
        return calls
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
        stop_lab(lab.name)


def summary(calls: list[Call], far_delay_ms: float) -> dict:
    out: dict = {"far_delay_ms": far_delay_ms}
    for setup in SETUPS:
        mine = [c for c in calls if c.setup == setup]
        rtts = [c.audio_rtt_ms for c in mine if c.audio_rtt_ms is not None]
        out[setup] = {"calls": len(mine), "carried_by": sorted({c.carried_by for c in mine}, key=str),
                      "audio_rtt_median_ms": statistics.median(rtts) if rtts else None}
    return out


LABELS = {"near": "relay 1 (near) preferred", "far-preferred": "relay 2 (far) preferred, both advertised",
          "far-only": "only relay 2 (far) advertised: forced"}


def markdown(s: dict) -> str:
    rows = ["| the transceiver's answer | calls | media carried by relay | audio RTT, median of calls (ms) |",
            "|---|---|---|---|"]
    for setup in SETUPS:
        r = s[setup]
        rtt = "n/a" if r["audio_rtt_median_ms"] is None else f"{r['audio_rtt_median_ms']:.1f}"
        rows.append(f"| {LABELS[setup]} | {r['calls']} | {', '.join(map(str, r['carried_by']))} | {rtt} |")
    return "\n".join(rows) + f"\n\nRelay 2's link delays UDP by {s['far_delay_ms']:g} ms each way.\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitrelay.bench.near_far",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="calls per relay (default 3)")
    parser.add_argument("--far-delay-ms", type=float, default=40.0, help="one-way delay on the far relay's link")
    parser.add_argument("--json", action="store_true", help="every call and the summary as JSON")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    calls = measure(args.runs, args.far_delay_ms, say=lambda line: print(line, file=sys.stderr, flush=True))
    s = summary(calls, args.far_delay_ms)
    print(json.dumps({"calls": [asdict(c) for c in calls], "summary": s}, indent=2) if args.json else markdown(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
