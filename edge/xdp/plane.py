"""The XDP data plane (``bpf/relay.c``) as a ``DataPlane``: what the agent needs beyond the maps.

It holds ``maps.XdpMaps`` (``maps``: loads, attaches, reads and writes the
maps; the contract's table calls are its) and adds the plane's life around an
agent: the next hops it must resolve (the gateway on the public side, each
backend on the internal side, since XDP writes Ethernet headers itself), the
mode it attaches in, and what stays when the agent exits (by default
everything: programs attached, maps pinned, so a restarted agent adopts every
call; ``detach_on_exit`` removes what this agent attached).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from splitrelay.edge import interfaces, neighbours
from splitrelay.edge.counters import Counter
from splitrelay.edge.plane import PENDING_TIMEOUT_S, PlaneConfig
from splitrelay.edge.records import Attachment, Backend, DataPlaneError, Flow, RelayConfig, RelaySettings, Session
from splitrelay.edge.xdp.maps import XdpMaps
from splitrelay.edge.xdp.loader import check_mode, refuse_host_links

log = logging.getLogger(__name__)


class XdpPlane:
    """A ``DataPlane`` (edge/plane.py) on the XDP programs and their pinned maps (``maps``)."""

    kind = "xdp"
    reads_block = True   # a million-flow walk takes seconds: the agent runs it off the loop

    def __init__(self, plane_config: PlaneConfig) -> None:
        c = self.plane_config = plane_config
        self.maps = XdpMaps(instance=c.instance, pin_root=c.pin_root, max_flows=c.max_flows,
                            port_range=c.translate_ports, port_quarantine_s=c.port_quarantine_s)
        self._attached = False   # this plane attached the programs (so detach_on_exit may remove them)

    @staticmethod
    def check(c: PlaneConfig) -> None:
        """One-line DataPlaneError for what this plane cannot run with (before anything is loaded)."""
        refuse_host_links(c.public_iface, c.internal_iface)
        if not (c.gateway_ip or c.gateway_mac):
            raise DataPlaneError("the public side needs a next hop: give a gateway IP or MAC")
        check_mode(c.mode)

    def relay_config(self) -> RelayConfig:
        """The relay's config from the interfaces and the neighbour table (blocking)."""
        c = self.plane_config
        gateway_mac = c.gateway_mac or neighbours.resolve(c.gateway_ip, c.public_iface,
                                                          timeout=c.gateway_timeout_s)
        resolved = {"internal_ip4": None, "internal_ip6": None, "internal_more": ()}   # DNAT: none
        if c.translate:
            internal = _internal_addresses(c.internal_iface, c)
            resolved = {"internal_ip4": internal.get(4), "internal_ip6": internal.get(6)}
        return c.relay_config(neighbours.interface_mac(c.public_iface), gateway_mac, **resolved)

    def setup(self) -> str:
        """Load (adopting pinned maps), configure, then attach; returns the XDP mode used."""
        relay = self.relay_config()
        if relay.translate:   # the pool and reverse array are sized for the address sets
            self.maps.xlate_addrs = max(1, len(relay.internal_sets()))
        self.maps.load()
        self.maps.configure(relay)
        self.maps.set_local_addrs(_own_addresses(self.plane_config.public_iface, self.plane_config.internal_iface))
        if relay.translate:   # before attaching; over pinned flows, skipping the ports they hold
            log.info("translation: %d free flow ports in %d-%d", self.maps.ports.refill(), *relay.translate_ports)
        c = self.plane_config
        mode = self.maps.attach(c.public_iface, c.internal_iface, mode=c.mode)
        self._attached = True
        return mode

    def activate(self, loop: asyncio.AbstractEventLoop) -> str:
        modes = sorted({a.mode for a in self.attachments})
        mode = modes[0] if len(modes) == 1 else "mixed"
        return f"XDP {mode} on {self.plane_config.public_iface}/{self.plane_config.internal_iface}"

    def shutdown(self) -> None:
        if not self._attached:
            return    # a failed start (say, maps pinned by another build) must not wipe a relay it never owned
        self._attached = False
        if self.plane_config.detach_on_exit:
            self.maps.destroy([self.plane_config.public_iface, self.plane_config.internal_iface])
            log.info("detached XDP and removed pinned maps of %s", self.maps.instance)
        else:
            log.info("left XDP attached and maps pinned (%s): a restarted agent adopts them", self.maps.pin_dir)

    def next_hop_mac(self, ip: str) -> str:
        c = self.plane_config
        return neighbours.resolve_next_hop(ip, c.internal_iface, timeout=c.neighbour_timeout_s)

    def internal_mac(self) -> str:
        return neighbours.interface_mac(self.plane_config.internal_iface)

    # -- tables: the maps' (edge/xdp/maps.py) ------------------------------------------------

    @property
    def attachments(self) -> list[Attachment]:
        return self.maps.attachments

    @property
    def flows_after_ageing(self) -> int | None:
        """The flow count the last ``age_flows`` walk left (/metrics reads it instead of walking)."""
        return self.maps.flows_after_ageing

    def configure(self, cfg: RelayConfig) -> None:
        self.maps.configure(cfg)

    def config(self) -> RelayConfig | None:
        return self.maps.config()

    def set_backend(self, backend: Backend) -> None:
        self.maps.set_backend(backend)

    def backend(self, backend_id: int) -> Backend | None:
        return self.maps.backend(backend_id)

    def backends(self) -> list[Backend]:
        return self.maps.backends()

    def del_backend(self, backend_id: int) -> bool:
        return self.maps.del_backend(backend_id)

    def set_session(self, ufrag: str, backend_id: int) -> None:
        self.maps.set_session(ufrag, backend_id)

    def session(self, ufrag: str) -> Session | None:
        return self.maps.session(ufrag)

    def sessions(self) -> list[Session]:
        return self.maps.sessions()

    def del_sessions(self, ufrags: list[str]) -> dict[str, bool]:
        return self.maps.del_sessions(ufrags)

    def del_session(self, ufrag: str) -> bool:
        return self.maps.del_session(ufrag)

    def flows(self, limit: int | None = None) -> list[Flow]:
        return self.maps.flows(limit)

    def flow(self, client: tuple[str, int]) -> Flow | None:
        return self.maps.flow(client)

    def del_flow(self, client: tuple[str, int]) -> bool:
        return self.maps.del_flow(client)

    def age_flows(self, idle_s: float, pending_s: float = PENDING_TIMEOUT_S) -> int:
        return self.maps.age_flows(idle_s, pending_s)

    def map_fill(self, known: dict[str, int] | None = None) -> dict[str, tuple[int, int]]:
        return self.maps.map_fill(known)

    def counters(self) -> dict[str, Counter]:
        return self.maps.counters()

    def reset_counters(self) -> None:
        self.maps.reset_counters()


def _own_addresses(*ifaces: str | None) -> list[str]:
    """Every global address of the relay's interfaces: what a backend sends there is for the host
    (sockets on its internal address), passed to the kernel, never forwarded (blocking)."""
    return sorted({addr for iface in dict.fromkeys(ifaces) if iface for _, addr in interfaces.address_list(iface)})


def _internal_addresses(iface: str, o: RelaySettings) -> dict[int, str]:
    """Translation's first internal address of each family: the given ones, each of which (and of
    ``internal_more``) must be on ``iface``, else the interface's first of each family (blocking)."""
    given = [ip for ip in (o.internal_ip4, o.internal_ip6, *o.internal_more) if ip]
    if not given:
        return interfaces.addresses(iface)
    present = {ipaddress.ip_address(addr) for _, addr in interfaces.address_list(iface)}
    for ip in given:
        if ipaddress.ip_address(ip) not in present:
            raise DataPlaneError(f"internal address {ip} is not configured on {iface}")
    return {4: o.internal_ip4, 6: o.internal_ip6}
