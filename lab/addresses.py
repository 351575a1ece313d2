"""The lab's address plan: reserved ranges only, and never one the host already uses.

IPv4 comes from 198.18.0.0/15, reserved for benchmarking (RFC 2544) and routed
nowhere; the plan takes 198.18.0.0/16, or 198.19.0.0/16 when the host has an
address or a route (other than its default route) that overlaps the first.  IPv6
is a ULA /48 with 40 random bits (RFC 4193), drawn afresh per lab.  (The lab used
172.31.0.0/16 before: a major cloud's default VPC, so it collided there.)

Subnets (``B`` = the IPv4 /16, ``P`` = the ULA /48; the IPv6 subnet id is the
IPv4 third octet in hex):

==============  ==================  ==============  =========================================
network         IPv4                IPv6            members
==============  ==================  ==============  =========================================
public, relay k B.(16(k-1)).0/24    P:(16(k-1))::/64 client .2 ::2, relay k .1 ::1
internal        B.1.0/24            P:1::/64        relay k .k ::k, transceiver N .(10+N) ::(10+N)
signaling       B.2.0/24            P:2::/64        client .2 ::2, transceiver N .(10+N) ::(10+N)
transceivers    B.3.0/24            P:3::/64        routed labs only: router .1 ::1, transceiver N
                                                    .(10+N) ::(10+N) (not on internal, where the
                                                    router is .254 ::fe; lab/router.py)
==============  ==================  ==============  =========================================

Relay 1's public network is B.0.0/24 and P::/64.  Nothing here is routed on the
host: the lab is reached by entering its namespaces (``splitrelay ... --lab NAME``).
"""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network

from splitrelay.lab.netns import LabError

V4_CHOICES = ("198.18.0.0/16", "198.19.0.0/16")
MAX_RELAYS = 8          # relay k's internal address is B.1.k, below the transceivers' .11
INTERNAL, SIGNALING, TRANSCEIVERS = 1, 2, 3


@dataclass(frozen=True)
class AddressPlan:
    v4: str     # the lab's IPv4 /16, e.g. "198.18.0.0/16"
    v6: str     # the lab's ULA /48, e.g. "fd3c:9a01:77e2::/48"

    def _net4(self, octet: int) -> IPv4Network:
        return IPv4Network((int(ip_network(self.v4).network_address) + (octet << 8), 24))

    def _net6(self, subnet: int) -> IPv6Network:
        return IPv6Network((int(ip_network(self.v6).network_address) + (subnet << 64), 64))

    @staticmethod
    def public_octet(relay: int) -> int:
        if not 1 <= relay <= MAX_RELAYS:
            raise LabError(f"relays are numbered 1..{MAX_RELAYS}, got {relay}")
        return 16 * (relay - 1)

    def network(self, name: str, relay: int = 1) -> tuple[str, str]:
        """("B.x.0/24", "P:x::/64") of ``public`` (relay ``relay``'s), ``internal``, ``signaling`` or
        ``transceivers`` (a routed lab's)."""
        octet = {"internal": INTERNAL, "signaling": SIGNALING, "transceivers": TRANSCEIVERS}.get(name)
        if octet is None:
            if name != "public":
                raise LabError(f"no lab network {name!r}")
            octet = self.public_octet(relay)
        return str(self._net4(octet)), str(self._net6(octet))

    def host(self, name: str, host: int, relay: int = 1) -> tuple[str, str]:
        """Host number ``host`` on a network: (IPv4, IPv6)."""
        net4, net6 = self.network(name, relay)
        return str(ip_network(net4)[host]), str(ip_network(net6)[host])

    def networks(self, relays: int = 1, routed: bool = False) -> dict[str, list[str]]:
        """Every network of a lab with ``relays`` relays, by name (``public``, ``public2``, ...);
        ``routed``: with the transceivers' own network behind the router."""
        nets = {"public": list(self.network("public"))}
        nets.update({f"public{k}": list(self.network("public", k)) for k in range(2, relays + 1)})
        nets["internal"] = list(self.network("internal"))
        nets["signaling"] = list(self.network("signaling"))
        if routed:
            nets["transceivers"] = list(self.network("transceivers"))
        return nets


def host_prefixes() -> list[IPv4Network | IPv6Network]:
    """Prefixes this namespace already uses: its addresses' networks and its routes, bar default routes."""
    from pyroute2 import IPRoute

    used = []
    with IPRoute() as ipr:
        for addr in ipr.get_addr():
            used.append(ip_network(f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}", strict=False))
        for family in (2, 10):
            for route in ipr.get_routes(family=family, table=254):
                dst = route.get_attr("RTA_DST")
                if dst and route["dst_len"]:
                    used.append(ip_network(f"{dst}/{route['dst_len']}", strict=False))
    return used


def choose(in_use: list[IPv4Network | IPv6Network] | None = None) -> AddressPlan:
    """A plan whose ranges overlap nothing in ``in_use`` (default: what this namespace uses)."""
    if in_use is None:  # pyroute2's synchronous API refuses a thread that runs an asyncio loop
        with ThreadPoolExecutor(1) as pool:
            in_use = pool.submit(host_prefixes).result()
    used = in_use
    free4 = [c for c in V4_CHOICES if not any(ip_network(c).overlaps(u) for u in used if u.version == 4)]
    if not free4:
        raise LabError(f"this host already uses both of {', '.join(V4_CHOICES)}: no room for a lab")
    for _ in range(16):
        v6 = IPv6Network(((0xFD << 120) | (secrets.randbits(40) << 80), 48))
        if not any(v6.overlaps(u) for u in used if u.version == 6):
            return AddressPlan(free4[0], str(v6))
    raise LabError("could not draw a ULA /48 this host does not use")


def in_networks(address: str, networks: dict[str, list[str]]) -> bool:
    """Whether ``address`` lies in one of a lab's networks (as recorded in its state)."""
    try:
        addr = ip_address(address.strip("[]"))
    except ValueError:
        return False
    return any(addr in ip_network(net) for nets in networks.values() for net in nets)
