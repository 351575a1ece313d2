"""Ended sessions are freed soon after they end, not whenever the interpreter's full collection comes round.

A session ends as a reference cycle (aiortc's peer connection, its transports and their callbacks point at
one another): about 950 objects, which hold its DTLS context, SRTP and Opus states in C.  They lived
through the call, so they sit in the oldest generation, which the interpreter collects only after ten of
the middle one's collections.  Measured in a worker under churn (4-minute soak, 3-8 s calls): 15 live
sessions, and up to 164 dead ones waiting; RSS grew about 0.3 MiB for each, and glibc kept the high-water
mark, so the hour soak's workers grew 22-27 % over 12 minutes before going flat.

So each ended session asks for one full collection, ``COLLECT_AFTER`` later (its closing tasks have let
go of it by then), and the ends of that window share it.  ``freeze()`` moves what exists once a process is up
(modules, classes, the service) out of every later collection, so a full one walks the calls' objects
only.  ``SPLITRELAY_GC=interpreter`` leaves collection to the interpreter (to compare).
"""

from __future__ import annotations

import asyncio
import gc
import os
import weakref

from splitrelay.errors import SplitrelayError

GC_ENV = "SPLITRELAY_GC"
GC_MODES = ("sessions", "interpreter")
# after its end a session is still held for 3.7-5.6 s (4 loopback calls, a collection every 0.25 s): by
# something of aiortc's that a loop callback keeps, which the collector cannot see
COLLECT_AFTER = 6.0
COLLECT_MAX = 60.0


class GcModeError(SplitrelayError):
    """$SPLITRELAY_GC names no collection mode (one-line reason)."""


def gc_mode() -> str:
    """The mode $SPLITRELAY_GC asks for: ``sessions`` (default) or ``interpreter``."""
    mode = os.environ.get(GC_ENV, "").strip() or GC_MODES[0]
    if mode not in GC_MODES:
        raise GcModeError(f"{GC_ENV}={mode!r}: choose from {', '.join(GC_MODES)}")
    return mode


def freeze() -> int:
    """Collect what is garbage now, then leave every object left out of later collections; returns how
    many were frozen.  For a process that serves calls and nothing else (``transceiver serve``), once it is
    up: a test process freezing its own objects would keep any cycle they later form."""
    if gc_mode() != "sessions":
        return 0
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class SessionCollector:
    """A full collection ``after`` seconds after a session ends, shared by the ends in between, and again,
    backing off to ``COLLECT_MAX``, while an ended session is still held."""

    def __init__(self, after: float = COLLECT_AFTER) -> None:
        self.after = after
        self.enabled = gc_mode() == "sessions"
        self.collections = 0
        self.all_freed = asyncio.Event()  # set by a collection that leaves no ended session unfreed
        # id -> a weak reference whose callback drops the entry: dict.pop is one step under the GIL, and a
        # session may be freed on any thread (the voice agent's threads collect too)
        self._held: dict[int, weakref.ref] = {}
        self._delay = after
        self._handle: asyncio.TimerHandle | None = None

    @property
    def unfreed(self) -> int:
        """Sessions ended whose objects are still in memory."""
        return len(self._held)

    def session_ended(self, session: object) -> None:
        key = id(session)
        self._held[key] = weakref.ref(session, lambda _: self._held.pop(key, None))
        self.all_freed.clear()
        self._delay = self.after
        if self._handle is not None and self._handle.when() > asyncio.get_running_loop().time() + self.after:
            self.stop()   # a backed-off retry: this end's collection comes first
        self._schedule()

    def _schedule(self) -> None:
        if self.enabled and self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self._delay, self._collect)

    def _collect(self) -> None:
        self._handle = None
        self.collections += 1
        gc.collect()
        if self._held:
            self._delay = min(self._delay * 2, COLLECT_MAX)
            self._schedule()
        else:
            self.all_freed.set()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
