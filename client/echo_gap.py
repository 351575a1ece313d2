"""An aiortc caller whose echo is judged like the browser's: the failover gap for aiortc clients.

The browser page samples getStats() every 100 ms (packets in, audio energy in) and
``client.browser.audio_gap`` decides when audio stopped and came back after a marked
moment.  This caller speaks a steady tone and keeps the same two counters from the
frames aiortc decodes (packets = frames; energy = the tone's power times the frame's
20 ms, so silence or another sound counts as nothing), sampled every 100 ms, so the
same judge measures it and the gaps of both clients mean the same thing.  aiortc plays
no concealment: while nothing arrives, no frame is counted.
"""

from __future__ import annotations

import asyncio
import fractions
import math
import struct
import time
from collections.abc import Awaitable, Callable

import aiohttp
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from splitrelay.client.beeps import FRAME_SAMPLES, SAMPLE_RATE, mono_samples, tone_power
from splitrelay.client.browser import TONE_HZ, AudioGap, audio_gap, flowing_since
from splitrelay.client.whip import WhipClient
from splitrelay.errors import SplitrelayError

SAMPLE_MS = 100.0     # as the browser page samples getStats()
FRAME_S = FRAME_SAMPLES / SAMPLE_RATE


class EchoCallError(SplitrelayError):
    """The echo did not come back in time (one-line reason; a refused offer is a ``WhipError``)."""


class ToneTrack(MediaStreamTrack):
    """48 kHz mono sine at half scale, paced at 20 ms (1000 Hz: whole periods, so one frame repeats)."""

    kind = "audio"

    def __init__(self, hz: float = TONE_HZ) -> None:
        super().__init__()
        self._pcm = struct.pack(f"<{FRAME_SAMPLES}h", *(int(16000 * math.sin(2 * math.pi * hz * i / SAMPLE_RATE))
                                                        for i in range(FRAME_SAMPLES)))
        self._index = 0
        self._start: float | None = None

    async def recv(self) -> AudioFrame:
        loop = asyncio.get_running_loop()
        self._start = loop.time() if self._start is None else self._start
        await asyncio.sleep(max(0.0, self._start + self._index * FRAME_S - loop.time()))
        frame = AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(self._pcm)
        frame.pts, frame.sample_rate = self._index * FRAME_SAMPLES, SAMPLE_RATE
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        self._index += 1
        return frame


class EchoCall:
    """One WHIP call from aiortc that hears its own tone echoed; ``samples`` look like the page's."""

    def __init__(self, whip_url: str, family: int | None = 4, hz: float = TONE_HZ,
                 token: str | None = None) -> None:
        self.whip_url, self.family, self.hz, self.token = whip_url, family, hz, token
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTrack(ToneTrack(hz))
        self.location: str | None = None
        self.answer = ""
        self.states: list[str] = []           # every connection state the call went through
        self._hung_up = False
        self._t0 = time.monotonic()
        self._packets, self._energy = 0, 0.0
        self._samples: list[dict] = []
        self._tasks: list[asyncio.Task] = []
        self.pc.on("connectionstatechange", self._state)
        self.pc.on("track", lambda track: self._tasks.append(asyncio.ensure_future(self._listen(track))))

    def _state(self) -> None:
        if not self._hung_up:
            self.states.append(self.pc.connectionState)

    def now(self) -> float:
        """Milliseconds on the samples' clock (marks for ``audio_gap``)."""
        return 1000 * (time.monotonic() - self._t0)

    @property
    def dropped(self) -> bool:
        """The call went to failed or closed on its own (a hang-up is not a drop)."""
        return any(s in ("failed", "closed") for s in self.states)

    async def call(self, http: aiohttp.ClientSession) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = self.pc.localDescription.sdp
        if self.family:   # only candidates of one address family
            offer = "\r\n".join(line for line in offer.split("\r\n") if not line.startswith("a=candidate:")
                                or (":" in line.split()[4]) == (self.family == 6))
        answer = await WhipClient(http, self.token).offer(self.whip_url, offer)
        self.answer, self.location = answer.sdp, answer.location
        await self.pc.setRemoteDescription(RTCSessionDescription(self.answer, "answer"))
        self._tasks.append(asyncio.ensure_future(self._sample()))

    async def _listen(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                self._packets += 1
                self._energy += tone_power(mono_samples(frame), self.hz, frame.sample_rate) * FRAME_S
        except MediaStreamError:
            return

    async def _sample(self) -> None:
        while True:
            self._samples.append({"t": self.now(), "inPackets": self._packets, "inEnergy": self._energy})
            await asyncio.sleep(SAMPLE_MS / 1000)

    def samples(self, since: float = 0.0) -> list[dict]:
        return [s for s in self._samples if s["t"] >= since]

    async def _wait(self, judge: Callable[[], object], timeout: float, what: str):  # noqa: ANN202
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = judge()
            if value is not None and value is not False:
                return value
            await asyncio.sleep(SAMPLE_MS / 1000)
        raise EchoCallError(f"timed out after {timeout:g} s waiting for {what} (states {self.states})")

    async def wait_audio(self, seconds: float = 1.0, timeout: float = 30.0) -> None:
        """Until the echo has been heard for ``seconds`` without a break."""
        def judge() -> bool:
            samples = self.samples(self.now() - (seconds + 1) * 1000)
            start = flowing_since(samples)
            return start is not None and samples[-1]["t"] - start >= seconds * 1000
        await self._wait(judge, timeout, f"{seconds:g} s of the echo")

    async def measure_gap(self, fault: Callable[[], Awaitable[object] | object], timeout: float = 30.0,
                          settle: float = 2.0) -> AudioGap:
        """Mark, cause ``fault()`` (called off the loop when it is a plain function), and wait until the
        echo flows again: the same judge as ``BrowserCall.measure_gap``."""
        mark = self.now()
        if asyncio.iscoroutinefunction(fault):
            await fault()
        else:
            await asyncio.to_thread(fault)
        return await self._wait(lambda: audio_gap(self.samples(mark), mark, settle), timeout,
                                "the echo to flow again after the mark")

    async def hang_up(self, http: aiohttp.ClientSession) -> int | None:
        """DELETE the session and close; returns the DELETE's status."""
        status = None
        self._hung_up = True   # the states of our own closing are not a drop
        try:
            if self.location:
                status = await WhipClient(http, self.token).delete(self.location)
        finally:
            for task in self._tasks:
                task.cancel()
            await self.pc.close()
        return status
