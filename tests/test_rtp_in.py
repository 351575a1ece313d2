"""SRTP from the mux straight into aiortc's RTP receive path (transceiver/rtp_in.py), with real aiortc callers.

Each test calls the transceiver with a plain aiortc peer speaking a tone (test_transceiver.Caller) and
checks the caller's own voice comes back through the echo, as it does through aioice's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import pylibsrtp
import pytest
from aiortc.rtcdtlstransport import RTCDtlsTransport

from splitrelay.transceiver import rtp_in
from splitrelay.transceiver.audio import AudioPathError, check_aiortc
from splitrelay.transceiver.service import Transceiver
from splitrelay.transceiver.session import Session

from . import test_transceiver
from .test_transceiver import Caller, ended, until

transceiver = test_transceiver.transceiver   # the fixture: a transceiver on loopback, direct mode


@contextlib.asynccontextmanager
async def echo_call(transceiver: Transceiver) -> AsyncIterator[tuple[Caller, Session]]:
    """A caller whose tone already came back, and its session on the transceiver; hung up after."""
    caller = Caller(transceiver.whip_url, 700.0)
    async with aiohttp.ClientSession() as http:
        try:
            await caller.call(http)
            await until(caller.heard_own, "the echo of the caller's tone")
            yield caller, transceiver.sessions[caller.session_id]
        finally:
            await caller.hangup(http)


async def heard_again(caller: Caller, what: str) -> None:
    """The caller hears half a second of its own tone from now on."""
    caller.heard_own.clear()
    caller._loud_run = 0
    await until(caller.heard_own, what)


async def test_an_echo_call_s_rtp_reaches_aiortc_s_receiver_without_aioice_s_queue(transceiver):
    async with echo_call(transceiver) as (caller, session):
        direct = session.voice.direct
        before = direct.packets
        stats = await session.stats()
        after = direct.packets
        # every RTP packet after the handshake went the direct way, none had to be finished by a task
        assert before > 25 and direct.queued <= 2 and direct.suspended == direct.rejected == 0
        # ...and through aiortc's receiver above it: its statistics count each one (those queued too)
        assert before <= stats["packets_received"] - direct.queued <= after
        assert stats["packets_lost"] == 0 and stats["jitter_ms"] is not None
        # the transport's own counters (getStats "transport") still count what came in
        dtls = session.voice.direct.receiver.transport
        transport = next(s for s in dtls._get_stats().values() if s.type == "transport")
        assert transport.packetsReceived >= after
        # SRTCP stays on aiortc's path: the caller's receiver reports reach the sender (an RTT)
        for _ in range(100):
            if (await session.stats())["rtt_ms"] is not None:
                break
            await asyncio.sleep(0.05)
        assert (await session.stats())["rtt_ms"] is not None
        assert session.voice.buffer.released >= after - 5
    assert (await ended(transceiver, caller.session_id))["end_reason"] == "deleted"


async def test_rtp_behind_a_datagram_still_queued_for_the_dtls_task_waits_its_turn(transceiver):
    async with echo_call(transceiver) as (caller, session):
        connection = session.ice_connections[0]
        deliver = connection.data_received      # the mux's way in (arrival stamp, then rtp_in)
        held: list[tuple[bytes, int]] = []

        def hold_one(data: bytes, component: int) -> None:
            if not held and 127 < data[0] < 192 and not 192 <= data[1] <= 208:
                held.append((data, component))   # one RTP packet, delivered below behind a queued datagram
                return
            deliver(data, component)

        connection.data_received = hold_one
        for _ in range(200):
            if held:
                break
            await asyncio.sleep(0.01)
        connection.data_received = deliver
        queued, packets = session.voice.direct.queued, session.voice.direct.packets
        received = (await session.stats())["packets_received"]
        deliver(bytes(20), held[0][1])   # neither DTLS nor SRTP: aiortc's task reads it and ignores it
        deliver(*held[0])                # in the same callback, so the task has not run yet
        assert session.voice.direct.queued == queued + 1 and session.voice.direct.packets == packets
        await asyncio.sleep(0.05)
        stats = await session.stats()    # the task took it from the queue to the receiver
        assert stats["packets_received"] - received == session.voice.direct.packets - packets + 1
        await asyncio.sleep(0.1)
        assert session.voice.direct.queued == queued + 1   # the queue drained, RTP went direct again
        await heard_again(caller, "the tone still echoed")
        assert session.voice.direct.packets > packets


async def test_a_forged_srtp_packet_from_the_caller_s_address_is_dropped_and_the_call_goes_on(transceiver):
    """An attacker who can send from the caller's bound address (or a path that corrupts) reaches libsrtp in
    the socket callback now: a packet failing authentication is counted and dropped, nothing else changes."""
    async with echo_call(transceiver) as (caller, session):
        (address,) = transceiver.mux.by_addr
        forged = bytes([0x80, 111, 0x12, 0x34]) + bytes(8) + bytes(range(60))   # RTP header, bad auth tag
        for i in range(50):
            transceiver.mux.datagram_received(forged[:2] + bytes([i]) + forged[3:], address)
        assert session.voice.direct.rejected == 50
        for junk in (bytes([0x80]), bytes([0x80, 111]), bytes([0xBF]) * 1500):   # short, tiny, full size
            transceiver.mux.datagram_received(junk, address)
        assert session.voice.direct.rejected == 53
        # longer than libsrtp's buffer: RTP and RTCP, taken direct or behind a queued datagram, never
        # reach aiortc's DTLS task, which a ValueError from pylibsrtp would end
        for oversized in (bytes([0x80, 111]) + bytes(1499), bytes([0x80, 200]) + bytes(3000)):
            transceiver.mux.datagram_received(oversized, address)
            transceiver.mux.datagram_received(bytes(20), address)   # queued for the DTLS task...
            transceiver.mux.datagram_received(oversized, address)   # ...so this would queue behind it
        assert session.voice.direct.rejected == 57
        await heard_again(caller, "the tone still echoed after the forgeries")
        assert (await session.stats())["packets_lost"] == 0


def test_the_aiortc_and_aioice_internals_the_direct_path_uses_are_there(monkeypatch):
    assert rtp_in.missing_internals() == []
    check_aiortc()
    monkeypatch.setattr(rtp_in, "RX_PACKETS", "_RTCDtlsTransport__renamed")
    with pytest.raises(AudioPathError) as exc:
        check_aiortc()
    assert "lacks RTCDtlsTransport.__rx_bytes/__rx_packets;" in str(exc.value)
    assert callable(RTCDtlsTransport._handle_rtp_data)


def test_pylibsrtp_takes_exactly_what_the_direct_path_lets_through():
    session = pylibsrtp.Session(pylibsrtp.Policy(key=bytes(30), ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND))
    with pytest.raises(pylibsrtp.Error):   # unauthenticated: an error aiortc's task survives
        session.unprotect(bytes([0x80, 111]) + bytes(rtp_in.SRTP_MAX_BYTES - 2))
    with pytest.raises(ValueError) as exc:  # one byte more: the error that ended aiortc's task
        session.unprotect(bytes([0x80, 111]) + bytes(rtp_in.SRTP_MAX_BYTES - 1))
    assert str(exc.value) == "packet is too long"
