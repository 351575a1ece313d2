"""One UDP socket for every session of a transceiver, under aioice.

The relay steers each session to a transceiver's single *backend address*,
so the transceiver cannot bind a socket per session.  ``UdpMux`` owns that
one socket and demultiplexes (the Pion UDPMux / mediasoup WebRtcServer
pattern):

* a STUN Binding Request is routed by the local (server) ufrag, the part of its
  USERNAME before the ':', parsed with exactly the relay's rules
  (``splitrelay.wire.stun``), from any address;
* a STUN response goes to the session whose transaction it answers (its
  96-bit random transaction id), from the address that session sent it to;
* anything else (DTLS, RTP, RTCP) goes only to the session its source address
  is *bound* to, and is dropped and counted by reason otherwise.

An address is bound to a session only once aioice authenticated it: a Binding
Request whose MESSAGE-INTEGRITY checked under the session's password, or the
authenticated success response to the session's own check (Pion binds likewise
only what it verified).  A later authenticated binding replaces an earlier one,
so a relay port recycled to a new caller follows that caller's checks; a forged
request naming a live ufrag from another address binds and moves nothing (aioice
answers it 401).  A bound address silent for ``address_timeout`` (30 s, RFC 7675's
consent lifetime) is unbound, so a recycled relay port cannot carry a new
caller's media into an old session.

Each session's aioice ``StunProtocol`` gets a ``MuxTransport``, a per-session
view of the shared socket: what a session sends to an address it has no binding
for is remembered only so that the answer to its check finds it.

``MuxedConnection`` (ice_connection.py) is the seam into aioice: it replaces candidate gathering
(binding one socket per interface) with one host candidate per *public
candidate* (the relay's address or addresses, IPv4 and/or IPv6), all on the
mux, so no transceiver address ever reaches the SDP and a session costs no
socket.  It relies on these aioice internals (all listed in ``CONNECTION_ATTRIBUTES`` /
``CONNECTION_METHODS``, checked by ``check_aioice()`` and tests/test_ice_internals.py; aioice
0.13 and aiortc 1.16 are pinned):

* ``Connection.get_component_candidates(component, addresses, timeout)`` is
  what ``gather_candidates`` awaits per component (overridden here);
* ``Connection._protocols``, the list of StunProtocols pairing, checks,
  consent and ``close()`` walk;
* ``Connection._query_consent_task`` / ``_closing``, only to tell a consent
  expiry (aioice closing the connection itself) from our own close;
* ``StunProtocol(receiver)``, its ``local_candidate`` and ``transactions`` (pending
  checks by transaction id) attributes and the ``DatagramProtocol`` methods it implements;
* ``Connection.request_received`` (overridden: an authenticated request binds its
  address) and ``_valid_username``.

A dual-stack socket (bound to ``::``) carries IPv4 clients as v4-mapped
addresses; the mux hands aioice plain IPv4 addresses and maps them back when
sending, so an IPv4 public candidate pairs with IPv4 clients as it should.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from aioice.ice import CandidatePair, Connection, StunProtocol

from splitrelay.transceiver.limits import ADDRESS_TIMEOUT
from splitrelay.wire import stun as ref_stun
from splitrelay.errors import SplitrelayError

log = logging.getLogger(__name__)

Address = tuple[str, int]

# drop reasons (UdpMux.drops keys)
# One socket carries every session's media: at ~50 packets/s per call, the kernel's default receive
# buffer (~208 KiB, ~250 small datagrams) covers only a few hundred ms of a busy transceiver's
# traffic, so one event-loop stall (a GC pause, a burst of new sessions) loses audio.  4 MiB holds
# seconds of it.  As root SO_RCVBUFFORCE passes net.core.rmem_max; otherwise the kernel caps it.
RECV_BUFFER_BYTES = 4 * 1024 * 1024

NOT_STUN = "not_stun"            # first datagram from a new address is not STUN (DTLS, RTP, noise)
NOT_BINDING = "not_binding"      # STUN but not a Binding Request (a stray response, an indication)
BAD_STUN = "bad_stun"            # a Binding Request the relay would drop too (no/bad USERNAME...)
UNKNOWN_UFRAG = "unknown_ufrag"  # no live session has that server ufrag
NO_ROUTE = "no_route"            # a session sent to an address family the socket cannot reach
NO_TRANSACTION = "no_transaction"  # a STUN response from an unbound address answering no pending check


class MuxError(SplitrelayError):
    """The mux could not bind or route (one-line reason)."""


# The aioice and aiortc internals the mux, the ICE seam (ice.py) and ICE restart rely on.  Both are
# pinned in pyproject.toml to the range the suite ran on; this list is checked at start
# (check_aioice) and by tests/test_ice_internals.py, so an upgrade fails in CI, not in a call.
CONNECTION_ATTRIBUTES = (
    "_protocols", "_nominated", "_check_list", "_check_list_done", "_check_list_state", "_closing",
    "_query_consent_task", "_remote_candidates", "_remote_candidates_end", "_local_username",
    "_local_password", "_nominating", "_early_checks_done",
)
CONNECTION_METHODS = (
    "get_component_candidates", "check_incoming", "check_start_task", "check_complete", "_find_pair",
    "request_received", "sort_check_list", "_pair_remote_candidate", "_check_list_maybe_fail",
    "_valid_username", "add_remote_candidate", "_check_list_maybe_complete",
)
SUPPORTED_AIOICE = "0.13"  # the pinned range, for the error message


def missing_internals() -> list[str]:
    """Names of the aioice/aiortc internals we use that this install lacks ([] = all present)."""
    import aiortc.rtcicetransport as rtcicetransport

    missing = [f"Connection.{name}" for name in CONNECTION_METHODS if not hasattr(Connection, name)]
    probe = Connection(ice_controlling=False)
    missing += [f"Connection.{name}" for name in CONNECTION_ATTRIBUTES if not hasattr(probe, name)]
    missing += [f"StunProtocol.{name}" for name in ("datagram_received", "connection_made", "request")
                if not hasattr(StunProtocol, name)]
    if "local_candidate" not in getattr(StunProtocol, "__annotations__", {}):
        missing.append("StunProtocol.local_candidate")
    if "transactions" not in StunProtocol.__init__.__code__.co_names:
        missing.append("StunProtocol.transactions")
    if not (hasattr(CandidatePair, "State") and hasattr(CandidatePair, "remote_addr")
            and "protocol" in CandidatePair.__init__.__code__.co_names):
        missing.append("CandidatePair.State/remote_addr/protocol")
    if not hasattr(rtcicetransport, "Connection"):
        missing.append("aiortc.rtcicetransport.Connection")
    if "_connection" not in rtcicetransport.RTCIceTransport.__init__.__code__.co_names:
        missing.append("aiortc.RTCIceTransport._connection")
    return missing


def check_aioice() -> None:
    """Fail loudly, at start, if the aioice/aiortc internals the mux depends on have moved."""
    missing = missing_internals()
    if missing:
        import aioice

        raise MuxError(f"aioice {getattr(aioice, '__version__', '?')} lacks {', '.join(missing)}; "
                       f"the transceiver's mux needs aioice {SUPPORTED_AIOICE}")


def _family(host: str) -> int:
    return ipaddress.ip_address(host).version


class MuxTransport(asyncio.DatagramTransport):
    """A per-session view of the shared socket: sending registers the peer for replies."""

    def __init__(self, mux: UdpMux, protocol: StunProtocol, ufrag: str) -> None:
        super().__init__()
        self.mux = mux
        self.protocol = protocol
        self.ufrag = ufrag
        self._closed = False

    def sendto(self, data: bytes, addr: Any = None) -> None:  # noqa: ANN401 - asyncio's signature
        if self._closed:
            return
        addr = (addr[0], addr[1])
        self.mux.sending(addr, self.protocol)
        self.mux.send(data, addr)

    def get_extra_info(self, name: str, default: Any = None) -> Any:  # noqa: ANN401
        if name == "sockname":
            return (self.protocol.local_candidate.host, self.protocol.local_candidate.port)
        if name == "peername":
            return None
        return default

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.mux.forget(self.protocol)
        asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()


def _grow_receive_buffer(sock: socket.socket, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUFFORCE, size)
    except (OSError, AttributeError):  # not CAP_NET_ADMIN: as much as rmem_max allows
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


class UdpMux(asyncio.DatagramProtocol):
    """The transceiver's one UDP socket, shared by all sessions."""

    def __init__(self, public_candidates: Sequence[Address], address_timeout: float = ADDRESS_TIMEOUT) -> None:
        self.public_candidates: list[Address] = [(h, int(p)) for h, p in public_candidates]
        self.relayed = bool(public_candidates)  # clients reach us through a relay (their candidates are theirs)
        self.transport: asyncio.DatagramTransport | None = None
        self.by_ufrag: dict[str, list[StunProtocol]] = {}
        self.by_addr: dict[Address, StunProtocol] = {}     # authenticated client address -> its session
        self.last_heard: dict[Address, float] = {}          # bound address -> loop time of its last datagram
        self.sent_to: dict[Address, list[StunProtocol]] = {}  # unbound addresses sessions sent checks to
        self.address_timeout = address_timeout
        self.drops: Counter[str] = Counter()
        self.candidates_ignored: Counter[str] = Counter()  # remote candidates never checked, by reason
        self.expired = 0                                    # bound addresses unbound for their silence
        self.on_expire: list[Callable[[Address], None]] = []
        self.datagrams_in = 0
        self._v6_socket = False
        self._sweep: asyncio.TimerHandle | None = None

    @classmethod
    async def bind(cls, host: str, port: int, public: Address | Sequence[Address] | None = None,
                   address_timeout: float = ADDRESS_TIMEOUT) -> UdpMux:
        """Bind the socket.  ``public``: the candidate(s) clients are told (the relay's address, or
        its IPv4 and IPv6 addresses); None = direct mode, the socket's own address is advertised.
        ``address_timeout``: how long a bound client address may stay silent."""
        if public and isinstance(public[0], str):
            public = [public]  # type: ignore[list-item] - one (host, port)
        check_aioice()
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "::" takes IPv4 clients too
            sock.bind((host, port))
            sock.setblocking(False)
            _grow_receive_buffer(sock, RECV_BUFFER_BYTES)
        except OSError as exc:
            sock.close()
            raise MuxError(f"cannot bind UDP {host}:{port}: {exc.strerror or exc}") from None
        _, mux = await loop.create_datagram_endpoint(lambda: cls(list(public or []), address_timeout), sock=sock)
        mux._v6_socket = family == socket.AF_INET6
        if not mux.public_candidates:  # direct mode: advertise the socket itself (port may be ephemeral)
            mux.public_candidates = [mux.local_address]
        return mux

    # -- addresses -------------------------------------------------------------

    @property
    def local_address(self) -> Address:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    @property
    def public_address(self) -> Address:
        """The first public candidate (what a single-address relay advertises)."""
        return self.public_candidates[0]

    def _from_socket(self, addr: tuple[Any, ...]) -> Address:
        host = addr[0]
        if self._v6_socket and host.startswith("::ffff:") and "." in host:
            host = host[7:]
        return host, addr[1]

    def send(self, data: bytes, addr: Address) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        host = addr[0]
        if ":" in host:
            if not self._v6_socket:
                self.drops[NO_ROUTE] += 1
                return
        elif self._v6_socket:
            host = "::ffff:" + host
        self.transport.sendto(data, (host, addr[1]))

    # -- sessions --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._schedule_sweep()

    def register(self, ufrag: str, protocol: StunProtocol) -> None:
        """Route new addresses whose Binding Request names ``ufrag`` to ``protocol`` (one per public
        candidate of a session; the one of the request's address family is chosen)."""
        protocols = self.by_ufrag.setdefault(ufrag, [])
        if protocol not in protocols:
            protocols.append(protocol)

    def unregister(self, ufrag: str) -> None:
        """Forget a session entirely (its ufrag and every address it talked to)."""
        for protocol in self.by_ufrag.pop(ufrag, []):
            self.forget(protocol)

    def drop_ufrag(self, ufrag: str) -> None:
        """Stop routing new addresses by ``ufrag`` (an ICE restart retired it); the session's
        protocols and the addresses it talks to stay."""
        self.by_ufrag.pop(ufrag, None)

    def bind_address(self, addr: Address, protocol: StunProtocol) -> None:
        """``addr`` authenticated itself to ``protocol``'s session: its media goes there from now on
        (replacing any earlier binding of that address)."""
        self.by_addr[addr] = protocol
        self.last_heard[addr] = asyncio.get_running_loop().time()

    def sending(self, addr: Address, protocol: StunProtocol) -> None:
        """``protocol`` sends to ``addr``: if that address is not bound to it, remember the send so
        the answer to a check finds its way back (it binds nothing)."""
        if self.by_addr.get(addr) is not protocol:
            waiting = self.sent_to.setdefault(addr, [])
            if protocol not in waiting:
                waiting.append(protocol)

    def forget(self, protocol: StunProtocol) -> None:
        for ufrag in [u for u, ps in self.by_ufrag.items() if protocol in ps]:
            self.by_ufrag[ufrag].remove(protocol)
            if not self.by_ufrag[ufrag]:
                del self.by_ufrag[ufrag]
        for addr in [a for a, p in self.by_addr.items() if p is protocol]:
            del self.by_addr[addr]
            self.last_heard.pop(addr, None)
        for addr in [a for a, ps in self.sent_to.items() if protocol in ps]:
            self.sent_to[addr].remove(protocol)
            if not self.sent_to[addr]:
                del self.sent_to[addr]

    def _schedule_sweep(self) -> None:
        # four looks per timeout: an address goes at most 25 % after its time
        self._sweep = asyncio.get_running_loop().call_later(self.address_timeout / 4, self._expire_silent)

    def _expire_silent(self) -> None:
        now = asyncio.get_running_loop().time()
        for addr in [a for a, at in self.last_heard.items() if now - at > self.address_timeout]:
            del self.last_heard[addr]
            self.by_addr.pop(addr, None)
            self.expired += 1
            for callback in self.on_expire:
                callback(addr)
        if self.transport is not None and not self.transport.is_closing():
            self._schedule_sweep()

    @property
    def sessions(self) -> int:
        return len(self.by_ufrag)

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())

    # -- receiving -------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """Media (RFC 7983: first byte above 3) from a bound address goes straight to its session's
        connection; only STUN goes through aioice's StunProtocol, which tries every datagram as STUN
        first (by its length field alone: an RTP packet whose sequence number is its length - 20 is
        parsed on) and hands media on from the ValueError.  The demultiplexing is RFC 7983's; the CPU it
        saves is small (0.5 µs a packet, ~0.2 % of an echo call's transceiver CPU, docs/bench/profile.md)."""
        self.datagrams_in += 1
        source = self._from_socket(addr) if self._v6_socket else addr
        bound = self.by_addr.get(source)
        if bound is not None:
            self.last_heard[source] = asyncio.get_running_loop().time()
        if not data or data[0] > 3:
            if bound is None:
                self.drops[NOT_STUN] += 1
                return
            connection = bound.receiver  # a MuxedConnection: what MuxProtocol.datagram_received does for media
            connection.paths.heard(source, data)
            connection.data_received(data, bound.local_candidate.component)
            return
        protocol = self._route_stun(data, source, bound)
        if protocol is not None:
            protocol.datagram_received(data, source)

    def _route_stun(self, data: bytes, source: Address, bound: StunProtocol | None) -> StunProtocol | None:
        """A Binding Request goes to the session its ufrag names (which authenticates it), a response
        to the session whose check it answers; what neither routes goes where its address is bound."""
        try:
            ufrag = ref_stun.server_ufrag(data)
        except ref_stun.StunError:
            if bound is None:
                self.drops[BAD_STUN] += 1
            return bound
        if ufrag is None:  # not a Binding Request: a response (or an indication)
            transaction_id = bytes(data[8:20])
            for protocol in (bound, *self.sent_to.get(source, ())):
                if protocol is not None and transaction_id in protocol.transactions:
                    return protocol
            if bound is None:
                self.drops[NO_TRANSACTION if data[0] & 0x01 else NOT_BINDING] += 1
            return bound
        protocols = self.by_ufrag.get(ufrag)
        if not protocols:
            if bound is None:
                self.drops[UNKNOWN_UFRAG] += 1
            return bound  # e.g. a retired ufrag: the session it talks to answers it
        if bound in protocols:
            return bound
        family = _family(source[0])
        for protocol in protocols:
            if _family(protocol.local_candidate.host) == family:
                return protocol
        return protocols[0]

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a client that went away: consent checks will notice
        log.debug("mux socket error: %s", exc)

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        if self.transport:
            self.transport.close()
