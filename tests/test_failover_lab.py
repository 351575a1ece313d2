"""One answer, two relays, through XDP (issue 12, sections 2 and 3a): the transceiver names both
relays (IPv4 and IPv6), registers the session with both agents, the call runs through the
preferred relay 1, and when relay 1 dies the client's switch to relay 2's candidate keeps it."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import pytest

from splitrelay.client.ice_failover import nominate_like_a_browser, switch_to
from splitrelay.client.ice_restart import ice_connection
from splitrelay.edge.xdp.maps import XdpMaps
from splitrelay.lab.netns import in_netns
from splitrelay.lab.stack import control, instance, start_lab, stop_lab
from splitrelay.lab.topology import Lab
from splitrelay.wire import hint

from .conftest import needs_root
from .test_failover import echo_back
from .test_transceiver import Caller, until

pytestmark = [needs_root, pytest.mark.lab]


@pytest.fixture(scope="module")
def two_relay_lab():
    info = start_lab(transceivers=1, handler="echo", relays=2)
    try:
        yield Lab.load(info["name"]), info
    finally:
        stop_lab(info["name"])


def kill_relay(lab: Lab, index: int) -> None:
    """The relay's agent killed and its XDP programs gone: nothing crosses it any more."""
    r = lab.relay(index)
    agent = lab.pids[index - 1]
    os.kill(agent, signal.SIGKILL)
    os.waitpid(agent, 0)
    lab.pids.remove(agent)
    datapath = XdpMaps(instance=instance(lab, index))
    in_netns(r.netns, lambda: datapath.destroy([r.public.ifname, r.internal.ifname]))


def test_two_relays_in_one_answer_and_a_switch_to_the_backup_keeps_the_call(two_relay_lab):
    lab, info = two_relay_lab
    r1, r2 = lab.relay(1), lab.relay(2)
    seen: dict = {}

    async def scenario() -> None:
        caller = Caller(info["whip_url"], 700.0, family=4, token=info["whip_token"])
        async with aiohttp.ClientSession() as http:
            await caller.call(http)
            await until(caller.heard_own, "the first echo", 30)
            seen["candidates"] = list(dict.fromkeys(line.split()[4] for line in caller.answer.splitlines()
                                                    if line.startswith("a=candidate:")))  # once per m-line
            seen["registered"] = [caller.ufrag in {s["ufrag"] for s in control(lab, lambda c: c.sessions(),
                                                                                relay=k)} for k in (1, 2)]
            seen["ufrag"] = caller.ufrag
            connection = ice_connection(caller.pc)
            nominate_like_a_browser(connection)
            seen["first"] = connection._nominated[1].remote_addr  # noqa: SLF001
            kill_relay(lab, 1)
            killed = time.monotonic()
            # a browser's switch after ~5 s, from its address on relay 2's network
            await switch_to(connection, (r2.public.ip4, lab.relay_port), local_host=r2.client.ip4)
            switched = time.monotonic()
            seen["switch_ms"] = 1000 * (switched - killed)
            seen["audio_back_ms"] = 1000 * await echo_back(caller, "the echo through relay 2", 30)
            seen["relay2_flows"] = control(lab, lambda c: c.flows(), relay=2)
            await caller.hangup(http)

    in_netns(lab.client.netns, lambda: asyncio.run(scenario()), timeout=240)
    print(f"\n3a through XDP: client switched {seen['switch_ms']:.0f} ms after relay 1 died, audio back "
          f"{seen['audio_back_ms']:.0f} ms after the switch")
    assert seen["candidates"] == [r1.public.ip4, r1.public.ip6, r2.public.ip4, r2.public.ip6]
    ufrag = seen["ufrag"]
    assert seen["registered"] == [True, True]                                          # both relays know it
    assert hint.decode(ufrag) == lab.transceivers[0].backend_id
    assert seen["first"] == (r1.public.ip4, lab.relay_port)                          # the preferred relay
    assert any(f["ufrag"] == ufrag and f["rx_packets"] > 0 for f in seen["relay2_flows"])
