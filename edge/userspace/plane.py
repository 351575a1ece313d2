"""The userspace relay: the XDP data plane's semantics on ordinary UDP sockets.

The fallback for hosts that cannot run XDP (no bcc, no CAP_BPF, a kernel or NIC
without it) and the baseline every benchmark figure of the XDP path is compared
with.  ``UserspacePlane`` is a ``DataPlane`` (edge/plane.py) like the XDP one (the
control API, the metrics and the agent use either), holds its tables in Python
dicts, and relays on the running asyncio loop:

* one public UDP socket per configured public address (``public_ip4`` /
  ``public_ip6`` on ``relay_port``).  Every datagram is judged exactly as
  ``xdp_public`` judges it (``bpf/relay.c``): RFC 7983 class by the first byte;
  a STUN Binding Request is routed by its server ufrag (the session table, or a
  routing hint under policy ``hint``, keyed v2 hints and ``forged_hint`` as in
  XDP) by ``routing.route``, the decision the XDP program is fuzzed against,
  so every drop reason is the same; every other STUN, DTLS and SRTP/SRTCP packet follows the flow of the
  client's (ip, port); the per-session allowance (``max_session_flows``) and the
  flow table size are enforced the same way (refuse and count, never evict).
* one UDP socket per flow on the relay's *internal* address (ephemeral port),
  connected to the owning backend: the client's packets leave through it, and
  what the backend sends back on it leaves through the public socket to the
  client, so the client only ever sees the relay's public address and port.

The one difference a transceiver can see: without TPROXY, userspace cannot
forward a packet with the client's source address, so **the transceiver sees
the relay's internal address and the flow's port as its peer**, not the client.
ICE copes: the transceiver's mux routes a new source address by the ufrag of
its first Binding Request, and aioice learns the address as a peer-reflexive
candidate and answers it.  The transceiver's own checks toward the client's
real candidates go nowhere (the relay forwards nothing in its kernel), which
ICE also copes with; the XDP path forwards them (``backend_no_flow``).

Other differences (docs/DESIGN.md, "Userspace relay"): state lives in this
process, so an agent restart loses every flow and session (transceivers
re-register their sessions when the boot id changes, but running calls do not
survive: the new flow gets a new internal port); a flow needs a file
descriptor, so the default table is the smaller of ``SR_MAX_FLOWS``, 65536 and
what RLIMIT_NOFILE allows; a STUN request whose backend lacks the client's
address family is dropped (``family_mismatch``) without a flow, where XDP
makes the flow first; ``client_mac`` is not known (all zeros).

Counters use the XDP names, indexes and meanings (``bpf/splitrelay.h`` via
``edge/counters.py``); their bytes are the Ethernet frame the datagram would
be on the wire (UDP payload + 8 + 20 or 40 + 14), what XDP counts for an
untagged frame without IP options, so byte rates compare across data paths.
Flow times are ``time.monotonic_ns()``, the clock of ``bpf_ktime_get_ns``.

The hot path is ``relay.py``; this module is the plane around it:
the tables' control calls, the limits, and the agent's lifecycle.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time

from splitrelay import defaults
from splitrelay.bpf import consts
from splitrelay.edge import counters as counters_mod
from splitrelay.edge import interfaces
from splitrelay.edge.plane import PENDING_TIMEOUT_S, PlaneConfig
from splitrelay.edge.records import (
    NO_MAC,
    Attachment,
    Backend,
    DataPlaneError,
    Flow,
    RelayConfig,
    Session,
    TableFullError,
    check_ufrag,
    parse_ip,
)
from splitrelay.edge.userspace.relay import OVERHEAD, UserspaceRelay, LiveFlow

log = logging.getLogger(__name__)

KIND = "userspace"
FD_RESERVE = 256                 # descriptors kept for the control API, logs, the loop itself
DEFAULT_MAX_FLOWS = 65536


def table_sizes() -> dict[str, int]:
    """SR_MAX_BACKENDS, SR_MAX_SESSIONS and SR_MAX_FLOWS from their single definition, bpf/splitrelay.h."""
    return {"SR_MAX_BACKENDS": consts.MAX_BACKENDS, "SR_MAX_SESSIONS": consts.MAX_SESSIONS,
            "SR_MAX_FLOWS": consts.MAX_FLOWS}


def default_max_flows() -> int:
    """The flow table size this process can hold: one file descriptor per flow.

    Raises the soft RLIMIT_NOFILE to the hard limit first (allowed without privilege).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    budget = DEFAULT_MAX_FLOWS if soft == resource.RLIM_INFINITY else soft - FD_RESERVE
    return max(1, min(consts.MAX_FLOWS, DEFAULT_MAX_FLOWS, budget))


def _normal_ip(ip: str) -> tuple[int, str]:
    """(family, the address as recvfrom spells it): the flow table's key form."""
    addr = parse_ip(ip)
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    return family, socket.inet_ntop(family, addr.packed)


class UserspacePlane:
    """A ``DataPlane`` (edge/plane.py) on UDP sockets: it holds the relay (``relay``: the sockets, the
    hot path and the tables they are judged by) and answers the tables' control calls."""

    kind = KIND
    reads_block = False            # the tables live on the loop: they are read there
    attachments: tuple[Attachment, ...] = ()   # nothing is attached to any interface

    def __init__(self, plane_config: PlaneConfig) -> None:
        c = self.plane_config = plane_config
        self.relay = UserspaceRelay(int(c.max_flows) if c.max_flows else default_max_flows(),
                                    c.internal_ip4, c.internal_ip6)
        self.instance = c.instance
        self.max_backends = consts.MAX_BACKENDS
        self.max_sessions = consts.MAX_SESSIONS

    @staticmethod
    def check(c: PlaneConfig) -> None:
        """Nothing to refuse: the plane only binds sockets (any interface, no next hop to resolve)."""

    # -- lifecycle (DataPlane) -------------------------------------------------------------

    def setup(self) -> str:
        """Configure the relay (blocking: reads the internal interface's addresses); ``activate`` binds.

        Flow sockets bind to the internal address of their family, so backends see (and
        answer) the relay's internal address; without one the kernel picks the source.
        """
        c = self.plane_config
        found = interfaces.addresses(c.internal_iface)
        self.relay.internal_ips[socket.AF_INET] = c.internal_ip4 or found.get(4)
        self.relay.internal_ips[socket.AF_INET6] = c.internal_ip6 or found.get(6)
        for family, public in ((socket.AF_INET, c.public_ip4), (socket.AF_INET6, c.public_ip6)):
            version = 4 if family == socket.AF_INET else 6
            if public and not self.relay.internal_ips[family]:
                log.warning("%s has no IPv%d address: IPv%d flows leave from whatever source the kernel picks",
                            c.internal_iface, version, version)
        # no Ethernet headers to write: no MACs; it translates by its sockets, not by sr_config's sets
        self.configure(c.relay_config(translate=False, internal_ip4=None, internal_ip6=None, internal_more=(),
                                      translate_ports=defaults.TRANSLATE_PORTS))
        return KIND

    def activate(self, loop: asyncio.AbstractEventLoop) -> str:
        bound = self.relay.start(loop)
        where = ", ".join(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip, port in bound)
        internal = ", ".join(ip for ip in self.relay.internal_ips.values() if ip) or "kernel-chosen"
        return f"userspace relay on {where}, flows from {internal}"

    def shutdown(self) -> None:
        """The relay lives in this process: its sockets close with it, whatever the agent's options say."""
        if self.relay.running:
            self.relay.close()
            log.info("userspace relay of %s stopped: its flows and sessions are gone", self.instance)

    def next_hop_mac(self, ip: str) -> str:
        """What a backend PUT asks instead of a next-hop MAC: is ``ip`` routable from the internal side?

        The kernel routes every forwarded packet, so no MAC is needed; returns ``NO_MAC`` or raises
        DataPlaneError with the kernel's reason (no route, address not on this host).
        """
        family, ip = _normal_ip(ip)
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                if self.relay.internal_ips[family]:
                    probe.bind((self.relay.internal_ips[family], 0))
                probe.connect((ip, 9))   # a route lookup; nothing is sent
            except OSError as exc:
                raise DataPlaneError(f"no route to {ip}: {exc.strerror or exc}") from None
        return NO_MAC

    def internal_mac(self) -> str:
        return NO_MAC

    # -- config (the relay's own) ----------------------------------------------------------

    def configure(self, cfg: RelayConfig) -> None:
        self.relay.configure(cfg)

    def config(self) -> RelayConfig | None:
        return self.relay.config()

    # -- flows -----------------------------------------------------------------------------

    @staticmethod
    def _flow_record(flow: LiveFlow) -> Flow:
        return Flow(client_ip=flow.key[0], client_port=flow.key[1], backend_id=flow.backend_id, ufrag=flow.ufrag,
                    client_mac=NO_MAC, created_ns=flow.created_ns, last_seen_ns=flow.last_seen_ns,
                    packets=flow.packets, bytes=flow.bytes, rx_packets=flow.rx_packets, rx_bytes=flow.rx_bytes,
                    pending=flow.pending)

    def _find(self, client: tuple[str, int]) -> LiveFlow | None:
        return self.relay.flows.get((_normal_ip(client[0])[1], int(client[1])))

    def flows(self, limit: int | None = None) -> list[Flow]:
        out = []
        for flow in self.relay.flows.values():
            if limit is not None and len(out) >= limit:
                break
            out.append(self._flow_record(flow))
        return out

    def flow(self, client: tuple[str, int]) -> Flow | None:
        found = self._find(client)
        return self._flow_record(found) if found else None

    def flow_socket_name(self, client: tuple[str, int]) -> tuple[str, int] | None:
        """The relay's internal (address, port) a flow's packets come from: the transceiver's view of it."""
        found = self._find(client)
        return found.sock.getsockname()[:2] if found else None

    def del_flow(self, client: tuple[str, int]) -> bool:
        found = self._find(client)
        if found is None:
            return False
        self.relay.remove(found)
        return True

    def age_flows(self, idle_s: float, pending_s: float = PENDING_TIMEOUT_S) -> int:
        """Remove flows idle (no client packet) for longer than idle_s, and pending ones opened longer
        than pending_s ago, closing their sockets.

        The allowance in use is counted exactly as flows come and go: nothing to recount.
        """
        now = time.monotonic_ns()
        cutoff, pending_cutoff = now - int(idle_s * 1e9), now - int(pending_s * 1e9)
        stale = [flow for flow in self.relay.flows.values()
                 if flow.last_seen_ns < cutoff or (flow.pending and flow.created_ns < pending_cutoff)]
        for flow in stale:
            self.relay.remove(flow)
        return len(stale)

    # -- backends and sessions -------------------------------------------------------------

    def set_backend(self, b: Backend) -> None:
        old = self.relay.backends.get(b.backend_id)
        if old is None and len(self.relay.backends) >= self.max_backends:
            raise TableFullError(f"the backend table is full ({self.max_backends} entries)")
        self.relay.backends[b.backend_id] = b
        if old is not None and (old.ip4, old.ip6, old.port) != (b.ip4, b.ip6, b.port):
            # XDP looks the backend up per packet; here each flow's socket is pointed at it again
            for flow in [f for f in self.relay.flows.values() if f.backend_id == b.backend_id]:
                target = b.ip6 if flow.side.v6 else b.ip4
                try:
                    if target is None:
                        raise OSError("the backend has no address of the flow's family")
                    flow.sock.connect((target, b.port))
                except OSError:
                    self.relay.remove(flow)

    def backend(self, backend_id: int) -> Backend | None:
        return self.relay.backends.get(backend_id)

    def backends(self) -> list[Backend]:
        return sorted(self.relay.backends.values(), key=lambda b: b.backend_id)

    def del_backend(self, backend_id: int) -> bool:
        """Remove a backend with its sessions and flows; False if it was not there."""
        if self.relay.backends.pop(backend_id, None) is None:
            return False
        for ufrag in [u for u, s in self.relay.sessions.items() if s.backend_id == backend_id]:
            self.del_session(ufrag)
        for flow in [f for f in self.relay.flows.values() if f.backend_id == backend_id]:
            self.relay.remove(flow)
        return True

    def set_session(self, ufrag: str, backend_id: int) -> None:
        check_ufrag(ufrag)
        if ufrag not in self.relay.sessions and len(self.relay.sessions) >= self.max_sessions:
            raise TableFullError(f"the session table is full ({self.max_sessions} entries)")
        self.relay.sessions[ufrag] = Session(ufrag, backend_id, time.monotonic_ns())

    def session(self, ufrag: str) -> Session | None:
        found = self.relay.sessions.get(ufrag)
        if found is None:
            return None
        return Session(found.ufrag, found.backend_id, found.created_ns, self.relay.ufrag_flows.get(ufrag, 0))

    def sessions(self) -> list[Session]:
        return [Session(s.ufrag, s.backend_id, s.created_ns, self.relay.ufrag_flows.get(s.ufrag, 0))
                for s in self.relay.sessions.values()]

    def del_session(self, ufrag: str) -> bool:
        """Remove a session and the flows it created; False if it was not there."""
        relay = self.relay
        removed = relay.sessions.pop(ufrag, None) is not None
        if relay.ufrag_flows.get(ufrag) or ufrag in relay.pending_rings:   # its confirmed or its pending flows
            for flow in [f for f in relay.flows.values() if f.ufrag == ufrag]:
                relay.remove(flow)
        return removed

    def del_sessions(self, ufrags: list[str]) -> dict[str, bool]:
        """``del_session`` for several (the XDP plane reads its flow table once for all)."""
        return {ufrag: self.del_session(ufrag) for ufrag in ufrags}

    # -- stats -----------------------------------------------------------------------------

    def map_fill(self) -> dict[str, tuple[int, int]]:
        """Entries and capacity of each table, under the XDP map names."""
        addrs = sum((b.ip4 is not None) + (b.ip6 is not None) for b in self.relay.backends.values())
        return {"backends": (len(self.relay.backends), self.max_backends),
                "backend_addrs": (addrs, 2 * self.max_backends),
                "sessions": (len(self.relay.sessions), self.max_sessions),
                "flows": (len(self.relay.flows), self.relay.max_flows)}

    def counters(self) -> dict[str, counters_mod.Counter]:
        """Every counter, keyed by its enum name, in the order of SR_STATS (as the XDP plane's)."""
        packets, bytes_ = self.relay.packet_counts, self.relay.byte_counts
        return {spec.name: counters_mod.Counter(spec, packets[spec.index], bytes_[spec.index])
                for spec in counters_mod.counter_specs()}

    def reset_counters(self) -> None:
        n = len(self.relay.packet_counts)
        self.relay.packet_counts[:] = [0] * n
        self.relay.byte_counts[:] = [0] * n


__all__ = ["KIND", "NO_MAC", "OVERHEAD", "TableFullError",
           "UserspacePlane", "default_max_flows", "table_sizes"]
