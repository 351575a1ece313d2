"""The event loop a transceiver process runs on: uvloop by default, asyncio's own on request.

Every packet of every call is a callback of this loop (the mux's socket read, the SRTP and RTP
layers' tasks, each frame's pacing timer), so the loop's own cost per callback is paid ~200 times
per call-second.  uvloop (libuv, in C) runs those callbacks, its timers and the UDP socket's reads
and writes with less Python in between: 1-3 % less transceiver CPU per echo call than asyncio's loop,
measured side by side in one run (bench/cpu_ab.py, two runs, docs/bench/profile.md) -- a small gain,
since libopus and aiortc's own per-packet Python are most of a call's cost.  ``asyncio`` stays
selectable (``--event-loop asyncio``, env SPLITRELAY_EVENT_LOOP), e.g. to rule the loop out when
debugging.

uvloop's clock is libuv's: the same CLOCK_MONOTONIC as ``time.monotonic()``, which the voice path
mixes with ``loop.call_at``, but kept in whole milliseconds, so a timer may fire up to a
millisecond early; the voice path re-checks the time on waking and waits again (audio.py).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from splitrelay.errors import SplitrelayError

EVENT_LOOPS = ("uvloop", "asyncio")
DEFAULT_EVENT_LOOP = "uvloop"
EVENT_LOOP_ENV = "SPLITRELAY_EVENT_LOOP"

T = TypeVar("T")


class EventLoopError(SplitrelayError):
    """The event loop asked for cannot run here (one-line reason)."""


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """A new-loop function for ``name`` (one of ``EVENT_LOOPS``)."""
    if name == "asyncio":
        return asyncio.new_event_loop
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise EventLoopError("--event-loop uvloop: uvloop is not installed (pip install uvloop, "
                                 "or --event-loop asyncio)") from None
        return uvloop.new_event_loop
    raise EventLoopError(f"unknown event loop {name!r} (choose from {', '.join(EVENT_LOOPS)})")


def run(main: Coroutine[Any, Any, T], name: str = DEFAULT_EVENT_LOOP) -> T:
    """``asyncio.run(main)`` on the loop ``name``."""
    factory = loop_factory(name)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """Which of ``EVENT_LOOPS`` ``loop`` is (what the transceiver reports it runs on)."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


LAG_INTERVAL = 0.05   # s between two wake-ups: 20 timer callbacks a second, nothing next to a call's ~200


class LoopLag:
    """How late the event loop runs a timer that was due: the saturation signal of a one-loop process.

    Every packet and frame of every call is a callback of the one loop, so a loop that is late is late
    for every call at once, whatever its core's average says: in the capacity bench, conversation calls
    lost audio at 64 calls with the core 83 % busy (BENCHMARKS.md).  ``observe`` gets each lateness
    in seconds (uvloop's timers are whole milliseconds: up to ~1 ms of it is the clock).
    """

    def __init__(self, observe: Callable[[float], None], interval: float = LAG_INTERVAL) -> None:
        self.observe, self.interval = observe, interval
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        self._due = time.monotonic() + self.interval
        self._handle = asyncio.get_running_loop().call_later(self.interval, self._woke)

    def _woke(self) -> None:
        now = time.monotonic()
        self.observe(max(0.0, now - self._due))
        self._due = now + self.interval
        self._handle = asyncio.get_running_loop().call_later(self.interval, self._woke)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class GcPauses:
    """How long each garbage collection held the process (and its loop), by generation: a full
    collection walks every live object, and a worker carrying many calls has many; ``observe`` gets
    (generation, seconds).  Hooks ``gc.callbacks`` between ``start`` and ``stop``."""

    def __init__(self, observe: Callable[[int, float], None]) -> None:
        self.observe = observe
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.observe(info["generation"], time.perf_counter() - self._started)

    def start(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
