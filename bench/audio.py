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

from splitrelay.transceiver.audio import STAGES
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
            record = service.find(report["location"].rsplit("/", 1)[1]) or {}
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
    """One echo call through the relay with ``impairment`` (lab/impair.Impairment) on the client's link,
    the probe receiving through the voice path (``--low-latency --carrier``): the probe's report and the
    transceiver's record of the call (``audio``: concealed frames, receive delay, stages)."""
    import subprocess
    import urllib.request

    from splitrelay.lab.stack import probe_result, start_lab, stop_lab
    from splitrelay.lab.topology import Lab

    info = start_lab(transceivers=1, name=name, handler="echo", impair=impairment)
    try:
        lab = Lab.load(info["name"])
        url = info["whip_urls"][0]
        proc = lab.popen(lab.client.netns, [sys.executable, "-m", "splitrelay.client.probe", url, "--duration",
                                            str(duration), "--carrier", "--low-latency"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        [report] = probe_result(proc, duration + 90)
        sessions_url = url.rsplit("/", 1)[0] + "/sessions?ended=1"

        def records() -> list[dict[str, Any]]:
            with urllib.request.urlopen(sessions_url, timeout=10) as resp:  # noqa: S310 - the lab's own URL
                return json.loads(resp.read())

        session_id = (report.get("location") or "").rsplit("/", 1)[-1]
        record = next((r for r in lab.in_netns(lab.client.netns, records) if r["id"] == session_id), {})
        return {"report": report, "server": record.get("audio", {})}
    finally:
        stop_lab(info["name"])


def markdown(results: dict[str, Any]) -> str:
    lines = ["| stage | stock client p50 / p99 (ms) | low-latency client p50 / p99 (ms) |", "|---|---|---|"]
    for stage in STAGES:
        cells = []
        for client in ("stock", "low_latency"):
            figure = results[client]["server"].get("stages", {}).get(stage)
            cells.append(f"{figure['p50']:.2f} / {figure['p99']:.2f}" if figure else "-")
        lines.append(f"| {STAGE_NAMES[stage]} | {cells[0]} | {cells[1]} |")
    rows = (("client's own receive buffering (packet in -> frame out)",
             lambda c: "{p50:.1f} / {p99:.1f}".format(**c["client_buffer_ms"]) if c["client_buffer_ms"] else "-"),
            ("beep sent -> echo packet in at the client (p50)", lambda c: f"{c['echo_arrival_ms_p50']}"),
            ("mouth to ear: beep sent -> beep heard (p50, +13 ms codec look-ahead)",
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


def main() -> None:  # pragma: no cover - a benchmark, run by make bench-audio
    parser = argparse.ArgumentParser(description="the echo's round trip, stage by stage")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--impaired", action="store_true",
                        help="instead: one call through a lab relay, 2 %% loss and 20 ms jitter (+20 ms delay) "
                             "on the client's link (root; lab/impair.py)")
    args = parser.parse_args()
    if args.impaired:
        from splitrelay.lab.impair import Impairment

        lossy = call_through_lossy_lab(args.duration, Impairment(delay_ms=20, jitter_ms=20, loss=0.02))
        report, server = lossy["report"], lossy["server"]
        print(json.dumps(lossy, indent=1) if args.json else (
            f"2 % loss, 20 ms jitter, 20 ms delay each way on the client's link: carrier frames echoed "
            f"{report['carrier_frames_echoed']}/{report['carrier_frames_sent']} (audio loss "
            f"{report['audio_loss']}), beeps {report['beeps_heard']}/{report['beeps_sent']}; transceiver "
            f"concealed {server.get('frames_concealed')} (late {server.get('frames_late')}), receive delay "
            f"{server.get('receive_delay_ms')} ms, share {server.get('stages', {}).get('in_to_out')}; client "
            f"concealed {report['frames_concealed']}, its buffer {report['client_buffer_ms']}; uplink lost "
            f"{report['packets_lost_uplink']}, downlink lost {report['packets_lost_downlink']}"))
        return
    results = asyncio.run(measure(args.duration))
    print(json.dumps(results, indent=1) if args.json else markdown(results))


if __name__ == "__main__":  # pragma: no cover
    main()
