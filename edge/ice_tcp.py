"""ICE-TCP through the relay: a client that cannot send UDP reaches its transceiver over TCP.

The answer lists a passive TCP candidate on each relay address (RFC 6544,
transceiver/relays.py).  This listener terminates that TCP connection, reads
RFC 4571 frames (a 16-bit length, then one STUN/DTLS/RTP packet) and carries
each frame as one UDP datagram, from a socket of its own on the relay's
internal address, to the transceiver that owns the session; each datagram the
transceiver sends back to that socket is framed into the connection.  The
transceiver sees an ordinary UDP client at (relay internal address, ephemeral
port): its mux and aiortc stay UDP-only, ICE takes the address as
peer-reflexive, as it does for the userspace relay's flows.

The connection is routed once, by its first frame, which must be a Binding
Request: ``routing.route`` decides it over the plane's own tables (session or
routing hint, policy, the session's allowance, the backend's family), so TCP
and UDP can never disagree.  A connection counts as one flow of its session's
allowance.  Everything an attacker can send costs a bounded amount and ends
in a counter (``CLOSE_REASONS``, or the reason of the routing counter that refused it) and a closed
connection: frames are at most ``MAX_FRAME`` bytes, a connection holds at most
one partial frame and ``MAX_PENDING`` bytes of replies, a connection must send
its first frame within ``first_frame_s`` and some frame every ``idle_s``
(RFC 7675: consent checks come every ~5 s and a client gives up after 30 s), a
connection routed by a session ends within ~5 s of the session's deletion,
and the listener holds at most ``max_connections`` of them, ``max_per_source``
from one address.  The ephemeral UDP ports come from the kernel's range, above
translation's default flow-port pool; one inside the pool is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from splitrelay.bpf import consts
from splitrelay.edge.ice_tcp_limits import BATCH, BROWSER_LOW_PORTS, CLOSE_REASONS, MAX_FRAME, MAX_PENDING
from splitrelay.edge.ice_tcp_limits import PORT_TRIES, ROUTING_REASON, SESSION_CHECK_SWEEPS, SWEEP_S, IceTcpConfig
from splitrelay.edge.plane import DataPlane
from splitrelay.edge.records import DataPlaneError
from splitrelay.edge.routing import RoutingTables, route
from splitrelay.edge import interfaces

log = logging.getLogger(__name__)


def _lookup(get: Callable, key):  # noqa: ANN001, ANN202
    """One entry of a plane's table, None when absent or when the key is not one the table holds."""
    try:
        return get(key)
    except (DataPlaneError, ValueError, OSError):
        return None


class _PlaneTable(Mapping):
    """One of the plane's tables as ``route`` reads it, one key at a time (a connection asks for one
    session and one backend; copying every table per connection would cost O(sessions))."""

    def __init__(self, get: Callable, keys: Callable[[], list]) -> None:
        self._get, self._keys = get, keys

    def __getitem__(self, key):  # noqa: ANN001, ANN204
        value = _lookup(self._get, key)
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())


class _Connection(asyncio.Protocol):
    """One client's TCP connection and, once routed, its UDP socket toward the transceiver."""

    def __init__(self, listener: IceTcpListener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.source: str | None = None
        self.buf = bytearray()
        self.udp: socket.socket | None = None
        self.ufrag: str | None = None
        self.backend_id: int | None = None
        self.by_session = False      # routed by a registered session (not a routing hint)
        self.opened = self.last_rx = time.monotonic()
        self.frames_in = self.frames_out = self.dropped = 0
        self.closed_as: str | None = None

    # -- TCP side -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.source = peer[0] if peer else "?"
        self.listener._admit(self)

    def data_received(self, data: bytes) -> None:
        if self.closed_as:
            return
        self.buf += data
        view, at = memoryview(self.buf), 0
        try:
            while len(view) - at >= 2:
                size = int.from_bytes(view[at:at + 2], "big")
                if not 0 < size <= MAX_FRAME:
                    self.close("oversized")
                    return
                if len(view) - at - 2 < size:
                    break
                self.last_rx = time.monotonic()   # whole frames only: a byte at a time keeps nothing alive
                with view[at + 2:at + 2 + size] as frame:   # released before the buffer is trimmed
                    at += 2 + size
                    if self.udp is None:
                        if not self.listener._route(self, bytes(frame)):
                            return
                    else:
                        self._forward(frame)
        finally:
            view.release()
        if not self.closed_as:
            del self.buf[:at]

    def eof_received(self) -> bool:
        self.close("truncated" if self.buf else "closed")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.close("truncated" if self.buf else "closed")

    def _forward(self, frame: memoryview) -> None:
        try:
            self.udp.send(frame)
            self.frames_in += 1
        except OSError:   # the socket buffer is full or the transceiver unreachable: UDP would lose it too
            self.dropped += 1

    # -- UDP side -------------------------------------------------------------------------

    def udp_readable(self) -> None:
        sock, transport = self.udp, self.transport
        for _ in range(BATCH):
            try:
                data = sock.recv(MAX_FRAME + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:   # ICMP unreachable from the transceiver's side: nothing to frame
                continue
            if not 0 < len(data) <= MAX_FRAME or transport.get_write_buffer_size() > MAX_PENDING:
                self.dropped += 1
                continue
            transport.write(len(data).to_bytes(2, "big") + data)
            self.frames_out += 1

    # -- end ------------------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """Count the connection under ``reason`` once and release everything it holds."""
        if self.closed_as:
            return
        self.closed_as = reason
        self.listener._release(self, reason)
        if self.udp is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.udp.fileno())
            self.udp.close()
        self.buf = bytearray()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()   # no lingering in FIN_WAIT for a client that misbehaved


class IceTcpListener:
    """The relay's ICE-TCP listener, one per agent (module docstring)."""

    def __init__(self, plane: DataPlane, config: IceTcpConfig, public_iface: str, families: list[int],
                 internal_ips: Mapping[int, str | None], flow_ports: tuple[int, int] | None = None) -> None:
        self.plane = plane
        self.config = config
        self.public_iface = public_iface
        self.families = families                      # AF_INET and/or AF_INET6: the relay's public ones
        self.internal_ips = dict(internal_ips)        # family -> where the UDP sockets bind
        self.flow_ports = flow_ports                  # translate: the pool the sockets must stay out of
        self.closed = Counter()                       # reason -> connections closed for it
        self.frames = Counter()                       # "in"/"out"/"dropped": frames carried
        self.ports: list[int] = []
        self._conns: set[_Connection] = set()
        self._per_source: Counter = Counter()
        self._per_ufrag: Counter = Counter()
        self._servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.Task | None = None

    async def start(self) -> None:
        """Listen on the public interface only (the wildcard address bound to the device: a public
        address behind a 1:1 NAT is not on the host), one socket per family."""
        loop = asyncio.get_running_loop()
        for family in self.families:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.public_iface.encode())
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", self.config.port))
                sock.setblocking(False)
                server = await loop.create_server(lambda: _Connection(self), sock=sock, backlog=1024)
            except BaseException as exc:
                sock.close()
                await self.stop()
                if isinstance(exc, OSError):
                    v = 6 if family == socket.AF_INET6 else 4
                    where = f"{self.public_iface} IPv{v} port {self.config.port}"
                    raise DataPlaneError(f"cannot listen for ICE-TCP on {where}: {exc.strerror or exc} "
                                        "(--tcp-port 0 turns it off)") from None
                raise
            self._servers.append(server)
            self.ports.append(sock.getsockname()[1])
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="ice-tcp timeouts")

    async def stop(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for server in self._servers:
            server.close()
        for conn in list(self._conns):
            conn.close("closed")
        for server in self._servers:
            await server.wait_closed()
        self._servers = []

    def status(self) -> dict:
        """For /v1/health and /metrics: where it listens and what it holds."""
        live = Counter()
        for conn in self._conns:
            live.update({"in": conn.frames_in, "out": conn.frames_out, "dropped": conn.dropped})
        return {"port": self.ports[0] if self.ports else self.config.port, "iface": self.public_iface,
                "connections": len(self._conns), "routed": sum(1 for c in self._conns if c.udp),
                "closed": dict(self.closed), "frames": dict(self.frames + live),
                "limits": {"max_connections": self.config.max_connections,
                           "max_per_source": self.config.max_per_source,
                           "first_frame_s": self.config.first_frame_s, "idle_s": self.config.idle_s}}

    # -- per connection (the loop's thread) ----------------------------------------------

    def _admit(self, conn: _Connection) -> None:
        if len(self._conns) >= self.config.max_connections:
            conn.close("limit_relay")
        elif self._per_source[conn.source] >= self.config.max_per_source:
            conn.close("limit_source")
        else:
            self._conns.add(conn)
            self._per_source[conn.source] += 1

    def _release(self, conn: _Connection, reason: str) -> None:
        self.closed[reason] += 1
        if conn in self._conns:
            self._conns.discard(conn)
            self._per_source[conn.source] -= 1
            if not self._per_source[conn.source]:
                del self._per_source[conn.source]
        if conn.ufrag is not None:
            self._per_ufrag[conn.ufrag] -= 1
            if not self._per_ufrag[conn.ufrag]:
                del self._per_ufrag[conn.ufrag]
            conn.ufrag = None
        self.frames["in"] += conn.frames_in
        self.frames["out"] += conn.frames_out
        self.frames["dropped"] += conn.dropped
        conn.frames_in = conn.frames_out = conn.dropped = 0

    def _tables(self) -> RoutingTables:
        """The plane's tables, read lazily, with this listener's connections in each allowance."""
        plane, cfg = self.plane, self.plane.config()

        def flows(ufrag: str) -> int:
            session = plane.session(ufrag)
            return (session.flows if session else 0) + self._per_ufrag.get(ufrag, 0)

        return RoutingTables(
            sessions=_PlaneTable(plane.session, lambda: [s.ufrag for s in plane.sessions()]),
            backends=_PlaneTable(plane.backend, lambda: [b.backend_id for b in plane.backends()]),
            session_flows=_PlaneTable(flows, lambda: [s.ufrag for s in plane.sessions()]),
            policy=cfg.policy, hint_key=cfg.hint_key, max_session_flows=cfg.max_session_flows)

    def _route(self, conn: _Connection, frame: bytes) -> bool:
        """The first frame: route the connection (the UDP path's decision) and open its UDP socket."""
        if frame[0] > 3:   # RFC 7983: 0..3 is STUN; ICE-TCP starts with a connectivity check
            conn.close("not_stun")
            return False
        family = socket.AF_INET6 if ":" in conn.source else socket.AF_INET   # one socket per family, v6only
        decision = route(frame, self._tables(),
                         family=consts.FAMILY_V6 if family == socket.AF_INET6 else consts.FAMILY_V4)
        if not decision.forwarded:
            conn.close(ROUTING_REASON.get(decision.counter, decision.counter))
            return False
        backend = self.plane.backend(decision.backend_id)
        target = None if backend is None else (backend.ip6 if family == socket.AF_INET6 else backend.ip4)
        sock = self._open_udp(family, (target, backend.port)) if target else None
        if sock is None:
            conn.close("no_port")
            return False
        conn.udp, conn.ufrag, conn.backend_id = sock, decision.ufrag, decision.backend_id
        conn.by_session = decision.counter == "IN_FWD_STUN_UFRAG"
        self._per_ufrag[decision.ufrag] += 1
        asyncio.get_running_loop().add_reader(sock.fileno(), conn.udp_readable)
        conn._forward(memoryview(frame))
        return True

    def _open_udp(self, family: int, target: tuple[str, int]) -> socket.socket | None:
        """A UDP socket on the internal address, connected to the transceiver (so only it answers),
        on a kernel-chosen port outside translation's flow-port pool."""
        for _ in range(PORT_TRIES):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.bind((self.internal_ips.get(family) or ("::" if family == socket.AF_INET6 else "0.0.0.0"), 0))
                port = sock.getsockname()[1]
                if self.flow_ports and self.flow_ports[0] <= port <= self.flow_ports[1]:
                    sock.close()
                    continue
                sock.connect(target)
                return sock
            except OSError as exc:
                log.warning("ICE-TCP: cannot open a UDP socket toward %s: %s", target, exc)
                sock.close()
                return None
        return None

    # -- timeouts -------------------------------------------------------------------------

    def sweep(self, now: float | None = None, sessions: bool = False) -> None:
        """Close connections past their first-frame or idle deadline; with ``sessions``, also those
        whose session is gone (one table lookup each)."""
        now = time.monotonic() if now is None else now
        for conn in list(self._conns):
            if conn.udp is None and now - conn.opened >= self.config.first_frame_s:
                conn.close("first_frame_timeout")
            elif now - conn.last_rx >= self.config.idle_s:
                conn.close("idle")
            elif sessions and conn.by_session and _lookup(self.plane.session, conn.ufrag) is None:
                conn.close("session_gone")

    async def _sweep_forever(self) -> None:
        for n in itertools.count(1):
            await asyncio.sleep(SWEEP_S)
            try:
                self.sweep(sessions=n % SESSION_CHECK_SWEEPS == 0)
            except Exception:  # noqa: BLE001 - one bad pass must not end the timeouts for good
                log.exception("ICE-TCP timeout sweep failed")


class IceTcpCollector(Collector):
    """The listener's gauges and counters on the agent's /metrics, read at scrape time."""

    def __init__(self, listener: IceTcpListener) -> None:
        self.listener = listener

    def describe(self):
        return list(self._families().values())

    @staticmethod
    def _families() -> dict:
        return {
            "connections": GaugeMetricFamily("splitrelay_edge_tcp_connections",
                                             "ICE-TCP connections open (routed or awaiting their first frame)"),
            "closed": CounterMetricFamily("splitrelay_edge_tcp_closed",
                                          "ICE-TCP connections closed, by reason (ice_tcp_limits.CLOSE_REASONS, "
                                          "or the routing counter that refused the first frame)",
                                          labels=["reason"]),
            "frames": CounterMetricFamily("splitrelay_edge_tcp_frames",
                                          "RFC 4571 frames carried: in (client to transceiver), out, dropped",
                                          labels=["direction"]),
        }

    def collect(self):
        f, status = self._families(), self.listener.status()
        f["connections"].add_metric([], status["connections"])
        for reason in {**dict.fromkeys(CLOSE_REASONS, 0), **status["closed"]}:
            f["closed"].add_metric([reason], status["closed"].get(reason, 0))
        for direction in ("in", "out", "dropped"):
            f["frames"].add_metric([direction], status["frames"].get(direction, 0))
        yield from f.values()


async def serve(plane: DataPlane, config: IceTcpConfig, public_iface: str, internal_iface: str,
                public_ips: Mapping[int, str | None], internal_ips: Mapping[int, str | None],
                flow_ports: tuple[int, int] | None, registry: CollectorRegistry | None) -> IceTcpListener | None:
    """The agent's hook: listen beside the UDP data plane (None when ``config.port`` is 0)."""
    if not config.port:
        return None
    if config.port < 1024 and config.port not in BROWSER_LOW_PORTS:
        log.warning("ICE-TCP on port %d: Chromium dials no ICE-TCP candidate below 1024 but 80 and 443",
                    config.port)
    found = await asyncio.get_running_loop().run_in_executor(None, interfaces.addresses, internal_iface)
    version = {socket.AF_INET: 4, socket.AF_INET6: 6}
    listener = IceTcpListener(plane, config, public_iface, [f for f in version if public_ips.get(f)],
                              {f: internal_ips.get(f) or found.get(v) for f, v in version.items()}, flow_ports)
    await listener.start()
    if registry is not None:
        registry.register(IceTcpCollector(listener))
    log.info("ICE-TCP on %s port %d", public_iface, listener.ports[0] if listener.ports else config.port)
    return listener
