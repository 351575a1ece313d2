"""The userspace relay: the XDP data plane's semantics on ordinary UDP sockets.

The fallback for hosts that cannot run XDP (no bcc, no CAP_BPF, a kernel or NIC
without it) and the baseline every benchmark figure of the XDP path is compared
with.  ``UserspaceDatapath`` answers the same calls as ``datapath.Datapath`` (the
control API, the metrics and the agent use either), holds its tables in Python
dicts, and relays on the running asyncio loop:

* one public UDP socket per configured public address (``public_ip4`` /
  ``public_ip6`` on ``relay_port``).  Every datagram is judged exactly as
  ``xdp_public`` judges it (``bpf/relay.c``): RFC 7983 class by the first byte;
  a STUN Binding Request is routed by its server ufrag (the session table, or a
  routing hint under policy ``hint``, keyed v2 hints and ``forged_hint`` as in
  XDP), parsed by the reference parser ``wire/stun.py`` so every drop reason is
  the same; every other STUN, DTLS and SRTP/SRTCP packet follows the flow of the
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
address family is dropped (``family_mismatch``) before a flow is made, where
XDP makes the flow first; ``client_mac`` is not known (all zeros).

Counters use the XDP names, indexes and meanings (``bpf/splitrelay.h`` via
``edge/counters.py``); their bytes are the Ethernet frame the datagram would
be on the wire (UDP payload + 8 + 20 or 40 + 14), what XDP counts for an
untagged frame without IP options, so byte rates compare across data paths.
Flow times are ``time.monotonic_ns()``, the clock of ``bpf_ktime_get_ns``.

The hot path is a ``loop.add_reader`` callback per socket that drains up to
``BATCH`` datagrams per wakeup with ``recvfrom_into`` into one preallocated
buffer and forwards each at once with a non-blocking ``send``/``sendto`` of a
memoryview (no copy, no per-packet allocation but the address tuple).  A send
the kernel refuses (socket buffer full, no route) is dropped and counted
``redirect_failed``, as XDP counts a failed redirect: nothing is queued in
Python, so memory is bounded by the tables.  (asyncio's datagram transports
queue in Python whenever the kernel refuses a send, read one datagram per
wakeup, and cannot be created synchronously for a flow's first packet;
``add_reader`` on plain sockets avoids all three.)  No callback raises and
nothing is logged per packet.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import resource
import socket
import time
from functools import lru_cache

from splitrelay.bpf import SOURCE_DIR
from splitrelay.edge import counters as counters_mod
from splitrelay.edge.datapath import Backend, DatapathError, Flow, RelayConfig, Session
from splitrelay.wire.hint import FORGED
from splitrelay.wire.hint import inspect as hint_inspect
from splitrelay.wire.stun import StunError, server_ufrag

log = logging.getLogger(__name__)

KIND = "userspace"
NO_MAC = "00:00:00:00:00:00"     # userspace never sees or writes Ethernet headers
BATCH = 64                       # datagrams per socket per loop wakeup: the control API still gets turns
RECV_SIZE = 65536                # any UDP datagram, never truncated
PUBLIC_RCVBUF = 4 << 20          # ask for room for bursts (the kernel caps it at net.core.rmem_max)
FD_RESERVE = 256                 # descriptors kept for the control API, logs, the loop itself
DEFAULT_MAX_FLOWS = 65536
ETH_HEADER, UDP_HEADER = 14, 8
OVERHEAD = {socket.AF_INET: ETH_HEADER + 20 + UDP_HEADER, socket.AF_INET6: ETH_HEADER + 40 + UDP_HEADER}
ERROR_LOG_INTERVAL_S = 60.0


class TableFullError(Exception):
    """A backend or session table is full (the control API answers 503, as for a full BPF map)."""


@lru_cache(maxsize=1)
def table_sizes() -> dict[str, int]:
    """SR_MAX_BACKENDS, SR_MAX_SESSIONS and SR_MAX_FLOWS from their single definition, bpf/splitrelay.h."""
    header = (SOURCE_DIR / "splitrelay.h").read_text()
    found = dict(re.findall(r"#define\s+(SR_MAX_(?:BACKENDS|SESSIONS|FLOWS))\s+(\d+)", header))
    return {name: int(value) for name, value in found.items()}


def _counter_index() -> dict[str, int]:
    return {spec.name: spec.index for spec in counters_mod.counter_specs()}


_IDX = _counter_index()
C_FWD_UFRAG = _IDX["IN_FWD_STUN_UFRAG"]
C_FWD_HINT = _IDX["IN_FWD_STUN_HINT"]
C_FWD_FLOW = _IDX["IN_FWD_FLOW"]
C_NO_FLOW = _IDX["IN_DROP_NO_FLOW"]
C_UNKNOWN_UFRAG = _IDX["IN_DROP_UNKNOWN_UFRAG"]
C_NO_BACKEND = _IDX["IN_DROP_NO_BACKEND"]
C_UNKNOWN_CLASS = _IDX["IN_DROP_UNKNOWN_CLASS"]
C_IN_FAMILY = _IDX["IN_DROP_FAMILY"]
C_FLOW_FULL = _IDX["IN_DROP_FLOW_FULL"]
C_IN_REDIRECT = _IDX["IN_DROP_REDIRECT"]
C_SESSION_FLOWS = _IDX["IN_DROP_SESSION_FLOWS"]
C_FORGED = _IDX["IN_DROP_FORGED_HINT"]
C_OUT_FWD = _IDX["OUT_FWD"]
C_OUT_REDIRECT = _IDX["OUT_DROP_REDIRECT"]
# a StunError's reason is its counter's reason (wire/stun.py mirrors relay.c)
C_STUN_DROP = {spec.reason: spec.index for spec in counters_mod.counter_specs()
               if spec.direction == "ingress" and spec.verdict == "dropped"}


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
    return max(1, min(table_sizes()["SR_MAX_FLOWS"], DEFAULT_MAX_FLOWS, budget))


def interface_addresses(ifname: str) -> dict[int, str]:
    """The first global IPv4 and IPv6 address of ``ifname`` ({4: ip, 6: ip}); blocking (netlink).

    Call it off the event loop: pyroute2's synchronous API refuses to run on a loop's thread.
    """
    from pyroute2 import IPRoute

    out: dict[int, str] = {}
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise DatapathError(f"no interface named {ifname!r} in this network namespace")
        for msg in ipr.get_addr(index=found[0]):
            if msg["scope"] != 0:   # link-local, host: not an address a backend routes back to
                continue
            version = 4 if msg["family"] == socket.AF_INET else 6
            addr = msg.get_attr("IFA_LOCAL") if version == 4 else None
            out.setdefault(version, addr or msg.get_attr("IFA_ADDRESS"))
    return out


def _normal_ip(ip: str) -> tuple[int, str]:
    """(family, the address as recvfrom spells it): the flow table's key form."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise DatapathError(f"not an IP address: {ip!r}") from None
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    return family, socket.inet_ntop(family, addr.packed)


def _check_ufrag(ufrag: str) -> None:
    if not 4 <= len(ufrag.encode("ascii", "replace")) <= 32:
        raise DatapathError(f"ufrag must be 4..32 characters, got {len(ufrag)}")


class _Side:
    """One public socket (one address family) and where its flows' sockets bind."""

    __slots__ = ("family", "sock", "overhead", "internal_ip", "v6", "address")

    def __init__(self, family: int, sock: socket.socket, internal_ip: str | None) -> None:
        self.family = family
        self.sock = sock
        self.overhead = OVERHEAD[family]
        self.internal_ip = internal_ip
        self.v6 = family == socket.AF_INET6
        self.address = sock.getsockname()[:2]


class _Flow:
    __slots__ = ("key", "reply_to", "side", "backend_id", "ufrag", "sock", "fd", "created_ns", "last_seen_ns",
                 "packets", "bytes", "rx_packets", "rx_bytes")

    def __init__(self, key: tuple, reply_to: tuple, side: _Side, backend_id: int, ufrag: str,
                 sock: socket.socket, now: int, size: int) -> None:
        self.key = key
        self.reply_to = reply_to
        self.side = side
        self.backend_id = backend_id
        self.ufrag = ufrag
        self.sock = sock
        self.fd = sock.fileno()
        self.created_ns = now
        self.last_seen_ns = now
        self.packets = 1
        self.bytes = size
        self.rx_packets = 0
        self.rx_bytes = 0


class UserspaceDatapath:
    """The relay's tables and its asyncio relay; the same calls as ``Datapath`` (module docstring).

    Lifecycle: ``configure(cfg)``, then ``start()`` on the running loop (binds the
    public sockets), ``close()`` when done (closes every socket; state is gone).
    Every method runs on the loop's thread (the control API and ageing do).
    """

    kind = KIND

    def __init__(self, instance: str = "default", max_flows: int | None = None,
                 internal_ip4: str | None = None, internal_ip6: str | None = None) -> None:
        sizes = table_sizes()
        self.instance = instance
        self.max_flows = int(max_flows) if max_flows else default_max_flows()
        if self.max_flows < 1:
            raise DatapathError(f"flow table size must be >= 1, got {max_flows}")
        self.max_backends = sizes["SR_MAX_BACKENDS"]
        self.max_sessions = sizes["SR_MAX_SESSIONS"]
        self.internal_ips = {socket.AF_INET: internal_ip4, socket.AF_INET6: internal_ip6}
        self.attachments: list = []           # nothing is attached to any interface
        self.internal_errors = 0              # bugs caught on the hot path (never raised out of a callback)
        self._cfg: RelayConfig | None = None
        self._backends: dict[int, Backend] = {}
        self._sessions: dict[str, Session] = {}
        self._flows: dict[tuple, _Flow] = {}
        self._ufrag_flows: dict[str, int] = {}   # live flows per ufrag: each session's allowance in use
        n = len(counters_mod.counter_specs())
        self._packets = [0] * n
        self._bytes = [0] * n
        self._sides: list[_Side] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buf = bytearray(RECV_SIZE)
        self._view = memoryview(self._buf)
        self._policy_hint = False
        self._max_session_flows = 0
        self._hint_key: bytes | None = None
        self._last_error_log = 0.0

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return bool(self._sides)

    def configure(self, cfg: RelayConfig) -> None:
        """Set the relay's config; policy, allowance and hint key apply at once, addresses at ``start``."""
        if self.running and self._cfg and (cfg.relay_port, cfg.public_ip4, cfg.public_ip6) != (
                self._cfg.relay_port, self._cfg.public_ip4, self._cfg.public_ip6):
            raise DatapathError("the public address and port of a running userspace relay cannot change")
        self._cfg = cfg
        self._policy_hint = cfg.policy == "hint"
        self._max_session_flows = cfg.max_session_flows
        self._hint_key = cfg.hint_key

    def config(self) -> RelayConfig | None:
        return self._cfg

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> list[tuple[str, int]]:
        """Bind the public sockets and start relaying on ``loop`` (default: the running one).

        Returns the bound (address, port) pairs; raises DatapathError (nothing left bound) when
        an address cannot be bound.
        """
        if self._cfg is None:
            raise DatapathError("configure the relay before starting it")
        if self.running:
            return [side.address for side in self._sides]
        self._loop = loop or asyncio.get_running_loop()
        sides = []
        try:
            for family, ip in ((socket.AF_INET, self._cfg.public_ip4), (socket.AF_INET6, self._cfg.public_ip6)):
                if ip:
                    sides.append(_Side(family, self._public_socket(family, ip), self.internal_ips[family]))
        except BaseException:
            for side in sides:
                side.sock.close()
            raise
        self._sides = sides
        for side in sides:
            self._loop.add_reader(side.sock.fileno(), self._on_public, side)
        return [side.address for side in sides]

    def _public_socket(self, family: int, ip: str) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PUBLIC_RCVBUF)
            sock.setblocking(False)
            sock.bind((ip, self._cfg.relay_port))
        except OSError as exc:
            sock.close()
            host = f"[{ip}]" if family == socket.AF_INET6 else ip
            raise DatapathError(f"cannot bind the relay port {host}:{self._cfg.relay_port}: "
                                f"{exc.strerror or exc}") from None
        return sock

    def close(self) -> None:
        """Stop relaying: close every flow and public socket (tables and counters stay readable)."""
        for flow in list(self._flows.values()):
            self._remove(flow)
        sides, self._sides = self._sides, []
        for side in sides:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(side.sock.fileno())
            side.sock.close()

    def destroy(self, ifnames: list[str] | None = None) -> None:
        """``Datapath.destroy``'s counterpart: stop relaying (nothing is attached or pinned)."""
        self.close()

    def route_check(self, ip: str) -> str:
        """What a backend PUT asks instead of a next-hop MAC: is ``ip`` routable from the internal side?

        The kernel routes every forwarded packet, so no MAC is needed; returns ``NO_MAC`` or raises
        DatapathError with the kernel's reason (no route, address not on this host).
        """
        family, ip = _normal_ip(ip)
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                if self.internal_ips[family]:
                    probe.bind((self.internal_ips[family], 0))
                probe.connect((ip, 9))   # a route lookup; nothing is sent
            except OSError as exc:
                raise DatapathError(f"no route to {ip}: {exc.strerror or exc}") from None
        return NO_MAC

    # -- the hot path --------------------------------------------------------------------

    def _on_public(self, side: _Side) -> None:
        """Readable public socket: judge and forward up to BATCH datagrams (xdp_public)."""
        buf, view = self._buf, self._view
        recv = side.sock.recvfrom_into
        flows, backends, packets, bytes_ = self._flows, self._backends, self._packets, self._bytes
        overhead, v6 = side.overhead, side.v6
        monotonic_ns = time.monotonic_ns
        for _ in range(BATCH):
            try:
                n, addr = recv(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return    # a transient error (ENOMEM...): the next wakeup reads on
            try:
                size = n + overhead
                key = addr[:2] if v6 else addr
                first = buf[0] if n else 255
                if first <= 3:
                    self._stun(side, n, key, addr, size)
                    continue
                if not (20 <= first <= 63 or 128 <= first <= 191):
                    packets[C_UNKNOWN_CLASS] += 1     # ZRTP, TURN ChannelData, unassigned, empty
                    bytes_[C_UNKNOWN_CLASS] += size
                    continue
                flow = flows.get(key)                 # DTLS, RTP/RTCP: by flow
                if flow is None:
                    packets[C_NO_FLOW] += 1
                    bytes_[C_NO_FLOW] += size
                    continue
                if flow.backend_id not in backends:
                    packets[C_NO_BACKEND] += 1
                    bytes_[C_NO_BACKEND] += size
                    continue
                flow.last_seen_ns = monotonic_ns()
                flow.packets += 1
                flow.bytes += size
                try:
                    flow.sock.send(view[:n])
                except OSError:
                    packets[C_IN_REDIRECT] += 1
                    bytes_[C_IN_REDIRECT] += size
                    continue
                packets[C_FWD_FLOW] += 1
                bytes_[C_FWD_FLOW] += size
            except Exception:  # noqa: BLE001 - a bug must not stop the relay: count, log rarely
                self._internal_error()

    def _count(self, index: int, size: int) -> None:
        self._packets[index] += 1
        self._bytes[index] += size

    def _stun(self, side: _Side, n: int, key: tuple, addr: tuple, size: int) -> None:
        """A STUN packet from a client: a Binding Request opens or refreshes a flow, the rest go by flow."""
        try:
            ufrag = server_ufrag(bytes(self._view[:n]))
        except StunError as exc:
            self._count(C_STUN_DROP[exc.reason], size)
            return
        flows = self._flows
        flow = flows.get(key)
        if ufrag is None:   # valid STUN that is not a Binding Request (consent answers, indications)
            if flow is None:
                self._count(C_NO_FLOW, size)
                return
            if flow.backend_id not in self._backends:
                self._count(C_NO_BACKEND, size)
                return
            flow.last_seen_ns = time.monotonic_ns()
            flow.packets += 1
            flow.bytes += size
            self._send(flow, n, size, C_FWD_FLOW)
            return
        session = self._sessions.get(ufrag)
        if session is not None:
            backend_id, stat = session.backend_id, C_FWD_UFRAG
        else:
            hinted = hint_inspect(ufrag, self._hint_key)
            if hinted == FORGED:
                self._count(C_FORGED, size)
                return
            if not hinted:
                self._count(C_UNKNOWN_UFRAG, size)
                return
            if hinted not in self._backends:
                self._count(C_NO_BACKEND, size)   # a hint naming an unknown backend: in any policy
                return
            if not self._policy_hint:
                self._count(C_UNKNOWN_UFRAG, size)
                return
            backend_id, stat = hinted, C_FWD_HINT
        backend = self._backends.get(backend_id)
        if backend is None:
            self._count(C_NO_BACKEND, size)
            return
        if flow is not None and flow.backend_id == backend_id:
            # consent check (or an ICE restart on the same 5-tuple): refresh
            flow.last_seen_ns = time.monotonic_ns()
            flow.packets += 1
            flow.bytes += size
            if flow.ufrag != ufrag:
                self._move_ufrag(flow, ufrag)
            self._send(flow, n, size, stat)
            return
        target = backend.ip6 if side.v6 else backend.ip4
        if target is None:
            self._count(C_IN_FAMILY, size)
            return
        if session is not None and flow is None and self._max_session_flows and \
                self._ufrag_flows.get(ufrag, 0) >= self._max_session_flows:
            self._count(C_SESSION_FLOWS, size)   # a new 5-tuple beyond the session's allowance
            return
        if flow is None and len(flows) >= self.max_flows:
            self._count(C_FLOW_FULL, size)       # refused: no live flow is ever evicted
            return
        sock, refused = self._flow_socket(side, target, backend.port)
        if sock is None:
            self._count(refused, size)
            return
        if flow is not None:                     # the 5-tuple moves to another backend
            self._remove(flow)
        flow = _Flow(key, addr, side, backend_id, ufrag, sock, time.monotonic_ns(), size)
        flows[key] = flow
        self._ufrag_flows[ufrag] = self._ufrag_flows.get(ufrag, 0) + 1
        self._loop.add_reader(flow.fd, self._on_flow, flow)
        self._send(flow, n, size, stat)

    def _flow_socket(self, side: _Side, ip: str, port: int) -> tuple[socket.socket | None, int]:
        """A socket on the internal address connected to the backend, or (None, counter to count)."""
        try:
            sock = socket.socket(side.family, socket.SOCK_DGRAM)
        except OSError:
            return None, C_FLOW_FULL            # out of descriptors or memory: no room for a flow
        try:
            sock.setblocking(False)
            if side.internal_ip:
                sock.bind((side.internal_ip, 0))
        except OSError:
            sock.close()
            return None, C_FLOW_FULL            # no free port
        try:
            sock.connect((ip, port))
        except OSError:
            sock.close()
            return None, C_IN_REDIRECT          # no route to the backend
        return sock, 0

    def _send(self, flow: _Flow, n: int, size: int, stat: int) -> None:
        try:
            flow.sock.send(self._view[:n])
        except OSError:
            self._count(C_IN_REDIRECT, size)
            return
        self._count(stat, size)

    def _on_flow(self, flow: _Flow) -> None:
        """Readable flow socket: the backend's replies go out of the public socket to the client."""
        buf, view = self._buf, self._view
        recv = flow.sock.recv_into
        sendto = flow.side.sock.sendto
        reply_to, overhead = flow.reply_to, flow.side.overhead
        packets, bytes_ = self._packets, self._bytes
        for _ in range(BATCH):
            try:
                n = recv(buf)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:
                continue      # an ICMP port unreachable from the backend, reported once
            except OSError:
                return        # closed under us (the flow went), or a transient error
            try:
                size = n + overhead
                try:
                    sendto(view[:n], reply_to)
                except OSError:
                    packets[C_OUT_REDIRECT] += 1
                    bytes_[C_OUT_REDIRECT] += size
                    continue
                flow.rx_packets += 1
                flow.rx_bytes += size
                packets[C_OUT_FWD] += 1
                bytes_[C_OUT_FWD] += size
            except Exception:  # noqa: BLE001 - as in _on_public
                self._internal_error()

    def _internal_error(self) -> None:
        self.internal_errors += 1
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL_S:
            self._last_error_log = now
            log.exception("userspace relay: a datagram raised (%d so far); it was dropped", self.internal_errors)

    # -- flows ---------------------------------------------------------------------------

    def _move_ufrag(self, flow: _Flow, ufrag: str) -> None:
        self._release_ufrag(flow.ufrag)
        flow.ufrag = ufrag
        self._ufrag_flows[ufrag] = self._ufrag_flows.get(ufrag, 0) + 1

    def _release_ufrag(self, ufrag: str) -> None:
        left = self._ufrag_flows.get(ufrag, 0) - 1
        if left > 0:
            self._ufrag_flows[ufrag] = left
        else:
            self._ufrag_flows.pop(ufrag, None)

    def _remove(self, flow: _Flow) -> None:
        if self._flows.get(flow.key) is flow:
            del self._flows[flow.key]
        self._release_ufrag(flow.ufrag)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(flow.fd)
        flow.sock.close()

    @staticmethod
    def _flow_record(flow: _Flow) -> Flow:
        return Flow(client_ip=flow.key[0], client_port=flow.key[1], backend_id=flow.backend_id, ufrag=flow.ufrag,
                    client_mac=NO_MAC, created_ns=flow.created_ns, last_seen_ns=flow.last_seen_ns,
                    packets=flow.packets, bytes=flow.bytes, rx_packets=flow.rx_packets, rx_bytes=flow.rx_bytes)

    def flows(self, limit: int | None = None) -> list[Flow]:
        out = []
        for flow in self._flows.values():
            if limit is not None and len(out) >= limit:
                break
            out.append(self._flow_record(flow))
        return out

    def flow(self, client: tuple[str, int]) -> Flow | None:
        found = self._flows.get((_normal_ip(client[0])[1], int(client[1])))
        return self._flow_record(found) if found else None

    def flow_socket_name(self, client: tuple[str, int]) -> tuple[str, int] | None:
        """The relay's internal (address, port) a flow's packets come from: the transceiver's view of it."""
        found = self._flows.get((_normal_ip(client[0])[1], int(client[1])))
        return found.sock.getsockname()[:2] if found else None

    def del_flow(self, client: tuple[str, int]) -> bool:
        found = self._flows.get((_normal_ip(client[0])[1], int(client[1])))
        if found is None:
            return False
        self._remove(found)
        return True

    def age_flows(self, idle_s: float) -> int:
        """Remove flows idle (no client packet) for longer than idle_s, closing their sockets."""
        cutoff = time.monotonic_ns() - int(idle_s * 1e9)
        stale = [flow for flow in self._flows.values() if flow.last_seen_ns < cutoff]
        for flow in stale:
            self._remove(flow)
        return len(stale)

    def recount_session_flows(self) -> None:
        """Nothing to do: the allowance in use is counted exactly as flows come and go."""

    # -- backends and sessions --------------------------------------------------------

    def set_backend(self, b: Backend) -> None:
        old = self._backends.get(b.backend_id)
        if old is None and len(self._backends) >= self.max_backends:
            raise TableFullError(f"the backend table is full ({self.max_backends} entries)")
        self._backends[b.backend_id] = b
        if old is not None and (old.ip4, old.ip6, old.port) != (b.ip4, b.ip6, b.port):
            # XDP looks the backend up per packet; here each flow's socket is pointed at it again
            for flow in [f for f in self._flows.values() if f.backend_id == b.backend_id]:
                target = b.ip6 if flow.side.v6 else b.ip4
                try:
                    if target is None:
                        raise OSError("the backend has no address of the flow's family")
                    flow.sock.connect((target, b.port))
                except OSError:
                    self._remove(flow)

    def backend(self, backend_id: int) -> Backend | None:
        return self._backends.get(backend_id)

    def backends(self) -> list[Backend]:
        return sorted(self._backends.values(), key=lambda b: b.backend_id)

    def del_backend(self, backend_id: int) -> bool:
        """Remove a backend with its sessions and flows; False if it was not there."""
        if self._backends.pop(backend_id, None) is None:
            return False
        for ufrag in [u for u, s in self._sessions.items() if s.backend_id == backend_id]:
            self.del_session(ufrag)
        for flow in [f for f in self._flows.values() if f.backend_id == backend_id]:
            self._remove(flow)
        return True

    def set_session(self, ufrag: str, backend_id: int) -> None:
        _check_ufrag(ufrag)
        if ufrag not in self._sessions and len(self._sessions) >= self.max_sessions:
            raise TableFullError(f"the session table is full ({self.max_sessions} entries)")
        self._sessions[ufrag] = Session(ufrag, backend_id, time.monotonic_ns())

    def session(self, ufrag: str) -> Session | None:
        found = self._sessions.get(ufrag)
        if found is None:
            return None
        return Session(found.ufrag, found.backend_id, found.created_ns, self._ufrag_flows.get(ufrag, 0))

    def sessions(self) -> list[Session]:
        return [Session(s.ufrag, s.backend_id, s.created_ns, self._ufrag_flows.get(s.ufrag, 0))
                for s in self._sessions.values()]

    def del_session(self, ufrag: str) -> bool:
        """Remove a session and the flows it created; False if it was not there."""
        removed = self._sessions.pop(ufrag, None) is not None
        if self._ufrag_flows.get(ufrag):
            for flow in [f for f in self._flows.values() if f.ufrag == ufrag]:
                self._remove(flow)
        return removed

    def del_sessions(self, ufrags: list[str]) -> dict[str, bool]:
        """``del_session`` for several (the XDP datapath reads its flow table once for all)."""
        return {ufrag: self.del_session(ufrag) for ufrag in ufrags}

    # -- stats -------------------------------------------------------------------------

    def map_fill(self) -> dict[str, tuple[int, int]]:
        """Entries and capacity of each table, under the XDP map names."""
        addrs = sum((b.ip4 is not None) + (b.ip6 is not None) for b in self._backends.values())
        return {"backends": (len(self._backends), self.max_backends),
                "backend_addrs": (addrs, 2 * self.max_backends),
                "sessions": (len(self._sessions), self.max_sessions),
                "flows": (len(self._flows), self.max_flows)}

    def counters(self) -> dict[str, counters_mod.Counter]:
        """Every counter, keyed by its enum name, in the order of SR_STATS (as ``Datapath.counters``)."""
        return {spec.name: counters_mod.Counter(spec, self._packets[spec.index], self._bytes[spec.index])
                for spec in counters_mod.counter_specs()}

    def reset_counters(self) -> None:
        n = len(self._packets)
        self._packets[:] = [0] * n
        self._bytes[:] = [0] * n


__all__ = ["KIND", "NO_MAC", "TableFullError", "UserspaceDatapath", "default_max_flows",
           "interface_addresses", "table_sizes"]
