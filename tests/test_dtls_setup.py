"""DTLS ready when ICE is (issue 20 §3): the transceiver answers ``setup:active`` (``--dtls-role``, default)
and sends its ClientHello again just after the client nominates, or ``setup:passive`` so the client starts
the handshake; no standard stack waits for a DTLS retransmission, and each is connected within 50 ms of
its own ICE.

First with aiortc peers on loopback (the role in the answer, offers that insist on a role, a client
that drops our early ClientHello as werift does, the start check), then through a one-relay XDP lab
with the default role and the stacks that dropped our early ClientHello (libdatachannel and werift,
from npm) and Chromium, a few calls each.  The 20-run figures are bench/dtls_setup.py's
(BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
from ipaddress import ip_address

import aiohttp
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcdtlstransport import RTCDtlsTransport

from splitrelay.bench.dtls_setup import (GAP_TARGET_MS, RETRANSMISSION_MS, Setup, chromium_setup, markdown,
                                         summarize)
from splitrelay.client import node_call
from splitrelay.client.browser import Browser, unavailable_reason as browser_unavailable
from splitrelay.lab.netns import nsenter_argv
from splitrelay.lab.stack import start_lab, stop_lab
from splitrelay.lab.topology import Lab
from splitrelay.transceiver import dtls_role
from splitrelay.transceiver.service import Transceiver, TransceiverConfig

from .conftest import needs_root

CALLS = 5   # per client; each one that waited for a retransmission fails the test, and so do two over 50 ms


def assert_within_target(stack: str, gaps: list[float]) -> None:
    """Issue 20's 19 of 20 within 50 ms, in short: all but one of ``CALLS``, and none a retransmission.
    werift with the passive answer: 0 of 20 (113-118 ms p50, its own 100 ms wait as the DTLS client)."""
    assert max(gaps) < RETRANSMISSION_MS, (stack, gaps)
    assert sum(gap <= GAP_TARGET_MS for gap in gaps) >= CALLS - 1, (stack, gaps)


async def serving(dtls_role: str):
    service = Transceiver(TransceiverConfig(backend_id=9, bind_port=0, whip_port=0, dtls_role=dtls_role))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.fixture
async def transceiver():
    async for service in serving(dtls_role.PASSIVE):
        yield service


@pytest.fixture
async def active_transceiver():
    async for service in serving(dtls_role.ACTIVE):
        yield service


@pytest.fixture(params=dtls_role.ROLES)
async def either_transceiver(request):
    async for service in serving(request.param):
        yield service


async def call(whip_url: str, offered_setup: str | None = None) -> tuple[str, str]:
    """An aiortc call whose offer says ``a=setup:<offered_setup>`` (default: aiortc's actpass);
    returns the answer's setup and the client's DTLS role once connected."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio")
    connected = asyncio.Event()
    pc.on("connectionstatechange", lambda: connected.set() if pc.connectionState == "connected" else None)
    await pc.setLocalDescription(await pc.createOffer())
    offer = pc.localDescription.sdp
    if offered_setup:
        offer = offer.replace("a=setup:actpass", f"a=setup:{offered_setup}")
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(whip_url, data=offer, headers={"Content-Type": "application/sdp"}) as resp:
                assert resp.status == 201, await resp.text()
                answer = await resp.text()
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            await asyncio.wait_for(connected.wait(), 20)
            setups = {line.split(":", 1)[1] for line in answer.splitlines() if line.startswith("a=setup:")}
            [setup] = setups
            return setup, pc.getTransceivers()[0].receiver.transport._role
    finally:
        await pc.close()


async def answered(pc: RTCPeerConnection, whip_url: str) -> str:
    """POST ``pc``'s offer as it is, apply the answer, return it."""
    async with aiohttp.ClientSession() as http:
        async with http.post(whip_url, data=pc.localDescription.sdp,
                             headers={"Content-Type": "application/sdp"}) as resp:
            assert resp.status == 201, await resp.text()
            answer = await resp.text()
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    return answer


async def test_with_the_passive_role_the_answer_says_passive_so_the_client_sends_the_first_dtls_flight(
        transceiver):
    assert await call(transceiver.whip_url) == ("passive", "client")


async def test_with_the_active_role_the_answer_says_active_and_the_transceiver_sends_the_first_dtls_flight(
        active_transceiver):
    assert await call(active_transceiver.whip_url) == ("active", "server")


@pytest.mark.parametrize("offered,answered,client_role", [("active", "passive", "client"),
                                                         ("passive", "active", "server")])
async def test_an_offer_that_insists_on_a_dtls_role_keeps_it_and_connects(either_transceiver, offered, answered,
                                                                          client_role):
    assert await call(either_transceiver.whip_url, offered) == (answered, client_role)


async def test_the_transceivers_ice_connects_on_the_first_valid_pair_before_the_client_nominates(transceiver):
    # a client that checks but never nominates (as libjuice holds its nomination for 2 s while a
    # higher-priority pair is still in progress): the transceiver's side is connected all the same
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio")
    await pc.setLocalDescription(await pc.createOffer())
    client = pc.getTransceivers()[0].sender.transport.transport._connection
    build = client.build_request
    client.build_request = lambda pair, nominate: build(pair, nominate=False)
    try:
        await answered(pc, transceiver.whip_url)
        [session] = transceiver.sessions.values()
        for _ in range(200):   # 10 s at most; ~50 ms on loopback
            if session.timings.ice_connected_ms is not None:
                break
            await asyncio.sleep(0.05)
        assert session.ice_states[-1] == "completed", session.ice_states
        [connection] = [c for c in session.ice_connections if not c._closing]
        [selected] = connection._nominated.values()
        assert not selected.nominated and not selected.remote_nominated   # no USE-CANDIDATE came
    finally:
        await pc.close()


def nominating_late(request, nominated: list[float]):  # noqa: ANN001, ANN201 - StunProtocol.request
    """``request``, with a nominating check sent 50 ms late; ``nominated`` gets when it was answered."""
    async def late(message, *args, **kwargs):  # noqa: ANN001, ANN202
        if "USE-CANDIDATE" not in message.attributes:
            return await request(message, *args, **kwargs)
        await asyncio.sleep(0.05)
        answered = await request(message, *args, **kwargs)
        nominated.append(asyncio.get_running_loop().time())
        return answered
    return late


async def test_as_the_dtls_client_the_transceiver_resends_its_clienthello_when_a_client_that_dropped_it_nominates(
        active_transceiver):
    # an aiortc client made to behave as werift does: it nominates regularly (a check, then one with
    # USE-CANDIDATE), and as the DTLS server it drops DTLS that arrives before that nomination is done.
    # Our ClientHello leaves on our first valid pair, before that; a copy sent just after the
    # nomination (or 50 ms after the first) is what the handshake runs on.  Without the resends, the
    # handshake waits for OpenSSL's first retransmission: 976 ms
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio")
    dtls_done, dropped, nominated = asyncio.Event(), [], []
    pc.on("connectionstatechange", lambda: dtls_done.set() if pc.connectionState == "connected" else None)
    await pc.setLocalDescription(await pc.createOffer())
    client = pc.getTransceivers()[0].sender.transport.transport._connection
    # aioice nominates regularly only for an ice-lite peer (aiortc sets the flag as ICE starts)
    client.__class__ = type("RegularNomination", (type(client),),
                            {"remote_is_lite": property(lambda _: True, lambda _, value: None)})
    for protocol in client._protocols:   # and late: on loopback it would beat our ClientHello
        protocol.request = nominating_late(protocol.request, nominated)
    received = client.data_received

    def werift_like(data: bytes, component: int) -> None:
        if not client._nominated:
            dropped.append(data)
            return
        received(data, component)

    client.data_received = werift_like
    try:
        assert "a=setup:active" in await answered(pc, active_transceiver.whip_url)
        await asyncio.wait_for(dtls_done.wait(), 10)
        gap_ms = 1000 * (asyncio.get_running_loop().time() - nominated[0])
        [session] = active_transceiver.sessions.values()
        [connection] = [c for c in session.ice_connections if not c._closing]
        print(f"dropped {len(dropped)} early datagrams; DTLS {gap_ms:.1f} ms after the nomination; "
              f"{connection.first_flight.resent} resends")
        assert dropped and all(dtls_role.is_client_hello(d) for d in dropped)   # it did drop our first one
        assert gap_ms < RETRANSMISSION_MS   # 976 ms without the resends; 2-14 ms here on loopback
        assert connection.first_flight.resent >= 1
    finally:
        await pc.close()


def test_the_start_check_names_the_aiortc_internal_that_moved(monkeypatch):
    dtls_role.check_dtls_role()
    monkeypatch.delattr(RTCDtlsTransport, "_set_role")
    import aiortc

    with pytest.raises(dtls_role.DtlsRoleError) as exc:
        dtls_role.check_dtls_role()
    assert str(exc.value) == (f"aiortc {aiortc.__version__} lacks RTCDtlsTransport._set_role; "
                              "the transceiver's passive DTLS answer needs aiortc 1.16")


def test_the_bench_counts_gaps_within_50_ms_and_retransmissions_and_judges_the_target():
    def calls(*gaps: float, role: str = "active") -> list[Setup]:
        return [Setup("werift", 60.0, 60.0 + gap, dtls_role=role) for gap in gaps]

    [row] = summarize(calls(*[10.0] * 19, 70.0))
    assert (row["connected"], row["within_50ms"], row["retransmissions"]) == (20, 19, 0)
    assert (row["dtls_p95_ms"], row["dtls_p95_target_ms"], row["ok"]) == (73.0, 122.0, True)
    assert ("| werift | active | - | 20/20 | 60.0 / 60.0 | 70.0 / 73.0 | 10.0 / 13.0 / 70.0 | 19/20 | 0 | 122.0 "
            "| yes |") in markdown([row])
    passive, active = summarize(calls(*[110.0] * 20, role="passive") + calls(*[10.0] * 20))   # a row per role
    assert [(r["dtls_role"], r["runs"], r["within_50ms"], r["ok"]) for r in (passive, active)] == [
        ("passive", 20, 0, False), ("active", 20, 20, True)]
    [row] = summarize(calls(*[10.0] * 18, 45.0, 1040.0))   # 19 of 20 within 50 ms, but one retransmission
    assert (row["within_50ms"], row["retransmissions"], row["dtls_p95_ms"], row["ok"]) == (19, 1, 154.8, False)
    [row] = summarize(calls(*[10.0] * 20) + [Setup("werift", None, None, error="timeout", dtls_role="active")])
    assert (row["runs"], row["connected"], row["ok"]) == (21, 20, False)


# -- through the relay ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def relay_lab():
    info = start_lab(transceivers=1, relays=1)
    try:
        yield Lab.load(info["name"]), info["whip_url"], info["whip_token"]
    finally:
        stop_lab(info["name"])


@needs_root
@pytest.mark.parametrize("stack", node_call.STACKS)
def test_a_node_stack_reaches_dtls_through_the_relay_within_50_ms_of_its_ice(relay_lab, stack):
    if reason := node_call.unavailable_reason(stack):
        pytest.skip(reason)
    lab, whip_url, token = relay_lab
    # one process, as an agent runs: the first call also loads and compiles the stack (werift's first
    # handshake alone took 150-900 ms of JavaScript crypto here), so it is only required to connect
    reports = node_call.node_calls(stack, whip_url, nsenter_argv(lab.client.netns, []), calls=1 + CALLS,
                                   token=token)
    assert [r["error"] for r in reports] == [None] * (1 + CALLS)
    gaps = [round(r["gap_ms"], 1) for r in reports[1:]]
    print(f"{stack} ICE connected -> DTLS connected, ms: {gaps} (warm-up {reports[0]['gap_ms']:.1f})")
    assert {r["answer_setup"] for r in reports} == {dtls_role.DEFAULT_ROLE}
    assert all(r["delete_status"] == 200 for r in reports)
    # before issue 20: 2.0 s (libdatachannel, waiting for its nomination) in 17 of 20 calls, 1.0-1.1 s
    # (werift, a dropped ClientHello) in 5 of 20
    assert_within_target(stack, gaps)


@needs_root
def test_libdatachannel_with_a_dead_best_pair_reaches_dtls_at_once_and_stays_up_across_its_late_nomination(
        relay_lab):
    # libjuice nominates only once no higher-priority pair is in progress, else after 2 s: one more
    # server candidate that nobody answers (an unused address on the client's link to the relay, as a
    # broken IPv6 path is in the field) holds its nomination.  The transceiver selected the first valid
    # pair meanwhile, so DTLS is up at once, and the call goes on across the nomination
    if reason := node_call.unavailable_reason("libdatachannel"):
        pytest.skip(reason)
    lab, whip_url, token = relay_lab
    dead = f"{ip_address(lab.relay_public.ip4) + 200}:{lab.relay_port}"
    [report] = node_call.node_calls("libdatachannel", whip_url, nsenter_argv(lab.client.netns, []), hold=3.5,
                                    dead_candidate=dead, token=token)
    assert report["error"] is None                        # never failed, closed or disconnected
    nominated = next(e["t"] for e in report["events"] if e["what"] == "ice" and e["value"] == "completed")
    print(f"libdatachannel with a dead best pair: ICE {report['ice_connected_ms']:.1f} ms, DTLS "
          f"{report['dtls_connected_ms']:.1f} ms, nominated {nominated:.1f} ms")
    assert nominated - report["ice_connected_ms"] > 1000  # it did nominate late (2.0 s before issue 20's fix)
    assert report["gap_ms"] < RETRANSMISSION_MS           # but DTLS did not wait for it
    assert report["delete_status"] == 200                 # the transceiver's session was still live


@needs_root
def test_chromium_reaches_dtls_through_the_relay_within_50_ms_of_its_ice(relay_lab):
    if reason := browser_unavailable():
        pytest.skip(f"no browser: {reason}")
    lab, whip_url, token = relay_lab
    with Browser(nsenter_argv(lab.client.netns, [])) as browser:
        setups = [chromium_setup(browser, whip_url, token) for _ in range(1 + CALLS)]
    assert [s.error for s in setups] == [None] * (1 + CALLS)
    gaps = [round(s.gap_ms, 1) for s in setups[1:]]
    print(f"chromium ICE connected -> DTLS connected, ms: {gaps} (warm-up {setups[0].gap_ms:.1f})")
    assert {s.answer_setup for s in setups} == {dtls_role.DEFAULT_ROLE}
    assert_within_target("chromium", gaps)


async def test_the_clienthello_resends_are_bounded_identical_and_stop_at_the_clients_first_dtls():
    # what a client (or anyone who can nominate: USE-CANDIDATE counts only on a check aioice has
    # authenticated) gets out of the resends: at most 7 copies of our own ClientHello per connection,
    # sent where ICE already sends, never anything for a ServerHello (the passive role)
    hello = bytes([dtls_role.HANDSHAKE]) + bytes(12) + bytes([dtls_role.CLIENT_HELLO]) + b"hello"
    server_hello = hello[:13] + b"\x02" + hello[14:]
    sent: list[bytes] = []

    async def send(data: bytes) -> None:
        sent.append(data)

    schedules = dtls_role.RESEND_AFTER_FLIGHT + dtls_role.RESEND_AFTER_NOMINATION
    unanswered = dtls_role.FirstFlightResender(send)
    unanswered.sent(server_hello)
    unanswered.sent(hello)
    unanswered.sent(hello[:13] + b"\x01other")   # OpenSSL's own retransmission: not a new first flight
    for _ in range(3):
        unanswered.nomination()                  # repeated on every later check
    await asyncio.sleep(max(schedules) + 0.1)
    assert sent == [hello] * len(schedules) == [hello] * 7
    assert unanswered.resent == 7

    sent.clear()
    answered = dtls_role.FirstFlightResender(send)
    answered.sent(hello)
    answered.nomination()
    answered.received(b"\x16" + bytes(20))       # the client's HelloVerifyRequest or ServerHello
    await asyncio.sleep(max(schedules) + 0.1)
    assert sent == [] and answered.resent == 0

    passive = dtls_role.FirstFlightResender(send)
    passive.sent(server_hello)
    passive.nomination()
    await asyncio.sleep(max(schedules) + 0.1)
    assert sent == [] and passive.flight is None
