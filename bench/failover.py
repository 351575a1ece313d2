"""The failover gap, re-runnable: a relay dies (3a) or its address floats (3b) under a call.

Issue 12's measurement: from the fault until audio flows again, for Chromium and for an
aiortc caller, median and worst of N runs each, and how many calls were dropped.  One
two-relay lab (one echo transceiver, every session registered with both relays); each
run is a fresh call through relay 1 that must be heard for 1 s, the fault, the gap
(client/browser.py ``audio_gap``: 100 ms samples of packets and tone energy coming back,
the same judge for both clients), 1 s more of audio, a hang-up that must find the session
(DELETE 200), and the lab healed.  Runs go one at a time (Chromium is heavy on 2 cores).

* ``death`` (3a): relay 1 silenced (lab/faults.py).  Chromium notices the silence and
  moves to relay 2's candidate by itself.  aioice never switches pairs, so the aiortc
  caller switches as a browser would (client/ice_failover.py) right at the fault: its gap
  has no detection delay in it, only the path change.
* ``float`` (3b): relay 1 silenced and its address moved to relay 2 in the same instant
  (lab/floating.py); no client notices, relay 2 learns the flow from the next consent check.

    python -m splitrelay.bench.failover --runs 5            # a markdown table on stdout
    python -m splitrelay.bench.failover --runs 5 --json     # every run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass

from splitrelay.bench import report_file

SCENARIOS = ("death", "float")
CLIENTS = ("chromium", "aiortc")
TARGETS_S = {("death", "chromium"): 6.0, ("float", "chromium"): 3.0}   # issue 12
GAP_TIMEOUT = 30.0     # bounds a failure only
# Consent checks run on a schedule that starts with the call, so a fault at a fixed moment of
# every run meets the same phase of it: measured, aiortc's gaps all fell in 3.2-3.9 s that way.
# Each run waits 1 s of audio plus a random 0..PHASE_S, so faults fall anywhere in a consent
# interval (aioice: 5 s +- 20 %; Chromium's on a stable pair: 2.5 s).
PHASE_S = 6.0


@dataclass
class Run:
    scenario: str
    client: str
    gap_s: float | None
    stopped_after_s: float | None
    relay_after: int | None     # whose public address the selected pair names (float: still 1)
    carried_by: int | None      # the relay whose flow for the call moved packets both ways after the fault
    dropped: bool
    error: str | None = None
    flow_after_s: float | None = None   # fault until relay 2 opened the call's flow (its age, from its agent)


def _relay_of(lab, address: str) -> int | None:  # noqa: ANN001
    address = address.rsplit(":", 1)[0].strip("[]")
    return next((r.index for r in lab.relays if address in (r.public.ip4, r.public.ip6)), None)


def _carrier(lab, client: str, run: Run, fault_at: float) -> None:  # noqa: ANN001
    """Which relay (2, then 1) carried ``client``'s flow both ways, and when relay 2 opened it."""
    from splitrelay.lab.stack import control

    for relay in (2, 1):
        read_at = time.monotonic()
        flow = next((f for f in control(lab, lambda c: c.flows(), relay) if f["client"] == client), None)
        if flow and flow["packets"] > 20 and flow["rx_packets"] > 20:
            run.carried_by = relay
            if relay == 2:
                run.flow_after_s = round(read_at - flow["age_s"] - fault_at, 3)
            return


def _fault(lab, scenario: str, at: list[float]):  # noqa: ANN001, ANN202
    """The fault of ``scenario``; appends the moment it starts (monotonic) to ``at``."""
    from splitrelay.lab.faults import kill_relay, relay_dies_and_its_address_floats

    def fault() -> None:
        at.append(time.monotonic())
        if scenario == "float":
            # translating relays: the internal address stays (the call comes in from relay 2's, latched)
            relay_dies_and_its_address_floats(lab, gateway=not lab.translate)
        else:
            kill_relay(lab, 1)
    return fault


def chromium_run(lab, browser, whip_url: str, scenario: str, phase: random.Random) -> Run:  # noqa: ANN001
    from splitrelay.lab.faults import heal

    from splitrelay.lab.stack import whip_token

    call = browser.call(whip_url, token=whip_token(lab))
    run = Run(scenario, "chromium", None, None, None, None, dropped=False)
    try:
        before = call.wait_audio(seconds=1.0 + phase.uniform(0, PHASE_S))
        if _relay_of(lab, before["pair"]["remote"]) != 1:
            raise RuntimeError(f"the call started on {before['pair']['remote']}, not relay 1")
        try:
            fault_at: list[float] = []
            judged = call.measure_gap(_fault(lab, scenario, fault_at), timeout=GAP_TIMEOUT)
            after = call.wait_audio(seconds=1.0)
            run.gap_s, run.stopped_after_s = judged.gap, judged.stopped_after
            run.relay_after = _relay_of(lab, after["pair"]["remote"])
            _carrier(lab, after["pair"]["local"], run, fault_at[0])
        finally:
            heal(lab)
        run.dropped = any(e["what"] == "connection" and e["value"] in ("failed", "closed")
                          for e in call.events(before["t"]))
    except Exception as exc:  # noqa: BLE001 - a failed run is reported, the others go on
        run.error = f"{type(exc).__name__}: {exc}"
    finally:
        try:
            status = call.hang_up()
        except Exception:  # noqa: BLE001
            status = None
        run.dropped = run.dropped or status != 200
    return run


def aiortc_run(lab, whip_url: str, scenario: str, phase: random.Random) -> Run:  # noqa: ANN001
    from splitrelay.lab.faults import heal

    run = Run(scenario, "aiortc", None, None, None, None, dropped=False)
    try:
        lab.in_netns(lab.client.netns, lambda: asyncio.run(_aiortc(lab, whip_url, scenario, run, phase)),
                     timeout=GAP_TIMEOUT + 60)
    except Exception as exc:  # noqa: BLE001
        run.error = run.error or f"{type(exc).__name__}: {exc}"
    finally:
        heal(lab)
    return run


async def _aiortc(lab, whip_url: str, scenario: str, run: Run, phase: random.Random) -> None:  # noqa: ANN001
    import aiohttp

    from splitrelay.client.echo_gap import EchoCall
    from splitrelay.client.ice_failover import nominate_like_a_browser, switch_to
    from splitrelay.client.ice_restart import ice_connection

    from splitrelay.lab.stack import whip_token

    caller = EchoCall(whip_url, family=4, token=whip_token(lab))
    status = None
    async with aiohttp.ClientSession() as http:
        await caller.call(http)
        try:
            await caller.wait_audio(seconds=1.0 + phase.uniform(0, PHASE_S), timeout=GAP_TIMEOUT)
            connection = ice_connection(caller.pc)
            nominate_like_a_browser(connection)
            fault_at: list[float] = []
            fault = _fault(lab, scenario, fault_at)
            spare = lab.relay(2)

            async def death() -> None:     # the browser's switch, made at once
                await asyncio.to_thread(fault)
                await switch_to(connection, (spare.public.ip4, lab.relay_port), local_host=spare.client.ip4)

            judged = await caller.measure_gap(death if scenario == "death" else fault, timeout=GAP_TIMEOUT)
            await caller.wait_audio(seconds=1.0)
            run.gap_s, run.stopped_after_s = judged.gap, judged.stopped_after
            pair = connection._nominated[1]  # noqa: SLF001
            run.relay_after = _relay_of(lab, pair.remote_addr[0])
            local = f"{pair.local_candidate.host}:{pair.local_candidate.port}"
            await asyncio.to_thread(_carrier, lab, local, run, fault_at[0])
        except Exception as exc:  # noqa: BLE001
            run.error = f"{type(exc).__name__}: {exc}"
        finally:
            status = await caller.hang_up(http)
    run.dropped = caller.dropped or status != 200


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def summarize(runs: list[Run]) -> list[dict]:
    """Per (scenario, client): runs, median and worst gap, dropped calls, failed runs, the target."""
    rows = []
    for scenario in SCENARIOS:
        for client in CLIENTS:
            mine = [r for r in runs if (r.scenario, r.client) == (scenario, client)]
            if not mine:
                continue
            gaps = [r.gap_s for r in mine if r.gap_s is not None and r.error is None]
            rows.append({"scenario": scenario, "client": client, "runs": len(mine),
                         "median_s": round(statistics.median(gaps), 2) if gaps else None,
                         "worst_s": round(max(gaps), 2) if gaps else None,
                         "gaps_s": [round(g, 2) for g in gaps],
                         "flow_after_median_s": _median([r.flow_after_s for r in mine
                                                         if r.flow_after_s is not None]),
                         "dropped": sum(r.dropped for r in mine), "failed": sum(r.error is not None for r in mine),
                         "target_s": TARGETS_S.get((scenario, client))})
    return rows


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return "before the fault (backup pair)" if value < 0 else f"{value} s"


def markdown(rows: list[dict]) -> str:
    lines = ["| scenario | client | runs | median gap | worst gap | gaps (s) | relay 2's flow opened (median) "
             "| dropped | failed runs | target |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        target = f"≤ {r['target_s']:g} s" if r["target_s"] else "-"
        lines.append(f"| {r['scenario']} | {r['client']} | {r['runs']} | {r['median_s']} s | {r['worst_s']} s | "
                     f"{', '.join(map(str, r['gaps_s']))} | {_seconds(r.get('flow_after_median_s'))} | "
                     f"{r['dropped']} | {r['failed']} | {target} |")
    return "\n".join(lines)


def measure(runs: int, scenarios: tuple[str, ...] = SCENARIOS, clients: tuple[str, ...] = CLIENTS,
            progress=lambda line: None, seed: int = 12, translate: bool = False) -> list[Run]:  # noqa: ANN001
    """Build the lab, do ``runs`` runs of every (scenario, client), tear the lab down; ``seed`` draws
    the moments of the faults; ``translate``: the relays translate both sides (lab up --translate)."""
    from splitrelay.client.browser import Browser, unavailable_reason
    from splitrelay.lab.netns import nsenter_argv
    from splitrelay.lab.stack import start_lab, stop_lab
    from splitrelay.lab.topology import Lab

    phase = random.Random(seed)
    missing = unavailable_reason()
    if missing and "chromium" in clients:   # `make bench` goes on without a browser, and says so
        progress(f"chromium runs skipped: {missing}")
        clients = tuple(c for c in clients if c != "chromium")

    info = start_lab(transceivers=1, handler="echo", relays=2, translate=translate)
    lab = Lab.load(info["name"])
    results: list[Run] = []
    try:
        for client in clients:
            if client == "chromium":
                with Browser(nsenter_argv(lab.client.netns, [])) as browser:
                    for scenario in scenarios:
                        for i in range(runs):
                            results.append(chromium_run(lab, browser, info["whip_url"], scenario, phase))
                            progress(f"{scenario} chromium {i + 1}/{runs}: {results[-1]}")
            else:
                for scenario in scenarios:
                    for i in range(runs):
                        results.append(aiortc_run(lab, info["whip_url"], scenario, phase))
                        progress(f"{scenario} aiortc {i + 1}/{runs}: {results[-1]}")
    finally:
        stop_lab(lab.name)
    return results


SECTION_NOTES = """\
Each run: a fresh call through relay 1 (the preferred one) heard for 1 s plus a random 0-6 s (so
the fault falls anywhere in the clients' consent schedules), the fault, then the gap: from the
fault until the echo of the client's own tone flows again (100 ms samples of packets and tone
energy coming back, `client/browser.py: audio_gap`, the same judge for both clients), 1 s more
of audio, and a hang-up that must find the session (DELETE 200); a call that fails, closes or
is not found at the hang-up counts as dropped.  *Relay 2's flow opened*: from the fault until
relay 2's XDP opened the call's flow (the flow's age, from relay 2's agent); the rest of the gap
is the way back to audio (the client's media to the echo and back, its jitter buffer).
**death** (3a): relay 1 silenced (its switch port disabled, no link event); Chromium notices on
its own and moves to relay 2's candidate; aioice never switches pairs, so the aiortc caller
switches as a browser would at the moment of the fault, and its gap has no detection in it.
**float** (3b): relay 1 silenced and its public address moved to relay 2 in the same instant
(`lab/floating.py`: the lab's internet maps the address 1:1 onto relay 2, relay 1's internal
address floats with gratuitous ARP/NA); no client notices anything, and relay 2 opens the flow
from the transceiver's probe of the silent path (after 500 ms, transceiver/paths.py) or the
client's next STUN check, whichever comes first.  A gap of 0.0 s means no 100 ms sample without
the echo: the echo in flight covered the uplink's cut, which lasted until relay 2's flow opened.
Failure detection (VRRP's ~1-3 s, a health check) is not in the float gap.
"""


def section(rows: list[dict], runs: int, seed: int) -> str:
    """The BENCHMARKS.md section: how to re-run it, the table, what the runs were."""
    return ("\n## Failover gap: a relay dies (3a), its address floats (3b) "
            "(`python -m splitrelay.bench.failover`)\n\n"
            f"Reproduce with `make bench-failover` or `python -m splitrelay.bench.failover --runs {runs} "
            f"--seed {seed}` (root, Debian's chromium; ~10 s a run, one at a time).  Two relays (XDP, "
            f"`strict` policy) in front of one echo transceiver, every session registered with both.\n\n"
            f"{markdown(rows)}\n\n{SECTION_NOTES}")


def main() -> None:  # pragma: no cover - a thin command line
    parser = argparse.ArgumentParser(prog="python -m splitrelay.bench.failover",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per scenario and client (default 5)")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, help="repeat; default: both")
    parser.add_argument("--client", action="append", choices=CLIENTS, help="repeat; default: both")
    parser.add_argument("--json", action="store_true", help="every run and the summary as JSON")
    parser.add_argument("--section", action="store_true", help="a BENCHMARKS.md section (markdown)")
    parser.add_argument("--from-json", metavar="FILE", help="measure nothing: render what --json saved")
    parser.add_argument("--seed", type=int, default=12, help="draws the moment of each fault (default 12)")
    parser.add_argument("--translate", action="store_true",
                        help="relays translate both sides: in float, the call arrives from relay 2's internal "
                             "address and the transceiver latches onto it")
    report_file.add_into_option(parser)
    args = parser.parse_args()
    report_file.check_into(parser, args, "bench.failover")
    if args.from_json:
        with open(args.from_json) as saved:
            data = json.load(saved)
        runs = [Run(**r) for r in data["runs"]]
        seed, seconds = data.get("seed", args.seed), data.get("seconds")
    else:
        started = time.monotonic()
        runs = measure(args.runs, tuple(args.scenario or SCENARIOS), tuple(args.client or CLIENTS),
                       progress=lambda line: print(line, file=sys.stderr, flush=True), seed=args.seed,
                       translate=args.translate)
        seed, seconds = args.seed, round(time.monotonic() - started, 1)
    rows = summarize(runs)
    saved = {"runs": [asdict(r) for r in runs], "summary": rows, "seed": seed, "seconds": seconds}
    report_file.print_report(parser, args, "bench.failover", saved,
                             lambda: section(rows, max(r["runs"] for r in rows), seed), markdown(rows))


if __name__ == "__main__":  # pragma: no cover
    main()
