"""`lab up --relays N`: several relays in front of the same transceivers, one of them optionally far.

The topology (namespaces, addresses, routes) is checked without daemons; then one
lab with an agent per relay carries a hinted packet through the second relay's
XDP to a backend and the backend's answer back out through that same relay.
"""

from __future__ import annotations

import socket
import struct
import time
from ipaddress import ip_address, ip_network

import pytest
from pyroute2 import IPRoute
from splitrelay.lab.impair import Impairment
from splitrelay.lab.netns import LabError, in_netns
from splitrelay.lab.stack import BACKEND_PORT, control, probe, probe_result, start_lab, stop_lab
from splitrelay.lab.topology import Lab
from splitrelay.wire import hint, stun

from .conftest import needs_root, relay_ufrags
from .waiting import wait_for

pytestmark = [needs_root, pytest.mark.lab, pytest.mark.timeout(240)]

WAIT = 3.0


def route(netns: str, dst: str) -> tuple[str | None, str]:
    def get() -> tuple[str | None, str]:
        with IPRoute() as ipr:
            [r] = ipr.route("get", dst=dst)
            return r.get_attr("RTA_GATEWAY"), ipr.get_links(r.get_attr("RTA_OIF"))[0].get_attr("IFLA_IFNAME")
    return in_netns(netns, get)


def udp_hello(lab: Lab, src_netns: str, src: str, dst_netns: str, dst: str, port: int = 9500) -> str:
    """One datagram src -> dst; the source address the receiver saw."""
    family = socket.AF_INET6 if ip_address(dst).version == 6 else socket.AF_INET
    server = lab.socket_in(dst_netns, family)
    client = lab.socket_in(src_netns, family)
    try:
        server.bind((dst, port))
        server.settimeout(WAIT)
        client.bind((src, 0))
        client.sendto(b"hello", (dst, port))
        _, peer = server.recvfrom(64)
        return peer[0]
    finally:
        server.close()
        client.close()


def test_each_relay_has_its_own_namespace_public_network_and_address_in_front_of_the_same_transceivers(lab):
    net = lab(transceivers=2, relays=3)
    relays = net.relays
    assert [r.index for r in relays] == [1, 2, 3]
    assert len({r.netns for r in relays}) == 3 and relays[0].netns == net.relay_public.netns
    publics = [ip_network(net.public_network(r.index)[0]) for r in relays]
    assert len(set(publics)) == 3
    internal = ip_network(net.networks["internal"][0])
    for r, public in zip(relays, publics, strict=True):
        assert ip_address(r.public.ip4) in public and ip_address(r.client.ip4) in public
        assert ip_address(r.internal.ip4) in internal
        # the client reaches every relay on its own link to it, with its address on that network
        assert udp_hello(net, net.client.netns, r.client.ip4, r.netns, r.public.ip4) == r.client.ip4
        assert udp_hello(net, net.client.netns, r.client.ip6, r.netns, r.public.ip6) == r.client.ip6
        assert route(net.client.netns, r.public.ip4) == (None, r.client.ifname)
        for t in net.transceivers:
            # replies to a client on relay r's network go back through relay r
            assert route(t.netns, r.client.ip4) == (r.internal.ip4, t.ifname)
            assert route(t.netns, r.client.ip6) == (r.internal.ip6, t.ifname)
            assert udp_hello(net, r.netns, r.internal.ip4, t.netns, t.ip4) == r.internal.ip4
        assert in_netns(r.netns, lambda: open("/proc/sys/net/ipv4/ip_forward").read().strip()) == "0"
    assert route(net.client.netns, "192.0.2.1") == (net.relay_public.ip4, "c0")   # relay 1 is the default


def test_a_far_relay_is_slow_only_on_its_own_link(lab):
    net = lab(transceivers=1, relays=2, far=Impairment(delay_ms=40))
    assert set(net.impaired) == {"relay2"}
    far = net.relay(2)

    def one_way(r) -> float:
        server = net.socket_in(r.netns)
        client = net.socket_in(net.client.netns)
        try:
            server.bind((r.public.ip4, 9501))
            server.settimeout(WAIT)
            client.bind((r.client.ip4, 0))
            sent = time.monotonic()
            client.sendto(b"x", (r.public.ip4, 9501))
            server.recvfrom(16)
            return time.monotonic() - sent
        finally:
            server.close()
            client.close()

    assert one_way(far) >= 0.040         # relay 1's link has no forwarder at all (impaired == {"relay2"})


def test_bad_relay_counts_are_refused():
    with pytest.raises(LabError, match="relays must be 1..8, got 9"):
        Lab.create(transceivers=1, relays=9)
    with pytest.raises(LabError, match="a far relay needs at least 2 relays"):
        Lab.create(transceivers=1, far=Impairment(delay_ms=10))


@pytest.fixture(scope="module")
def two_relays():
    info = start_lab(transceivers=1, handler="echo", policy="hint", relays=2)
    try:
        yield Lab.load(info["name"]), info
    finally:
        stop_lab(info["name"])


def test_lab_json_keeps_the_single_relay_keys_and_lists_every_relay(two_relays):
    lab, info = two_relays
    assert info["relay_public"] == f"{lab.relay_public.ip4}:{lab.relay_port}"
    assert info["control_url"] == info["relays"][0]["control_url"]
    assert [r["index"] for r in info["relays"]] == [1, 2]
    assert info["relays"][1]["relay_public"] == f"{lab.relay(2).public.ip4}:{lab.relay_port}"
    assert info["relays"][1]["instance"] == f"{lab.name}-r2"
    for r in (1, 2):   # the transceiver registered itself with every relay's agent
        assert [(b["id"], b["ip"]) for b in control(lab, lambda c: c.backends(), relay=r)] == \
            [(1, lab.transceivers[0].ip4)]


def test_a_call_is_registered_with_every_relay_and_carried_by_the_preferred_first(two_relays):
    lab, info = two_relays

    def forwarded(relay: int) -> int:
        return {c["name"]: c["packets"] for c in control(lab, lambda c: c.stats(), relay=relay)["counters"]}[
            "IN_FWD_FLOW"]

    before = {r: forwarded(r) for r in (1, 2)}
    proc = probe(lab, [info["whip_url"]], duration=3)

    [flow] = wait_for(lambda: control(lab, lambda c: c.flows()), 30, "the call's flow on relay 1", proc)
    assert all(flow["ufrag"] in relay_ufrags(lab, r) for r in (1, 2))  # registered everywhere (2 is the backup)
    [report] = probe_result(proc, 60)
    assert report["ok"], report["error"]
    media = {r: forwarded(r) - before[r] for r in (1, 2)}
    assert media[1] > 100 and media[2] < media[1] / 10, media    # the media went by relay 1, preferred


def test_a_hinted_packet_crosses_the_second_relay_to_the_backend_and_the_answer_returns_through_it(two_relays):
    lab, _ = two_relays
    r2, t = lab.relay(2), lab.transceivers[0]
    backend_id, port = 7, BACKEND_PORT + 1            # a bare UDP backend beside the transceiver, on relay 2 only
    control(lab, lambda c: c.put_backend(backend_id, t.ip4, port), relay=2)
    backend = lab.socket_in(t.netns)
    backend.bind((t.ip4, port))
    backend.settimeout(WAIT)
    client = lab.socket_in(lab.client.netns)
    client.bind((r2.client.ip4, 0))
    client.settimeout(WAIT)
    before = {c["name"]: c["packets"] for c in control(lab, lambda c: c.stats(), relay=2)["counters"]}
    try:
        request = stun.build_binding_request(hint.encode(backend_id) + ":cli2")
        client.sendto(request, (r2.public.ip4, lab.relay_port))
        data, peer = backend.recvfrom(2048)
        assert data == request and peer == (r2.client.ip4, client.getsockname()[1])   # DNAT: the client's own
        backend.sendto(struct.pack("!B", 0x80) + b"answer", peer)                     # an RTP-class reply
        data, source = client.recvfrom(2048)
        assert source == (r2.public.ip4, lab.relay_port) and data.endswith(b"answer")
    finally:
        backend.close()
        client.close()
    after = {c["name"]: c["packets"] for c in control(lab, lambda c: c.stats(), relay=2)["counters"]}
    assert after["IN_FWD_STUN_HINT"] - before["IN_FWD_STUN_HINT"] == 1
    assert after["OUT_FWD"] - before["OUT_FWD"] == 1
    assert all(f["backend"] != backend_id for f in control(lab, lambda c: c.flows(), relay=1))   # relay 1: none
