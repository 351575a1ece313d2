"""A routed lab's router: the transceivers in an L3 network of their own, one hop from the relays.

Issue 12 asks that relays and transceivers may sit in different networks.  With
``Lab.create(routed=True)`` (``splitrelay lab up --routed --translate``) the
transceivers' media links go to their own bridge ``trs`` in the switch namespace,
on the ``transceivers`` network (lab/addresses.py: B.3.0/24, P:3::/64), and a
router namespace ``<prefix>-rtr`` joins it to the relays' internal segment::

    P-rly int0 --- rint --+-- br0 -- rtint --- int0 [P-rtr, forwarding] tr0 --- rttr --+-- trs -- tNm --- eth1 P-tN
    P-rk  int0 --- rkint -+                                                           (B.3.0/24, P:3::/64)

The router is B.1.254 / P:1::fe on the internal network and B.3.1 / P:3::1 on
the transceivers'.  Every relay routes the transceivers' network via the router
(the XDP plane's next hop is then the router's MAC: edge/neighbours.py
``resolve_next_hop``); each transceiver routes the relays' internal network via
the router and nothing else: no default route, no route to any public network.
So a routed lab needs translation on both sides (``edge serve --translate``):
with DNAT alone a transceiver's reply is addressed to the client, which it cannot
reach.  The router forwards in its kernel (``ip_forward=1``, IPv6 forwarding);
the relays still forward nothing in theirs.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyroute2 import IPRoute

from splitrelay.lab import links
from splitrelay.lab.addresses import AddressPlan
from splitrelay.lab.host import Host
from splitrelay.lab.netns import AF_INET6

ROUTED_NEEDS_TRANSLATE = ("--routed needs --translate: with DNAT alone the transceivers behind the router "
                          "would need a route back to the client")
ON_INTERNAL = 254         # the router's host number on the internal network (relays are 1..8, transceivers 11..)
ON_TRANSCEIVERS = 1       # ... and on the transceivers' network
BRIDGE = "trs"            # the transceivers' bridge in the switch namespace
SWITCH_PORTS = {"int0": ("rtint", "br0"), "tr0": ("rttr", BRIDGE)}   # router ifname -> (its veth's end in
                                                                     # the switch namespace, that end's bridge)
FORWARDING = {"net/ipv4/ip_forward": "1", "net/ipv6/conf/all/forwarding": "1",
              "net/ipv6/conf/default/forwarding": "1"}


@dataclass
class Router:
    """The router's two sides: on the relays' internal segment and the transceivers' gateway."""

    internal: Host
    transceivers: Host

    @property
    def netns(self) -> str:
        return self.internal.netns

    def veths(self, switch_netns: str) -> list[tuple[str, str]]:
        """Its veth ends, (namespace, ifname), its own and the switch's."""
        ports = [(own, port) for own, (port, _) in SWITCH_PORTS.items()]
        return [end for own, port in ports for end in ((self.netns, own), (switch_netns, port))]

    def info(self) -> dict:
        """What ``lab up --json`` shows of it."""
        return {"netns": self.netns, "internal": [self.internal.ip4, self.internal.ip6],
                "transceivers": [self.transceivers.ip4, self.transceivers.ip6]}


def plan(prefix: str, addresses: AddressPlan) -> Router:
    ns = f"{prefix}-rtr"
    return Router(Host(ns, "int0", *addresses.host("internal", ON_INTERNAL)),
                  Host(ns, "tr0", *addresses.host("transceivers", ON_TRANSCEIVERS)))


def from_json(data: dict) -> Router:
    """The router of a lab's state file (Lab.to_json's asdict)."""
    return Router(Host(**data["internal"]), Host(**data["transceivers"]))


def configure(router: Router) -> None:
    """Its addresses and MACs (its veths exist; forwarding was switched on before they did)."""
    def setup(ipr: IPRoute) -> None:
        links.up(ipr, "lo")
        for side in (router.internal, router.transceivers):
            links.addresses(ipr, side, 24, 64)
            side.mac = links.mac(ipr, side.ifname)
    links.netlink(router.netns, setup)


def route_via(ipr: IPRoute, networks: list[str], via: Host, table: int = 254) -> None:
    """Routes to ``networks`` ([IPv4, IPv6] prefixes) through ``via`` (one of the router's sides)."""
    net4, net6 = networks
    ipr.route("add", dst=net4, gateway=via.ip4, table=table)
    ipr.route("add", family=AF_INET6, dst=net6, gateway=via.ip6, table=table)
