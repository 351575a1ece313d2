"""Next-hop MAC addresses from the kernel's neighbour table (pyroute2, no `ip` subprocess).

XDP rewrites Ethernet headers itself, so the agent must know the MAC of every
next hop: each transceiver on the internal side and the gateway on the public
side.  The kernel already resolves them; we read its table and, when an entry
is missing, provoke resolution with one datagram and wait (bounded).
"""

from __future__ import annotations

import ipaddress
import socket
import time

from pyroute2 import IPRoute

NUD_VALID = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE STALE DELAY PROBE NOARP PERMANENT


class NeighbourError(Exception):
    """A next hop's MAC could not be found (one-line reason)."""


def interface_index(ifname: str) -> int:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NeighbourError(f"no interface named {ifname!r} in this network namespace")
    return found[0]


def interface_mac(ifname: str) -> str:
    with IPRoute() as ipr:
        links = ipr.get_links(interface_index(ifname))
    return links[0].get_attr("IFLA_ADDRESS")


def interface_for(ip: str) -> str:
    """The interface the kernel would use to reach ``ip``."""
    with IPRoute() as ipr:
        routes = ipr.route("get", dst=ip)
        if not routes:
            raise NeighbourError(f"no route to {ip}")
        index = routes[0].get_attr("RTA_OIF")
        return ipr.get_links(index)[0].get_attr("IFLA_IFNAME")


def _lookup(ipr: IPRoute, ip: str, index: int) -> str | None:
    family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
    for entry in ipr.get_neighbours(family=family, ifindex=index):
        if entry.get_attr("NDA_DST") == ip and entry["state"] & NUD_VALID:
            mac = entry.get_attr("NDA_LLADDR")
            if mac:
                return mac
    return None


def resolve(ip: str, ifname: str | None = None, timeout: float = 3.0) -> str:
    """MAC of ``ip`` on ``ifname`` (default: the interface its route uses)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise NeighbourError(f"not an IP address: {ip!r}") from None
    ifname = ifname or interface_for(ip)
    index = interface_index(ifname)
    deadline = time.monotonic() + timeout
    with IPRoute() as ipr:
        mac = _lookup(ipr, ip, index)
        if mac:
            return mac
        family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
            while time.monotonic() < deadline:
                try:
                    probe.sendto(b"", (ip, 9))  # discard port: only the neighbour lookup matters
                except OSError:
                    pass
                time.sleep(0.05)
                mac = _lookup(ipr, ip, index)
                if mac:
                    return mac
    raise NeighbourError(f"no neighbour entry for {ip} on {ifname} after {timeout:.1f} s (host down?)")
