"""The transceiver's event loop (transceiver/loop.py): uvloop by default, asyncio on request, and a call
works end to end on either (the in-process tests run on pytest's asyncio loop, so this is where uvloop
carries real calls)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from splitrelay.client.probe import run_probes
from splitrelay.transceiver import loop

from .test_workers import children, serving


def ready_on(name: str) -> re.Pattern:
    return re.compile(r"transceiver ready: WHIP (http://\S+)/whip admin (http://\S+) backend 7 "
                      rf"on 127\.0\.0\.1:\d+ \({name} loop\)")


async def running_loop() -> str:
    return loop.loop_name(asyncio.get_running_loop())


def test_run_puts_the_coroutine_on_the_loop_it_names():
    assert loop.run(running_loop(), "uvloop") == "uvloop"
    assert loop.run(running_loop(), "asyncio") == "asyncio"
    assert loop.run(running_loop()) == loop.DEFAULT_EVENT_LOOP == "uvloop"


def test_an_unknown_loop_is_refused_with_the_choices():
    with pytest.raises(loop.EventLoopError) as exc:
        loop.loop_factory("trio")
    assert str(exc.value) == "unknown event loop 'trio' (choose from uvloop, asyncio)"


@pytest.mark.parametrize("args, env, name", [
    ((), None, "uvloop"),
    (("--event-loop", "asyncio"), None, "asyncio"),
    ((), "asyncio", "asyncio"),
])
def test_serve_runs_calls_on_the_loop_it_was_told(tmp_path, monkeypatch, args, env, name):
    if env:
        monkeypatch.setenv(loop.EVENT_LOOP_ENV, env)
    else:
        monkeypatch.delenv(loop.EVENT_LOOP_ENV, raising=False)
    with serving(tmp_path, "--processes", "1", "--backend-id", "7", *args, ready=ready_on(name)) as running:
        _, base, _, _ = running
        [report] = asyncio.run(run_probes([base + "/whip"], sessions=1, duration=2.0))
        assert report.ok and report.beeps_heard == report.beeps_sent >= 2, report


def test_the_loop_given_to_a_supervisor_reaches_every_worker(tmp_path, monkeypatch):
    monkeypatch.delenv(loop.EVENT_LOOP_ENV, raising=False)
    with serving(tmp_path, "--processes", "2", "--backend-id", "44", "--event-loop", "asyncio") as (proc, *_):
        workers = children(proc.pid)
        assert len(workers) == 2
        for pid in workers:   # the option travels in the environment, which each worker's serve reads
            assert b"SPLITRELAY_EVENT_LOOP=asyncio" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
