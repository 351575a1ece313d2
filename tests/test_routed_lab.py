"""Transceivers one router hop from the relays (issue 12 §1): `lab up --routed --translate`.

The lab puts the transceivers in a network of their own behind a router namespace
(lab/router.py); they route the relays' internal network via the router and nothing
else.  Real aiortc WHIP calls (echo) cross each relay's translating XDP plane, whose
next hop to a transceiver is the router's MAC (edge/neighbours.py resolve_next_hop),
and every reply reaches the client only through that relay's translation.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from ipaddress import ip_address, ip_network

import pytest
from splitrelay.lab.netns import LabError, list_namespaces
from splitrelay.lab.router import ROUTED_NEEDS_TRANSLATE
from splitrelay.lab.stack import control, lab_info, probe, probe_result, start_lab, start_transceiver, stop_lab
from splitrelay.lab.topology import Lab

from .conftest import needs_root
from .test_webrtc_lab import assert_clean_call
from .waiting import wait_for

pytestmark = [needs_root, pytest.mark.timeout(400)]


def test_routed_without_translate_is_refused_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "splitrelay.cli.main", "lab", "up", "--routed"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == f"splitrelay: error: {ROUTED_NEEDS_TRANSLATE}\n"
    with pytest.raises(LabError, match=f"^{ROUTED_NEEDS_TRANSLATE}$"):
        Lab.create(transceivers=1, routed=True)


def echo_once(lab: Lab, src_netns: str, src: str, dst_netns: str, dst: str, port: int = 9600) -> tuple[str, str]:
    """One datagram src -> dst and its answer back: (source the receiver saw, source the sender got back)."""
    family = socket.AF_INET6 if ip_address(dst).version == 6 else socket.AF_INET
    server, client = lab.socket_in(dst_netns, family), lab.socket_in(src_netns, family)
    try:
        server.bind((dst, port))
        client.bind((src, 0))
        server.settimeout(3.0)
        client.settimeout(3.0)
        client.sendto(b"hello", (dst, port))
        _, peer = server.recvfrom(64)
        server.sendto(b"back", peer)
        _, back = client.recvfrom(64)
        return peer[0], back[0]
    finally:
        server.close()
        client.close()


def test_a_routed_lab_is_built_and_torn_down_with_its_router(lab):
    net = lab(transceivers=2, relays=2, translate=True, routed=True)
    rtr = net.router
    assert rtr.netns in net.namespaces() and rtr.netns in list_namespaces()
    assert Lab.load(net.name).router == rtr                              # the state file knows it
    nets = [ip_network(p) for pair in net.networks.values() for p in pair]
    assert all(not a.overlaps(b) for i, a in enumerate(nets) for b in nets[i + 1:]), net.networks
    for r in net.relays:            # both families, each relay's internal address <-> each transceiver
        for t in net.transceivers:
            for src, dst in ((r.internal.ip4, t.ip4), (r.internal.ip6, t.ip6)):
                assert echo_once(net, r.netns, src, t.netns, dst) == (src, dst)
    assert int(net.run(rtr.netns, ["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout) == 1
    net.destroy()
    assert not [ns for ns in list_namespaces() if ns.startswith(net.prefix + "-")]


def router_tx(lab: Lab) -> dict[str, int]:
    """Packets the router sent out of each of its sides so far."""
    links = json.loads(lab.run(lab.router.netns, ["ip", "-s", "-j", "link", "show"]).stdout)
    return {link["ifname"]: link["stats64"]["tx"]["packets"] for link in links}


@pytest.fixture(scope="module")
def routed_lab():
    """Two relays, two echo transceivers behind the router: t1 offers relay 1 only, t2 relay 2 only."""
    info = start_lab(transceivers=2, handler=None, translate=True, routed=True, relays=2)
    try:
        lab = Lab.load(info["name"])
        for t in lab.transceivers:
            start_transceiver(lab, t, "echo", relays=[t.index])
        yield lab, info
    finally:
        stop_lab(info["name"])


def test_the_transceivers_sit_behind_the_router_and_route_only_the_relays_internal_network(routed_lab):
    lab, info = routed_lab
    router, tnets = info["router"], info["transceivers_network"]
    assert router == lab.router.info() and router["netns"] == f"{lab.prefix}-rtr"
    assert tnets == lab.networks["transceivers"] == lab_info(lab)["transceivers_network"]
    internal = lab.networks["internal"]
    for family, net, via_internal, via_transceivers in ((4, 0, router["internal"][0], router["transceivers"][0]),
                                                        (6, 1, router["internal"][1], router["transceivers"][1])):
        assert ip_address(via_internal) in ip_network(internal[net])
        assert ip_address(via_transceivers) in ip_network(tnets[net])
        for r in lab.relays:    # each relay: the transceivers' network via the router
            routes = lab.run(r.netns, ["ip", f"-{family}", "route", "show", tnets[net]]).stdout
            assert f"via {via_internal} dev {r.internal.ifname}" in routes, routes
        for t in lab.transceivers:
            assert ip_address((t.ip4, t.ip6)[net]) in ip_network(tnets[net])
            routes = lab.run(t.netns, ["ip", f"-{family}", "route", "show"]).stdout.splitlines()
            gateways = [line for line in routes if " via " in line]
            assert len(gateways) == 1, routes
            assert gateways[0].startswith(f"{internal[net]} via {via_transceivers} dev {t.ifname} "), routes
            assert not any(line.startswith("default") for line in routes), routes


def test_a_transceiver_behind_the_router_has_no_route_to_the_client(routed_lab):
    lab, _ = routed_lab
    for t in lab.transceivers:
        for argv in (["ip", "route", "get", lab.client.ip4],
                     ["ip", "route", "get", lab.client.ip4, "from", t.ip4, "iif", "lo"],
                     ["ip", "-6", "route", "get", lab.client.ip6],
                     ["ip", "-6", "route", "get", lab.client.ip6, "from", t.ip6, "iif", "lo"]):
            got = lab.run(t.netns, argv, check=False)
            assert got.returncode != 0, f"{' '.join(argv)}: {got.stdout}"


@pytest.mark.parametrize("relay", [1, 2])
def test_a_call_through_each_translating_relay_reaches_a_transceiver_one_router_hop_away(routed_lab, relay):
    lab, info = routed_lab
    [backend] = [b for b in control(lab, lambda c: c.backends(), relay) if b["id"] == relay]
    assert backend["mac"].lower() == lab.router.internal.mac.lower()                 # the next hop is the router
    before = {c["name"]: c["packets"] for c in control(lab, lambda c: c.stats(), relay)["counters"]}
    forwarded = router_tx(lab)
    proc = probe(lab, [info["whip_urls"][relay - 1]], duration=3)
    flows = wait_for(lambda: control(lab, lambda c: c.flows(), relay), 30, f"the session's flow on relay {relay}",
                     proc)
    assert [f["backend"] for f in flows] == [relay]
    # the operator still sees the client (aiortc may send from any of its addresses: weak host model)
    assert flows[0]["client"].rsplit(":", 1)[0] in {c.client.ip4 for c in lab.relays}
    [report] = probe_result(proc, 90)
    assert_clean_call(report)                                           # every echoed beep heard back
    after = {c["name"]: c["packets"] for c in control(lab, lambda c: c.stats(), relay)["counters"]}
    assert after["IN_FWD_FLOW"] - before["IN_FWD_FLOW"] > 100           # client -> transceiver in XDP
    assert after["OUT_FWD"] - before["OUT_FWD"] > 100                   # replies translated back in XDP
    now = router_tx(lab)
    assert now["tr0"] - forwarded["tr0"] > 100 and now["int0"] - forwarded["int0"] > 100   # one hop, both ways
