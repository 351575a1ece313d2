"""One UDP socket for every session of a transceiver, under aioice.

The relay steers each session to a transceiver's single *backend address*,
so the transceiver cannot bind a socket per session.  ``UdpMux`` owns that
one socket and demultiplexes: a datagram from a source address it already
knows goes to that address's session; one from a new address must be a STUN
Binding Request, routed by the local (server) ufrag in its USERNAME (the
Pion UDPMux / mediasoup WebRtcServer pattern).  Each aioice ``StunProtocol``
gets a ``MuxTransport`` that sends through the shared socket instead of
owning one, so sessions come and go without binding anything.

``MuxedConnection`` is the seam into aioice: it replaces candidate gathering
(binding per-interface sockets) with one host candidate per session that
carries the relay's public address, so no transceiver address ever reaches
the SDP.  It relies on aioice's ``StunProtocol`` and ``Connection._protocols``
(aioice 0.10).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aioice import Candidate
from aioice.candidate import candidate_foundation, candidate_priority
from aioice.ice import Connection, StunProtocol

from splitrelay.edge import stun as ref_stun

log = logging.getLogger(__name__)


class MuxError(Exception):
    """The mux could not bind or route (one-line reason)."""


class MuxTransport(asyncio.DatagramTransport):
    """A per-session view of the shared socket: sending registers the peer for replies."""

    def __init__(self, mux: UdpMux, protocol: StunProtocol, ufrag: str) -> None:
        super().__init__()
        self.mux = mux
        self.protocol = protocol
        self.ufrag = ufrag
        self._closed = False

    def sendto(self, data: bytes, addr: Any = None) -> None:
        if self._closed or self.mux.transport is None:
            return
        addr = (addr[0], addr[1])
        self.mux.learn(addr, self.protocol)
        self.mux.transport.sendto(data, addr)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sockname":
            return self.mux.public_address
        return default

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.mux.forget(self.protocol)
        asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)


class UdpMux(asyncio.DatagramProtocol):
    """The transceiver's one UDP socket, shared by all sessions."""

    def __init__(self, public_address: tuple[str, int]) -> None:
        self.public_address = public_address
        self.transport: asyncio.DatagramTransport | None = None
        self.by_ufrag: dict[str, StunProtocol] = {}
        self.by_addr: dict[tuple[str, int], StunProtocol] = {}
        self.dropped = 0

    @classmethod
    async def bind(cls, host: str, port: int, public_address: tuple[str, int] | None = None) -> UdpMux:
        loop = asyncio.get_running_loop()
        try:
            _, mux = await loop.create_datagram_endpoint(lambda: cls(public_address or (host, port)),
                                                         local_addr=(host, port))
        except OSError as exc:
            raise MuxError(f"cannot bind UDP {host}:{port}: {exc.strerror or exc}") from None
        if public_address is None:  # direct mode: advertise the socket itself (port may be ephemeral)
            mux.public_address = mux.transport.get_extra_info("sockname")[:2]
        return mux

    @property
    def local_address(self) -> tuple[str, int]:
        return self.transport.get_extra_info("sockname")[:2]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def register(self, ufrag: str, protocol: StunProtocol) -> None:
        # aiortc gives every transport of one peer connection the same ufrag; with BUNDLE the
        # first one carries everything, so the first registration keeps the ufrag.
        self.by_ufrag.setdefault(ufrag, protocol)

    def learn(self, addr: tuple[str, int], protocol: StunProtocol) -> None:
        self.by_addr.setdefault(addr, protocol)

    def forget(self, protocol: StunProtocol) -> None:
        for table in (self.by_ufrag, self.by_addr):
            for key in [k for k, v in table.items() if v is protocol]:
                del table[key]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        addr = (addr[0], addr[1])
        protocol = self.by_addr.get(addr)
        if protocol is None:
            protocol = self._route_new(data)
            if protocol is None:
                self.dropped += 1
                return
            self.by_addr[addr] = protocol
        protocol.datagram_received(data, addr)

    def _route_new(self, data: bytes) -> StunProtocol | None:
        if ref_stun.classify(data) != ref_stun.STUN:
            return None
        try:
            ufrag = ref_stun.server_ufrag(data)
        except ref_stun.StunError:
            return None
        return self.by_ufrag.get(ufrag) if ufrag else None

    def close(self) -> None:
        if self.transport:
            self.transport.close()


class MuxedConnection(Connection):
    """An aioice Connection whose only candidate is the relay's public address, on the mux."""

    def __init__(self, *args: Any, mux: UdpMux, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mux = mux

    async def get_component_candidates(self, component: int, addresses: list[str],
                                       timeout: int = 5) -> list[Candidate]:
        protocol = StunProtocol(self)
        protocol.connection_made(MuxTransport(self.mux, protocol, self.local_username))
        host, port = self.mux.public_address
        protocol.local_candidate = Candidate(
            foundation=candidate_foundation("host", "udp", host), component=component, transport="udp",
            priority=candidate_priority(component, "host"), host=host, port=port, type="host",
        )
        self.mux.register(self.local_username, protocol)
        self._protocols.append(protocol)
        return [protocol.local_candidate]
