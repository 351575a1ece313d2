"""A plain aiortc WHIP client that measures a voice session end to end.

The demo, the tests and the benchmarks all need the same thing: a standard
WebRTC client (nothing splitrelay-specific on the wire) that opens a session
with one HTTP request, talks, and reports how fast the session came up and how
long its own voice took to come back.  The probe speaks a beep pattern
(a 1 kHz burst every ``beep_interval``) and detects the bursts in the audio
it receives, so with the transceiver's ``echo`` handler the measured delay is
the real mouth-to-ear round trip of the media path (network + jitter buffer +
codec), and a lost echo is visible as a missing beep.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import math
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import aiohttp
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

SAMPLE_RATE = 48000
FRAME_SAMPLES = 960  # 20 ms
BEEP_HZ = 1000.0


class ProbeError(Exception):
    """The probe could not open or run its session (one-line reason)."""


@dataclass
class ProbeReport:
    whip_url: str
    ok: bool = False
    error: str | None = None
    location: str | None = None
    offer_to_answer_ms: float | None = None
    ice_connected_ms: float | None = None
    dtls_connected_ms: float | None = None
    ice_states: list[str] = field(default_factory=list)
    connection_states: list[str] = field(default_factory=list)
    beeps_sent: int = 0
    beeps_heard: int = 0
    beep_echoed: list[bool] = field(default_factory=list)  # per beep sent, in order
    audio_rtt_ms: list[float] = field(default_factory=list)
    datachannel_rtt_ms: list[float] = field(default_factory=list)
    frames_received: int = 0
    rtcp_rtt_ms: float | None = None
    packets_sent: int = 0
    packets_received: int = 0

    @staticmethod
    def _median(values: list[float]) -> float | None:
        if not values:
            return None
        ordered = sorted(values)
        return ordered[len(ordered) // 2]

    @property
    def audio_rtt_median_ms(self) -> float | None:
        return self._median(self.audio_rtt_ms)

    @property
    def datachannel_rtt_median_ms(self) -> float | None:
        return self._median(self.datachannel_rtt_ms)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["audio_rtt_median_ms"] = self.audio_rtt_median_ms
        data["datachannel_rtt_median_ms"] = self.datachannel_rtt_median_ms
        return data


def goertzel_power(samples: tuple[int, ...], freq: float = BEEP_HZ, rate: int = SAMPLE_RATE) -> float:
    """Normalised power of one frequency in a block of s16 samples (0..~1 for a full-scale tone)."""
    n = len(samples)
    if n == 0:
        return 0.0
    coeff = 2.0 * math.cos(2.0 * math.pi * freq / rate)
    s1 = s2 = 0.0
    for x in samples:
        s0 = x + coeff * s1 - s2
        s2, s1 = s1, s0
    power = s1 * s1 + s2 * s2 - coeff * s1 * s2
    return power / (n * n * 32768.0 * 32768.0 / 4.0)


class BeepTrack(MediaStreamTrack):
    """48 kHz mono audio: a 1 kHz burst of ``beep_ms`` every ``interval`` seconds, silence between."""

    kind = "audio"

    def __init__(self, interval: float = 0.5, beep_ms: int = 60) -> None:
        super().__init__()
        self.interval_frames = max(2, round(interval / 0.02))
        self.beep_frames = max(1, beep_ms // 20)
        self.sent_at: list[float] = []  # wall-clock time each beep's first frame left recv()
        self._index = 0
        self._start: float | None = None
        tone = [
            int(12000 * math.sin(2 * math.pi * BEEP_HZ * i / SAMPLE_RATE)) for i in range(FRAME_SAMPLES)
        ]
        self._tone = struct.pack(f"<{FRAME_SAMPLES}h", *tone)
        self._silence = bytes(2 * FRAME_SAMPLES)

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            wait = self._start + self._index * 0.02 - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        phase = self._index % self.interval_frames
        # the first beep starts after a short lead-in so ICE/DTLS are surely up
        beeping = self._index >= self.interval_frames and phase < self.beep_frames
        if beeping and phase == 0:
            self.sent_at.append(time.monotonic())
        frame = AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(self._tone if beeping else self._silence)
        frame.pts = self._index * FRAME_SAMPLES
        frame.sample_rate = SAMPLE_RATE
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        self._index += 1
        return frame


class BeepDetector:
    """Finds beep onsets in received audio and pairs each with the beep that was sent."""

    THRESHOLD = 0.01

    def __init__(self, sent_at: list[float]) -> None:
        self.sent_at = sent_at
        self.rtts_ms: list[float] = []
        self.matched: set[int] = set()
        self._in_beep = False

    def feed(self, frame: AudioFrame, now: float) -> None:
        pcm = bytes(frame.planes[0])
        channels = len(frame.layout.channels)
        count = frame.samples * channels
        samples = struct.unpack(f"<{count}h", pcm[: 2 * count])[::channels]
        loud = goertzel_power(samples, rate=frame.sample_rate) > self.THRESHOLD
        if loud and not self._in_beep:
            self._onset(now)
        self._in_beep = loud

    def _onset(self, now: float) -> None:
        # the newest beep sent before now that has not been matched yet
        for index in range(len(self.sent_at) - 1, -1, -1):
            sent = self.sent_at[index]
            if sent <= now and index not in self.matched:
                self.matched.add(index)
                self.rtts_ms.append((now - sent) * 1000.0)
                return


async def _post_offer(
    session: aiohttp.ClientSession, url: str, sdp: str, token: str | None
) -> tuple[str, str | None]:
    headers = {"Content-Type": "application/sdp"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with session.post(url, data=sdp, headers=headers) as resp:
        body = await resp.text()
        if resp.status != 201:
            raise ProbeError(f"WHIP {url} answered {resp.status}: {body.strip()[:200]}")
        location = resp.headers.get("Location")
        if location:
            location = str(resp.url.join(aiohttp.client.URL(location)))
        return body, location


async def run_probe(
    whip_url: str,
    duration: float = 10.0,
    token: str | None = None,
    connect_timeout: float = 15.0,
    beep_interval: float = 0.5,
    on_progress: Callable[[ProbeReport], None] | None = None,
) -> ProbeReport:
    """Open one WHIP session, talk for ``duration`` seconds, close it, return what was measured."""
    report = ProbeReport(whip_url=whip_url)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    track = BeepTrack(interval=beep_interval)
    detector = BeepDetector(track.sent_at)
    t0 = time.monotonic()
    ice_up = asyncio.Event()
    dtls_up = asyncio.Event()
    failed = asyncio.Event()
    tasks: list[asyncio.Task] = []

    @pc.on("iceconnectionstatechange")
    def _ice_state() -> None:
        state = pc.iceConnectionState
        report.ice_states.append(state)
        if state in ("connected", "completed") and report.ice_connected_ms is None:
            report.ice_connected_ms = (time.monotonic() - t0) * 1000.0
            ice_up.set()
        if state == "failed":
            failed.set()

    @pc.on("connectionstatechange")
    def _conn_state() -> None:
        state = pc.connectionState
        report.connection_states.append(state)
        if state == "connected" and report.dtls_connected_ms is None:
            report.dtls_connected_ms = (time.monotonic() - t0) * 1000.0
            dtls_up.set()
        if state == "failed":
            failed.set()

    async def consume(remote: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await remote.recv()
                report.frames_received += 1
                detector.feed(frame, time.monotonic())
        except MediaStreamError:
            return

    @pc.on("track")
    def _on_track(remote: MediaStreamTrack) -> None:
        if remote.kind == "audio":
            tasks.append(asyncio.ensure_future(consume(remote)))

    pc.addTrack(track)
    channel = pc.createDataChannel("probe")
    pending_pings: dict[str, float] = {}

    @channel.on("message")
    def _on_message(message: object) -> None:
        if isinstance(message, str) and message.startswith("ping "):
            sent = pending_pings.pop(message, None)
            if sent is not None:
                report.datachannel_rtt_ms.append((time.monotonic() - sent) * 1000.0)

    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=connect_timeout))
    try:
        await pc.setLocalDescription(await pc.createOffer())
        t_offer = time.monotonic()
        answer, report.location = await _post_offer(http, whip_url, pc.localDescription.sdp, token)
        report.offer_to_answer_ms = (time.monotonic() - t_offer) * 1000.0
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        up = asyncio.ensure_future(dtls_up.wait())
        bad = asyncio.ensure_future(failed.wait())
        done, _ = await asyncio.wait({up, bad}, timeout=connect_timeout, return_when=asyncio.FIRST_COMPLETED)
        up.cancel()
        bad.cancel()
        if up not in done:
            raise ProbeError(
                f"session did not connect within {connect_timeout:.0f} s "
                f"(ice: {'→'.join(report.ice_states) or 'new'}, "
                f"connection: {'→'.join(report.connection_states) or 'new'})"
            )
        deadline = time.monotonic() + duration
        seq = 0
        while time.monotonic() < deadline and not failed.is_set():
            if channel.readyState == "open":
                ping = f"ping {seq} {time.monotonic():.6f}"
                pending_pings[ping] = time.monotonic()
                channel.send(ping)
                seq += 1
            report.beeps_sent = len(track.sent_at)
            report.beeps_heard = len(detector.rtts_ms)
            report.audio_rtt_ms = list(detector.rtts_ms)
            if on_progress:
                on_progress(report)
            await asyncio.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        await _collect_stats(pc, report)
        # beeps sent in the last RTT cannot have come back yet: do not count them as sent
        horizon = time.monotonic() - (max(detector.rtts_ms) / 1000.0 if detector.rtts_ms else 1.0) - 0.1
        report.beeps_sent = sum(1 for t in track.sent_at if t <= horizon)
        report.beep_echoed = [i in detector.matched for i in range(report.beeps_sent)]
        report.beeps_heard = len(detector.rtts_ms)
        report.audio_rtt_ms = list(detector.rtts_ms)
        report.ok = not failed.is_set() and report.beeps_heard > 0
        if not report.ok and report.error is None:
            report.error = "session failed" if failed.is_set() else "no audio came back"
    except ProbeError as exc:
        report.error = str(exc)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        report.error = f"WHIP request to {whip_url} failed: {exc.__class__.__name__}: {exc}".rstrip(": ")
    finally:
        if report.location:
            try:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                async with http.delete(report.location, headers=headers) as resp:
                    await resp.read()
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass
        await http.close()
        for task in tasks:
            task.cancel()
        await pc.close()
    return report


async def _collect_stats(pc: RTCPeerConnection, report: ProbeReport) -> None:
    for sender in pc.getSenders():
        if sender.track is None:
            continue
        stats = await sender.getStats()
        for item in stats.values():
            if item.type == "outbound-rtp":
                report.packets_sent = item.packetsSent
            elif item.type == "remote-inbound-rtp" and item.roundTripTime is not None:
                report.rtcp_rtt_ms = item.roundTripTime * 1000.0
    for receiver in pc.getReceivers():
        stats = await receiver.getStats()
        for item in stats.values():
            if item.type == "inbound-rtp":
                report.packets_received = item.packetsReceived


async def run_probes(whip_urls: list[str], sessions: int, duration: float,
                     token: str | None = None) -> list[ProbeReport]:
    """``sessions`` concurrent probes spread round-robin over ``whip_urls``."""
    return list(await asyncio.gather(*(
        run_probe(whip_urls[i % len(whip_urls)], duration=duration, token=token) for i in range(sessions)
    )))


def main() -> None:  # pragma: no cover - thin wrapper run inside lab namespaces
    import argparse

    parser = argparse.ArgumentParser(description="splitrelay probe: measured WHIP voice sessions")
    parser.add_argument("whip_url", nargs="+")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--token")
    args = parser.parse_args()
    reports = asyncio.run(run_probes(args.whip_url, args.sessions, args.duration, args.token))
    print(json.dumps([r.to_dict() for r in reports]))
    raise SystemExit(0 if all(r.ok for r in reports) else 1)


if __name__ == "__main__":  # pragma: no cover
    main()
