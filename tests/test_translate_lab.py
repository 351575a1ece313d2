"""A real aiortc WHIP call through the translating XDP relay, where the transceiver has no route to the client.

The lab is built with ``translate``: transceivers get no route to any public network (not even
their default route points at the relay), so every reply that reaches the client went through
``xdp_internal``'s translation of (relay internal address, flow port) back to the client.
"""

from __future__ import annotations

import subprocess
import sys
from ipaddress import ip_address

import pytest

from splitrelay.edge.xdp.maps import XdpMaps
from splitrelay.lab.netns import in_netns

from splitrelay.lab.stack import control, probe, probe_result, start_lab, stop_lab
from splitrelay.lab.topology import Lab

from .conftest import needs_root
from .test_webrtc_lab import assert_clean_call
from .waiting import wait_for

pytestmark = needs_root


@pytest.fixture(scope="module")
def translate_lab():
    info = start_lab(transceivers=2, handler="echo", translate=True)
    try:
        yield Lab.load(info["name"]), info
    finally:
        stop_lab(info["name"])


def test_the_transceiver_has_no_route_back_to_the_client(translate_lab):
    lab, _ = translate_lab
    t = lab.transceivers[1]
    default = lab.run(t.netns, ["ip", "-4", "route", "show", "default"]).stdout.strip()
    assert lab.relay_internal.ip4 not in default
    for argv in (["ip", "route", "get", lab.client.ip4],
                 ["ip", "route", "get", lab.client.ip4, "from", t.ip4, "iif", "lo"],
                 ["ip", "-6", "route", "get", lab.client.ip6, "from", t.ip6, "iif", "lo"]):
        got = lab.run(t.netns, argv, check=False)
        assert got.returncode != 0, f"{' '.join(argv)}: {got.stdout}"


def test_a_voice_call_through_translation_has_audio_both_ways(translate_lab):
    lab, info = translate_lab
    before = {c["name"]: c["packets"] for c in control(lab, lambda c: c.stats())["counters"]}
    proc = probe(lab, [info["whip_urls"][1]], duration=3)
    flows = wait_for(lambda: control(lab, lambda c: c.flows()), 20, "the session's flow", proc)
    assert [f["backend"] for f in flows] == [2]
    assert flows[0]["client"].startswith(lab.client.ip4 + ":")      # the operator still sees the client
    assert flows[0]["internal_port"] > 0                               # ... and the port the transceiver saw
    [report] = probe_result(proc, 60)
    assert_clean_call(report)                                           # every echoed beep heard back
    after = {c["name"]: c["packets"] for c in control(lab, lambda c: c.stats())["counters"]}
    assert after["IN_FWD_FLOW"] - before["IN_FWD_FLOW"] > 100
    assert after["OUT_FWD"] - before["OUT_FWD"] > 100                  # replies translated back
    assert control(lab, lambda c: c.flows()) == []                      # DELETE ended it: port quarantined


@pytest.fixture(scope="module")
def translate2_lab():
    info = start_lab(transceivers=2, handler="echo", translate=True, translate_addrs=2)
    try:
        yield Lab.load(info["name"]), info
    finally:
        stop_lab(info["name"])


def test_calls_over_two_internal_addresses_use_both_and_have_audio_both_ways(translate2_lab):
    """The relay translates with two internal addresses per family: consecutive flows take pairs on
    alternate addresses, and each transceiver answers whichever address its peer came from."""
    lab, info = translate2_lab
    proc = probe(lab, info["whip_urls"], duration=3, sessions=2)   # a call to each transceiver, at once
    seen: set[int] = set()

    def both_addresses():   # the calls' flows, as the agent lists them while they last
        seen.update(f["internal_set"] for f in control(lab, lambda c: c.flows()))
        return seen == {0, 1}

    wait_for(both_addresses, 30, "flows on both internal addresses", proc)
    reports = probe_result(proc, 60)
    assert len(reports) == 2
    for report in reports:
        assert_clean_call(report)                                       # every echoed beep heard back
    stats = {c["name"]: c["packets"] for c in control(lab, lambda c: c.stats())["counters"]}
    assert stats.get("OUT_DROP_UNALLOCATED_PORT", 0) == 0 and stats.get("OUT_DROP_NOT_FLOW_BACKEND", 0) == 0


UNPAIRED = ["--translate", "--internal-ip", "10.9.0.1", "--internal-ip", "10.9.0.2", "--internal-ip", "fd00:9::1"]
UNPAIRED_MESSAGE = ("internal addresses pair up by position: give as many IPv4 as IPv6 (or none of one family), "
                    "got 2 IPv4 and 1 IPv6")


@pytest.mark.parametrize("command, args, message", [
    ("serve", UNPAIRED, UNPAIRED_MESSAGE),
    ("attach", UNPAIRED, UNPAIRED_MESSAGE),
    ("serve", ["--plane", "userspace", "--internal-ip", "10.9.0.1", "--internal-ip", "10.9.0.2"],
     "--internal-ip: the userspace relay takes one address per family"),
    ("serve", ["--internal-ip", "10.9.0.1"],
     "--internal-ip is for --plane userspace or --translate (XDP forwards with the client's address)"),
    ("attach", ["--internal-ip", "10.9.0.1"],
     "--internal-ip is for --translate (XDP forwards with the client's address)"),
    ("attach", ["--translate", "--internal-ip", "10.9.0.300"], "'10.9.0.300' does not appear to be an IPv4 or "
                                                               "IPv6 address"),
], ids=["serve-unpaired", "attach-unpaired", "serve-userspace", "serve-no-translate", "attach-no-translate",
        "attach-not-an-address"])
def test_edge_serve_and_attach_refuse_internal_addresses_they_cannot_use_in_one_line(command, args, message):
    proc = subprocess.run([sys.executable, "-m", "splitrelay.cli.main", "edge", command, "nosuch0", "--internal",
                           "nosuch1", "--public-ip", "192.0.2.200", "--gateway-mac", "02:00:00:00:00:01", *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == f"splitrelay: error: {message}"


def test_edge_attach_translates_over_every_internal_address_it_is_given(lab):
    created = lab(transceivers=1)
    pub, internal = created.relay_public, created.relay_internal
    second = str(ip_address(internal.ip4) + 100)
    created.run(internal.netns, ["ip", "addr", "add", f"{second}/32", "dev", internal.ifname])
    cli = [sys.executable, "-m", "splitrelay.cli.main", "edge"]
    try:
        proc = created.run(pub.netns, cli + [
            "attach", pub.ifname, "--internal", internal.ifname, "--public-ip", pub.ip4,
            "--gateway-mac", created.client.mac, "--instance", created.name, "--translate",
            "--internal-ip", internal.ip4, "--internal-ip", second], check=False, timeout=300)
        assert proc.returncode == 0, proc.stderr
        config = in_netns(pub.netns, lambda: XdpMaps(instance=created.name).config())
        assert config.translate and config.internal_sets() == [(internal.ip4, None), (second, None)]
    finally:
        created.run(pub.netns, cli + ["detach", pub.ifname, internal.ifname, "--instance", created.name],
                    check=False)
