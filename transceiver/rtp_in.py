"""A session's SRTP packets from the mux straight into aiortc's RTP receive path, in the socket callback.

aioice puts every non-STUN datagram of a connection on an ``asyncio.Queue``; aiortc's
``RTCDtlsTransport`` runs a task that awaits ``Connection.recv`` -> ``recvfrom`` -> the queue for each
one, then ``_recv_next`` demultiplexes it.  So each received RTP packet costs a queue put, a future
resolved, a task wake-up through the event loop and a chain of coroutine frames before libsrtp sees it.
``DirectRtp`` does for an SRTP RTP packet (RFC 7983: first byte 128..191, not RTCP) what
``_recv_next`` does for it -- count it in the transport's statistics, unprotect it, hand it to
``RTCDtlsTransport._handle_rtp_data`` with its arrival time -- synchronously, from
``Connection.data_received``, where the mux delivers it.

What stays aiortc's: DTLS (the data channel), SRTCP and every packet that arrives while an earlier
datagram is still queued for the DTLS task (so nothing overtakes what came before it), and everything
before the transport is connected and keyed.  aiortc's RTP layers above (parsing, routing,
``RTCRtpReceiver._handle_rtp_packet``: statistics, RTX, NACK, the jitter buffer the voice path replaces)
run unchanged; they are coroutines that, for audio fed to the voice path, never suspend, so they are
driven to completion here and only handed to a task if one ever does.

Relies on aiortc's ``RTCDtlsTransport._state``, ``_rx_srtp``, ``_handle_rtp_data``, its name-mangled
``__rx_bytes``/``__rx_packets`` counters, ``RTCIceTransport._connection``, and aioice's
``Connection._queue`` and ``data_received`` (``missing_internals``, tests/test_rtp_in.py; both pinned).
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Coroutine, Generator
from typing import Any

import pylibsrtp
from aioice.ice import Connection
from aiortc import clock
from aiortc.rtcdtlstransport import RTCDtlsTransport, State
from aiortc.rtcrtpreceiver import RTCRtpReceiver

log = logging.getLogger(__name__)

# pylibsrtp 1.0 unprotects in a 1500-byte buffer and raises ValueError (not pylibsrtp.Error) past it; aiortc's
# DTLS task catches only pylibsrtp.Error, so one longer SRTP/SRTCP-range datagram from a session's bound
# address (its caller, or anyone who spoofs the caller's address) ended that task, and the session with it.
SRTP_MAX_BYTES = 1500
RX_BYTES = "_RTCDtlsTransport__rx_bytes"
RX_PACKETS = "_RTCDtlsTransport__rx_packets"


def missing_internals() -> list[str]:
    """Names of the aiortc/aioice internals ``DirectRtp`` uses that this install lacks ([] = all present)."""
    recv_next = RTCDtlsTransport._recv_next.__code__.co_names
    init = RTCDtlsTransport.__init__.__code__.co_names
    checks = (
        ("RTCDtlsTransport._handle_rtp_data", callable(getattr(RTCDtlsTransport, "_handle_rtp_data", None))
         and "_handle_rtp_data" in recv_next),
        ("RTCDtlsTransport._rx_srtp", "_rx_srtp" in init and "_rx_srtp" in recv_next),
        ("RTCDtlsTransport._state", "_state" in init and hasattr(State, "CONNECTED")),
        ("RTCDtlsTransport.__rx_bytes/__rx_packets", RX_BYTES in init and RX_PACKETS in recv_next),
        ("RTCDtlsTransport.transport._recv", "_recv" in recv_next),
        ("aioice Connection._queue", "_queue" in Connection.__init__.__code__.co_names
         and "_queue" in Connection.data_received.__code__.co_names),
    )
    return [name for name, ok in checks if not ok]


@types.coroutine
def _resume(coro: Coroutine[Any, Any, None], yielded: Any) -> Generator[Any, Any, None]:  # noqa: ANN401
    """The rest of ``coro``, which suspended on ``yielded`` after being started by hand, as a task runs it."""
    while True:
        try:
            value = yield yielded
        except BaseException as exc:  # noqa: BLE001 - cancellation and all: passed into the coroutine
            try:
                yielded = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                yielded = coro.send(value)
            except StopIteration:
                return


async def _finish(coro: Coroutine[Any, Any, None], yielded: Any) -> None:  # noqa: ANN401
    await _resume(coro, yielded)


class DirectRtp:
    """Delivers one aiortc receiver's SRTP packets from its ICE connection's ``data_received``."""

    def __init__(self, receiver: RTCRtpReceiver) -> None:
        self.receiver = receiver
        self.packets = 0    # RTP packets delivered here, not through aioice's queue
        self.queued = 0     # SRTP/SRTCP left to the queue: an earlier datagram was still waiting there
        self.rejected = 0   # SRTP packets that failed authentication or were too long for libsrtp (dropped)
        self.suspended = 0  # deliveries that awaited something and were finished by a task
        self._tasks: set[asyncio.Task] = set()

    def attach(self) -> bool:
        """Take the receiver's RTP from its connection (the transport's, set before aiortc's ``track``
        event); False if the connection is not an aioice one."""
        connection = getattr(getattr(self.receiver.transport, "transport", None), "_connection", None)
        if not isinstance(connection, Connection):
            return False
        original = connection.data_received
        queue = connection._queue

        def data_received(data: bytes, component: int) -> None:
            if data and 127 < data[0] < 192:
                if len(data) > SRTP_MAX_BYTES:
                    self.rejected += 1
                    return
                if not queue.empty():
                    self.queued += 1
                elif self.deliver(data):
                    return
            original(data, component)

        connection.data_received = data_received  # type: ignore[method-assign]
        return True

    def deliver(self, data: bytes) -> bool:
        """``_recv_next``'s SRTP branch for one RTP datagram; False: not ours to take (RTCP, not keyed)."""
        dtls = self.receiver.transport
        srtp = dtls._rx_srtp
        if srtp is None or dtls._state is not State.CONNECTED or (len(data) >= 2 and 191 < data[1] < 209):
            return False   # SRTCP (aiortc's is_rtcp) and anything before the keys: aiortc's own path
        setattr(dtls, RX_BYTES, getattr(dtls, RX_BYTES) + len(data))
        setattr(dtls, RX_PACKETS, getattr(dtls, RX_PACKETS) + 1)
        arrival_time_ms = clock.current_ms()
        try:
            data = srtp.unprotect(data)
        except (pylibsrtp.Error, ValueError) as exc:
            self.rejected += 1
            log.debug("SRTP unprotect failed: %s", exc)
            return True
        self.packets += 1
        coro = dtls._handle_rtp_data(data, arrival_time_ms=arrival_time_ms)
        try:
            yielded = coro.send(None)
        except StopIteration:
            return True
        except Exception:  # noqa: BLE001 - aiortc's task would have logged it and stopped; the call goes on
            log.warning("RTP receive failed", exc_info=True)
            return True
        self.suspended += 1
        task = asyncio.ensure_future(_finish(coro, yielded))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True
