"""A plain aiortc WHIP client that measures a voice session end to end.

The demo, the tests and the benchmarks all need the same thing: a standard
WebRTC client (nothing splitrelay-specific on the wire) that opens a session
with one HTTP request, talks, and reports how fast the session came up and how
long its own voice took to come back.  The probe speaks a beep pattern
(a 1 kHz burst every ``beep_interval``) and detects the bursts in the audio
it receives, so with the transceiver's ``echo`` handler the measured delay is
the real mouth-to-ear round trip of the media path (network + jitter buffer +
codec), and a lost echo is visible as a missing beep.

For benchmarks it can also

* measure only session setup (``setup_only``: close with DELETE as soon as the
  session is connected) and open sessions one after another in one process
  (``run_sequence``, ``--sequential N``), so many setups cost one Python start;
* count lost audio frame by frame (``carrier``): a quiet continuous tone at
  ``CARRIER_HZ`` under the beeps, so every 20 ms frame the probe sends carries
  it.  At the end the probe falls silent, waits for the echo's tail, and counts
  the received frames that carry the carrier at half its amplitude or more:
  ``audio_loss`` = 1 - echoed / sent.  The transceiver pads with silence when it
  has nothing to send, so packet counts alone would not show a lost echo; this
  does, wherever it was lost (uplink, the transceiver, downlink, a jitter buffer).

The round trip is split: ``echo_arrival_ms`` (beep sent -> arrival of the echo
packet that carried it: the far end, the network, the codec) and
``client_buffer_ms`` (packet in -> frame out of this client's own receive path).
``Probe`` is one call in four steps (connect / talk / drain / close); with
``low_latency`` it receives through the transceiver's voice path instead of
aiortc's 4-frame buffer.  What it speaks and hears is in ``beeps.py``, what it reports in
``probe_report.py``, and its requests in ``whip.py``.

Times: ``offer_sent_ms``, ``ice_connected_ms`` and ``dtls_connected_ms`` count
from the creation of the peer connection (before createOffer and candidate
gathering); ``offer_to_answer_ms`` counts from the moment the offer is POSTed.
The offer → connected times are ``ice_connected_ms - offer_sent_ms`` and
``dtls_connected_ms - offer_sent_ms``.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from splitrelay.client.beeps import BeepDetector, BeepTrack, CarrierCounter, ClientBuffering, _np, mono_samples
from splitrelay.client.beeps import goertzel_power  # noqa: F401 - re-exported (the tests measure tones with it)
from splitrelay.client.probe_report import ProbeReport, collect_stats
from splitrelay.client.whip import WhipClient, WhipError
from splitrelay.tokens import TOKEN_ENV
from splitrelay.errors import SplitrelayError
from splitrelay.transceiver.audio import VoiceReceiver
from splitrelay.transceiver.history import StateHistory


class ProbeError(SplitrelayError):
    """The probe could not open or run its session (one-line reason)."""


class TalkGate:
    """Holds the talk phase of ``count`` concurrent probes until each is connected or has failed
    (then ``settle`` seconds more, for the last handshakes' work to drain), so that all of them talk
    in the same window and none of the measured audio overlaps another session's setup."""

    def __init__(self, count: int, settle: float = 0.5) -> None:
        self.left = count
        self.settle = settle
        self.open = asyncio.Event()
        self._counted: set[int] = set()

    def _arrive(self) -> None:
        task = asyncio.current_task()
        key = id(task)
        if key in self._counted:
            return
        self._counted.add(key)
        self.left -= 1
        if self.left <= 0 and not self.open.is_set():
            asyncio.get_running_loop().call_later(self.settle, self.open.set)

    def failed(self) -> None:
        """This session will not talk (each session counts once, whichever it calls first)."""
        self._arrive()

    async def connected(self, timeout: float) -> None:
        """This session is connected: wait (at most ``timeout`` + settle) until the gate opens."""
        self._arrive()
        try:
            await asyncio.wait_for(self.open.wait(), timeout + self.settle)
        except TimeoutError:
            pass


class Probe:
    """One measured WHIP call, in four steps: ``connect()``, ``talk(duration)``, ``drain()`` (with the
    carrier: fall silent and count the echo's tail), ``close()`` (DELETE, hang up).  ``report`` holds
    what was measured so far; ``run_probe`` runs the four in order.

    ``low_latency``: receive through the transceiver's own voice path (adaptive buffer, concealment)
    instead of aiortc's 4-frame buffer: what a low-latency client would hear.
    """

    def __init__(self, whip_url: str, token: str | None = None, connect_timeout: float = 15.0,
                 beep_interval: float = 0.5, carrier: bool = False, low_latency: bool = False) -> None:
        self.whip_url, self.token, self.connect_timeout, self.carrier = whip_url, token, connect_timeout, carrier
        self.low_latency = low_latency
        self.report = ProbeReport(whip_url=whip_url)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.states = StateHistory()  # times from the creation of the peer connection
        self.track = BeepTrack(interval=beep_interval)  # the carrier starts with the talk phase
        self.detector = BeepDetector(self.track.sent_at)
        self.counter = CarrierCounter() if carrier else None
        self.buffering = ClientBuffering()
        self.voice: VoiceReceiver | None = None
        self.connected = asyncio.Event()
        self.failed = asyncio.Event()
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=connect_timeout))
        self.whip = WhipClient(self.http, token)
        self._tasks: list[asyncio.Task] = []
        self._pending_pings: dict[str, float] = {}
        self.pc.on("iceconnectionstatechange", self._ice_state)
        self.pc.on("connectionstatechange", self._connection_state)
        self.pc.on("track", self._on_track)
        self.pc.addTrack(self.track)
        self.channel = self.pc.createDataChannel("probe")
        self.channel.on("message", self._on_message)

    # -- events ----------------------------------------------------------------------------

    def _ice_state(self) -> None:
        state = self.pc.iceConnectionState
        at_ms = self.states.record("ice", state)
        if state in ("connected", "completed") and self.report.ice_connected_ms is None:
            self.report.ice_connected_ms = at_ms
        if state == "failed":
            self.failed.set()

    def _connection_state(self) -> None:
        state = self.pc.connectionState
        at_ms = self.states.record("connection", state)
        if state == "connected" and self.report.dtls_connected_ms is None:
            self.report.dtls_connected_ms = at_ms
            self.connected.set()
        if state == "failed":
            self.failed.set()

    def _on_track(self, remote: MediaStreamTrack) -> None:
        if remote.kind != "audio":
            return
        receiver = next((t.receiver for t in self.pc.getTransceivers() if t.receiver.track is remote), None)
        if self.low_latency and receiver is not None:
            self.voice = VoiceReceiver(receiver)
            self._tasks.append(asyncio.ensure_future(self._listen_voice(self.voice)))
            return
        if receiver is not None:
            self.buffering.observe(receiver)
        self._tasks.append(asyncio.ensure_future(self._listen(remote)))

    def _heard(self, samples: Any, rate: int, pts: int | None, arrived: float | None) -> None:  # noqa: ANN401
        now = time.monotonic()
        self.report.frames_received += 1
        if arrived is None:
            arrived = self.buffering.arrival(pts, now)
        elif pts is not None:
            self.buffering.held_ms.append((now - arrived) * 1000.0)
        before = len(self.detector.rtts_ms)
        self.detector.feed_samples(samples, rate, now)
        if len(self.detector.rtts_ms) > before and arrived is not None:  # a beep came back in this frame
            self.report.echo_arrival_ms.append(self.detector.rtts_ms[-1] - (now - arrived) * 1000.0)
        if self.counter is not None:
            self.counter.feed_samples(samples, rate)

    async def _listen(self, remote: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await remote.recv()
                self._heard(mono_samples(frame), frame.sample_rate, frame.pts, None)
        except MediaStreamError:
            return

    async def _listen_voice(self, voice: VoiceReceiver) -> None:
        while True:
            pcm = await voice.recv()
            samples = (_np.frombuffer(pcm.samples, dtype="<i2").astype(_np.float64) if _np is not None
                       else struct.unpack(f"<{pcm.sample_count}h", pcm.samples))
            self._heard(samples, pcm.sample_rate, pcm.pts, pcm.received)

    def _on_message(self, message: object) -> None:
        if isinstance(message, str) and message.startswith("ping "):
            sent = self._pending_pings.pop(message, None)
            if sent is not None:
                self.report.datachannel_rtt_ms.append((time.monotonic() - sent) * 1000.0)

    # -- the call --------------------------------------------------------------------------

    async def connect(self) -> None:
        """Offer, POST, answer, and wait until connected; WhipError if the endpoint refuses or does not
        answer, ProbeError if the session does not connect in time."""
        report = self.report
        await self.pc.setLocalDescription(await self.pc.createOffer())
        t_offer = time.monotonic()
        report.offer_sent_ms = (t_offer - self.states.origin) * 1000.0
        answer = await self.whip.offer(self.whip_url, self.pc.localDescription.sdp)
        report.location, report.session_id = answer.location, answer.session_id
        report.offer_to_answer_ms = (time.monotonic() - t_offer) * 1000.0
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer.sdp, type="answer"))
        up = asyncio.ensure_future(self.connected.wait())
        bad = asyncio.ensure_future(self.failed.wait())
        done, _ = await asyncio.wait({up, bad}, timeout=self.connect_timeout, return_when=asyncio.FIRST_COMPLETED)
        up.cancel()
        bad.cancel()
        if up not in done:
            raise ProbeError(
                f"session did not connect within {self.connect_timeout:.0f} s "
                f"(ice: {'→'.join(self.states.states['ice'][1:]) or 'new'}, "
                f"connection: {'→'.join(self.states.states['connection'][1:]) or 'new'})"
            )

    async def talk(self, duration: float, on_progress: Callable[[ProbeReport], None] | None = None) -> None:
        """Beep (and carry the carrier) for ``duration`` seconds, pinging on the data channel."""
        report = self.report
        self.track.carrier = self.carrier
        report.talk_started_mono = time.monotonic()
        deadline = time.monotonic() + duration
        seq = 0
        while time.monotonic() < deadline and not self.failed.is_set():
            if self.channel.readyState == "open":
                ping = f"ping {seq} {time.monotonic():.6f}"
                self._pending_pings[ping] = time.monotonic()
                self.channel.send(ping)
                seq += 1
            report.beeps_sent = len(self.track.sent_at)
            report.beeps_heard = len(self.detector.rtts_ms)
            report.audio_rtt_ms = list(self.detector.rtts_ms)
            if on_progress:
                on_progress(report)
            await asyncio.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        report.talk_ended_mono = time.monotonic()

    async def drain(self, max_drain: float = 3.0) -> None:
        """With the carrier: fall silent, let the echo's tail come back (a deadline, not a condition: a
        lagging peer pads with silence, so no received frame proves that the tail is complete), count."""
        if self.counter is None:
            return
        self.track.quiet = True
        slowest = max(self.detector.rtts_ms) / 1000.0 if self.detector.rtts_ms else 1.0
        try:
            await asyncio.wait_for(self.failed.wait(), timeout=min(max_drain, 0.5 + 2.0 * slowest))
        except TimeoutError:
            pass
        report = self.report
        report.carrier_frames_sent = self.track.carrier_frames
        report.carrier_frames_echoed = self.counter.frames
        if self.track.carrier_frames:
            report.audio_loss = min(1.0, max(0.0, 1.0 - report.carrier_frames_echoed / self.track.carrier_frames))

    async def finish(self) -> None:
        """Collect RTCP figures and settle which beeps count as sent and heard."""
        report, detector = self.report, self.detector
        await collect_stats(self.pc, report)
        # beeps sent in the last RTT cannot have come back yet: do not count them as sent
        horizon = time.monotonic() - (max(detector.rtts_ms) / 1000.0 if detector.rtts_ms else 1.0) - 0.1
        # ...unless it did come back (a fast last echo under a slow earlier maximum RTT)
        report.beeps_sent = max(sum(1 for t in self.track.sent_at if t <= horizon),
                                max(detector.matched, default=-1) + 1)
        report.beep_echoed = [i in detector.matched for i in range(report.beeps_sent)]
        report.beeps_heard = len(detector.rtts_ms)
        report.audio_rtt_ms = list(detector.rtts_ms)
        report.ok = not self.failed.is_set() and report.beeps_heard > 0
        if not report.ok and report.error is None:
            report.error = "session failed" if self.failed.is_set() else "no audio came back"

    async def close(self) -> None:
        """DELETE the session (if it was created) and hang up; safe to call more than once."""
        report = self.report
        report.frames_sent = self.track.frames
        report.ice_states = self.states.states["ice"][1:]
        report.connection_states = self.states.states["connection"][1:]
        report.client_buffer_ms = self.buffering.summary()
        if self.voice is not None:
            report.frames_concealed = self.voice.buffer.concealed
        if report.location and not self.http.closed:
            try:
                await self.whip.delete(report.location)
            except WhipError:
                pass
        await self.http.close()
        for task in self._tasks:
            task.cancel()
        await self.pc.close()
        report.ice_states = self.states.states["ice"][1:]
        report.connection_states = self.states.states["connection"][1:]


async def run_probe(
    whip_url: str,
    duration: float = 10.0,
    token: str | None = None,
    connect_timeout: float = 15.0,
    beep_interval: float = 0.5,
    on_progress: Callable[[ProbeReport], None] | None = None,
    setup_only: bool = False,
    carrier: bool = False,
    max_drain: float = 3.0,
    gate: TalkGate | None = None,
    low_latency: bool = False,
) -> ProbeReport:
    """Open one WHIP session, talk for ``duration`` seconds, close it, return what was measured.

    ``setup_only``: close (DELETE) as soon as the session is connected; ``ok`` means it connected.
    ``carrier``: count lost audio (see the module docstring); after ``duration`` the probe is silent
    for up to ``max_drain`` seconds (0.5 s plus twice the slowest beep round trip) while the echo's
    tail comes back.
    ``gate``: a ``TalkGate`` shared by concurrent probes; the talk phase (and the ``duration``) starts
    when every session of the gate is connected or has failed.
    ``low_latency``: the probe receives through the transceiver's voice path (see ``Probe``).
    """
    probe = Probe(whip_url, token, connect_timeout, beep_interval, carrier, low_latency)
    report = probe.report
    try:
        await probe.connect()
        if setup_only:
            report.ok = True
            return report
        if gate is not None:
            await gate.connected(timeout=connect_timeout)
        await probe.talk(duration, on_progress)
        await probe.drain(max_drain)
        await probe.finish()
    except (ProbeError, WhipError) as exc:
        report.error = str(exc)
        if gate is not None:
            gate.failed()
    finally:
        await probe.close()
    return report


async def run_probes(whip_urls: list[str], sessions: int, duration: float, token: str | None = None,
                     carrier: bool = False, together: bool = False,
                     low_latency: bool = False) -> list[ProbeReport]:
    """``sessions`` concurrent probes spread round-robin over ``whip_urls``; with ``together`` they all
    start talking once all are connected (a ``TalkGate``)."""
    gate = TalkGate(sessions) if together else None
    return list(await asyncio.gather(*(
        run_probe(whip_urls[i % len(whip_urls)], duration=duration, token=token, carrier=carrier, gate=gate,
                  low_latency=low_latency)
        for i in range(sessions)
    )))


async def run_sequence(whip_urls: list[str], rounds: int, duration: float = 0.0, token: str | None = None,
                       setup_only: bool = True, carrier: bool = False) -> list[ProbeReport]:
    """One session at a time: ``rounds`` rounds of one session per URL in the order given (A B A B ...),
    each closed (DELETE) before the next is offered; reports in the order the sessions ran."""
    reports = []
    for _ in range(rounds):
        for url in whip_urls:
            reports.append(await run_probe(url, duration=duration, token=token, setup_only=setup_only,
                                           carrier=carrier))
    return reports


def main() -> None:  # pragma: no cover - thin wrapper run inside lab namespaces
    import argparse

    parser = argparse.ArgumentParser(description="splitrelay probe: measured WHIP voice sessions")
    parser.add_argument("whip_url", nargs="+")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--sessions", type=int, default=1, help="concurrent sessions (round-robin over the URLs)")
    parser.add_argument("--sequential", type=int, metavar="N",
                        help="instead: N rounds of one session per URL, one session at a time (A B A B ...)")
    parser.add_argument("--setup-only", action="store_true",
                        help="close each session as soon as it is connected (only setup times are measured)")
    parser.add_argument("--carrier", action="store_true",
                        help="count lost audio frame by frame (a quiet carrier tone under the beeps)")
    parser.add_argument("--together", action="store_true",
                        help="concurrent sessions start talking when all are connected (one common window)")
    parser.add_argument("--low-latency", action="store_true",
                        help="receive through the transceiver's voice path instead of aiortc's 4-frame buffer")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                        help=f"WHIP bearer token (offer token or static; default ${TOKEN_ENV})")
    args = parser.parse_args()
    if args.sequential is not None and args.sequential < 1:
        parser.error("--sequential must be at least 1")
    reports = asyncio.run(_run(args))
    print(json.dumps([r.to_dict() for r in reports]))
    raise SystemExit(0 if all(r.ok for r in reports) else 1)


async def _run(args: Any) -> list[ProbeReport]:  # noqa: ANN401 - argparse.Namespace
    urls = args.whip_url
    if args.sequential is not None:
        return await run_sequence(urls, args.sequential, args.duration, args.token, args.setup_only, args.carrier)
    if args.setup_only:
        return list(await asyncio.gather(*(run_probe(urls[i % len(urls)], token=args.token, setup_only=True)
                                           for i in range(args.sessions))))
    return await run_probes(urls, args.sessions, args.duration, args.token, args.carrier, args.together,
                            args.low_latency)


if __name__ == "__main__":  # pragma: no cover
    main()
