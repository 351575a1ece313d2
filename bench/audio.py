"""Where the echo's round trip goes, stage by stage: ``make bench-audio`` (``python -m splitrelay.bench.audio``).

A transceiver (echo handler, direct mode on loopback) runs in this process; the probe runs in its own
process (``python -m splitrelay.client.probe``), once as a stock aiortc client and once with
``--low-latency`` (the transceiver's voice receive path on the client too).  The transceiver's stages
come from its session record (``Session.audio()``), the client's from the probe's report, so the
transceiver's share (RTP packet in at the mux -> echoed packet handed to the sender) is reported apart
from what the client adds.  Prints a markdown table (``--json`` for the numbers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from splitrelay.bench import report_file
from splitrelay.transceiver.service import Transceiver, TransceiverConfig

STAGE_NAMES = {
    "mux_to_receiver": "RTP at the mux -> receive buffer (ICE queue, SRTP)",
    "jitter_buffer": "receive buffer (in -> out)",
    "decode": "decode (libopus, on the loop)",
    "handler": "handler in -> send_audio",
    "outbound_queue": "outbound queue (RTP-time pacing)",
    "encode": "encode (libopus, on the loop)",
    "in_to_out": "**transceiver share: RTP in at the mux -> encoded packet out**",
}


async def _probe(url: str, duration: float, low_latency: bool) -> dict[str, Any]:
    argv = [sys.executable, "-m", "splitrelay.client.probe", url, "--duration", str(duration)]
    if low_latency:
        argv.append("--low-latency")
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), duration + 60)
    if not out.strip():
        raise SystemExit(f"probe failed: {err.decode().strip().splitlines()[-1:]}")
    return json.loads(out)[0]


def _median(values: list[float]) -> float | None:
    return round(sorted(values)[len(values) // 2], 1) if values else None


async def measure(duration: float) -> dict[str, Any]:
    service = Transceiver(TransceiverConfig(backend_id=9, bind_port=0, whip_port=0, bind_host="127.0.0.1"))
    await service.start()
    results = {}
    try:
        for client in ("stock", "low_latency"):
            report = await _probe(service.whip_url, duration, client == "low_latency")
            record = service.find(report["session_id"]) or {}
            results[client] = {"server": record.get("audio", {}), "client": {
                "mouth_to_ear_ms_p50": _median(report["audio_rtt_ms"]),
                "echo_arrival_ms_p50": _median(report["echo_arrival_ms"]),
                "client_buffer_ms": report["client_buffer_ms"],
                "beeps": f"{report['beeps_heard']}/{report['beeps_sent']}",
                "client_frames_concealed": report["frames_concealed"]}}
    finally:
        await service.stop()
    return results


def call_through_lossy_lab(duration: float, impairment: Any, name: str | None = None) -> dict[str, Any]:  # noqa: ANN401
    """One echo call through the relay with ``impairment`` (splitrelay.lab.impair.Impairment) on the client's link,
    the probe receiving through the voice path (``--low-latency --carrier``): the probe's report and the
    transceiver's record of the call (``audio``: concealed frames, receive delay, stages)."""
    import subprocess

    from splitrelay.lab.stack import admin_get, probe_result, start_lab, stop_lab, whip_token
    from splitrelay.lab.topology import Lab

    info = start_lab(transceivers=1, name=name, handler="echo", impair=impairment)
    try:
        lab = Lab.load(info["name"])
        url = info["whip_urls"][0]
        proc = lab.popen(lab.client.netns, [sys.executable, "-m", "splitrelay.client.probe", url, "--duration",
                                            str(duration), "--carrier", "--low-latency",
                                            "--token", whip_token(lab)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        [report] = probe_result(proc, duration + 90)
        admin = info["transceivers"][0]["admin_url"]

        def concealed_metric() -> float | None:
            lines = admin_get(lab, admin, "/metrics").decode().splitlines()
            return next((float(line.split()[1]) for line in lines
                         if line.startswith("splitrelay_transceiver_audio_frames_concealed_total ")), None)

        records = json.loads(admin_get(lab, admin, "/sessions?ended=1"))
        record = next((r for r in records if r["id"] == report.get("session_id")), {})
        return {"report": report, "server": record.get("audio", {}),
                "concealed_metric": lab.in_netns(lab.client.netns, concealed_metric)}
    finally:
        stop_lab(info["name"])


def markdown(results: dict[str, Any]) -> str:
    lines = ["| stage | stock client p50 / p99 (ms) | low-latency client p50 / p99 (ms) |", "|---|---|---|"]
    for stage in STAGE_NAMES:  # send_late is generated audio's (a voice agent's reply): not in an echo
        cells = []
        for client in ("stock", "low_latency"):
            figure = results[client]["server"].get("stages", {}).get(stage)
            cells.append(f"{figure['p50']:.2f} / {figure['p99']:.2f}" if figure else "-")
        lines.append(f"| {STAGE_NAMES[stage]} | {cells[0]} | {cells[1]} |")
    rows = (("client's own receive buffering (packet in -> frame out)",
             lambda c: "{p50:.1f} / {p99:.1f}".format(**c["client_buffer_ms"]) if c["client_buffer_ms"] else "-"),
            ("beep sent -> echo packet in at the client (p50; see note)", lambda c: f"{c['echo_arrival_ms_p50']}"),
            ("mouth to ear: beep sent -> beep heard (p50; see note)",
             lambda c: f"{c['mouth_to_ear_ms_p50']}"),
            ("beeps heard / sent", lambda c: c["beeps"]))
    for name, cell in rows:
        lines.append(f"| {name} | {cell(results['stock']['client'])} | {cell(results['low_latency']['client'])} |")
    for client in ("stock", "low_latency"):
        server = results[client]["server"]
        lines.append(f"\n{client}: transceiver concealed {server.get('frames_concealed')}, late "
                     f"{server.get('frames_late')}, skipped (catch-up) {server.get('frames_skipped')}, silence "
                     f"inserted {server.get('frames_silent')}; receive delay {server.get('receive_delay_ms')} ms "
                     f"(measured jitter {server.get('receive_jitter_ms')} ms)")
    return "\n".join(lines)


def lossy_line(lossy: dict[str, Any]) -> str:
    report, server = lossy["report"], lossy["server"]
    share = server.get("stages", {}).get("in_to_out") or {}
    return (f"2 % loss, 20 ms jitter, 20 ms delay each way on the client's link (lab/impair.py), probe with "
            f"`--low-latency --carrier`: carrier frames echoed {report['carrier_frames_echoed']}/"
            f"{report['carrier_frames_sent']} (audio loss {_pct(report['audio_loss'])}), beeps "
            f"{report['beeps_heard']}/{report['beeps_sent']}; RTP lost uplink {report['packets_lost_uplink']}, "
            f"downlink {report['packets_lost_downlink']}; the transceiver concealed "
            f"{server.get('frames_concealed')} frames (late {server.get('frames_late')}), the client "
            f"{report['frames_concealed']}; transceiver share {share.get('p50')} / {share.get('p99')} ms "
            f"(p50 / p99); measured jitter {server.get('receive_jitter_ms')} ms.")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


METHOD = """## Voice path: where the echo's round trip goes

Generated by `make bench-audio` (`python -m splitrelay.bench.audio --section --into BENCHMARKS.md`, which
`make bench` runs too: it replaces this section in place).
A transceiver with the echo handler (direct mode, loopback) runs in the bench's process, the probe in its
own, once as a stock aiortc client and once with `--low-latency` (the transceiver's voice receive path on
the client too).  Stage times are per 20 ms frame, taken inside the transceiver (`Session.audio()`); the
client's own receive buffering is measured by the probe and reported apart, so the transceiver's share is
its own.  Target (issue 13): transceiver share <= 25 ms p50, <= 45 ms p99 on a clean network.  The machine
is shared: its load average is printed with the run.

Before this path (stock aiortc on both ends, a fixed 20 ms send clock) the round trip was ~200 ms: the
transceiver's receiver held 4 frames (`prefetch=4`, 80-100 ms), the send clock added 3-29 ms, and decode
and encode each crossed a thread.  Now (transceiver/jitter.py, opus.py, audio.py): an in-order frame
leaves the receive buffer the moment its packet is in; a gap waits one frame on a path that keeps order
(the measured delay once packets came out of order), then is concealed with libopus FEC/PLC and counted;
decode and encode run on the loop through PyAV's libopus; a frame is sent when the handler pushes it,
paced by RTP time (live audio at most 3 frames ahead, a voice agent's reply 1: see the barge-in below),
silence only once the handler is 3 frames late (after a barge-in's flush: in its own slot); queued live
audio sheds quiet frames so a caller's catch-up burst is not carried as latency.

Note on the two client rows: the probe detects beeps per 20 ms frame.  A beep starts on a frame boundary;
two Opus passes delay it 2 x 6.5 ms, so the first echoed frame carries only its last 7 ms, below the
detector's threshold, and the beep is recognised in the next frame, whose packet the client sent 20 ms
after the beep began.  Those two rows therefore include one frame (20 ms) that is the detector's
granularity (the audible onset is ~7 ms earlier); the client's own send path (its 20 ms clock and
aiortc's encoder executor) is the rest beyond the transceiver's share.
"""


def section(results: dict[str, Any], lossy: dict[str, Any] | None) -> str:
    import os

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    out = [METHOD, f"Clean network, load average {load}:\n", markdown(results)]
    if lossy is not None:
        out += ["\nImpaired client link (`python -m splitrelay.bench.audio --impaired`, root):", lossy_line(lossy)]
    return "\n".join(out) + "\n"


def main() -> None:  # pragma: no cover - a benchmark, run by make bench-audio
    parser = argparse.ArgumentParser(prog="python -m splitrelay.bench.audio",
                                     description="the echo's round trip, stage by stage")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--impaired", action="store_true",
                        help="instead: one call through a lab relay, 2 %% loss and 20 ms jitter (+20 ms delay) "
                             "on the client's link (root; lab/impair.py)")
    parser.add_argument("--section", action="store_true",
                        help="both (the impaired call when root), as BENCHMARKS.md's voice-path section")
    report_file.add_into_option(parser)
    args = parser.parse_args()
    report_file.check_into(parser, args, "bench.audio")
    import os

    from splitrelay.lab.impair import Impairment

    impairment = Impairment(delay_ms=20, jitter_ms=20, loss=0.02)
    if args.impaired:
        lossy = call_through_lossy_lab(args.duration, impairment)
        print(json.dumps(lossy, indent=1) if args.json else lossy_line(lossy))
        return
    results = asyncio.run(measure(args.duration))
    if args.section:
        lossy = call_through_lossy_lab(args.duration, impairment) if os.geteuid() == 0 else None
        if args.json:
            print(json.dumps({"clean": results, "impaired": lossy}, indent=1))
        else:
            report_file.print_or_write_section(parser, args, "bench.audio", section(results, lossy))
        return
    print(json.dumps(results, indent=1) if args.json else markdown(results))


if __name__ == "__main__":  # pragma: no cover
    main()
