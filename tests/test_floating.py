"""Scenario 3b through XDP: relay 1 dies and its public address floats to relay 2 (issue 12).

One two-relay lab (one echo transceiver, every session registered with both relays) for
the module.  The client's ICE agent sees nothing change: the same pair, the same remote
address.  Relay 2 opens the flow from the transceiver's probe of the silent path (or the
client's next consent check) and the call goes on: an aiortc caller and headless Chromium,
each judged by the same gap measure (client/browser.py ``audio_gap``).  lab/floating.py
says how the address moves.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import aiohttp
import pytest

from splitrelay.client.browser import Browser, unavailable_reason
from splitrelay.client.echo_gap import EchoCall
from splitrelay.client.ice_restart import ice_connection
from splitrelay.lab.faults import heal, relay_dies_and_its_address_floats
from splitrelay.lab.floating import floated
from splitrelay.lab.netns import nsenter_argv
from splitrelay.lab.stack import control, start_lab, stop_lab
from splitrelay.lab.topology import Lab

from .conftest import needs_root

pytestmark = [needs_root, pytest.mark.lab]

BROWSER_MISSING = unavailable_reason()


@pytest.fixture(scope="module")
def float_lab():
    info = start_lab(transceivers=1, handler="echo", relays=2)
    lab = Lab.load(info["name"])
    try:
        yield lab, info
    finally:
        heal(lab)
        stop_lab(info["name"])


def transceiver_sessions(lab: Lab, info: dict) -> list[dict]:
    """The first transceiver's sessions, from its admin listener (the WHIP one lists none)."""
    cli = lab.run(lab.client.netns, [sys.executable, "-m", "splitrelay.cli.main", "transceiver", "sessions",
                                     info["transceivers"][0]["admin_url"], "--admin-token-file",
                                     info["admin_token_file"], "--json"])
    return json.loads(cli.stdout)


def flow_of(lab: Lab, relay: int, client: str) -> dict | None:
    return next((f for f in control(lab, lambda c: c.flows(), relay) if f["client"] == client), None)


def test_an_aiortc_call_goes_on_when_relay_1_dies_and_its_address_floats_to_relay_2(float_lab):
    lab, info = float_lab
    seen: dict = {}

    async def scenario() -> None:
        caller = EchoCall(info["whip_url"], family=4, token=info["whip_token"])
        async with aiohttp.ClientSession() as http:
            await caller.call(http)
            try:
                await caller.wait_audio(seconds=1.0)
                pair = ice_connection(caller.pc)._nominated[1]  # noqa: SLF001
                seen["before"] = (pair.local_candidate.host, pair.local_candidate.port), pair.remote_addr
                seen["gap"] = await caller.measure_gap(lambda: relay_dies_and_its_address_floats(lab), timeout=30)
                await caller.wait_audio(seconds=1.0)
                pair = ice_connection(caller.pc)._nominated[1]  # noqa: SLF001
                seen["after"] = (pair.local_candidate.host, pair.local_candidate.port), pair.remote_addr
                seen["flow"] = await asyncio.to_thread(flow_of, lab, 2, f"{pair.local_candidate.host}:"
                                                                       f"{pair.local_candidate.port}")
                seen["dropped"] = caller.dropped
            finally:
                seen["status"] = await caller.hang_up(http)

    try:
        lab.in_netns(lab.client.netns, lambda: asyncio.run(scenario()), timeout=120)
    finally:
        heal(lab)
    print(f"\n3b, aiortc: relay 1 died and its address moved: echo again after {seen['gap'].gap:.2f} s")
    assert seen["before"] == seen["after"]                          # the client saw no change ...
    assert seen["after"][1] == (lab.relay(1).public.ip4, lab.relay_port)   # ... still relay 1's address
    flow = seen["flow"]
    assert flow is not None and flow["packets"] > 20 and flow["rx_packets"] > 20   # but relay 2 carried it
    assert not seen["dropped"] and seen["status"] == 200           # the same call, never dropped
    assert transceiver_sessions(lab, info) == []        # ... and ended by its own DELETE
    assert floated(lab) is None


@pytest.mark.skipif(BROWSER_MISSING is not None, reason=f"no browser: {BROWSER_MISSING}")
def test_chromium_keeps_its_call_when_relay_1_dies_and_its_address_floats_to_relay_2(float_lab):
    lab, info = float_lab
    with Browser(nsenter_argv(lab.client.netns, [])) as browser:
        call = browser.call(info["whip_url"], token=info["whip_token"])
        try:
            before = call.wait_audio(seconds=1.0)
            assert before["pair"]["remote"] == f"{lab.relay(1).public.ip4}:{lab.relay_port}"
            try:
                judged = call.measure_gap(lambda: relay_dies_and_its_address_floats(lab), timeout=30)
                after = call.wait_audio(seconds=1.0)
                flow = flow_of(lab, 2, after["pair"]["local"])
            finally:
                heal(lab)
            connection_events = [e for e in call.events(before["t"]) if e["what"] == "connection"]
        finally:
            status = call.hang_up()
    print(f"\n3b, Chromium: relay 1 died and its address moved: audio again after {judged.gap:.2f} s")
    assert after["pair"]["remote"] == before["pair"]["remote"]       # Chromium saw no change
    assert after["pair"]["local"] == before["pair"]["local"]
    assert flow is not None and flow["packets"] > 20 and flow["rx_packets"] > 20   # relay 2 carried it
    assert connection_events == [] and status == 200                 # never left "connected": not dropped


def test_the_lab_fault_command_kills_a_relay_floats_its_address_and_heals_both(float_lab):
    lab, _ = float_lab

    def cli(*args: str) -> dict:
        proc = subprocess.run([sys.executable, "-m", "splitrelay.cli.main", "lab", "fault", *args,
                               "--name", lab.name, "--json"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def port_state(relay: int) -> str:
        port = lab.relay(relay).switch_port
        [link] = json.loads(lab.run(lab.switch_netns, ["bridge", "-j", "link", "show", "dev", port]).stdout)
        return link["state"]

    assert cli("kill", "--relay", "1") == {"lab": lab.name, "killed": 1}
    assert port_state(1) == "disabled"
    moved = cli("float", "--relay", "1", "--to", "2")
    try:
        r1, r2 = lab.relay(1), lab.relay(2)
        assert moved["floated"] == {"relay": 1, "standby": 2, "public": [r1.public.ip4, r1.public.ip6],
                                    "to": [r2.public.ip4, r2.public.ip6], "gateway": True,
                                    "internal": [r1.internal.ip4, r1.internal.ip6]}
        status = subprocess.run([sys.executable, "-m", "splitrelay.cli.main", "lab", "status", "--json"],
                                capture_output=True, text=True, timeout=60, check=True)
        assert next(i for i in json.loads(status.stdout) if i["name"] == lab.name)["floated"] == moved["floated"]
        standby = lab.run(lab.relay(2).netns, ["ip", "-j", "addr", "show", "dev", "int0"]).stdout
        assert lab.relay(1).internal.ip4 in standby                  # the gateway floated along
        again = subprocess.run([sys.executable, "-m", "splitrelay.cli.main", "lab", "fault", "float", "--name",
                                lab.name], capture_output=True, text=True, timeout=60)
        assert again.returncode != 0 and again.stderr.count("\n") == 1 and "already" in again.stderr
    finally:
        healed = cli("heal")
    assert healed["returned"] == moved["floated"] and floated(lab) is None
    assert healed["revived"] == [1, 2] and port_state(1) == "forwarding"
    home = lab.run(lab.relay(1).netns, ["ip", "-j", "addr", "show", "dev", "int0"]).stdout
    assert lab.relay(1).internal.ip4 in home
    nat = lab.run(lab.client.netns, ["iptables", "-t", "nat", "-S", "OUTPUT"]).stdout
    assert "DNAT" not in nat
