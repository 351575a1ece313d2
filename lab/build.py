"""Building a planned lab in the kernel: namespaces, veths, bridges, addresses, routes and rules.

lab/topology.py plans a lab (names, addresses) and records it; this module makes
it, once, in the namespaces the plan names.  Netlink steps inside a namespace are
lab/links.py's; the topology itself is described in lab/topology.py's docstring.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from pyroute2 import IPRoute, netns as pnetns

from splitrelay.lab import links, procs, router as routing
from splitrelay.lab.host import BACKEND_PORT, Host, Relay, Transceiver
from splitrelay.lab.links import set_sysctls
from splitrelay.lab.netns import AF_INET, AF_INET6, LabError, netns_path, nsenter_argv

if TYPE_CHECKING:
    from splitrelay.lab.topology import Lab   # for annotations only: the lab passes itself in

BACKEND_TABLE = 100
IFF_LOWER_UP = 1 << 16


def build(lab: Lab) -> None:
    """Make a planned lab's namespaces, veths, bridges, addresses, routes and rules."""
    for ns in lab.namespaces():
        try:
            pnetns.create(ns)
        except FileExistsError:
            raise LabError(f"namespace {ns} already exists") from None
    _sysctls(lab)
    _switch(lab)
    if lab.router:
        routing.configure(lab.router)
    links.netlink(lab.client.netns, lambda ipr: _client(ipr, lab))
    for r in lab.relays:
        links.netlink(r.netns, lambda ipr, r=r: _relay(ipr, r, lab))
    # each relay's public network is reached through that relay (replies leave the way they came)
    routed_via = [] if lab.translate else [(lab.public_network(r.index), r.internal) for r in lab.relays]
    if lab.router:   # the relays' internal network (their agents, their translated sources): the only route
        routed_via.append((lab.networks["internal"], lab.router.transceivers))
    # the transceivers' own network: on-link on their media link
    own = lab.networks["transceivers" if lab.router else "internal"]
    for t in lab.transceivers:
        links.netlink(t.netns, lambda ipr, t=t: _transceiver(ipr, t, routed_via, own))
        for family in ("-4", "-6"):   # the backend port too: a socket bound to [::] picks no source
            procs.run(nsenter_argv(t.netns, ["ip", family, "rule", "add", "priority", str(BACKEND_TABLE),
                                             "ipproto", "udp", "sport", str(BACKEND_PORT),
                                             "lookup", str(BACKEND_TABLE)]))
    _offloads(lab)
    _check_carrier(lab)


def _sysctls(lab: Lab) -> None:
    """Kernel settings before any interface exists, so per-interface defaults follow them."""
    no_ipv6 = {"net/ipv6/conf/all/disable_ipv6": "1", "net/ipv6/conf/default/disable_ipv6": "1"}
    for ns in [lab.switch_netns, *(link["netns"] for link in lab.impaired.values())]:
        set_sysctls(ns, no_ipv6)
    if lab.router:
        set_sysctls(lab.router.netns, routing.FORWARDING)
    for r in lab.relays:
        set_sysctls(r.netns, {"net/ipv4/ip_forward": "0", "net/ipv6/conf/all/forwarding": "0",
                              "net/ipv6/conf/default/forwarding": "0"})


def _switch(lab: Lab) -> None:
    """The switch's bridges, every veth (created with both ends already in their namespaces), the ports."""
    cli, sw = lab.client.netns, lab.switch_netns

    def switch_bridges(ipr: IPRoute) -> None:
        links.up(ipr, "lo")
        for bridge in ("br0", "sig", *([routing.BRIDGE] if lab.router else [])):
            ipr.link("add", ifname=bridge, kind="bridge", br_forward_delay=0, br_stp_state=0,
                     br_mcast_snooping=0)  # a plain switch: flood, learn unicast MACs

    links.netlink(sw, switch_bridges)
    for r in lab.relays:
        imp = lab.impaired.get(r.link, {}).get("netns")
        if imp:   # client -- ia [impairment forwarder] ib -- relay: a transparent L2 wire
            _veth(cli, r.client.ifname, imp, "ia")
            _veth(imp, "ib", r.netns, r.public.ifname)
            links.netlink(imp, lambda ipr: (links.up(ipr, "ia"), links.up(ipr, "ib")))
        else:
            _veth(cli, r.client.ifname, r.netns, r.public.ifname)
        _veth(r.netns, r.internal.ifname, sw, r.switch_port)
    _veth(cli, "s0", sw, "scli")
    for own, (port, _) in routing.SWITCH_PORTS.items() if lab.router else ():
        _veth(lab.router.netns, own, sw, port)
    for t in lab.transceivers:
        _veth(t.netns, t.ifname, sw, f"t{t.index}m")
        _veth(t.netns, t.signal_ifname, sw, f"t{t.index}s")

    def switch_ports(ipr: IPRoute) -> None:
        ports = {r.switch_port: "br0" for r in lab.relays}
        ports["scli"] = "sig"
        media = routing.BRIDGE if lab.router else "br0"   # a routed lab's transceivers: behind the router
        if lab.router:
            ports.update(dict(routing.SWITCH_PORTS.values()))
        for t in lab.transceivers:
            ports[f"t{t.index}m"] = media
            ports[f"t{t.index}s"] = "sig"
        for port, bridge in ports.items():
            ipr.link("set", index=links.index(ipr, port), master=links.index(ipr, bridge))
        for dev in (*dict.fromkeys(ports.values()), *ports):
            links.up(ipr, dev)

    links.netlink(sw, switch_ports)


def _client(ipr: IPRoute, lab: Lab) -> None:
    links.up(ipr, "lo")
    for r in lab.relays:   # one link per relay, each on that relay's public network
        links.addresses(ipr, r.client, 24, 64)
        r.client.mac = links.mac(ipr, r.client.ifname)
    links.addresses(ipr, lab.signal_host, 24, 64)
    ipr.route("add", dst="0.0.0.0/0", gateway=lab.relay_public.ip4)      # relay 1 is the default
    ipr.route("add", family=AF_INET6, dst="::/0", gateway=lab.relay_public.ip6)
    lab.signal_host.mac = links.mac(ipr, "s0")


def _relay(ipr: IPRoute, r: Relay, lab: Lab) -> None:
    links.up(ipr, "lo")
    links.addresses(ipr, r.public, 24, 64)
    links.addresses(ipr, r.internal, 24, 64)
    # host firewall: the internal side (control API) is not reachable from the public side
    for family, own, bits in ((AF_INET, r.internal.ip4, 32), (AF_INET6, r.internal.ip6, 128)):
        ipr.rule("add", family=family, priority=10, iifname=r.public.ifname, dst=own,
                 dst_len=bits, action="FR_ACT_PROHIBIT")
        ipr.rule("add", family=family, priority=20, table=255)   # local, after the firewall rule
        ipr.rule("del", family=family, priority=0, table=255)
    r.public.mac = links.mac(ipr, r.public.ifname)
    r.internal.mac = links.mac(ipr, r.internal.ifname)
    if lab.router:   # the transceivers' network is one hop away
        routing.route_via(ipr, lab.networks["transceivers"], lab.router.internal)


def _transceiver(ipr: IPRoute, t: Transceiver, routed_via: list[tuple[list[str], Host]], own: list[str]) -> None:
    """Its addresses, routes to ``routed_via``'s networks, and the backend table: a backend address leaves
    only through a relay (or to the transceivers' own network ``own``), never otherwise."""
    links.up(ipr, "lo")
    links.addresses(ipr, t, 24, 64)
    links.addresses(ipr, Host(t.netns, t.signal_ifname, t.signal_ip4, t.signal_ip6), 24, 64)
    eth = links.index(ipr, t.ifname)
    for nets, via in routed_via:
        routing.route_via(ipr, nets, via)
    for family, addr, bits, net in ((AF_INET, t.ip4, 32, own[0]), (AF_INET6, t.ip6, 128, own[1])):
        ipr.rule("add", family=family, priority=BACKEND_TABLE, src=addr, src_len=bits, table=BACKEND_TABLE)
        ipr.route("add", family=family, dst=net, oif=eth, table=BACKEND_TABLE)
    for nets, via in routed_via:
        routing.route_via(ipr, nets, via, table=BACKEND_TABLE)
    for family, default in ((AF_INET, "0.0.0.0/0"), (AF_INET6, "::/0")):
        ipr.route("add", family=family, dst=default, type="unreachable", table=BACKEND_TABLE)
    t.mac = links.mac(ipr, t.ifname)
    t.signal_mac = links.mac(ipr, t.signal_ifname)


def _offloads(lab: Lab) -> None:
    """Tx checksum offload off on every veth, GRO on where XDP redirects into (ethtool: no netlink
    equivalent in pyroute2 that we rely on)."""
    cli, sw = lab.client.netns, lab.switch_netns
    gro = {(cli, r.client.ifname) for r in lab.relays} | {(sw, r.switch_port) for r in lab.relays}
    gro |= {(link["netns"], "ib") for link in lab.impaired.values()}
    for ns, dev in lab.veths():
        argv = ["ethtool", "-K", dev, "tx", "off"]
        if (ns, dev) in gro:
            argv += ["gro", "on"]  # frames XDP redirects into pub0/int0 arrive here
        procs.run(nsenter_argv(ns, argv))


def _veth(a_ns: str, a: str, b_ns: str, b: str) -> None:
    peer_ns = os.open(netns_path(b_ns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        links.netlink(a_ns, lambda ipr: ipr.link("add", ifname=a, kind="veth",
                                                 peer={"ifname": b, "net_ns_fd": peer_ns}))
    finally:
        os.close(peer_ns)


def _check_carrier(lab: Lab) -> None:
    """Every lab veth has carrier (veth raises it synchronously when both ends are up)."""
    missing = []
    for ns in dict.fromkeys(ns for ns, _ in lab.veths()):
        up = links.netlink(ns, lambda ipr: {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()
                                            if link["flags"] & IFF_LOWER_UP})
        missing += [(n, dev) for n, dev in lab.veths() if n == ns and dev not in up]
    if missing:
        raise LabError(f"no carrier on {missing}")
