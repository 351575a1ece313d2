"""``voice``: a voice agent behind the transceiver's handler interface (VAD → STT → reply → TTS).

Each stage is small and replaceable (``vad.py``, ``stt.py``, ``reply.py``,
``tts.py``); this module only wires them to a session and keeps time:

* inbound 48 kHz frames are resampled to 16 kHz and cut into VAD windows on
  the event loop (cheap); speech of the current turn streams to the
  recogniser on one worker thread per session, so at the end of a turn only
  the recogniser's final step is left;
* end of turn: a fixed silence window (``turn=fixed``), or (``turn=smart``) a
  short pause that asks Smart Turn v3.2 whether the caller has finished, on a
  worker thread of its own (``judge.py``); its answer ends the turn only if the
  caller is still silent when it comes (``turn_judged`` event), else the turn
  ends after ``max_wait_ms`` of silence;
* the reply runs in a task with a time limit; its text is spoken frame by
  frame as it is synthesised, at most ``AHEAD`` seconds ahead of the
  listener, so a barge-in has little queued audio to drop;
* barge-in: caller speech (one VAD window) while the agent talks drops the queued audio
  (``SessionIO.clear_audio``), cancels the reply and its speech, marks the
  turn interrupted, and says so on the data channel.  With ``backchannel=on``
  the audio stops just as soon, but the answer is *held*: if the caller's turn
  is a short "uh huh" / "yeah" (``BACKCHANNELS``, at most
  ``backchannel_ms`` of speech) the unplayed audio is sent again and the
  answer goes on (``resumed``); anything else cancels it (``interrupted``)
  and is answered.

Everything the client needs to measure the agent goes out on the data
channel, one JSON object per message (JSON lines): ``ready``,
``turn_start``, ``turn_end``, ``transcript``, ``reply``, ``speaking``,
``spoken``, ``barge_in``, ``ignored``, ``reply_error``, ``dropped``; ``turn_judged``
(turn=smart), ``resumed`` / ``interrupted`` (backchannel=on).

Options (``--handler voice:stt=whisper,silence_ms=500``): ``stt`` (sphinx |
whisper), ``tts`` (espeak | piper), ``reply`` (rules | echo |
package.module:function), ``turn`` (fixed | smart), ``silence_ms`` (fixed),
``ask_ms``, ``pause_ms``, ``reask_ms``, ``max_wait_ms``, ``complete``, ``model_nice`` (smart),
``backchannel`` (on | off), ``backchannel_ms``, ``min_speech_ms``, ``max_turn_ms``, ``threshold``,
``reply_timeout`` (seconds).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from splitrelay.transceiver.handlers import Handler, PcmFrame, SessionIO, register_handler
from splitrelay.voice.audio import MODEL_RATE, Resampler
from splitrelay.voice.judge import TurnJudge, Verdict
from splitrelay.voice.reply import BACKCHANNELS, COMMANDS, ReplyHook, Turn, load_reply, reply_pieces
from splitrelay.voice.stt import Stt, make_stt
from splitrelay.voice.tts import Tts, make_tts
from splitrelay.voice.vad import SileroVad, TurnDetector, TurnEvent, TurnRule

log = logging.getLogger(__name__)

AHEAD = 0.3                 # seconds of speech queued ahead of the listener (what a barge-in drops)
PRE_ROLL = 0.25             # seconds of audio before the detected start that the recogniser also gets
MAX_TEXT = 500              # characters of a data-channel message that are read
MAX_TYPED_PENDING = 4       # typed turns waiting; more are dropped (a data-channel flood)
MAX_STT_BACKLOG = 2 * 5 * MODEL_RATE  # bytes (5 s) of audio waiting for a recogniser that lags
HISTORY = 10                # (caller, agent) pairs kept for the reply hook


@register_handler("voice")
class VoiceHandler(Handler):
    """A voice agent: command recognition and rule replies by default, every stage replaceable."""

    def __init__(self, io: SessionIO, stt: str = "sphinx", tts: str = "espeak", reply: str | ReplyHook = "rules",
                 turn: str = "fixed", silence_ms: int = 400, ask_ms: int = 64, pause_ms: int = 96,
                 max_wait_ms: int = 1500, reask_ms: int = 0,
                 complete: float = 0.5, model_nice: int = 0, backchannel: str = "off", backchannel_ms: int = 700,
                 min_speech_ms: int = 150, max_turn_ms: int = 15000,
                 threshold: float = 0.5, reply_timeout: float = 5.0) -> None:
        super().__init__(io)
        if stt not in ("sphinx", "whisper"):
            raise ValueError(f"unknown stt {stt!r}; choose sphinx or whisper")
        if tts not in ("espeak", "piper"):
            raise ValueError(f"unknown tts {tts!r}; choose espeak or piper")
        if not 0.1 <= float(reply_timeout) <= 60:
            raise ValueError(f"reply_timeout must be 0.1..60 s, got {reply_timeout}")
        self.rule = TurnRule(threshold=float(threshold), silence_ms=int(silence_ms),
                             min_speech_ms=int(min_speech_ms), max_turn_ms=int(max_turn_ms), turn=str(turn),
                             ask_ms=int(ask_ms), pause_ms=int(pause_ms), max_wait_ms=int(max_wait_ms),
                             reask_ms=int(reask_ms), complete=float(complete))
        if not -20 <= int(model_nice) <= 19:
            raise ValueError(f"model_nice must be -20..19, got {model_nice}")
        self.model_nice = int(model_nice)
        if backchannel not in ("on", "off"):
            raise ValueError(f"backchannel must be on or off, got {backchannel!r}")
        if not 200 <= int(backchannel_ms) <= 2000:
            raise ValueError(f"backchannel_ms must be 200..2000 ms, got {backchannel_ms}")
        self.backchannel, self.backchannel_ms = backchannel == "on", int(backchannel_ms)
        self.stt_name, self.tts_name = stt, tts
        self.reply_hook = load_reply(reply)
        self.reply_timeout = float(reply_timeout)
        self.stt: Stt | None = None
        self.tts: Tts | None = None
        self.turns: TurnDetector | None = None
        self._resampler = Resampler(MODEL_RATE)
        self._pending = bytearray()          # 16 kHz audio not yet scored
        self._pre_roll: deque[bytes] = deque()
        self._worker: ThreadPoolExecutor | None = None
        self.judge: TurnJudge | None = None   # turn=smart: the end-of-turn model's side of the call
        self._verdict: dict | None = None     # its last verdict in this turn
        self._stopped = False
        self._stt_backlog = 0
        self._turn_index = 0
        self._history: deque[tuple[str, str]] = deque(maxlen=HISTORY)
        self._answer: asyncio.Task | None = None
        self._answer_turn: Turn | None = None
        self._typed: deque[str] = deque()
        self._typed_task: asyncio.Task | None = None
        self._playing_until = 0.0
        self._sent: deque[tuple[float, bytes]] = deque()  # (end of its playout, frame) of recent answer audio
        self._held: list[bytes] | None = None  # backchannel=on: unplayed answer audio while the caller speaks
        self._unheld = asyncio.Event()
        self._unheld.set()
        self._settle: asyncio.Task | None = None
        self.dropped_messages = 0
        self.dropped_audio = 0
        self._load_ms: float | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def on_start(self) -> None:
        loop = asyncio.get_running_loop()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"voice-{self.io.session_id[:6]}")
        started = time.monotonic()
        phrases = list(COMMANDS) + (list(BACKCHANNELS) if self.backchannel else [])
        self.stt = await loop.run_in_executor(self._worker, make_stt, self.stt_name, phrases)
        self.tts = make_tts(self.tts_name)
        if self.rule.turn == "smart":
            self.judge = TurnJudge(self.io.session_id, self._judged, self.model_nice)
            await self.judge.load()
        if hasattr(self.tts, "load"):  # piper: load the voice now, not at the first answer (~1 s)
            await loop.run_in_executor(None, self.tts.load)
        self.turns = TurnDetector(SileroVad(), self.rule)
        self._load_ms = _ms(time.monotonic() - started)
        self._ready()

    def _ready(self) -> None:
        """Say the agent listens (again when asked: the data channel may open after the call connects)."""
        self.emit("ready", stt=self.stt_name, tts=self.tts_name, turn=self.rule.turn,
                  silence_ms=self._window_ms, load_ms=self._load_ms)

    @property
    def _window_ms(self) -> int:
        """The silence the agent waits before it answers at the soonest (fixed: all of it)."""
        return self.rule.pause_ms if self.rule.turn == "smart" else self.rule.silence_ms

    async def on_stop(self) -> None:
        self._stopped = True  # an inference still running finishes on its thread; its answer is dropped
        for task in (self._answer, self._typed_task, self._settle):
            if task is not None:
                task.cancel()
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)
        if self.judge is not None:
            self.judge.stop()

    def emit(self, event: str, **fields: Any) -> None:  # noqa: ANN401
        self.io.send_text(json.dumps({"event": event, **fields}, separators=(",", ":")))

    @property
    def speaking(self) -> bool:
        return (self._answer is not None and not self._answer.done()) or time.monotonic() < self._playing_until

    # -- inbound audio ------------------------------------------------------------------------

    async def on_audio(self, frame: PcmFrame) -> None:
        if self.turns is None:  # models still loading: nothing to hear yet
            return
        now = frame.time or time.monotonic()
        self._pending += self._resampler.feed(frame.samples, frame.sample_rate, frame.channels)
        size = 2 * self.turns.vad.window_samples
        while len(self._pending) >= size:
            window = bytes(self._pending[:size])
            del self._pending[:size]
            self._window(window, now)

    def _window(self, window: bytes, now: float) -> None:
        assert self.turns is not None
        was_in_turn = self.turns.in_turn
        events = self.turns.push(window, now)
        if was_in_turn:
            self._to_stt("feed", window)
            self._keep_turn_audio(window)
        else:
            self._pre_roll.append(window)
            while len(self._pre_roll) * len(window) > 2 * MODEL_RATE * PRE_ROLL:
                self._pre_roll.popleft()
        for event in events:
            if event.kind == "onset":
                if self.speaking and self._held is None:  # one speech window is enough to stop talking
                    self.barge_in(event.at)
            elif event.kind == "start":
                self._turn_started(event)
            elif event.kind == "pause" and self.judge is not None:
                self.judge.ask(self.turns.pauses, event)
            else:
                self._turn_ended(event)
        if self._held is not None and self._settle is None:
            if not self.turns.starting:            # an onset that never became a turn: a click, go on
                self._resume()
            elif self.turns.speech_ms > self.backchannel_ms:  # too long for a backchannel: a real interruption
                self._interrupt()

    def _to_stt(self, method: str, pcm: bytes = b"") -> None:
        if self._worker is None or self.stt is None:
            return
        if method == "feed":
            if self._stt_backlog > MAX_STT_BACKLOG:  # the recogniser lags: drop, do not queue without end
                self.dropped_audio += len(pcm)
                return
            self._stt_backlog += len(pcm)
        stt = self.stt

        def run() -> None:
            if method == "feed":
                stt.feed(pcm)
            else:
                stt.begin()

        done = self._worker.submit(run)
        if method == "feed":  # the count is only changed on the event loop's thread
            loop = asyncio.get_running_loop()
            size = len(pcm)

            def fed(_: object) -> None:
                if not loop.is_closed():
                    loop.call_soon_threadsafe(self._fed, size)

            done.add_done_callback(fed)

    def _fed(self, size: int) -> None:
        self._stt_backlog -= size

    def _keep_turn_audio(self, window: bytes) -> None:
        if self.judge is not None:
            self.judge.keep(window)

    def _turn_started(self, event: TurnEvent) -> None:
        self._to_stt("begin")
        if self.judge is not None:
            self.judge.begin()
            self._verdict = None
        for window in self._pre_roll:
            self._to_stt("feed", window)
            self._keep_turn_audio(window)
        self._pre_roll.clear()
        self.emit("turn_start", turn=self._turn_index)

    # -- the end-of-turn model (turn=smart) ---------------------------------------------------------

    def _judged(self, v: Verdict) -> None:
        """The model's verdict, on the loop: a "complete" ends the turn now or at ``pause_ms`` of silence."""
        if self._stopped or self.turns is None:
            return
        current = self.turns.pause_current(v.pause)
        complete = v.score is not None and v.score >= self.rule.complete
        now = time.monotonic()
        self._verdict = {"score": None if v.score is None else round(v.score, 3),
                         "pause_ms": _ms(v.asked.at - v.asked.last_speech_at), "infer_ms": _ms(v.infer)}
        self.emit("turn_judged", turn=self._turn_index, **self._verdict, cpu_ms=_ms(v.cpu),
                  wait_ms=_ms(now - v.asked.at),
                  decision="stale" if not current else "end" if complete else "wait")
        ended = self.turns.judged(v.pause, complete, now)
        if ended is not None:
            self._turn_ended(ended)

    def _turn_ended(self, event: TurnEvent) -> None:
        if event.kind == "ignored":
            self.emit("ignored", turn=self._turn_index, speech_ms=round(event.speech_ms))
            if self._worker is not None and self.stt is not None:
                self._worker.submit(self.stt.finish)
            if self._held is not None:
                self._resume()
            return
        index = self._turn_index
        self._turn_index += 1
        # the decision, for a person to read (make demo): the silence heard and the model's last verdict
        self.emit("turn_end", turn=index, reason=event.reason, speech_ms=round(event.speech_ms),
                  silence_ms=self._window_ms, endpoint_ms=_ms(event.at - event.last_speech_at),
                  model=self._verdict)
        self._verdict = None
        transcript = self._transcribe(index, event.at)
        if self._held is not None:  # backchannel=on and the caller spoke over the answer: which was it?
            self._settle = asyncio.ensure_future(self._backchannel_or_not(transcript, index))
            return
        self._start_answer(transcript, index)

    async def _transcribe(self, index: int, ended_at: float) -> str:
        assert self._worker is not None and self.stt is not None
        result = await asyncio.get_running_loop().run_in_executor(self._worker, self.stt.finish)
        self.emit("transcript", turn=index, text=result.text, stt_ms=_ms(time.monotonic() - ended_at))
        return result.text

    # -- replies ------------------------------------------------------------------------------

    def _start_answer(self, transcript: Any, index: int) -> None:  # noqa: ANN401 - str or a coroutine of one
        if self._answer is not None and not self._answer.done():
            self._answer.cancel()  # a new turn supersedes an answer still being prepared
        self._answer = asyncio.ensure_future(self._respond(transcript, index))

    async def _respond(self, transcript: Any, index: int) -> None:  # noqa: ANN401
        text = transcript if isinstance(transcript, str) else await transcript
        if not text:
            return
        turn = self._answer_turn = Turn(text, index, list(self._history))
        assert self.tts is not None
        asked = time.monotonic()
        first_piece = first_audio = None
        try:
            async for piece in reply_pieces(self.reply_hook, turn, self.reply_timeout):
                if first_piece is None:
                    first_piece = time.monotonic()
                    self.emit("reply", turn=index, text=piece, reply_ms=_ms(first_piece - asked))
                if not piece.strip():
                    continue
                spoken_from = time.monotonic()
                async for pcm in self.tts.stream(piece):
                    if not self._unheld.is_set():  # backchannel=on: the caller is speaking over it
                        await self._unheld.wait()
                    if first_audio is None:
                        first_audio = time.monotonic()
                        self.emit("speaking", turn=index, tts_ms=_ms(first_audio - spoken_from))
                    self._play(pcm)
                    ahead = self._playing_until - time.monotonic() - AHEAD
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                turn.spoken += piece
        except TimeoutError:
            self.emit("reply_error", turn=index, error=f"reply took longer than {self.reply_timeout:g} s")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a user's hook must not end the call
            log.warning("reply hook failed in session %s: %s", self.io.session_id, exc)
            self.emit("reply_error", turn=index, error=f"{type(exc).__name__}: {exc}"[:200])
        else:
            if first_audio is not None:
                self.emit("spoken", turn=index, seconds=round(self._playing_until - first_audio, 3))
        finally:
            self._history.append((turn.transcript, turn.spoken + (" [interrupted]" if turn.interrupted else "")))

    def _play(self, pcm: bytes) -> None:
        now = time.monotonic()
        self._playing_until = max(self._playing_until, now) + len(pcm) / (2 * 48000)
        self.io.send_audio(PcmFrame(pcm))
        if self.backchannel:  # what a hold may have to send again: the frames not yet heard
            self._sent.append((self._playing_until, pcm))
            while self._sent and self._sent[0][0] < now - 0.1:
                self._sent.popleft()

    def barge_in(self, at: float) -> None:
        """The caller speaks over the agent: stop talking now (backchannel=on: hold the answer)."""
        dropped = self.io.clear_audio()
        self._playing_until = 0.0
        turn = self._answer_turn
        if self.backchannel:
            now = time.monotonic()
            self._held = [pcm for end, pcm in self._sent if end > now + 0.02]  # not on the wire yet
            self._sent.clear()
            self._unheld.clear()
        else:
            self._cancel_answer()
        stopped = time.monotonic()
        # onset_at / stopped_at: this host's time.monotonic(), so a caller on the same host (the bench's, in
        # another network namespace of the same kernel) can place them on its own timeline
        self.emit("barge_in", turn=turn.index if turn else None, dropped_ms=_ms(dropped),
                  detect_ms=_ms(stopped - at), onset_at=round(at, 6), stopped_at=round(stopped, 6))

    def _cancel_answer(self) -> None:
        if self._answer_turn is not None:
            self._answer_turn.interrupted = True
        if self._answer is not None and not self._answer.done():
            self._answer.cancel()

    def _resume(self) -> None:
        """The caller's speech was a backchannel (or a click): the held answer goes on where it stopped."""
        held, self._held, self._settle = self._held or [], None, None
        for pcm in held:
            self._play(pcm)
        self._unheld.set()
        turn = self._answer_turn
        self.emit("resumed", turn=turn.index if turn else None, held_ms=_ms(0.02 * len(held)))

    def _interrupt(self) -> None:
        """The caller's speech was a real interruption: the held answer is dropped."""
        self._held, self._settle = None, None
        self._cancel_answer()
        self._unheld.set()
        turn = self._answer_turn
        self.emit("interrupted", turn=turn.index if turn else None)

    async def _backchannel_or_not(self, transcript: Any, index: int) -> None:  # noqa: ANN401 - a coroutine
        text = await transcript
        if self._held is None:  # settled meanwhile (the turn grew too long)
            self._start_answer(text, index)
            return
        if " ".join(text.lower().split()) in BACKCHANNELS:
            self.emit("backchannel", turn=index, text=text)
            self._resume()
        else:
            self._interrupt()
            self._start_answer(text, index)

    # -- data channel -------------------------------------------------------------------------

    async def on_text(self, text: str) -> None:
        """A typed turn: the text is answered as if it had been said (bounded: a flood is dropped).

        ``{"event": "hello"}`` is not a turn: it asks for the ``ready`` event (sent once the models are
        loaded), for a client whose data channel opened after the call connected.
        """
        if text.startswith('{"event":') and text.replace(" ", "") == '{"event":"hello"}':
            if self._load_ms is not None:
                self._ready()
            return
        if len(self._typed) >= MAX_TYPED_PENDING:
            self.dropped_messages += 1
            if self.dropped_messages in (1, 10, 100) or self.dropped_messages % 1000 == 0:
                self.emit("dropped", messages=self.dropped_messages)
            return
        self._typed.append(text[:MAX_TEXT])
        if self._typed_task is None or self._typed_task.done():
            self._typed_task = asyncio.ensure_future(self._typed_turns())

    async def _typed_turns(self) -> None:
        while self._typed:
            text = self._typed.popleft()
            index = self._turn_index
            self._turn_index += 1
            self.emit("transcript", turn=index, text=text, typed=True)
            self._start_answer(text, index)
            await asyncio.wait({self._answer})  # type: ignore[arg-type]


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)
