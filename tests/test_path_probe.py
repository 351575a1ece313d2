"""The transceiver probes a selected path that went silent (transceiver/paths.py), on loopback.

Under DNAT a floated relay address (3b) leaves the client's address unchanged, so only a
check naming the session opens the flow on the standby: the client's comes every ~5 s,
the transceiver's probe 500 ms after its client went silent (tests/test_floating.py and
bench/failover.py show the gap through XDP).  Here: a real aiortc caller through a
translating loopback relay that dies, and what the transceiver sends to that path after.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from .test_failover import call, sends_to, two_relays  # noqa: F401 - the fixture

BINDING_REQUEST = b"\x00\x01"


def requests_to(sent: list, addr, since: float, until: float) -> list[float]:  # noqa: ANN001
    """When (seconds after ``since``) each Binding Request to ``addr`` left, up to ``until``."""
    return [t - since for t, data, to in sent if to == addr and data[:2] == BINDING_REQUEST and since <= t < until]


async def test_a_selected_path_gone_silent_is_probed_once_a_second_while_media_goes_out(two_relays):  # noqa: F811
    service, relays = two_relays
    sent: list = []
    send = service.mux.send
    service.mux.send = lambda data, addr: (sent.append((time.monotonic(), bytes(data), addr)), send(data, addr))[1]
    async with aiohttp.ClientSession() as http:
        caller = await call(service, http)
        selected = sends_to(service, caller)
        live = time.monotonic()
        await asyncio.sleep(1.5)   # a window of a live path: media and at most one consent check go there
        relays["a"].kill()         # the client's packets stop arriving; the echo keeps sending
        killed = time.monotonic()
        await asyncio.sleep(3.2)   # a window of a silent path: the probes are counted in it
        alive = requests_to(sent, selected, live, killed)
        silent = requests_to(sent, selected, killed, killed + 3.2)
        await caller.hangup(http)
    # aioice's own consent checks come 4-6 s apart, so at most one falls in either window
    assert len(alive) <= 1, alive
    assert 3 <= len(silent) <= 4, silent                            # a probe a second after 0.5 s of silence
    assert len([t for t in silent if t < 0.45]) <= 1, silent         # none before the silence counts
