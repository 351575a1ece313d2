"""Netlink steps the lab's builder takes inside a namespace: links up, addresses, MACs, sysctls.

pyroute2's synchronous API refuses to run on a thread whose asyncio loop is
running, so every call goes through ``netlink(netns, fn)``, which runs it in a
worker thread that entered the namespace.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pyroute2 import IPRoute

from splitrelay.lab.host import Host
from splitrelay.lab.netns import LabError, in_netns

IFA_F_NODAD = 0x02
T = TypeVar("T")


def index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LabError(f"no interface {ifname}")
    return found[0]


def up(ipr: IPRoute, ifname: str) -> None:
    ipr.link("set", index=index(ipr, ifname), state="up")


def mac(ipr: IPRoute, ifname: str) -> str:
    return ipr.get_links(index(ipr, ifname))[0].get_attr("IFLA_ADDRESS")


def addresses(ipr: IPRoute, host: Host, prefix4: int, prefix6: int) -> None:
    link = index(ipr, host.ifname)
    ipr.addr("add", index=link, address=host.ip4, prefixlen=prefix4)
    if host.ip6:
        # no DAD: the address is usable at once and nobody else on the link can hold it
        ipr.addr("add", index=link, address=host.ip6, prefixlen=prefix6, flags=IFA_F_NODAD)
    up(ipr, host.ifname)


def netlink(netns: str, fn: Callable[[IPRoute], T]) -> T:
    """Run ``fn(ipr)`` with an IPRoute opened inside ``netns``, in a worker thread: pyroute2's
    synchronous API refuses to run on a thread whose asyncio loop is running (async callers)."""
    def call() -> T:
        with IPRoute() as ipr:
            return fn(ipr)
    return in_netns(netns, call)


def set_sysctls(netns: str, values: dict[str, str]) -> None:
    """Write /proc/sys/<key> as seen from ``netns`` (net.* sysctls are per namespace)."""
    def write() -> None:
        for key, value in values.items():
            Path("/proc/sys", key).write_text(value)
    in_netns(netns, write)
