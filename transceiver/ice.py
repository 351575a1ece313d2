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
"""

from __future__ import annotations

import contextlib
import secrets
from contextvars import ContextVar
from collections.abc import Iterator
from typing import Any

import aiortc.rtcicetransport as _rtcicetransport

from splitrelay.wire.hint import ALPHABET
from splitrelay.transceiver.mux import MuxedConnection, UdpMux

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
