"""Reaching a lab from the host: reserved addresses, `--lab NAME`, and no lab traffic out of eth0.

The lab's addresses are routed nowhere on the host; a command given one of them
without --lab is refused (exit 2) rather than sending it by the default route.
"""

from __future__ import annotations

import json
import subprocess
import sys
from ipaddress import ip_address, ip_network

import pytest
from splitrelay.lab.addresses import AddressPlan, choose, host_prefixes
from splitrelay.lab.netns import LabError
from splitrelay.lab.stack import control_token, start_lab, stop_lab
from splitrelay.lab.topology import Lab

from .conftest import needs_root

BENCHMARKING = ip_network("198.18.0.0/15")
ULA = ip_network("fc00::/7")


def test_a_plan_takes_the_first_benchmarking_range_and_a_random_ula_48():
    plan = choose(in_use=[])
    assert plan.v4 == "198.18.0.0/16"
    v6 = ip_network(plan.v6)
    assert v6.prefixlen == 48 and v6.subnet_of(ULA)
    assert len({choose(in_use=[]).v6 for _ in range(4)}) > 1     # 40 random bits per lab


def test_a_plan_avoids_a_range_the_host_uses_and_says_when_none_is_left():
    assert choose(in_use=[ip_network("198.18.7.0/24")]).v4 == "198.19.0.0/16"
    with pytest.raises(LabError) as exc:
        choose(in_use=[ip_network("198.18.0.0/15")])
    assert str(exc.value) == ("this host already uses both of 198.18.0.0/16, 198.19.0.0/16: "
                              "no room for a lab")


def test_every_relay_gets_public_networks_of_its_own_and_no_two_networks_overlap():
    plan = AddressPlan("198.18.0.0/16", "fd12:3456:789a::/48")
    nets = plan.networks(relays=8)
    assert nets["public"] == ["198.18.0.0/24", "fd12:3456:789a::/64"]
    assert nets["public2"] == ["198.18.16.0/24", "fd12:3456:789a:10::/64"]
    flat = [ip_network(n) for pair in nets.values() for n in pair]
    assert not any(a.overlaps(b) for i, a in enumerate(flat) for b in flat[i + 1:])
    assert plan.host("internal", 11) == ("198.18.1.11", "fd12:3456:789a:1::b")
    with pytest.raises(LabError, match="relays are numbered 1..8, got 9"):
        plan.network("public", 9)


@needs_root
@pytest.mark.lab
def test_a_built_lab_uses_only_reserved_addresses_the_host_does_not_use(lab):
    net = lab(transceivers=2)
    hosts = [net.client, net.relay_public, net.relay_internal, net.signal_host, *net.transceivers]
    v4 = [ip_address(h.ip4) for h in hosts] + [ip_address(t.signal_ip4) for t in net.transceivers]
    v6 = [ip_address(h.ip6) for h in hosts] + [ip_address(t.signal_ip6) for t in net.transceivers]
    assert all(a in BENCHMARKING for a in v4) and all(a in ULA for a in v6)
    used = host_prefixes()   # this test runs in the host's namespace
    lab_nets = [ip_network(n) for pair in net.networks.values() for n in pair]
    assert not any(n.overlaps(u) for n in lab_nets for u in used if u.version == n.version)


def cli(*args: str, netns: str | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "splitrelay.cli.main", *args]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def reach_lab():
    info = start_lab(transceivers=1, handler="echo")
    try:
        yield Lab.load(info["name"]), info
    finally:
        stop_lab(info["name"])


@needs_root
@pytest.mark.lab
def test_a_lab_address_from_the_host_without_lab_is_refused_in_one_line(reach_lab):
    lab, info = reach_lab
    host = lab.relay_internal.ip6            # unique to this lab (its own ULA /48); IPv4 plans are shared
    proc = cli("stats", "--control", f"http://[{host}]:8470")
    assert proc.returncode == 2
    assert proc.stderr == (f"splitrelay: error: {host} is an address of lab {lab.name}, which this host "
                           f"does not route: add --lab {lab.name}\n")
    proc = cli("stats", "--control", info["control_url"])   # other labs may hold the same IPv4 address
    assert proc.returncode == 2 and lab.name in proc.stderr and proc.stderr.count("\n") == 1
    proc = cli("transceiver", "sessions", info["transceivers"][0]["admin_url"])
    assert proc.returncode == 2 and lab.name in proc.stderr and "add --lab" in proc.stderr
    proc = cli("transceiver", "serve", "--backend-id", "9", "--relay-control", info["control_url"])
    assert proc.returncode == 2 and proc.stderr.endswith("run this inside the lab's namespace\n")


@needs_root
@pytest.mark.lab
def test_lab_name_reaches_the_agent_and_the_transceiver_from_the_host(reach_lab):
    lab, info = reach_lab
    proc = cli("backends", "list", "--json", "--lab", lab.name)
    assert proc.returncode == 0, proc.stderr
    assert [(b["id"], b["ip"]) for b in json.loads(proc.stdout)] == [(1, lab.transceivers[0].ip4)]
    proc = cli("stats", "--json", "--lab", lab.name)
    assert proc.returncode == 0 and "counters" in json.loads(proc.stdout)
    proc = cli("transceiver", "sessions", "--json", "--lab", lab.name)
    assert proc.returncode == 0 and json.loads(proc.stdout) == []
    # inside the lab, the plain URL works as before
    proc = cli("sessions", "list", "--json", "--control", info["control_url"], "--token", control_token(lab),
               netns=lab.relay_public.netns)
    assert proc.returncode == 0, proc.stderr
    # no call yet: only the transceiver's ready ufrags (ufrag_pool.py), which carry no flow
    assert {(s["backend"], s["flows"]) for s in json.loads(proc.stdout)} <= {(1, 0)}


@needs_root
def test_an_unknown_lab_is_one_line_and_exit_1():
    proc = cli("stats", "--lab", "nosuchlab")
    assert (proc.returncode, proc.stderr) == (1, "splitrelay: error: no lab named 'nosuchlab' is up\n")
