"""A relay's public address floats to a standby relay under a live call (issue 12, scenario 3b).

A floating IP in a cloud (an Elastic IP, a reserved IP) is a 1:1 NAT at the provider's
edge: the public address maps onto one instance, and failover re-maps it onto another.
The client keeps talking to the same address and port and sees no change; the standby
relay sees the client's packets arrive for its own address.  In the lab the client's
namespace is the internet (every relay's public link ends there), so that edge is its
netfilter: a DNAT of ``relay:3478`` to the standby's public ``address:3478`` for what the
client sends, conntrack turning the standby's answers back into ``relay:3478`` (IPv4 and
IPv6).  No ICE agent notices; the standby's XDP opens the flow from the next check naming
the session (registered with every relay): the transceiver's probe of the silent path
(transceiver/paths.py, 500 ms) or the client's consent check.  Why not the address itself
on the standby, VRRP or anycast style: a relay answers from its one public address per
family (``sr_config`` in bpf/splitrelay.h), so the standby would answer a moved flow from
its own address, and clients drop that.

With today's DNAT-only relays the transceiver answers the client's own address through
the relay whose public network that is (its route via that relay's internal address), so
that gateway address floats too, as VRRP does: the old holder releases it, the standby
adds it and announces it (gratuitous ARP, unsolicited NA with the override flag) so the
transceivers' neighbour entries follow at once.  With XDP translation the call arrives
from the standby's own internal address instead and the transceiver latches onto it
(transceiver/paths.py): the gateway need not float (``gateway=False``), the rest is the
same.  While the gateway is away its relay's control API (which listens on it) is out of
reach, as a dead relay's is; ``return_address`` brings both back.

``float_address`` and ``return_address`` are the fault and its repair (lab/faults.py's
``AddressFloats``); the record of a move lives next to the lab's state
(``<name>-floating.state``: not ``.json``, which names labs), so ``splitrelay lab fault``
from another process can undo it.  Timings:
tests/test_floating.py and bench/failover.py.
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import asdict, dataclass
from ipaddress import ip_address

from splitrelay.lab.links import IFA_F_NODAD, index, netlink
from splitrelay.lab.netns import LabError, in_netns
from splitrelay.lab.topology import STATE_DIR, Host, Lab

ETH_P_ARP = 0x0806
ND_NEIGHBOR_ADVERT, ND_OPT_TARGET_LL_ADDR, ND_NA_FLAG_OVERRIDE = 136, 2, 0x20000000
ALL_NODES = "ff02::1"


@dataclass
class FloatedAddress:
    """Relay ``relay``'s public address (and, with ``gateway``, its internal one) now served by ``standby``."""
    relay: int
    standby: int
    public: list[str]         # [IPv4, IPv6] of the address that moved
    to: list[str]             # the standby's own public [IPv4, IPv6] the edge maps it onto
    gateway: bool
    internal: list[str]       # the relay's internal [IPv4, IPv6]: the gateway that floats with it

    def to_dict(self) -> dict:
        return asdict(self)


def state_path(lab: Lab):  # noqa: ANN201
    return STATE_DIR / f"{lab.name}-floating.state"


def floated(lab: Lab) -> FloatedAddress | None:
    """The move in force on this lab, None when every address is at home."""
    try:
        return FloatedAddress(**json.loads(state_path(lab).read_text()))
    except FileNotFoundError:
        return None


def float_address(lab: Lab, relay: int = 1, standby: int = 2, gateway: bool = True) -> FloatedAddress:
    """Move relay ``relay``'s public address (IPv4 and IPv6, the relay port) to relay ``standby``:
    the client's packets for it reach the standby from now on, answers come back from it.

    ``gateway``: the relay's internal address (the transceivers' route back to its public
    network) moves as well, needed while relays only DNAT.  Took 41 ms on an idle machine (two
    netfilter commands, two netlink steps); ``LabError`` when an address is already floated.
    """
    if relay == standby:
        raise LabError(f"relay {relay} cannot float its address to itself")
    old, new = lab.relay(relay), lab.relay(standby)
    if floated(lab) is not None:
        raise LabError(f"lab {lab.name} already has a floated address "
                       f"(splitrelay lab fault heal --name {lab.name})")
    move = FloatedAddress(relay, standby, [old.public.ip4, old.public.ip6], [new.public.ip4, new.public.ip6],
                          gateway, [old.internal.ip4, old.internal.ip6])
    state_path(lab).write_text(json.dumps(move.to_dict()))
    _edge_nat(lab, move, add=True)
    if gateway:
        _release(old.internal)
        _adopt(new.internal.netns, new.internal.ifname, old.internal)
    return move


def return_address(lab: Lab) -> FloatedAddress | None:
    """Undo ``float_address``: the address and its gateway home again (announced), the edge's NAT and
    its conntrack entries gone, so the client's next packets reach the relay again; idempotent."""
    move = floated(lab)
    if move is None:
        return None
    old, new = lab.relay(move.relay), lab.relay(move.standby)
    _edge_nat(lab, move, add=False)
    if move.gateway:
        _release(Host(new.internal.netns, new.internal.ifname, *move.internal))
        _adopt(old.internal.netns, old.internal.ifname, old.internal)
    state_path(lab).unlink(missing_ok=True)
    return move


def _edge_nat(lab: Lab, move: FloatedAddress, add: bool) -> None:
    """The provider edge's 1:1 NAT, in the client's namespace (the lab's internet)."""
    for tool, public, to in (("iptables", move.public[0], move.to[0]),
                             ("ip6tables", move.public[1], f"[{move.to[1]}]")):
        rule = ["-d", public, "-p", "udp", "--dport", str(lab.relay_port), "-j", "DNAT",
                "--to-destination", f"{to}:{lab.relay_port}"]
        if add:
            lab.run(lab.client.netns, [tool, "-w", "5", "-t", "nat", "-A", "OUTPUT", *rule])
        else:
            lab.run(lab.client.netns, [tool, "-w", "5", "-t", "nat", "-D", "OUTPUT", *rule], check=False)
    if not add:   # mappings made while the address was away would go on sending to the standby
        _flush_conntrack(lab.client.netns)


def _flush_conntrack(netns: str) -> None:
    from pyroute2 import Conntrack

    def flush() -> None:
        with Conntrack() as ct:
            ct.flush()
    in_netns(netns, flush)


def _release(holder: Host) -> None:
    """Take ``holder``'s IPv4 and IPv6 addresses off its interface (the old holder lets go)."""
    def release(ipr) -> None:  # noqa: ANN001
        link = index(ipr, holder.ifname)
        for addr in ipr.get_addr(index=link):
            if addr.get_attr("IFA_ADDRESS") in (holder.ip4, holder.ip6):
                ipr.addr("del", index=link, address=addr.get_attr("IFA_ADDRESS"), prefixlen=addr["prefixlen"],
                         family=addr["family"])
    netlink(holder.netns, release)


def _adopt(netns: str, ifname: str, address: Host) -> None:
    """Add ``address``'s IPv4 and IPv6 on ``ifname`` in ``netns`` and announce them to the segment."""
    home = address.netns == netns   # back on its own relay: the prefix it was built with
    def adopt(ipr) -> str:  # noqa: ANN001
        link = index(ipr, ifname)
        held = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=link)}   # a half-done move, healed
        if address.ip4 not in held:
            ipr.addr("add", index=link, address=address.ip4, prefixlen=24 if home else 32)
        if address.ip6 not in held:
            ipr.addr("add", index=link, address=address.ip6, prefixlen=64 if home else 128, flags=IFA_F_NODAD)
        return ipr.get_links(link)[0].get_attr("IFLA_ADDRESS")
    mac = netlink(netns, adopt)
    announce(netns, ifname, mac, address.ip4, address.ip6)


def announce(netns: str, ifname: str, mac: str, ip4: str, ip6: str) -> None:
    """A gratuitous ARP for ``ip4`` and an unsolicited Neighbour Advertisement (override) for ``ip6``,
    from ``mac`` out of ``ifname``: neighbours holding an entry for them switch to ``mac`` at once
    (Linux overrides an entry on a gratuitous ARP and on an NA with the O flag)."""
    hw = bytes.fromhex(mac.replace(":", ""))

    def send() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
            raw.bind((ifname, 0))
            arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, hw, socket.inet_aton(ip4),
                              b"\0" * 6, socket.inet_aton(ip4))
            raw.send(b"\xff" * 6 + hw + struct.pack("!H", ETH_P_ARP) + arp)
        with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as icmp:
            icmp.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
            icmp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
            # the kernel fills in the ICMPv6 checksum of a raw ICMPv6 socket
            na = struct.pack("!BBHI16sBB6s", ND_NEIGHBOR_ADVERT, 0, 0, ND_NA_FLAG_OVERRIDE,
                             ip_address(ip6).packed, ND_OPT_TARGET_LL_ADDR, 1, hw)
            icmp.sendto(na, (ALL_NODES, 0, 0, socket.if_nametoindex(ifname)))
    in_netns(netns, send)
