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
    args = parser.parse_args()
    results = asyncio.run(measure(args.duration))
    print(json.dumps(results, indent=1) if args.json else markdown(results))


if __name__ == "__main__":  # pragma: no cover
    main()
