"""Ended sessions are freed soon after they end, not whenever the interpreter's full collection comes round.

A session ends as a reference cycle (aiortc's peer connection, its transports and their callbacks point at
one another): about 950 objects, which hold its DTLS context, SRTP and Opus states in C.  They lived
through the call, so they sit in the oldest generation, which the interpreter collects only after ten of
the middle one's collections.  Measured in a worker under churn (4-minute soak, 3-8 s calls): 15 live
sessions, and up to 164 dead ones waiting; RSS grew about 0.3 MiB for each, and glibc kept the high-water
mark, so the hour soak's workers grew 22-27 % over 12 minutes before going flat.

So each ended session asks for one full collection ``COLLECT_AFTER`` later (its closing tasks have let
go of it by then), and the ends of that window share it.  That collection walks every live call's objects
too: it held the loop 11-19 ms with 48 echo calls up (2026-12-08), and every call's audio waited as long.
``SPLITRELAY_GC=release`` (opt-in) first breaks each ended session's cycles (``Session.release`` with
``break_cycles``: ~1 ms a pass, whatever else is up) and lets reference counting free it, collecting only
for a session still held.  It is not the default: in a 30-minute soak (2026-12-08) the workers' RSS rose
to 139 MiB, 18 % over the 5th minute's, against 116 flat with a collection per pass.  The release frees
the session, but not the other cyclic garbage of the process that each full collection also took.
``freeze()`` moves what exists once a process is up (modules, classes, the service) out of every later
collection, so a full one walks the calls' objects only.  ``interpreter`` leaves collection to the
interpreter (to compare).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import time
import types
import weakref
from collections.abc import Callable

from splitrelay.errors import SplitrelayError

GC_ENV = "SPLITRELAY_GC"
GC_MODES = ("sessions", "release", "interpreter")   # release: break cycles first (opt-in, see above)
# after its end a session is still held for 3.7-5.6 s (4 loopback calls, a collection every 0.25 s): by
# something of aiortc's that a loop callback keeps, which the collector cannot see
COLLECT_AFTER = 6.0
COLLECT_MAX = 60.0
# sessions released per loop step: 0.4-0.5 ms each (2 of them in 1.0 ms with 48 echo calls up, 48 in one
# step 18.5 ms, 2026-12-08), so a mass hang-up holds the loop ~4 ms at a time, not once for all of them
RELEASE_BATCH = 8


class GcModeError(SplitrelayError):
    """$SPLITRELAY_GC names no collection mode (one-line reason)."""


def gc_mode() -> str:
    """The mode $SPLITRELAY_GC asks for: ``sessions`` (default), ``release`` or ``interpreter``."""
    mode = os.environ.get(GC_ENV, "").strip() or GC_MODES[0]
    if mode not in GC_MODES:
        raise GcModeError(f"{GC_ENV}={mode!r}: choose from {', '.join(GC_MODES)}")
    return mode


def freeze() -> int:
    """Collect what is garbage now, then leave every object left out of later collections; returns how
    many were frozen.  For a process that serves calls and nothing else (``transceiver serve``), once it is
    up: a test process freezing its own objects would keep any cycle they later form."""
    if gc_mode() == "interpreter":
        return 0
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


_CONTAINERS = (dict, list, tuple, set, frozenset, collections.deque)


def break_cycles(root: object, owned: tuple[type, ...]) -> int:
    """Empty the attributes of ``root`` and of every instance of ``owned`` reachable from it; how many.

    The walk enters only instances of ``owned``, containers, bound methods (their object) and closures (their
    cells): never a module, a class, a coroutine or any other object, so what a session shares with others
    (the service, the mux, the handler's models) is not reached, let alone emptied.  ``owned`` must be types
    whose instances one session makes for itself alone; a second instance of ``root``'s own type (another
    session's peer connection in a shared container) is not entered either."""
    seen, found, todo = {id(root)}, [root], [root]
    while todo:
        obj = todo.pop()
        if isinstance(obj, types.MethodType):
            children = [obj.__self__]
        elif isinstance(obj, types.FunctionType):
            children = [cell.cell_contents for cell in obj.__closure__ or () if _filled(cell)]
        else:
            children = gc.get_referents(obj)
        for child in children:
            if id(child) in seen:
                continue
            if isinstance(child, owned) and not isinstance(child, type) and type(child) is not type(root):
                found.append(child)
            elif not isinstance(child, (*_CONTAINERS, types.MethodType, types.FunctionType)):
                continue
            seen.add(id(child))
            todo.append(child)
    for obj in found:
        if hasattr(obj, "__dict__"):
            obj.__dict__.clear()
    return len(found)


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


class SessionCollector:
    """``after`` seconds after a session ends, shared by the ends in between: a full collection (``release``
    mode: each ended session's ``release()`` first, and a collection only if one is still held), and again,
    backing off to ``COLLECT_MAX``, while one is."""

    def __init__(self, after: float = COLLECT_AFTER, observe: Callable[[float], None] | None = None) -> None:
        self.after = after
        self.enabled = gc_mode() != "interpreter"
        self.release = gc_mode() == "release"   # else each pass is a full collection
        self.collections = 0     # full collections: for sessions still held after their release
        self.released = 0        # ended sessions whose cycles were broken (``release()``)
        self.observe = observe   # seconds each pass held the loop (releases and any collection)
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
        started = time.perf_counter()
        released = 0
        for ref in list(self._held.values()) if self.release else ():
            if released == RELEASE_BATCH:
                break
            session = ref()
            if session is not None and hasattr(session, "release") and session.release():
                released += 1
            del session  # the last reference: a released session is freed here
        self.released += released
        if released == RELEASE_BATCH:   # maybe more: the next step, after the packets waiting now
            self._observe(started)
            self._handle = asyncio.get_running_loop().call_later(0, self._collect)
            return
        if self._held:
            self.collections += 1
            gc.collect()
        self._observe(started)
        if self._held:
            self._delay = min(self._delay * 2, COLLECT_MAX)
            self._schedule()
        else:
            self.all_freed.set()

    def _observe(self, started: float) -> None:
        if self.observe is not None:
            self.observe(time.perf_counter() - started)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
