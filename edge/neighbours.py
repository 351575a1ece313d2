"""Next-hop MAC addresses from the kernel's neighbour table (pyroute2, no `ip` subprocess).

XDP rewrites Ethernet headers itself, so the agent must know the MAC of every
next hop: each transceiver on the internal side and the gateway on the public
side.  The kernel already resolves them; we read its table and, when an entry
is missing, provoke resolution with one datagram to the discard port and wait
for the kernel's neighbour notification (bounded, re-probing once a second
while the kernel gives up on an entry).

Every function looks in the caller's own network namespace; a test that needs
another runs the call there (``splitrelay.lab.netns.in_netns``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import select
import socket
import time
from collections.abc import Callable
from typing import TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_NEIGH

from splitrelay.errors import SplitrelayError

NUD_INCOMPLETE, NUD_REACHABLE, NUD_STALE, NUD_DELAY, NUD_PROBE, NUD_FAILED, NUD_NOARP, NUD_PERMANENT = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80)
NUD_VALID = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_NOARP | NUD_PERMANENT
DISCARD_PORT = 9
REPROBE_S = 1.0

T = TypeVar("T")


class NeighbourError(SplitrelayError):
    """A next hop's MAC could not be found (one-line reason)."""


def _off_loop(fn: Callable[[], T]) -> T:
    """fn() here, or in a worker thread when this thread runs an asyncio loop: pyroute2's synchronous
    API refuses to run on such a thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="neighbours") as pool:
        return pool.submit(fn).result()


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NeighbourError(f"no interface named {ifname!r} in this network namespace")
    return found[0]


def interface_index(ifname: str) -> int:
    def get() -> int:
        with IPRoute() as ipr:
            return _index(ipr, ifname)
    return _off_loop(get)


def interface_mac(ifname: str) -> str:
    def get() -> str:
        with IPRoute() as ipr:
            return ipr.get_links(_index(ipr, ifname))[0].get_attr("IFLA_ADDRESS")
    return _off_loop(get)


def _parse(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(ip)
    except ValueError:
        raise NeighbourError(f"not an IP address: {ip!r}") from None


def _family(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    return socket.AF_INET6 if addr.version == 6 else socket.AF_INET


def interface_for(ip: str) -> str:
    """The interface the kernel would use to reach ``ip``."""
    addr = _parse(ip)

    def get() -> str:
        with IPRoute() as ipr:
            try:
                routes = ipr.route("get", dst=str(addr), family=_family(addr))
            except Exception as exc:  # noqa: BLE001 - netlink errors (ENETUNREACH, ...) become one line
                raise NeighbourError(f"no route to {ip}: {exc}") from None
            if not routes:
                raise NeighbourError(f"no route to {ip}")
            index = routes[0].get_attr("RTA_OIF")
            return ipr.get_links(index)[0].get_attr("IFLA_IFNAME")
    return _off_loop(get)


def _lookup(ipr: IPRoute, ip: str, family: int, index: int) -> tuple[str | None, int]:
    """(MAC or None, NUD state or 0) of the entry for ``ip`` on ``index``."""
    for entry in ipr.get_neighbours(family=family, ifindex=index):
        dst = entry.get_attr("NDA_DST")
        if dst and ipaddress.ip_address(dst) == ipaddress.ip_address(ip):
            mac = entry.get_attr("NDA_LLADDR")
            if entry["state"] & NUD_VALID and mac:
                return mac, entry["state"]
            return None, entry["state"]
    return None, 0


def _route_out(ipr: IPRoute, addr: ipaddress.IPv4Address | ipaddress.IPv6Address, ifname: str,
               index: int) -> str | None:
    """Gateway of the kernel's route to ``addr`` (None: on-link); the route must leave through ``ifname``."""
    try:
        routes = ipr.route("get", dst=str(addr))
    except Exception as exc:  # noqa: BLE001 - netlink errors (ENETUNREACH, ...) become one line
        raise NeighbourError(f"{addr} is not reachable: {exc}") from None
    if not routes:
        raise NeighbourError(f"no route to {addr}")
    gateway = routes[0].get_attr("RTA_GATEWAY")
    oif = routes[0].get_attr("RTA_OIF")
    if oif != index:
        other = ipr.get_links(oif)[0].get_attr("IFLA_IFNAME") if oif else "?"
        raise NeighbourError(f"{addr} is not on-link on {ifname} (the kernel reaches it via {other})")
    return gateway


def _check_on_link(ipr: IPRoute, addr: ipaddress.IPv4Address | ipaddress.IPv6Address, ifname: str,
                   index: int) -> None:
    """The kernel's own route to ``addr`` must be a direct one out of ``ifname``."""
    if addr.is_link_local:
        return
    gateway = _route_out(ipr, addr, ifname, index)
    if gateway:
        raise NeighbourError(f"{addr} is not on-link on {ifname} (reached via gateway {gateway}): "
                             f"resolve the gateway instead")


def _probe(sock: socket.socket, addr: ipaddress.IPv4Address | ipaddress.IPv6Address, index: int) -> None:
    target = (str(addr), DISCARD_PORT, 0, index) if addr.version == 6 else (str(addr), DISCARD_PORT)
    try:
        sock.sendto(b"", target)  # only the neighbour lookup it causes matters
    except OSError:
        pass  # e.g. EHOSTUNREACH after a failed resolution: the next probe retries


def _resolve_here(ip: str, ifname: str | None, timeout: float) -> str:
    addr = _parse(ip)
    family = _family(addr)
    ifname = ifname or interface_for(ip)
    deadline = time.monotonic() + timeout
    with IPRoute() as ipr, IPRoute() as monitor:
        index = _index(ipr, ifname)
        monitor.bind(groups=RTMGRP_NEIGH)  # before the first look: no notification can slip between
        mac, _ = _lookup(ipr, ip, family, index)
        if mac:
            return mac
        _check_on_link(ipr, addr, ifname, index)
        state = 0
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
            next_probe = 0.0
            while True:
                now = time.monotonic()
                if now >= deadline:
                    break
                if now >= next_probe:
                    _probe(sock, addr, index)
                    next_probe = now + REPROBE_S
                ready, _, _ = select.select([monitor], [], [], max(0.0, min(deadline, next_probe) - now))
                if ready:
                    monitor.get()  # drain; the table below is the authority
                mac, state = _lookup(ipr, ip, family, index)
                if mac:
                    return mac
    what = "resolution failed" if state & NUD_FAILED else "no answer"
    raise NeighbourError(f"no neighbour entry for {ip} on {ifname} after {timeout:.1f} s ({what}; host down?)")


def _gateway_out_of(ip: str, ifname: str) -> str | None:
    """The gateway the kernel's route to ``ip`` uses, or None when ``ip`` is on-link or already has
    a neighbour entry on ``ifname`` (as resolve, the table is trusted before the route)."""
    addr = _parse(ip)
    with IPRoute() as ipr:
        index = _index(ipr, ifname)
        if addr.is_link_local or _lookup(ipr, ip, _family(addr), index)[0]:
            return None
        return _route_out(ipr, addr, ifname, index)


def resolve_next_hop(ip: str, ifname: str, timeout: float = 3.0) -> str:
    """MAC of the next hop toward ``ip`` out of ``ifname``: ``ip``'s own when on-link, else that of
    the gateway the kernel's route uses (a routed backend; the packet keeps ``ip`` as destination).

    Raises NeighbourError as resolve does, and when the route leaves through another interface.
    """
    if timeout <= 0:
        raise NeighbourError(f"timeout must be positive, got {timeout}")
    gateway = _off_loop(lambda: _gateway_out_of(ip, ifname))
    return resolve(gateway or ip, ifname, timeout)


def resolve(ip: str, ifname: str | None = None, timeout: float = 3.0) -> str:
    """MAC of the on-link host ``ip`` on ``ifname`` (default: the interface its route uses).

    Raises NeighbourError when ``ip`` is not an address, the interface is missing, ``ip`` is
    only reachable via a gateway, or nobody answered within ``timeout`` seconds.
    """
    if timeout <= 0:
        raise NeighbourError(f"timeout must be positive, got {timeout}")
    return _off_loop(lambda: _resolve_here(ip, ifname, timeout))
