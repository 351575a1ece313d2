"""Make aiortc's ICE gatherers use the transceiver's mux, for the peer connections we create.

aiortc builds its ICE ``Connection`` inside ``RTCIceGatherer``, which
``RTCPeerConnection`` creates privately (``__createDtlsTransport``) during
``setRemoteDescription``; there is no public way to hand it a Connection.  We
swap the ``Connection`` name in ``aiortc.rtcicetransport`` (once, at import)
for a factory that, only while a session context is set (a ContextVar, so
other peer connections in the process, such as test clients, are untouched),
returns a ``MuxedConnection`` with the session's hint-carrying ufrag and a
144-bit password.  aiortc passes the first transport's ufrag/password to any
later gatherer of the same peer connection, so every transport of a session
shares them (with BUNDLE there is only one).

``restart_ice`` is the transceiver's half of an ICE restart (WHIP PATCH, RFC 9725
4.3.2): the same MuxedConnection moves to a new hint-carrying ufrag and password
and checks the client's new candidates (ice_restart.py), the DTLS/SRTP association
above it untouched; the old ufrag is retired once the new generation is nominated.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from contextvars import ContextVar
from collections.abc import Iterator
from typing import Any

import aiortc.rtcicetransport as _rtcicetransport
from aioice import Candidate
from aioice.ice import CandidatePair

from splitrelay.wire.hint import ALPHABET
from splitrelay.transceiver.ice_restart import begin_generation, run_generation
from splitrelay.transceiver.ice_connection import MuxedConnection
from splitrelay.transceiver.mux import UdpMux

_session: ContextVar[tuple[UdpMux, str, str, list, list[MuxedConnection]] | None] = ContextVar(
    "splitrelay_ice_session", default=None)
_original_connection = _rtcicetransport.Connection


def new_password() -> str:
    """24 ice-chars: 144 random bits (RFC 8445 asks for at least 128)."""
    return "".join(secrets.choice(ALPHABET) for _ in range(24))


def _connection_factory(*args: Any, **kwargs: Any):  # noqa: ANN202 - mirrors aioice.Connection
    current = _session.get()
    if current is None:
        return _original_connection(*args, **kwargs)
    mux, ufrag, password, candidates, created = current
    if kwargs.get("local_username") is None:
        kwargs["local_username"], kwargs["local_password"] = ufrag, password
    connection = MuxedConnection(*args, mux=mux, public_candidates=candidates, **kwargs)
    created.append(connection)
    return connection


_rtcicetransport.Connection = _connection_factory


@contextlib.contextmanager
def session_ice(mux: UdpMux, ufrag: str, password: str,
                candidates: list[tuple[tuple[str, int], int]] | None = None) -> Iterator[list[MuxedConnection]]:
    """Peer connections that create ICE transports inside this block use the mux and this ufrag,
    and advertise ``candidates`` ((address, local preference), see relays.py; default: the mux's);
    yields the list of the ICE connections so created."""
    created: list[MuxedConnection] = []
    token = _session.set((mux, ufrag, password, list(candidates or []), created))
    try:
        yield created
    finally:
        _session.reset(token)


def restart_ice(connections: list[MuxedConnection], mux: UdpMux, ufrag: str, password: str,
                remote_ufrag: str, remote_password: str, remote_candidates: list[Candidate],
                timeout: float = 10.0) -> tuple[list[Candidate], asyncio.Task[CandidatePair]]:
    """Move a session's ICE connection(s) to (ufrag, password) and start checking the client's
    new candidates.  Returns our candidates (unchanged: the relays' public addresses) and a
    task that ends with the newly nominated pair, after which the old ufrag routes nothing.

    New addresses naming the new ufrag reach the session at once (registered with the mux
    before this returns); those the session already talked to stay routed to it."""
    # aiortc creates a transport per m-line and closes the ones BUNDLE makes redundant
    connections = [c for c in connections if not c._closing]
    old = {c.local_username for c in connections}
    for connection in connections:
        begin_generation(connection, ufrag, password)
        # now, not when the task runs: the client's first check may come before it does
        connection.remote_username, connection.remote_password = remote_ufrag, remote_password
        for protocol in connection._protocols:
            mux.register(ufrag, protocol)

    async def generation() -> CandidatePair:
        pairs = await asyncio.gather(*(run_generation(c, remote_ufrag, remote_password, remote_candidates,
                                                      timeout) for c in connections))
        for retired in old - {ufrag}:
            mux.drop_ufrag(retired)
        return pairs[0]

    candidates = [c for connection in connections for c in connection.local_candidates]
    return candidates, asyncio.ensure_future(generation())
