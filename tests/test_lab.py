"""The network lab itself: topology, isolation of the media path, neighbours, teardown, overlap.

No XDP here: these tests pin down what the lab guarantees before any program is
attached (in particular that nothing crosses the relay in its kernel).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pyroute2 import IPRoute
from splitrelay.edge import neighbours
from splitrelay.lab import topology
from splitrelay.lab.build import build
from splitrelay.lab.topology import STATE_DIR, Lab, destroy
from splitrelay.lab.netns import LabError, in_netns, in_netns_async, list_namespaces, netns_socket
from splitrelay.edge.neighbours import NeighbourError

from .conftest import TEST_STEM, needs_root
from .waiting import wait_for

pytestmark = [needs_root, pytest.mark.lab, pytest.mark.timeout(120)]

WAIT = 3.0  # seconds any single packet may take to arrive in a lab (they take microseconds)


def links(netns: str) -> dict[str, dict]:
    def get() -> dict[str, dict]:
        with IPRoute() as ipr:
            return {link.get_attr("IFLA_IFNAME"): {"mac": link.get_attr("IFLA_ADDRESS"),
                                                   "kind": link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")}
                    for link in ipr.get_links()}
    return in_netns(netns, get)


def features(lab: Lab, netns: str, dev: str) -> dict[str, str]:
    out = lab.run(netns, ["ethtool", "-k", dev]).stdout
    pairs = (line.split(":", 1) for line in out.splitlines()[1:] if ":" in line)
    return {k.strip(): v.split()[0] for k, v in pairs}


def udp(netns: str, family: int, bind: tuple | None = None) -> socket.socket:
    sock = netns_socket(netns, family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if bind:
        sock.bind(bind)
    sock.settimeout(WAIT)
    return sock


def queued(sock: socket.socket) -> list[bytes]:
    """Datagrams already waiting on ``sock`` (no waiting)."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(2048))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(WAIT)


def snmp(netns: str, proto: str, field: str) -> int:
    """A counter of the namespace's IP stack (/proc/thread-self/net/snmp or snmp6)."""
    def read() -> int:
        if proto == "Ip6":
            for line in Path("/proc/thread-self/net/snmp6").read_text().splitlines():
                name, value = line.split()
                if name == f"Ip6{field}":
                    return int(value)
            raise KeyError(field)
        lines = [line.split() for line in Path("/proc/thread-self/net/snmp").read_text().splitlines()
                 if line.startswith(proto + ":")]
        return int(dict(zip(lines[0][1:], lines[1][1:], strict=True))[field])
    return in_netns(netns, read)


def tcp_exchange(server_ns: str, server_addr: tuple, client_ns: str) -> tuple[bytes, str]:
    """Connect from client_ns to a listener in server_ns; return (what the server got, peer address)."""
    family = socket.AF_INET6 if ":" in server_addr[0] else socket.AF_INET
    listener = netns_socket(server_ns, family, socket.SOCK_STREAM)
    with listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(server_addr)
        listener.listen(1)
        listener.settimeout(WAIT)
        with netns_socket(client_ns, family, socket.SOCK_STREAM) as client:
            client.settimeout(WAIT)
            client.connect(server_addr)
            client.sendall(b"hello")
            conn, peer = listener.accept()
            with conn:
                conn.settimeout(WAIT)
                return conn.recv(100), peer[0]


# -- topology --------------------------------------------------------------------------------

def test_topology_builds_as_documented(lab):
    started = time.monotonic()
    net = lab(transceivers=3)
    built_in = time.monotonic() - started
    assert built_in < 20, f"building took {built_in:.1f} s"

    assert net.prefix.startswith(TEST_STEM) and len(net.prefix) == len(TEST_STEM) + 6
    assert set(net.namespaces()) <= set(list_namespaces())
    assert all(len(ns) <= 15 for ns in net.namespaces())
    rly, cli, sw = net.relay_public.netns, net.client.netns, net.switch_netns
    assert net.relay_internal.netns == rly
    # the relay has exactly one public and one internal interface, both veths
    relay_links = links(rly)
    assert set(relay_links) == {"lo", "pub0", "int0"}
    assert relay_links["pub0"]["kind"] == relay_links["int0"]["kind"] == "veth"
    assert relay_links["pub0"]["mac"] == net.relay_public.mac
    assert relay_links["int0"]["mac"] == net.relay_internal.mac
    client_links = links(cli)
    assert set(client_links) == {"lo", "c0", "s0"} and client_links["c0"]["mac"] == net.client.mac
    switch_links = links(sw)
    assert switch_links["br0"]["kind"] == switch_links["sig"]["kind"] == "bridge"
    assert {"rint", "scli"} <= set(switch_links)
    for t in net.transceivers:
        t_links = links(t.netns)
        assert set(t_links) == {"lo", t.ifname, t.signal_ifname}
        assert t_links[t.ifname]["mac"] == t.mac and t_links[t.signal_ifname]["mac"] == t.signal_mac
        assert {f"t{t.index}m", f"t{t.index}s"} <= set(switch_links)
    assert len({t.ip4 for t in net.transceivers}) == len({t.ip6 for t in net.transceivers}) == 3
    assert [t.backend_id for t in net.transceivers] == [1, 2, 3]

    # offloads: no partial checksums from any lab veth; GRO where XDP redirects frames into a veth
    for ns, dev in net.veths():
        assert len(dev) <= 15
        feats = features(net, ns, dev)
        assert feats["tx-checksumming"] == "off", (ns, dev)
    assert features(net, cli, "c0")["generic-receive-offload"] == "on"
    assert features(net, sw, "rint")["generic-receive-offload"] == "on"

    # routes: the client sends everything to the relay; transceivers reach the client via the relay
    def route(ns: str, dst: str) -> tuple[str | None, str]:
        def get():
            with IPRoute() as ipr:
                r = ipr.route("get", dst=dst)[0]
                return r.get_attr("RTA_GATEWAY"), ipr.get_links(r.get_attr("RTA_OIF"))[0].get_attr("IFLA_IFNAME")
        return in_netns(ns, get)

    assert route(cli, "192.0.2.1") == (net.relay_public.ip4, "c0")
    assert route(cli, "2001:db8::1") == (net.relay_public.ip6, "c0")
    assert route(cli, net.transceivers[0].ip4) == (net.relay_public.ip4, "c0")
    for t in net.transceivers:
        assert route(t.netns, net.client.ip4) == (net.relay_internal.ip4, t.ifname)
        assert route(t.netns, net.client.ip6) == (net.relay_internal.ip6, t.ifname)

    # state: recorded before use, loadable from another process, JSON round trip
    data = json.loads((STATE_DIR / f"{net.name}.json").read_text())
    assert data == json.loads(json.dumps(net.to_json()))
    assert Lab.load(net.name) == net == Lab.from_json(data)
    assert net.name in Lab.names()
    assert set(data) >= {"name", "prefix", "client", "client_signal", "relay_public", "relay_internal",
                         "switch_netns", "transceivers", "pids", "relay_port", "networks"}


def test_relay_forwards_nothing_in_its_kernel(lab):
    net = lab(transceivers=1)
    rly = net.relay_public.netns
    assert net.run(rly, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "0"
    for conf in ("all", "default", "pub0", "int0"):
        assert net.run(rly, ["sysctl", "-n", f"net.ipv6.conf.{conf}.forwarding"]).stdout.strip() == "0"
    assert in_netns(rly, lambda: Path("/proc/sys/net/ipv4/conf/all/forwarding").read_text().strip()) == "0"


def test_signaling_and_control_paths(lab):
    net = lab(transceivers=2)
    for t in net.transceivers:
        # client -> transceiver signaling (WHIP would be HTTP here), v4 and v6, from the client's s0
        got, peer = tcp_exchange(t.netns, (t.signal_ip4, 8080), net.client.netns)
        assert (got, peer) == (b"hello", net.client_signal.ip4)
        got, peer = tcp_exchange(t.netns, (t.signal_ip6, 8080), net.client.netns)
        assert (got, peer) == (b"hello", net.client_signal.ip6)
        # transceiver -> edge agent control port on the relay's internal address
        got, peer = tcp_exchange(net.relay_internal.netns, (net.relay_internal.ip4, 8470), t.netns)
        assert (got, peer) == (b"hello", t.ip4)

    # the control API is not reachable from the public side
    listener = netns_socket(net.relay_public.netns, socket.AF_INET, socket.SOCK_STREAM)
    with listener, netns_socket(net.client.netns, socket.AF_INET, socket.SOCK_STREAM) as client:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((net.relay_internal.ip4, 8470))
        listener.listen(1)
        client.settimeout(1.0)  # the relay drops silently (it forwards nothing, so sends no ICMP): bounded
        with pytest.raises(TimeoutError):
            client.connect((net.relay_internal.ip4, 8470))
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_no_xdp_means_no_packet_reaches_a_transceiver(lab):
    """Without XDP the relay's kernel delivers client packets to itself or drops them: never onwards."""
    net = lab(transceivers=1)
    t, rly, cli = net.transceivers[0], net.relay_public.netns, net.client.netns
    relay_port = net.relay_port
    inbox = {
        (fam, port): udp(t.netns, fam, ("::" if fam == socket.AF_INET6 else "0.0.0.0", port))
        for fam in (socket.AF_INET, socket.AF_INET6) for port in (relay_port, 5000)
    }
    try:
        # positive control: the transceiver's sockets do receive what the relay itself sends them
        for fam, dst in ((socket.AF_INET, t.ip4), (socket.AF_INET6, t.ip6)):
            with udp(rly, fam) as s:
                s.sendto(b"control", (dst, 5000))
            assert inbox[(fam, 5000)].recvfrom(100)[0] == b"control"

        # 1. to the relay's public port: the relay consumes it (ICMP port unreachable comes back)
        for fam, relay in ((socket.AF_INET, net.relay_public.ip4), (socket.AF_INET6, net.relay_public.ip6)):
            with udp(cli, fam) as s:
                s.connect((relay, relay_port))
                s.send(b"\x00\x01" + b"x" * 18)
                with pytest.raises(ConnectionRefusedError):
                    s.recv(100)

        # 2. straight to the transceiver's addresses: routed to the relay, which must drop them
        count = 5
        before4, before6 = snmp(rly, "Ip", "InAddrErrors"), snmp(rly, "Ip6", "InAddrErrors")
        fwd4, fwd6 = snmp(rly, "Ip", "ForwDatagrams"), snmp(rly, "Ip6", "OutForwDatagrams")
        for fam, dst in ((socket.AF_INET, t.ip4), (socket.AF_INET6, t.ip6)):
            with udp(cli, fam) as s:
                for port in (5000, relay_port):
                    for i in range(count):
                        s.sendto(b"leak %d" % i, (dst, port))
        wait_for(lambda: snmp(rly, "Ip", "InAddrErrors") - before4 >= 2 * count, WAIT,
                 "the relay to drop the IPv4 datagrams")
        wait_for(lambda: snmp(rly, "Ip6", "InAddrErrors") - before6 >= 2 * count, WAIT,
                 "the relay to drop the IPv6 datagrams")
        assert snmp(rly, "Ip", "ForwDatagrams") == fwd4 and snmp(rly, "Ip6", "OutForwDatagrams") == fwd6

        # barrier: the same path later carries a datagram that does arrive; nothing came before it
        for fam, dst in ((socket.AF_INET, t.ip4), (socket.AF_INET6, t.ip6)):
            with udp(rly, fam) as s:
                s.sendto(b"barrier", (dst, 5000))
            assert inbox[(fam, 5000)].recvfrom(100)[0] == b"barrier"
        assert {key: queued(sock) for key, sock in inbox.items()} == {key: [] for key in inbox}
    finally:
        for sock in inbox.values():
            sock.close()


# -- neighbours ------------------------------------------------------------------------------

def test_neighbour_resolution(lab):
    net = lab(transceivers=2)
    rly = net.relay_public.netns

    def entries() -> set[str]:
        with IPRoute() as ipr:
            return {n.get_attr("NDA_DST") for n in ipr.get_neighbours()}

    assert net.transceivers[0].ip4 not in in_netns(rly, entries)  # resolution must be triggered
    def in_relay(fn, *args, **kwargs):  # noqa: ANN001, ANN202 - the agent runs inside the relay's namespace
        return in_netns(rly, lambda: fn(*args, **kwargs))

    for t in net.transceivers:
        assert in_relay(neighbours.resolve, t.ip4, "int0") == t.mac
        assert in_relay(neighbours.resolve, t.ip6, "int0") == t.mac
    assert in_relay(neighbours.resolve, net.client.ip4, "pub0") == net.client.mac
    assert in_relay(neighbours.resolve, net.client.ip6) == net.client.mac          # interface from the route
    client_ns = net.client.netns
    assert in_netns(client_ns, lambda: neighbours.resolve(net.relay_public.ip4, "c0")) == net.relay_public.mac

    assert in_relay(neighbours.interface_mac, "pub0") == net.relay_public.mac
    assert in_relay(neighbours.interface_index, "int0") == in_relay(socket.if_nametoindex, "int0")
    assert in_relay(neighbours.interface_for, net.transceivers[1].ip4) == "int0"

    nobody = str(ipaddress.ip_network(net.networks["internal"][0])[99])
    started = time.monotonic()
    with pytest.raises(NeighbourError, match=re.escape(nobody)):
        in_relay(neighbours.resolve, nobody, "int0", timeout=1.0)         # nobody there
    assert 0.9 < time.monotonic() - started < 2.5
    with pytest.raises(NeighbourError, match="not on-link on int0.*via pub0"):
        in_relay(neighbours.resolve, net.client.ip4, "int0", timeout=1.0)        # wrong link
    with pytest.raises(NeighbourError, match="gateway"):
        in_netns(net.client.netns, lambda: neighbours.resolve(net.transceivers[0].ip4, "c0"))  # behind the relay
    behind = in_netns(net.client.netns, lambda: neighbours.resolve_next_hop(net.transceivers[0].ip4, "c0"))
    assert behind == net.relay_public.mac                          # routed: the gateway's MAC
    with pytest.raises(NeighbourError, match=re.escape(
            f"{net.client.ip4} is not on-link on int0 (the kernel reaches it via pub0)")):
        in_relay(neighbours.resolve_next_hop, net.client.ip4, "int0", timeout=1.0)   # route out of another link
    with pytest.raises(NeighbourError, match="no interface"):
        in_relay(neighbours.resolve, net.client.ip4, "eth9")
    with pytest.raises(NeighbourError, match="not an IP"):
        in_relay(neighbours.resolve, "relay", "pub0")
    with pytest.raises(LabError, match="no network namespace"):
        in_netns(net.prefix + "-nope", lambda: neighbours.interface_mac("pub0"))


# -- processes -------------------------------------------------------------------------------

async def test_running_code_inside_namespaces(lab):
    net = lab(transceivers=1)
    t = net.transceivers[0]
    own = os.stat("/proc/self/ns/net").st_ino
    t_inode = os.stat(f"/run/netns/{t.netns}").st_ino
    assert int(net.run(t.netns, ["stat", "-L", "-c", "%i", "/proc/self/ns/net"]).stdout) == t_inode
    assert net.exec_py(t.netns, "import socket; print(socket.if_nametoindex('eth1'))").stdout.strip().isdigit()
    assert in_netns(t.netns, lambda: os.stat("/proc/thread-self/ns/net").st_ino) == t_inode
    assert os.stat("/proc/thread-self/ns/net").st_ino == own                    # the caller never moved
    with pytest.raises(LabError):
        net.run("not-" + t.netns, ["true"])

    # asyncio over sockets made inside namespaces
    loop = asyncio.get_running_loop()
    server = udp(t.netns, socket.AF_INET, (t.signal_ip4, 9999))
    client = udp(net.client.netns, socket.AF_INET)
    with server, client:
        server.setblocking(False)
        client.setblocking(False)
        await loop.sock_sendto(client, b"ping", (t.signal_ip4, 9999))
        data, peer = await asyncio.wait_for(loop.sock_recvfrom(server, 100), WAIT)
        assert (data, peer[0]) == (b"ping", net.client_signal.ip4)
    assert await in_netns_async(t.netns, lambda: socket.if_nametoindex("sig0")) > 0

    # popen: tracked by PID, started in the namespace, stopped by destroy
    proc = net.popen(t.netns, ["sleep", "300"])
    assert proc.pid in net.pids and Lab.load(net.name).pids == net.pids
    # nsenter enters the namespace just before exec: the child is in it once it runs sleep
    wait_for(lambda: os.stat(f"/proc/{proc.pid}/ns/net").st_ino == t_inode, WAIT, "sleep in the namespace")
    net.destroy()
    assert proc.wait(timeout=WAIT) == -15
    assert net.pids == []


# -- teardown --------------------------------------------------------------------------------

def root_links_with(prefix: str) -> list[str]:
    with IPRoute() as ipr:
        return [n for n in (link.get_attr("IFLA_IFNAME") for link in ipr.get_links()) if n.startswith(prefix)]


def test_teardown_removes_everything_even_from_another_process():
    net = Lab.create(transceivers=2)
    try:
        sleeper = net.popen(net.transceivers[1].netns, ["sleep", "300"])
        names = net.namespaces()
        assert set(names) <= set(list_namespaces())
        down = subprocess.run(
            [sys.executable, "-c", "import sys; from splitrelay.lab.topology import destroy; "
                                   "sys.exit(0 if destroy(sys.argv[1]) else 1)", net.name],
            capture_output=True, text=True, timeout=30)
        assert down.returncode == 0, down.stderr
        assert sleeper.wait(timeout=WAIT) == -15                  # killed by PID from the state file
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        assert not [ns for ns in names if ns in listed.split()]
        assert not [ns for ns in list_namespaces() if ns.startswith(net.prefix)]
        assert not root_links_with(net.prefix)
        assert not (STATE_DIR / f"{net.name}.json").exists() and net.name not in Lab.names()
        net.destroy()                                              # idempotent
        net.destroy()
        assert destroy(net.name) is False
        with pytest.raises(LabError, match="no lab named"):
            Lab.load(net.name)
    finally:
        net.destroy()


def test_context_manager_tears_down_on_error():
    with pytest.raises(RuntimeError, match="boom"), Lab.create(transceivers=1) as net:
        names = net.namespaces()
        raise RuntimeError("boom")
    assert not set(names) & set(list_namespaces())
    assert not (STATE_DIR / f"{net.name}.json").exists()


def test_half_built_lab_leaves_nothing(monkeypatch):
    seen: list[Lab] = []

    def build_then_fail(lab: Lab) -> None:
        seen.append(lab)
        build(lab)
        raise OSError("simulated failure after the build")

    monkeypatch.setattr(topology, "build", build_then_fail)
    with pytest.raises(LabError, match="simulated failure"):
        Lab.create(transceivers=1)
    [half] = seen
    assert not [ns for ns in list_namespaces() if ns.startswith(half.prefix)]
    assert not (STATE_DIR / f"{half.name}.json").exists()


def test_two_labs_at_once_do_not_collide(lab):
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda _: lab(transceivers=1), range(2))
    assert a.prefix != b.prefix and a.name != b.name
    assert not set(a.namespaces()) & set(b.namespaces())
    assert {a.name, b.name} <= set(Lab.names())
    with pytest.raises(LabError, match="already up"):
        Lab.create(transceivers=1, name=a.name)
    assert Lab.load(a.name) == a                           # the failed attempt did not touch a

    # the same addresses live in both labs; each lab's traffic stays in its own namespaces
    sockets = {net.name: udp(net.transceivers[0].netns, socket.AF_INET, (net.transceivers[0].signal_ip4, 7000))
               for net in (a, b)}
    try:
        for net in (a, b):
            with udp(net.client.netns, socket.AF_INET) as s:
                s.sendto(net.name.encode(), (net.transceivers[0].signal_ip4, 7000))
        for net in (a, b):
            assert sockets[net.name].recv(100) == net.name.encode()
            assert queued(sockets[net.name]) == []
    finally:
        for sock in sockets.values():
            sock.close()
    a.destroy()
    assert set(b.namespaces()) <= set(list_namespaces())  # tearing one down leaves the other alone
    assert Lab.load(b.name) == b


def test_bad_arguments_build_nothing():
    before = set(list_namespaces())
    for kwargs in ({"transceivers": 0}, {"transceivers": 51}, {"name": "../etc"}, {"stem": "Bad-Stem"},
                   {"relay_port": 0}):
        with pytest.raises(LabError):
            Lab.create(**kwargs)
    assert {ns for ns in set(list_namespaces()) - before if ns.startswith(TEST_STEM)} == set()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitrelay.cli.main", *args], capture_output=True, text=True,
                          timeout=120)


def test_lab_down_removes_only_the_lab_it_is_told_to():
    """With several labs up (a test run's, another checkout's), a bare `lab down` must not guess."""
    first, second = Lab.create(transceivers=1), Lab.create(transceivers=1)
    try:
        refused = _cli("lab", "down")
        assert refused.returncode == 2, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and first.name in refused.stderr
        assert {first.name, second.name} <= set(Lab.names())              # nothing was removed
        both = _cli("lab", "down", "--name", first.name, "--all")
        assert both.returncode == 2 and "not both" in both.stderr
        removed = _cli("lab", "down", "--name", first.name)
        assert removed.returncode == 0 and f"lab {first.name} removed" in removed.stdout
        assert first.name not in Lab.names() and second.name in Lab.names()
        assert not any(ns in list_namespaces() for ns in first.namespaces())
    finally:
        for lab in (first, second):
            if lab.name in Lab.names():
                lab.destroy()
