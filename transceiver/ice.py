"""Make aiortc's ICE gatherers use the transceiver's mux, for the peer connections we create.

aiortc builds its ICE ``Connection`` inside ``RTCIceGatherer``; we swap in a
factory that, only while a session context is set (a ContextVar, so other
peer connections in the process are untouched), returns a ``MuxedConnection``
with the session's hint-carrying ufrag and a 144-bit password.
"""

from __future__ import annotations

import contextlib
import secrets
from contextvars import ContextVar
from typing import Any
from collections.abc import Iterator

import aiortc.rtcicetransport as _rtcicetransport

from splitrelay.edge.hint import ALPHABET
from splitrelay.transceiver.mux import MuxedConnection, UdpMux

_session: ContextVar[tuple[UdpMux, str, str] | None] = ContextVar("splitrelay_ice_session", default=None)
_original_connection = _rtcicetransport.Connection


def new_password() -> str:
    """24 ice-chars: 144 random bits (RFC 8445 asks for at least 128)."""
    return "".join(secrets.choice(ALPHABET) for _ in range(24))


def _connection_factory(*args: Any, **kwargs: Any):  # noqa: ANN202 - mirrors aioice.Connection
    current = _session.get()
    if current is None:
        return _original_connection(*args, **kwargs)
    mux, ufrag, password = current
    if kwargs.get("local_username") is None:
        kwargs["local_username"], kwargs["local_password"] = ufrag, password
    return MuxedConnection(*args, mux=mux, **kwargs)


_rtcicetransport.Connection = _connection_factory


@contextlib.contextmanager
def session_ice(mux: UdpMux, ufrag: str, password: str) -> Iterator[None]:
    """Peer connections that create ICE transports inside this block use the mux and this ufrag."""
    token = _session.set((mux, ufrag, password))
    try:
        yield
    finally:
        _session.reset(token)
