"""The relay host's interfaces and their global addresses, as the kernel reports them (netlink).

Both planes and the agent ask the same questions of the same interfaces: which
addresses flows come from (the userspace plane's sockets, translation's internal
addresses), which are the relay's own (passed to its kernel by XDP), which
networks backends may be in.  Every call blocks: run it off the event loop
(pyroute2's synchronous API refuses to run on a loop's thread).
"""

from __future__ import annotations

import ipaddress
import socket

from splitrelay.edge.records import DataPlaneError


def exists(ifname: str) -> bool:
    """Whether ``ifname`` is in this network namespace."""
    try:
        socket.if_nametoindex(ifname)
    except OSError:
        return False
    return True


def _global_addrs(ifname: str, missing_ok: bool = False) -> list:
    """The netlink address messages of ``ifname``'s global addresses (link-local and host ones are no
    address a backend routes back to); a missing interface raises DataPlaneError unless ``missing_ok``."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            if missing_ok:
                return []
            raise DataPlaneError(f"no interface named {ifname!r} in this network namespace")
        return [msg for msg in ipr.get_addr(index=found[0]) if msg["scope"] == 0]


def address_list(ifname: str) -> list[tuple[int, str]]:
    """Every global (version, address) of ``ifname``, in the kernel's order."""
    out: list[tuple[int, str]] = []
    for msg in _global_addrs(ifname):
        version = 4 if msg["family"] == socket.AF_INET else 6
        addr = msg.get_attr("IFA_LOCAL") if version == 4 else None
        out.append((version, addr or msg.get_attr("IFA_ADDRESS")))
    return out


def addresses(ifname: str) -> dict[int, str]:
    """The first global IPv4 and IPv6 address of ``ifname`` ({4: ip, 6: ip})."""
    out: dict[int, str] = {}
    for version, addr in address_list(ifname):
        out.setdefault(version, addr)
    return out


def networks(ifname: str) -> list[str]:
    """The networks ``ifname``'s global addresses are on (none for a missing interface): the agent's
    default range for backends."""
    out = []
    for msg in _global_addrs(ifname, missing_ok=True):
        addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        out.append(str(ipaddress.ip_network(f"{addr}/{msg['prefixlen']}", strict=False)))
    return out

