"""Ended sessions are freed by the collection their end asks for (transceiver/garbage.py), with real aiortc
callers; the interpreter's own collector is off while a test looks, so nothing else can free them."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import subprocess
import sys
import weakref
from collections.abc import Iterator

import aiohttp
import pytest

from splitrelay.transceiver.garbage import GC_ENV, RELEASE_BATCH, GcModeError, SessionCollector, break_cycles

from . import test_transceiver
from .test_transceiver import Caller, ended, until

transceiver = test_transceiver.transceiver


@contextlib.contextmanager
def no_automatic_collection() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


async def call_and_hang_up(service, http: aiohttp.ClientSession) -> weakref.ref:
    """A call whose echo came back, hung up and ended: a weak reference to its session."""
    caller = Caller(service.whip_url, 700.0)
    try:
        await caller.call(http)
        await until(caller.heard_own, "the echo of the caller's tone")
        ref = weakref.ref(service.sessions[caller.session_id])
    finally:
        await caller.hangup(http)
    await ended(service, caller.session_id)
    return ref


def releasing(transceiver, monkeypatch) -> SessionCollector:
    """The service's collector in ``release`` mode (opt-in), its passes timed into its metrics."""
    monkeypatch.setenv(GC_ENV, "release")
    transceiver.collector = SessionCollector(observe=transceiver.metrics.session_release.observe)
    return transceiver.collector


@pytest.mark.parametrize(("mode", "collections", "released"), [
    ("sessions", (1, 2, 3), 0),   # the default: a full collection 6 s after the end, then 12 and 24 s later
    ("release", (0,), 1),         # opt-in: its cycles broken, no full collection (which walks every call)
])
async def test_an_ended_call_s_session_is_freed_by_the_pass_its_end_asks_for(transceiver, monkeypatch, mode,
                                                                            collections, released):
    monkeypatch.setenv(GC_ENV, mode)
    transceiver.collector = collector = SessionCollector(observe=transceiver.metrics.session_release.observe)
    with no_automatic_collection():
        async with aiohttp.ClientSession() as http:
            ref = await call_and_hang_up(transceiver, http)
            assert ref() is not None, "a session ends as a cycle: reference counting alone does not free it"
            assert collector.unfreed == 1
            await until(collector.all_freed, "the pass its end asked for", 45)
            assert ref() is None and collector.unfreed == 0
            assert collector.collections in collections and collector.released == released
            metrics = (await (await http.get(f"{transceiver.admin_url}/metrics")).text()).splitlines()
            assert "splitrelay_transceiver_sessions_unfreed 0.0" in metrics
            passes = collector.collections or 1   # a release pass, or one pass per collection
            assert f"splitrelay_transceiver_session_release_seconds_count {passes}.0" in metrics


async def test_released_the_ends_of_one_window_share_one_pass(transceiver, monkeypatch):
    collector = releasing(transceiver, monkeypatch)
    with no_automatic_collection():
        async with aiohttp.ClientSession() as http:
            refs = [await call_and_hang_up(transceiver, http) for _ in range(3)]
            await until(collector.all_freed, "the pass the ends asked for", 45)
            assert [r() for r in refs] == [None, None, None]
            assert collector.released == 3 and collector.collections == 0


async def test_a_release_leaves_the_live_calls_beside_it_working_and_raises_nothing(transceiver, monkeypatch):
    # the release empties objects: one of another call's, or one a callback still used, would show here
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    collector = releasing(transceiver, monkeypatch)
    live = Caller(transceiver.whip_url, 500.0)
    try:
        with no_automatic_collection():
            async with aiohttp.ClientSession() as http:
                await live.call(http)
                await until(live.heard_own, "the live call's echo")
                refs = [await call_and_hang_up(transceiver, http) for _ in range(2)]
                await until(collector.all_freed, "the release of the two ended calls", 45)
                assert [r() for r in refs] == [None, None] and collector.released == 2
                live.heard_own.clear()
                await until(live.heard_own, "the live call's echo after its neighbours' release")
                assert transceiver.sessions[live.session_id].frames_in > 0
                await live.hangup(http)
                await ended(transceiver, live.session_id)
                await until(collector.all_freed, "the live call's own release", 45)
                assert collector.released == 3 and collector.collections == 0
    finally:
        loop.set_exception_handler(previous)
    assert errors == []


class Shared:
    """Stands in for what sessions share (the service, the mux, a handler's model)."""


class Part:
    """Stands in for a transport: refers back to what made it, and to shared things."""

    def __init__(self, shared: Shared, peer: object = None) -> None:
        self.shared, self.peer = shared, peer
        self.callback = self.on_event          # a bound method back to itself: a cycle
        self.items = [shared, {"peer": peer}]

    def on_event(self) -> None: ...


class Root(Part):
    """Stands in for a peer connection."""


def test_breaking_a_cycle_empties_only_the_root_s_own_objects_never_a_shared_one_or_another_root():
    shared = Shared()
    shared.state = "in use"
    other_root = Root(shared)
    shared.roots = [other_root]                       # reachable from the root only through the shared object
    shared.part = Part(Shared())                      # an owned type, but the shared object is not entered
    root = Root(shared)
    child = Part(shared, peer=root)
    root.peer = child
    inside = Part(shared, peer=other_root)            # a second root, reachable through a container: not entered
    root.items.append(inside)
    root.callbacks = [lambda: child]                  # a closure: entered through its cell
    ref = weakref.ref(root)
    assert break_cycles(root, (Root, Part)) == 3      # root, child, inside
    assert vars(root) == {} and vars(child) == {} and vars(inside) == {}
    assert shared.state == "in use" and shared.roots == [other_root] and vars(shared.part) != {}
    assert other_root.shared is shared and other_root.callback.__self__ is other_root
    with no_automatic_collection():
        del root
        assert ref() is None, "with its cycles broken, reference counting frees it"


async def test_with_the_interpreter_s_collection_an_ended_session_waits_for_it(transceiver, monkeypatch):
    monkeypatch.setenv(GC_ENV, "interpreter")
    transceiver.collector = SessionCollector()
    with no_automatic_collection():
        async with aiohttp.ClientSession() as http:
            ref = await call_and_hang_up(transceiver, http)
        assert transceiver.collector._handle is None and ref() is not None
        assert transceiver.collector.unfreed == 1 and transceiver.collector.collections == 0


class Cycle:
    """Stands in for a session: an object only a collection frees once it is let go."""

    def __init__(self) -> None:
        self.me = self


async def test_a_collection_frees_what_ended_and_backs_off_while_something_is_still_held():
    collector = SessionCollector(after=30.0)
    loop = asyncio.get_running_loop()
    with no_automatic_collection():
        held, garbage = Cycle(), Cycle()
        collector.session_ended(held)
        collector.session_ended(garbage)
        del garbage
        assert collector.unfreed == 2 and collector._handle.when() <= loop.time() + 30.0
        collector._handle.cancel()
        collector._collect()                      # what the timer does
        assert collector.unfreed == 1 and not collector.all_freed.is_set()
        assert collector._handle.when() > loop.time() + 59.0   # still held: again in 60 s, not 30
        collector.session_ended(Cycle())          # a new end does not wait for that retry
        assert collector._handle.when() <= loop.time() + 30.0
        del held
        collector._handle.cancel()
        collector._collect()
        assert collector.unfreed == 0 and collector.all_freed.is_set() and collector._handle is None
    collector.stop()


async def test_a_stranger_ending_a_thousand_calls_at_once_costs_one_collection(monkeypatch):
    # anyone who may place calls can end them at the rate limit's pace: the ends share one collection
    collector = SessionCollector(after=30.0)
    handles = []
    real = asyncio.get_running_loop().call_later
    monkeypatch.setattr(asyncio.get_running_loop(), "call_later",
                        lambda *a: handles.append(real(*a)) or handles[-1])
    with no_automatic_collection():
        for _ in range(1000):
            collector.session_ended(Cycle())
        assert len(handles) == 1 and collector.unfreed == 1000
        handles[0].cancel()
        collector._collect()
        assert collector.collections == 1 and collector.unfreed == 0 and collector._handle is None


class Releasable(Cycle):
    """Stands in for a session whose release breaks its cycle."""

    def release(self) -> bool:
        self.me = None
        return True


async def test_a_mass_hang_up_is_released_a_batch_per_loop_step_and_needs_no_collection(monkeypatch):
    monkeypatch.setenv(GC_ENV, "release")
    collector = SessionCollector(after=30.0)
    with no_automatic_collection():
        for _ in range(2 * RELEASE_BATCH + 3):
            collector.session_ended(Releasable())
        collector._handle.cancel()
        collector._collect()
        assert collector.released == RELEASE_BATCH and collector.unfreed == RELEASE_BATCH + 3
        assert collector._handle.when() <= asyncio.get_running_loop().time()   # the rest: at once, next step
        await until(collector.all_freed, "the other two batches", 5)
        assert collector.released == 2 * RELEASE_BATCH + 3 and collector.collections == 0
    collector.stop()


def test_a_collection_mode_that_does_not_exist_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv(GC_ENV, "never")
    with pytest.raises(GcModeError) as exc:
        SessionCollector()
    assert str(exc.value) == "SPLITRELAY_GC='never': choose from sessions, release, interpreter"


@pytest.mark.parametrize(("mode", "frozen"), [("sessions", True), ("release", True), ("interpreter", False)])
def test_a_serving_process_freezes_what_it_is_once_up_unless_told_not_to(mode, frozen):
    # in a process of its own: freezing this test process would keep its objects out of every collection
    code = "from splitrelay.transceiver import garbage; import gc; print(garbage.freeze(), gc.get_freeze_count())"
    out = subprocess.run([sys.executable, "-c", code], env={GC_ENV: mode, "PATH": ""}, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    assert (int(out[0]) > 1000, int(out[1]) > 1000) == (frozen, frozen)
