"""The end-of-turn model's side of one call (``turn=smart``): what it hears, when it runs, what it said.

The agent hands over every window of the turn (``keep``) and each pause (``ask``); the model runs on a
thread of its own, never on the event loop and never behind the recogniser, and its verdict comes back
on the loop through ``on_verdict``.  One inference is in flight per call and only the newest pause waits
for it: an attacker's audio can make pauses faster than a loaded core infers, and a queue of stale work
(tried: 5.3 s late) would answer old pauses.  A verdict for a pause the caller has since spoken through
is still reported; the agent calls it stale.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from splitrelay.voice.audio import MODEL_RATE
from splitrelay.voice.smart_turn import SECONDS, SmartTurn
from splitrelay.voice.vad import TurnEvent

log = logging.getLogger(__name__)


@dataclass
class Verdict:
    pause: int                  # which pause of the call was judged (TurnDetector.pauses)
    asked: TurnEvent            # the pause event
    score: float | None         # None: the inference failed
    infer: float = 0.0          # wall seconds of the inference (its thread may wait for a core)
    cpu: float = 0.0            # CPU seconds of its thread


class TurnJudge:
    def __init__(self, session_id: str, on_verdict: Callable[[Verdict], None], nice: int = 0) -> None:
        self.session_id = session_id
        self.nice = nice                                       # the model thread's niceness (Linux: per thread)
        self.on_verdict = on_verdict
        self.model: SmartTurn | None = None
        self.judging = False                                   # one inference in flight...
        self.waiting: tuple[int, bytes, TurnEvent] | None = None  # ...and the newest pause waiting for it
        self._audio = bytearray()                              # the turn so far (its last SECONDS)
        self._pool: ThreadPoolExecutor | None = None
        self._stopped = False

    async def load(self) -> None:
        """Load the model and run it once on its thread (onnxruntime's first run: 380 ms here, then 50)."""
        loop = asyncio.get_running_loop()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"turn-{self.session_id[:6]}")
        if self.nice:
            await loop.run_in_executor(self._pool, self._renice)
        self.model = await loop.run_in_executor(self._pool, SmartTurn)
        await loop.run_in_executor(self._pool, self.model.warm_up)

    def _renice(self) -> None:
        """On a shared core the inference waits for its turn (56 ms of CPU took 260 ms at load 8 here): a
        lower niceness for this one thread shortens that wait without touching the rest of the process."""
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        except OSError as exc:  # not permitted (no CAP_SYS_NICE): the model still runs, at the default
            log.warning("model thread niceness %d refused: %s", self.nice, exc.strerror)

    def stop(self) -> None:
        """The call ended: an inference still running finishes on its thread and its verdict is dropped."""
        self._stopped = True
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def begin(self) -> None:
        self._audio.clear()

    def keep(self, window: bytes) -> None:
        self._audio += window
        excess = len(self._audio) - 2 * MODEL_RATE * SECONDS
        if excess > 0:
            del self._audio[:excess]

    def ask(self, pause: int, event: TurnEvent) -> None:
        """A pause: judge the turn so far (now, or once the inference in flight is done)."""
        self.waiting = (pause, bytes(self._audio), event)
        if not self.judging:
            self._next()

    def _next(self) -> None:
        if self.waiting is None or self._pool is None or self.model is None or self._stopped:
            return
        pause, audio, asked = self.waiting
        self.waiting = None
        loop = asyncio.get_running_loop()
        model = self.model

        def run() -> tuple[float, float, float]:
            started, cpu = time.monotonic(), time.thread_time()
            score = model.complete(audio)
            return score, time.monotonic() - started, time.thread_time() - cpu

        try:
            future = self._pool.submit(run)
        except RuntimeError:  # shut down: the call has ended
            return
        self.judging = True

        def done(_: object) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._done, pause, asked, future)

        future.add_done_callback(done)

    def _done(self, pause: int, asked: TurnEvent, future: Future) -> None:
        self.judging = False
        if self._stopped:
            return
        if future.cancelled() or future.exception() is not None:
            log.warning("end-of-turn model failed in session %s: %s", self.session_id,
                        None if future.cancelled() else future.exception())
            verdict = Verdict(pause, asked, None)
        else:
            score, infer, cpu = future.result()
            verdict = Verdict(pause, asked, score, infer, cpu)
        self.on_verdict(verdict)
        self._next()
