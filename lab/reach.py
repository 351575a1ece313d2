"""Reaching a lab's daemons from the host: enter the lab's namespace, never the host's default route.

A lab's addresses are routed nowhere on the host (lab/addresses.py), so a request
to one from the host's own namespace would leave by the default route (eth0) and
whatever answers there is not the lab.  Commands therefore either run inside one
of the lab's namespaces already, or name the lab and make the request from a
thread inside the right namespace (``Reach``); a lab address given without the
lab is refused (``unreachable_from_here``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

from splitrelay.lab.addresses import in_networks
from splitrelay.lab.netns import LabError, in_netns, netns_path
from splitrelay.lab.topology import Lab

T = TypeVar("T")


@dataclass(frozen=True)
class Reach:
    """A URL, the namespace a request to it must come from (None: this namespace) and the file of the
    bearer token it wants (None: none known)."""

    url: str
    netns: str | None = None
    token: str | None = None        # the lab's admin token, for its agents' control APIs
    token_file: str | None = None   # the file of a transceiver admin listener's token

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` with its sockets made in ``netns``."""
        return fn() if self.netns is None else in_netns(self.netns, fn)


def url_host(url: str) -> str:
    try:
        return urlsplit(url if "//" in url else f"//{url}").hostname or ""
    except ValueError:
        return ""


def _netns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def inside(lab: Lab) -> bool:
    """Whether this process already runs in one of ``lab``'s namespaces."""
    here = _netns_inode("/proc/thread-self/ns/net")
    return any(here == _netns_inode(netns_path(ns)) for ns in lab.namespaces())


def labs_holding(address: str) -> list[Lab]:
    """The labs that are up and whose networks hold ``address``."""
    found = []
    for name in Lab.names():
        try:
            lab = Lab.load(name)
        except LabError:
            continue  # torn down meanwhile
        if in_networks(address, lab.networks):
            found.append(lab)
    return found


def unreachable_from_here(url: str) -> list[str]:
    """The labs whose address ``url`` names, when this process is in none of them ([] when it is fine)."""
    labs = labs_holding(url_host(url))
    if any(inside(lab) for lab in labs):
        return []
    return [lab.name for lab in labs]


def control(lab: Lab, url: str | None = None, relay: int = 1) -> Reach:
    """Relay ``relay``'s agent's control API (or ``url``), from that relay's namespace."""
    from splitrelay.lab.stack import control_token, control_url

    return Reach(url or control_url(lab, relay), lab.relay(relay).netns, control_token(lab))


def whip(lab: Lab, url: str | None = None) -> Reach:
    """A transceiver's WHIP or sessions URL (default: the first transceiver's), from the client's namespace,
    which reaches every transceiver's signaling address."""
    from splitrelay.lab.stack import whip_url

    return Reach(url or whip_url(lab.transceivers[0]), lab.client.netns)


def admin(lab: Lab, url: str | None = None) -> Reach:
    """A transceiver's admin listener (default: the first transceiver's), from the client's namespace,
    with the lab's admin token."""
    from splitrelay.lab.stack import admin_url

    return Reach(url or admin_url(lab.transceivers[0]), lab.client.netns, str(lab.secret_file("admin.token")))
