"""The userspace relay's hot path: UDP sockets on the event loop, judged by ``routing.route``.

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

The control calls over its tables are ``plane.UserspacePlane``'s, which holds it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque

from splitrelay.edge import counters as counters_mod
from splitrelay.edge.records import Backend, DataPlaneError, RelayConfig, Session
from splitrelay.bpf import consts
from splitrelay.edge.routing import RoutingTables, route
from splitrelay.wire.stun import confirms_flow

log = logging.getLogger(__name__)

BATCH = 64                       # datagrams per socket per loop wakeup: the control API still gets turns
RECV_SIZE = 65536                # any UDP datagram, never truncated
PUBLIC_RCVBUF = 4 << 20          # ask for room for bursts (the kernel caps it at net.core.rmem_max)
ETH_HEADER, UDP_HEADER = 14, 8
OVERHEAD = {socket.AF_INET: ETH_HEADER + 20 + UDP_HEADER, socket.AF_INET6: ETH_HEADER + 40 + UDP_HEADER}
ERROR_LOG_INTERVAL_S = 60.0

INDEX = {spec.name: spec.index for spec in counters_mod.counter_specs()}
C_FWD_FLOW = INDEX["IN_FWD_FLOW"]
C_NO_FLOW = INDEX["IN_DROP_NO_FLOW"]
C_NO_BACKEND = INDEX["IN_DROP_NO_BACKEND"]
C_UNKNOWN_CLASS = INDEX["IN_DROP_UNKNOWN_CLASS"]
C_FLOW_FULL = INDEX["IN_DROP_FLOW_FULL"]
C_IN_REDIRECT = INDEX["IN_DROP_REDIRECT"]
C_OUT_FWD = INDEX["OUT_FWD"]
C_OUT_REDIRECT = INDEX["OUT_DROP_REDIRECT"]
C_PENDING = INDEX["IN_DROP_PENDING"]
C_OUT_CONFIRM = INDEX["OUT_FWD_CONFIRM"]
C_OUT_SESSION_FLOWS = INDEX["OUT_DROP_SESSION_FLOWS"]


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


class LiveFlow:
    """A client flow as the relay holds it: its socket to the backend and its counts."""

    __slots__ = ("key", "reply_to", "side", "backend_id", "ufrag", "sock", "fd", "created_ns", "last_seen_ns",
                 "packets", "bytes", "rx_packets", "rx_bytes", "pending")

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
        self.pending = True      # until its backend answers (wire.stun.confirms_flow): STUN only


class UserspaceRelay:
    """The relay's sockets and the tables they are judged by (module docstring).

    Lifecycle: ``configure(cfg)``, then ``start()`` on the running loop (binds the
    public sockets), ``close()`` when done (closes every socket; the tables stay readable).
    Every method runs on the loop's thread.
    """

    def __init__(self, max_flows: int, internal_ip4: str | None = None, internal_ip6: str | None = None) -> None:
        self.max_flows = max_flows   # >= 1: PlaneConfig checked it
        self.internal_ips = {socket.AF_INET: internal_ip4, socket.AF_INET6: internal_ip6}
        self.internal_errors = 0              # bugs caught on the hot path (never raised out of a callback)
        self._cfg: RelayConfig | None = None
        self.backends: dict[int, Backend] = {}
        self.sessions: dict[str, Session] = {}
        self.flows: dict[tuple, LiveFlow] = {}
        self.ufrag_flows: dict[str, int] = {}   # live confirmed flows per ufrag: its allowance in use
        self.pending_rings: dict[str, deque] = {}   # per ufrag: its last PENDING_FLOWS pending flows (relay.c)
        self._tables = RoutingTables(self.sessions, self.backends, self.ufrag_flows)   # the same dicts
        n = len(counters_mod.counter_specs())
        self.packet_counts = [0] * n
        self.byte_counts = [0] * n
        self._sides: list[_Side] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buf = bytearray(RECV_SIZE)
        self._view = memoryview(self._buf)
        self._last_error_log: float | None = None   # not 0.0: the clock starts at boot, not an hour ago

    @property
    def running(self) -> bool:
        return bool(self._sides)

    def configure(self, cfg: RelayConfig) -> None:
        """Set the relay's config; policy, allowance and hint key apply at once, addresses at ``start``."""
        if self.running and self._cfg and (cfg.relay_port, cfg.public_ip4, cfg.public_ip6) != (
                self._cfg.relay_port, self._cfg.public_ip4, self._cfg.public_ip6):
            raise DataPlaneError("the public address and port of a running userspace relay cannot change")
        self._cfg = cfg
        self._tables.policy = cfg.policy
        self._tables.max_session_flows = cfg.max_session_flows
        self._tables.hint_key = cfg.hint_key

    def config(self) -> RelayConfig | None:
        return self._cfg

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> list[tuple[str, int]]:
        """Bind the public sockets and start relaying on ``loop`` (default: the running one).

        Returns the bound (address, port) pairs; raises DataPlaneError (nothing left bound) when
        an address cannot be bound.
        """
        if self._cfg is None:
            raise DataPlaneError("configure the relay before starting it")
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
            raise DataPlaneError(f"cannot bind the relay port {host}:{self._cfg.relay_port}: "
                                f"{exc.strerror or exc}") from None
        return sock

    def close(self) -> None:
        """Stop relaying: close every flow and public socket (tables and counters stay readable)."""
        for flow in list(self.flows.values()):
            self.remove(flow)
        sides, self._sides = self._sides, []
        for side in sides:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(side.sock.fileno())
            side.sock.close()

    # -- the hot path --------------------------------------------------------------------

    def _on_public(self, side: _Side) -> None:
        """Readable public socket: judge and forward up to BATCH datagrams (xdp_public).

        DTLS and media, nearly every packet, take the by-flow branch of ``routing.route``
        written out here (a dict lookup and a send, no call per packet); STUN and everything
        else is judged by ``route`` itself.
        """
        buf, view = self._buf, self._view
        recv = side.sock.recvfrom_into
        flows, backends, packets, bytes_ = self.flows, self.backends, self.packet_counts, self.byte_counts
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
                if not (20 <= first <= 63 or 128 <= first <= 191):
                    self._judge(side, n, key, addr, size)   # STUN, and what is dropped by class
                    continue
                flow = flows.get(key)                 # DTLS, RTP/RTCP: by flow
                if flow is None:
                    packets[C_NO_FLOW] += 1
                    bytes_[C_NO_FLOW] += size
                    continue
                if flow.pending:                      # no media before the backend answered
                    packets[C_PENDING] += 1
                    bytes_[C_PENDING] += size
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
        self.packet_counts[index] += 1
        self.byte_counts[index] += size

    def _judge(self, side: _Side, n: int, key: tuple, addr: tuple, size: int) -> None:
        """A datagram ``routing.route`` decides on; this carries the decision out."""
        flow = self.flows.get(key)
        decision = route(bytes(self._view[:n]), self._tables, family=6 if side.v6 else 4,
                         flow_backend=flow.backend_id if flow else None, flow_pending=bool(flow and flow.pending),
                         flows_full=len(self.flows) >= self.max_flows)
        stat = INDEX[decision.counter]
        if not decision.forwarded:
            self._count(stat, size)
            return
        if not decision.opens_flow:                  # by flow, or a consent check on its flow: refresh
            flow.last_seen_ns = time.monotonic_ns()
            flow.packets += 1
            flow.bytes += size
            if decision.ufrag and flow.ufrag != decision.ufrag:
                self._move_ufrag(flow, decision.ufrag)
            self._send(flow, n, size, stat)
            return
        backend = self.backends[decision.backend_id]
        target = backend.ip6 if side.v6 else backend.ip4
        sock, refused = self._flow_socket(side, target, backend.port)
        if sock is None:
            self._count(refused, size)
            return
        if flow is not None:                         # a pending 5-tuple moves to another backend
            self.remove(flow)
        flow = LiveFlow(key, addr, side, decision.backend_id, decision.ufrag, sock, time.monotonic_ns(), size)
        self.flows[key] = flow
        self._enter_pending_ring(flow)
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

    def _send(self, flow: LiveFlow, n: int, size: int, stat: int) -> None:
        try:
            flow.sock.send(self._view[:n])
        except OSError:
            self._count(C_IN_REDIRECT, size)
            return
        self._count(stat, size)

    def _confirm(self, flow: LiveFlow, n: int, size: int) -> int | None:
        """A backend's datagram on a pending flow: the counter it goes out under (confirmed by a STUN
        answer, charged to the ufrag's allowance), or None when a full allowance drops it."""
        if not confirms_flow(self._view[:n]):
            return C_OUT_FWD
        held = self.ufrag_flows.get(flow.ufrag, 0)
        limit = self._tables.max_session_flows
        if limit and held >= limit:
            self._count(C_OUT_SESSION_FLOWS, size)
            return None
        self.ufrag_flows[flow.ufrag] = held + 1
        self._leave_pending_ring(flow)
        flow.pending = False
        return C_OUT_CONFIRM

    def _on_flow(self, flow: LiveFlow) -> None:
        """Readable flow socket: the backend's replies go out of the public socket to the client."""
        buf, view = self._buf, self._view
        recv = flow.sock.recv_into
        sendto = flow.side.sock.sendto
        reply_to, overhead = flow.reply_to, flow.side.overhead
        packets, bytes_ = self.packet_counts, self.byte_counts
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
                stat = C_OUT_FWD if not flow.pending else self._confirm(flow, n, size)
                if stat is None:
                    continue
                try:
                    sendto(view[:n], reply_to)
                except OSError:
                    packets[C_OUT_REDIRECT] += 1
                    bytes_[C_OUT_REDIRECT] += size
                    continue
                flow.rx_packets += 1
                flow.rx_bytes += size
                packets[stat] += 1
                bytes_[stat] += size
            except Exception:  # noqa: BLE001 - as in _on_public
                self._internal_error()

    def _internal_error(self) -> None:
        self.internal_errors += 1
        now = time.monotonic()
        if self._last_error_log is None or now - self._last_error_log >= ERROR_LOG_INTERVAL_S:
            self._last_error_log = now
            log.exception("userspace relay: a datagram raised (%d so far); it was dropped", self.internal_errors)

    # -- flows ---------------------------------------------------------------------------

    def _move_ufrag(self, flow: LiveFlow, ufrag: str) -> None:
        if flow.pending:                      # stays bounded by its new ufrag's ring
            self._leave_pending_ring(flow)
            flow.ufrag = ufrag
            self._enter_pending_ring(flow)
            return
        self._release_ufrag(flow.ufrag)
        flow.ufrag = ufrag
        self.ufrag_flows[ufrag] = self.ufrag_flows.get(ufrag, 0) + 1

    def _enter_pending_ring(self, flow: LiveFlow) -> None:
        """A pending flow joins its ufrag's ring; the oldest of a full ring goes if it is still a
        pending flow of that ufrag (enter_pending_ring in relay.c)."""
        ring = self.pending_rings.setdefault(flow.ufrag, deque())
        if len(ring) >= consts.PENDING_FLOWS:
            old = ring.popleft()
            if old is not flow and old.pending and old.ufrag == flow.ufrag and self.flows.get(old.key) is old:
                self.remove(old)
        ring.append(flow)

    def _leave_pending_ring(self, flow: LiveFlow) -> None:
        ring = self.pending_rings.get(flow.ufrag)
        if ring is not None and flow in ring:
            ring.remove(flow)
            if not ring:
                del self.pending_rings[flow.ufrag]

    def _release_ufrag(self, ufrag: str) -> None:
        left = self.ufrag_flows.get(ufrag, 0) - 1
        if left > 0:
            self.ufrag_flows[ufrag] = left
        else:
            self.ufrag_flows.pop(ufrag, None)

    def remove(self, flow: LiveFlow) -> None:
        if self.flows.get(flow.key) is flow:
            del self.flows[flow.key]
        if flow.pending:
            self._leave_pending_ring(flow)
        else:
            self._release_ufrag(flow.ufrag)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(flow.fd)
        flow.sock.close()


__all__ = ["BATCH", "OVERHEAD", "UserspaceRelay"]
