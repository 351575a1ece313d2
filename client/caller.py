"""A caller for the voice agent: speaks espeak-ng utterances into a WHIP call and times what comes back.

(Just over 400 lines: one call's clock, playout and events are shared by every figure it takes.)

A plain aiortc client, like the probe, but with speech instead of beeps:

* **voice-to-voice** per turn: from the end of the caller's voice (the last
  audible sample of the utterance, at the moment its frame left the client's
  track) to the first audible frame of the agent at the client (after the
  client's own jitter buffer: what a person would hear);
* the agent's own figures for the same turn, from its data-channel events
  (end-of-turn detection, STT, reply, first TTS audio), and whether the
  transcript was the phrase spoken;
* **barge-in**: the caller asks for a long answer, waits until it is heard,
  then speaks over it ("wait"); latency is from the onset of the caller's
  voice to the end of the last audible agent frame at the client.  The word
  matters: Silero sees the voiced "w" of "wait" 28 ms after its onset, the
  unvoiced "st" of "stop" only at the vowel, 156 ms after.

Audible = RMS above -40 dBFS in a 20 ms frame.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from splitrelay.errors import SplitrelayError
from splitrelay.client.beeps import s16_frame
from splitrelay.client.whip import WhipClient, WhipError
from splitrelay.voice.audio import FRAME_BYTES, FRAME_SAMPLES, frames_of, rms
from splitrelay.voice.tts import EspeakTts

AUDIBLE = 0.01  # RMS, -40 dBFS
FRAME_SECONDS = 0.02


class CallError(SplitrelayError):
    """The agent never said it was ready (one-line reason; a refused offer is a ``WhipError``)."""


def voice_span(pcm: bytes) -> tuple[int, int]:
    """First and last audible sample of an utterance (20 ms resolution at the edges, then exact)."""
    frames = frames_of(pcm)
    loud = [i for i, f in enumerate(frames) if rms(f) >= AUDIBLE]
    if not loud:
        return 0, 0
    return loud[0] * FRAME_SAMPLES, (loud[-1] + 1) * FRAME_SAMPLES


class SpeechTrack(MediaStreamTrack):
    """48 kHz mono, paced on the clock: silence, or the utterance being said; records when each frame left."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._queue: deque[bytes] = deque()
        self._start: float | None = None
        self._index = 0
        self._marks: list[tuple[int, asyncio.Future]] = []  # (frame number to wait for, future of its time)
        self._queued_frames = 0

    def say(self, pcm: bytes) -> tuple[asyncio.Future, asyncio.Future]:
        """Queue an utterance; futures of the times its voice starts and ends leaving the track."""
        first, last = voice_span(pcm)
        loop = asyncio.get_running_loop()
        base = self._index + len(self._queue)
        starts, ends = loop.create_future(), loop.create_future()
        self._marks.append((base + first // FRAME_SAMPLES, starts))
        self._marks.append((base + max(0, last - 1) // FRAME_SAMPLES, ends))
        self._queue.extend(frames_of(pcm))
        return starts, ends

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._index * 0.02 - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        pcm = self._queue.popleft() if self._queue else bytes(FRAME_BYTES)
        now = time.monotonic()
        for mark in [m for m in self._marks if m[0] <= self._index]:  # the frame carrying the mark leaves now
            self._marks.remove(mark)
            if not mark[1].done():
                mark[1].set_result(now)
        frame = s16_frame(pcm, self._index)
        self._index += 1
        return frame


@dataclass
class TurnResult:
    phrase: str
    transcript: str | None = None
    correct: bool = False
    voice_to_voice_ms: float | None = None   # end of caller voice -> first audible agent audio (client)
    silence_ms: float | None = None          # the agent's silence window (its share of the above)
    endpoint_ms: float | None = None         # agent: last speech window -> end of turn decided
    reason: str | None = None                # agent: what ended the turn (silence, complete, max_wait, ...)
    model: dict | None = None                # agent (turn=smart): the model's last verdict (score, pause_ms)
    stt_ms: float | None = None              # agent: end of turn -> transcript
    reply_ms: float | None = None            # agent: transcript -> reply text
    tts_ms: float | None = None              # agent: reply text -> first synthesised frame
    reply: str | None = None
    error: str | None = None


@dataclass
class BargeInResult:
    """Milliseconds from the caller's voice onset (its frame leaving the caller's track) to each step."""

    latency_ms: float | None = None          # -> the last audible agent frame ends, out of the client's
                                             # receive path (jitter buffer + decoder output)
    played_ms: float | None = None           # -> the same on a playout clock (frames of a talkspurt back to
                                             # back): audio sent ahead of real time plays after it arrived
    agent_onset_ms: float | None = None      # -> the agent's VAD window that saw speech (uplink, the agent's
                                             # receive path, the VAD window, Silero)
    agent_stop_ms: float | None = None       # -> the agent flushed its audio and cancelled the reply
    wire_ms: float | None = None             # -> the last audible agent packet arrived at the client (the
                                             # transceiver's last agent frame on the wire, plus <1 ms)
    event_ms: float | None = None            # -> the barge_in event arrived at the client (data channel)
    agent_detect_ms: float | None = None     # agent: speech window -> barge_in event
    dropped_ms: float | None = None          # agent audio flushed from the transceiver's queue
    error: str | None = None


@dataclass
class CallReport:
    whip_url: str
    low_latency: bool = False  # received through the transceiver's voice path instead of aiortc's buffer
    ok: bool = False
    error: str | None = None
    turns: list[TurnResult] = field(default_factory=list)
    barge_ins: list[BargeInResult] = field(default_factory=list)
    ready: dict | None = None

    def summary(self) -> dict[str, Any]:
        def p50(values: list[float]) -> float | None:
            values = sorted(v for v in values if v is not None)
            return values[len(values) // 2] if values else None
        answered = [t for t in self.turns if t.transcript is not None]
        return {"turns": len(self.turns),
                "accuracy": (sum(t.correct for t in self.turns) / len(self.turns)) if self.turns else None,
                "voice_to_voice_p50_ms": p50([t.voice_to_voice_ms for t in answered]),
                "silence_ms": answered[0].silence_ms if answered else None,
                "stt_p50_ms": p50([t.stt_ms for t in answered]),
                "reply_p50_ms": p50([t.reply_ms for t in answered]),
                "tts_p50_ms": p50([t.tts_ms for t in answered]),
                "barge_in_p50_ms": p50([b.latency_ms for b in self.barge_ins]),
                "barge_in_max_ms": max((b.latency_ms for b in self.barge_ins if b.latency_ms is not None),
                                       default=None),
                "barge_in_played_p50_ms": p50([b.played_ms for b in self.barge_ins]),
                "barge_in_agent_stop_p50_ms": p50([b.agent_stop_ms for b in self.barge_ins]),
                "barge_in_wire_p50_ms": p50([b.wire_ms for b in self.barge_ins])}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary()}


class Caller:
    """One call: ``connect()``, then ``turn(phrase)`` / ``barge_in()`` as often as wanted, ``close()``."""

    def __init__(self, whip_url: str, token: str | None = None, words_per_minute: int = 175,
                 low_latency: bool = False) -> None:
        self.whip_url = whip_url
        self.low_latency = low_latency
        self.token = token
        self.tts = EspeakTts(words_per_minute=words_per_minute)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.track = SpeechTrack()
        self.events: list[tuple[float, dict]] = []
        self.heard: list[tuple[float, bool]] = []  # (out of the receive path, audible) per received frame
        # per received frame: (end of its play on a playout clock, audible, its packet's arrival or None)
        self.played: list[tuple[float, bool, float | None]] = []
        self._played = 0.0
        self._event_added = asyncio.Event()
        self._location: str | None = None
        self._http: aiohttp.ClientSession | None = None
        self._whip: WhipClient | None = None
        self._tasks: list[asyncio.Task] = []

    async def connect(self, timeout: float = 20.0) -> dict:
        """Open the call and wait for the agent's ``ready`` event (its models loaded); WhipError if the
        endpoint refuses the offer or does not answer, CallError if the agent is never ready."""
        self.pc.addTrack(self.track)
        channel = self.pc.createDataChannel("voice")

        @channel.on("message")
        def _message(message: object) -> None:
            if isinstance(message, str):
                try:
                    event = json.loads(message)
                except ValueError:
                    return
                if isinstance(event, dict) and "event" in event:
                    self.events.append((time.monotonic(), event))
                    self._event_added.set()

        @channel.on("open")
        def _open() -> None:
            channel.send('{"event": "hello"}')  # the agent's "ready" may have gone out before this

        @self.pc.on("track")
        def _track(remote: MediaStreamTrack) -> None:
            if remote.kind != "audio":
                return
            receiver = next((t.receiver for t in self.pc.getTransceivers() if t.receiver.track is remote), None)
            if self.low_latency and receiver is not None:  # the transceiver's own receive path, as the probe's
                from splitrelay.transceiver.audio import VoiceReceiver
                self._tasks.append(asyncio.ensure_future(self._listen_voice(VoiceReceiver(receiver))))
            else:
                self._tasks.append(asyncio.ensure_future(self._listen(remote)))

        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))
        self._whip = WhipClient(self._http, self.token)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        answer = await self._whip.offer(self.whip_url, self.pc.localDescription.sdp)
        self._location = answer.location
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer.sdp, type="answer"))
        ready = await self.wait_event("ready", since=0.0, timeout=timeout)
        if ready is None:
            raise CallError(f"the agent sent no 'ready' event within {timeout:.0f} s (is it --handler voice?)")
        return ready

    def _hear(self, pcm: bytes, arrived: float | None = None, now: float | None = None) -> None:
        """A frame came out of the receive path (at ``now``: time.monotonic() unless given)."""
        now = time.monotonic() if now is None else now
        audible = rms(pcm) >= AUDIBLE
        # a playout clock: frames play back to back, each no earlier than it came out of the receive path;
        # a player behind its clock may skip a quiet frame to catch up (NetEQ's accelerate), never speech
        starts = max(now, self._played)
        behind = min(FRAME_SECONDS, starts - now)
        self._played = starts + (FRAME_SECONDS if audible else FRAME_SECONDS - behind)
        self.heard.append((now, audible))
        self.played.append((starts + FRAME_SECONDS, audible, arrived))
        if len(self.heard) > 30000:  # 10 minutes: keep the newest
            del self.heard[:15000]
            del self.played[:15000]

    async def _listen(self, remote: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await remote.recv()
                self._hear(bytes(frame.planes[0])[: 2 * frame.samples * len(frame.layout.channels)])
        except MediaStreamError:
            return

    async def _listen_voice(self, voice: Any) -> None:  # noqa: ANN401 - transceiver.audio.VoiceReceiver
        while True:
            frame = await voice.recv()
            self._hear(frame.samples, frame.received)

    async def wait_event(self, kind: str, since: float, timeout: float, turn: int | None = None) -> dict | None:
        deadline = time.monotonic() + timeout
        while True:
            for at, event in self.events:
                if at >= since and event["event"] == kind and (turn is None or event.get("turn") == turn):
                    return event
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._event_added.clear()
            try:
                await asyncio.wait_for(self._event_added.wait(), left)
            except TimeoutError:
                return None

    async def _audible_after(self, t: float, timeout: float) -> float | None:
        """When the first audible agent frame after ``t`` arrived (waiting up to ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            heard = next((at for at, loud in self.heard if at > t and loud), None)
            if heard is not None or time.monotonic() >= deadline:
                return heard
            await asyncio.sleep(0.02)

    async def quiet(self, seconds: float = 0.4, timeout: float = 20.0) -> None:
        """Wait until the agent has been silent at the client for ``seconds``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = time.monotonic()
            if not any(loud for at, loud in self.heard if at > now - seconds) and self.heard \
                    and self.heard[-1][0] > now - 0.1:
                return
            await asyncio.sleep(0.05)

    async def turn(self, phrase: str, timeout: float = 15.0) -> TurnResult:
        """Say ``phrase``, wait for the agent's answer to be heard; the turn's figures."""
        result = TurnResult(phrase)
        await self.quiet()
        asked = time.monotonic()
        _, ends = self.track.say(self.tts.synthesize(phrase))
        voice_end = await ends
        end = await self.wait_event("turn_end", asked, timeout)
        if end is None:
            result.error = "the agent detected no end of turn"
            return result
        index = end["turn"]
        result.endpoint_ms, result.silence_ms = end.get("endpoint_ms"), end.get("silence_ms")
        result.reason, result.model = end.get("reason"), end.get("model")
        transcript = await self.wait_event("transcript", asked, timeout, index)
        if transcript is None:
            result.error = "no transcript"
            return result
        result.transcript, result.stt_ms = transcript["text"], transcript.get("stt_ms")
        result.correct = result.transcript.strip().lower() == phrase.strip().lower()
        reply = await self.wait_event("reply", asked, timeout, index)
        if reply is not None:
            result.reply, result.reply_ms = reply["text"], reply.get("reply_ms")
        speaking = await self.wait_event("speaking", asked, timeout, index) if reply and reply["text"] else None
        if speaking is not None:
            result.tts_ms = speaking.get("tts_ms")
            heard = await self._audible_after(voice_end, timeout)
            if heard is not None:
                result.voice_to_voice_ms = round((heard - voice_end) * 1000.0, 1)
            await self.wait_event("spoken", asked, timeout, index)
        return result

    async def barge_in(self, ask: str = "tell me a story", interrupt: str = "wait",
                       after: float = 1.0, timeout: float = 15.0) -> BargeInResult:
        """Ask for a long answer, let ``after`` seconds of it be heard, speak over it; the figures."""
        result = BargeInResult()
        await self.quiet()
        asked = time.monotonic()
        _, ends = self.track.say(self.tts.synthesize(ask))
        voice_end = await ends
        heard = await self._audible_after(voice_end, timeout)
        if heard is None:
            result.error = "the agent did not answer"
            return result
        await asyncio.sleep(max(0.0, heard + after - time.monotonic()))
        starts, _ = self.track.say(self.tts.synthesize(interrupt))
        onset = await starts
        event = await self.wait_event("barge_in", asked, timeout)
        if event is None:
            result.error = "the agent did not stop (no barge_in event)"
            return result
        result.agent_detect_ms, result.dropped_ms = event.get("detect_ms"), event.get("dropped_ms")
        arrived = next(at for at, e in self.events if e is event)
        result.event_ms = round((arrived - onset) * 1000.0, 1)
        if "stopped_at" in event:  # the agent's clock: time.monotonic() of the same host (see agent.py)
            result.agent_onset_ms = _since(onset, event["onset_at"])
            result.agent_stop_ms = _since(onset, event["stopped_at"])
        await asyncio.sleep(1.0)  # anything still heard after this was not stopped
        # "wait" is answered with silence, so every audible frame after the onset is the cut answer
        last = max((at for at, loud in self.heard if loud and at >= onset), default=None)
        result.latency_ms = _since(onset, last + FRAME_SECONDS) if last is not None else 0.0
        played = [(end, arrived) for end, loud, arrived in self.played if loud and end > onset]
        if played:
            result.played_ms = _since(onset, max(end for end, _ in played))
            arrivals = [a for _, a in played if a is not None]
            result.wire_ms = _since(onset, max(arrivals)) if arrivals else None
        else:
            result.played_ms = 0.0
        await self.quiet()
        return result

    async def close(self) -> None:
        if self._location and self._whip is not None:
            try:
                await self._whip.delete(self._location)
            except WhipError:
                pass
        if self._http is not None:
            await self._http.close()
        for task in self._tasks:
            task.cancel()
        await self.pc.close()


def _since(start: float, at: float) -> float:
    return round((at - start) * 1000.0, 1)


async def run_call(whip_url: str, phrases: list[str], barge_ins: int = 1, token: str | None = None,
                   timeout: float = 20.0, low_latency: bool = False) -> CallReport:
    """One call: a turn per phrase, then ``barge_ins`` barge-ins."""
    report = CallReport(whip_url, low_latency=low_latency)
    caller = Caller(whip_url, token, low_latency=low_latency)
    try:
        report.ready = await caller.connect(timeout)
        for phrase in phrases:
            report.turns.append(await caller.turn(phrase))
        for _ in range(barge_ins):
            report.barge_ins.append(await caller.barge_in())
        report.ok = all(t.error is None for t in report.turns) and all(b.error is None for b in report.barge_ins)
        if not report.ok:
            report.error = next(x.error for x in [*report.turns, *report.barge_ins] if x.error)
    except (CallError, WhipError) as exc:
        report.error = str(exc)
    finally:
        await caller.close()
    return report
