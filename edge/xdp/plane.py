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
from dataclasses import dataclass

from splitrelay.edge import interfaces, neighbours
from splitrelay.edge.counters import Counter
from splitrelay.edge.plane import PENDING_TIMEOUT_S, PlaneConfig
from splitrelay.edge.records import (
    Attachment,
    Backend,
    DataPlaneError,
    Flow,
    RelayConfig,
    Session,
    check_internal_sets,
)
from splitrelay.edge.xdp.maps import XdpMaps
from splitrelay.edge.xdp.loader import ATTACH_MODES, PIN_ROOT, refuse_host_links

log = logging.getLogger(__name__)


@dataclass
class XdpOptions:
    """What only the XDP plane needs."""

    gateway_ip: str | None = None           # the public next hop, resolved to a MAC at setup
    gateway_mac: str | None = None          # ... or given
    gateway_timeout_s: float = 3.0
    neighbour_timeout_s: float = 1.5        # a backend PUT answers 422 before a 2 s client gives up
    mode: str = "auto"                      # auto | native | generic
    pin_root: str = PIN_ROOT
    detach_on_exit: bool = False
    internal_ip4: str | None = None         # translate: flows' source (default: the internal iface's)
    internal_ip6: str | None = None
    internal_more: tuple[str, ...] = ()     # translate: further internal addresses (edge/records.py sets)
    port_quarantine_s: float = 60.0         # translate: a freed port waits longer than the idle timeout

    def check(self, common: PlaneConfig) -> None:
        """One-line DataPlaneError for what this plane cannot run with."""
        check_internal_sets(self.internal_ip4, self.internal_ip6, self.internal_more)
        refuse_host_links(common.public_iface, common.internal_iface)
        if not (self.gateway_ip or self.gateway_mac):
            raise DataPlaneError("the public side needs a next hop: give a gateway IP or MAC")
        if self.mode not in ATTACH_MODES:
            raise DataPlaneError(f"mode must be auto, native or generic, got {self.mode!r}")


class XdpPlane:
    """A ``DataPlane`` (edge/plane.py) on the XDP programs and their pinned maps (``maps``)."""

    kind = "xdp"
    reads_block = True   # a million-flow walk takes seconds: the agent runs it off the loop

    def __init__(self, common: PlaneConfig, options: XdpOptions | None = None) -> None:
        o = options or XdpOptions()
        self.maps = XdpMaps(instance=common.instance, pin_root=o.pin_root, max_flows=common.max_flows,
                            port_range=common.translate_ports, port_quarantine_s=o.port_quarantine_s)
        self.common = common
        self.options = options or XdpOptions()
        self._attached = False   # this plane attached the programs (so detach_on_exit may remove them)

    def relay_config(self) -> RelayConfig:
        """The relay's config from the interfaces and the neighbour table (blocking)."""
        c, o = self.common, self.options
        gateway_mac = o.gateway_mac or neighbours.resolve(o.gateway_ip, c.public_iface,
                                                          timeout=o.gateway_timeout_s)
        internal = {4: o.internal_ip4, 6: o.internal_ip6}
        if c.translate:
            internal = _internal_addresses(c.internal_iface, o)
        return RelayConfig(
            relay_port=c.relay_port, public_mac=neighbours.interface_mac(c.public_iface),
            gateway_mac=gateway_mac, public_ip4=c.public_ip4, public_ip6=c.public_ip6, policy=c.policy,
            max_session_flows=c.max_session_flows, hint_key=c.hint_key, translate=c.translate,
            internal_ip4=internal.get(4) if c.translate else None,
            internal_ip6=internal.get(6) if c.translate else None, translate_ports=c.translate_ports,
            internal_more=o.internal_more if c.translate else (),
        )

    def setup(self) -> str:
        """Load (adopting pinned maps), configure, then attach; returns the XDP mode used."""
        relay = self.relay_config()
        if relay.translate:   # the pool and reverse array are sized for the address sets
            self.maps.xlate_addrs = max(1, len(relay.internal_sets()))
        self.maps.load()
        self.maps.configure(relay)
        self.maps.set_local_addrs(_own_addresses(self.common.public_iface, self.common.internal_iface))
        if relay.translate:   # before attaching; over pinned flows, skipping the ports they hold
            log.info("translation: %d free flow ports in %d-%d", self.maps.ports.refill(), *relay.translate_ports)
        mode = self.maps.attach(self.common.public_iface, self.common.internal_iface, mode=self.options.mode)
        self._attached = True
        return mode

    def activate(self, loop: asyncio.AbstractEventLoop) -> str:
        modes = sorted({a.mode for a in self.attachments})
        mode = modes[0] if len(modes) == 1 else "mixed"
        return f"XDP {mode} on {self.common.public_iface}/{self.common.internal_iface}"

    def shutdown(self) -> None:
        if not self._attached:
            return    # a failed start (say, maps pinned by another build) must not wipe a relay it never owned
        self._attached = False
        if self.options.detach_on_exit:
            self.maps.destroy([self.common.public_iface, self.common.internal_iface])
            log.info("detached XDP and removed pinned maps of %s", self.maps.instance)
        else:
            log.info("left XDP attached and maps pinned (%s): a restarted agent adopts them", self.maps.pin_dir)

    def next_hop_mac(self, ip: str) -> str:
        timeout = self.options.neighbour_timeout_s
        return neighbours.resolve_next_hop(ip, self.common.internal_iface, timeout=timeout)

    def internal_mac(self) -> str:
        return neighbours.interface_mac(self.common.internal_iface)

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


def _internal_addresses(iface: str, o: XdpOptions) -> dict[int, str]:
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
