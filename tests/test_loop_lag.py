"""The event loop's lateness (transceiver/loop.py LoopLag): the saturation signal a capacity step and an
operator read, exported by every transceiver as ``splitrelay_transceiver_event_loop_lag_seconds``."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from splitrelay.transceiver.loop import LoopLag, loop_factory, run
from splitrelay.transceiver.service import Transceiver, TransceiverConfig


@pytest.mark.parametrize("name", ["uvloop", "asyncio"])
def test_a_callback_that_holds_the_loop_80_ms_shows_as_lateness_and_an_idle_loop_shows_almost_none(name):
    loop_factory(name)   # uvloop installed (make setup)

    async def main() -> list[float]:
        seen: list[float] = []
        lag = LoopLag(seen.append, interval=0.01)
        lag.start()
        try:
            await asyncio.sleep(0.1)               # idle: each wake-up on time
            idle = len(seen)
            time.sleep(0.08)                        # one callback holds the loop (a burst of calls' frames)
            deadline = time.monotonic() + 5
            while len(seen) <= idle and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
        finally:
            lag.stop()
        return seen[:idle + 1]

    seen = run(main(), name)
    assert len(seen) >= 3
    assert max(seen[:-1]) < 0.03                    # on time, give or take a loaded CI machine
    assert seen[-1] >= 0.06                         # late by the block, less the interval it overlapped


async def test_every_transceiver_exports_its_loop_lag_and_gc_pauses_and_stops_measuring_when_it_stops():
    import gc

    service = Transceiver(TransceiverConfig(backend_id=9, bind_port=0, whip_port=0))
    hooks = len(gc.callbacks)
    await service.start()
    try:
        await asyncio.sleep(0.2)
        gc.collect()
        async with aiohttp.ClientSession() as http, http.get(service.admin_url + "/metrics") as resp:
            text = await resp.text()
        values = {line.split()[0]: float(line.split()[-1])
                  for line in text.splitlines() if not line.startswith("#")}
        assert values["splitrelay_transceiver_event_loop_lag_seconds_count"] >= 2
        assert values['splitrelay_transceiver_gc_pause_seconds_count{generation="2"}'] >= 1
    finally:
        await service.stop()
    assert len(gc.callbacks) == hooks
    lag_count = "splitrelay_transceiver_event_loop_lag_seconds_count"
    count = service.metrics.registry.get_sample_value(lag_count)
    await asyncio.sleep(0.15)
    assert service.metrics.registry.get_sample_value(lag_count) == count     # no wake-up after the stop
