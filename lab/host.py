"""The lab's hosts: a namespace with an interface and its addresses, and what a relay or transceiver adds.

Plain records (no netlink, no processes), so the lab's builder, its router and
its faults all name hosts without importing the lab itself (lab/topology.py).
"""

from __future__ import annotations

from dataclasses import dataclass

BACKEND_PORT = 5000     # every transceiver's one UDP socket (lab/stack.py starts them on it)


@dataclass
class Host:
    netns: str
    ifname: str
    ip4: str
    ip6: str
    mac: str = ""


@dataclass
class Transceiver(Host):
    index: int = 0
    backend_id: int = 0
    signal_ip4: str = ""
    signal_ip6: str = ""
    signal_ifname: str = "sig0"
    signal_mac: str = ""


@dataclass
class Relay:
    """One relay host: its public side, its internal side, and the client's end of its public link."""

    index: int
    public: Host
    internal: Host
    client: Host

    @property
    def netns(self) -> str:
        return self.public.netns

    @property
    def switch_port(self) -> str:
        """Its internal veth's end in the switch namespace (on the bridge br0)."""
        return "rint" if self.index == 1 else f"r{self.index}int"

    @property
    def link(self) -> str:
        """The name of the client's link to it, as impairments name it."""
        return f"relay{self.index}"
