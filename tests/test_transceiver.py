"""The transceiver with real loopback aiortc peers (direct mode: no relay, no namespaces)."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from splitrelay.edge import hint, stun
from splitrelay.transceiver.probe import run_probe, run_probes
from splitrelay.transceiver.service import Transceiver, TransceiverConfig

BACKEND_ID = 9


@pytest.fixture
async def transceiver():
    service = Transceiver(TransceiverConfig(backend_id=BACKEND_ID, bind_port=0, whip_port=0))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def offer_sdp() -> str:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def test_echo_session_on_the_mux(transceiver):
    report = await run_probe(transceiver.whip_url, duration=2.5)
    assert report.ok, report.error
    assert report.beeps_heard == report.beeps_sent >= 3       # our own voice came back
    assert report.datachannel_rtt_ms
    assert report.ice_states[0] == "checking" and report.ice_states[-1] == "closed"
    assert report.connection_states[:2] == ["connecting", "connected"]
    assert transceiver.sessions == {}                          # DELETE ended it
    assert transceiver.mux.by_ufrag == {} and transceiver.mux.by_addr == {}


async def test_concurrent_sessions_share_one_socket(transceiver):
    reports = await run_probes([transceiver.whip_url], sessions=3, duration=2.5)
    assert all(r.ok and r.beeps_heard == r.beeps_sent for r in reports), [r.error for r in reports]
    assert transceiver.metrics.sessions_started._value.get() == 3


async def test_answer_carries_only_the_public_candidate_and_a_hint_ufrag():
    service = Transceiver(TransceiverConfig(backend_id=BACKEND_ID, bind_port=0, whip_port=0,
                                            public_address=("198.51.100.7", 3478)))
    await service.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(service.whip_url, data=await offer_sdp(),
                                 headers={"Content-Type": "application/sdp"}) as resp:
                assert resp.status == 201
                answer = await resp.text()
                location = resp.headers["Location"]
            candidates = [line for line in answer.splitlines() if line.startswith("a=candidate")]
            assert candidates and all(" 198.51.100.7 3478 typ host" in c for c in candidates)
            assert "127.0.0.1" not in answer
            ufrag = next(line.split(":", 1)[1] for line in answer.splitlines() if line.startswith("a=ice-ufrag"))
            assert hint.decode(ufrag) == BACKEND_ID
            pwd = next(line.split(":", 1)[1] for line in answer.splitlines() if line.startswith("a=ice-pwd"))
            assert len(pwd) >= 22
            async with http.delete(service.whip_url.rsplit("/", 1)[0] + location) as resp:
                assert resp.status == 200
            async with http.delete(service.whip_url.rsplit("/", 1)[0] + location) as resp:
                assert resp.status == 404
    finally:
        await service.stop()


@pytest.mark.parametrize("body,content_type,status", [
    (b"v=0\r\n", "text/plain", 415),
    (b"hello", "application/sdp", 400),
    (b"v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n",
     "application/sdp", 400),
    (b"x" * (70 * 1024), "application/sdp", 413),
])
async def test_bad_offers_get_4xx_and_create_nothing(transceiver, body, content_type, status):
    async with aiohttp.ClientSession() as http:
        async with http.post(transceiver.whip_url, data=body, headers={"Content-Type": content_type}) as resp:
            assert resp.status == status
            assert (await resp.text()).strip()
    assert transceiver.sessions == {} and transceiver.mux.by_ufrag == {}


async def test_offer_without_ice_credentials_is_refused(transceiver):
    sdp = "\r\n".join(line for line in (await offer_sdp()).split("\r\n") if not line.startswith("a=ice-"))
    async with aiohttp.ClientSession() as http:
        async with http.post(transceiver.whip_url, data=sdp, headers={"Content-Type": "application/sdp"}) as resp:
            assert resp.status == 400 and "ICE credentials" in await resp.text()


async def test_cors_preflight(transceiver):
    async with aiohttp.ClientSession() as http:
        async with http.options(transceiver.whip_url) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
            assert "Location" in resp.headers["Access-Control-Expose-Headers"]


async def test_bearer_token_is_required_when_configured():
    service = Transceiver(TransceiverConfig(backend_id=BACKEND_ID, bind_port=0, whip_port=0, whip_token="s3cret"))
    await service.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(service.whip_url, data=await offer_sdp(),
                                 headers={"Content-Type": "application/sdp"}) as resp:
                assert resp.status == 401
        report = await run_probe(service.whip_url, duration=1.5, token="s3cret")
        assert report.ok, report.error
    finally:
        await service.stop()


async def test_mux_drops_what_it_cannot_route(transceiver):
    """Datagrams from unknown addresses that are not a Binding Request for a live ufrag go nowhere."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    target = transceiver.mux.local_address
    try:
        for payload in (b"\x80" * 40, stun.build_binding_request(hint.encode(BACKEND_ID) + ":x"), b"\x16" * 30):
            await loop.sock_sendto(sock, payload, target)
        for _ in range(100):  # bounded: the mux counts each drop as it arrives
            if transceiver.mux.dropped == 3:
                break
            await asyncio.sleep(0.01)
        assert transceiver.mux.dropped == 3
        assert transceiver.mux.by_addr == {}
    finally:
        sock.close()


async def test_port_in_use_is_one_clear_error():
    from splitrelay.transceiver.mux import MuxError, UdpMux

    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("127.0.0.1", 0))
    try:
        with pytest.raises(MuxError, match="cannot bind UDP"):
            await UdpMux.bind("127.0.0.1", busy.getsockname()[1])
    finally:
        busy.close()


async def test_tone_handler_speaks_and_answers_text():
    service = Transceiver(TransceiverConfig(backend_id=BACKEND_ID, bind_port=0, whip_port=0, handler="tone"))
    await service.start()
    try:
        report = await run_probe(service.whip_url, duration=1.5)
        assert report.frames_received > 30                    # audio flowed toward the client
        assert report.beeps_heard == 0                        # ...and it was the tone, not our beeps
        assert not report.datachannel_rtt_ms                  # text was answered with "tone", not echoed
        assert report.error == "no audio came back"
    finally:
        await service.stop()


async def test_drain_refuses_offers_and_waits_for_live_sessions(transceiver):
    call = asyncio.ensure_future(run_probe(transceiver.whip_url, duration=2.0))
    for _ in range(200):  # bounded: until the call is up
        if any(s.connected.is_set() for s in transceiver.sessions.values()):
            break
        await asyncio.sleep(0.02)
    drained = asyncio.ensure_future(transceiver.drain(deadline_s=20))
    await asyncio.sleep(0)
    async with aiohttp.ClientSession() as http:
        base = transceiver.whip_url.rsplit("/", 1)[0]
        async with http.get(base + "/readyz") as resp:
            assert resp.status == 503                         # out of the Service's endpoints
        async with http.post(transceiver.whip_url, data=await offer_sdp(),
                             headers={"Content-Type": "application/sdp"}) as resp:
            assert resp.status == 503                         # no new sessions
    assert not drained.done()                                 # the live call is not cut
    report = await call
    assert report.ok and report.beeps_heard == report.beeps_sent
    assert await asyncio.wait_for(drained, 20) == 0           # and the drain ends when it does


async def test_slow_client_gets_408_and_leaves_nothing_behind():
    service = Transceiver(TransceiverConfig(backend_id=BACKEND_ID, bind_port=0, whip_port=0, body_timeout=0.5))
    await service.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", service.whip_port)
        writer.write(b"POST /whip HTTP/1.1\r\nHost: x\r\nContent-Type: application/sdp\r\n"
                     b"Content-Length: 1000\r\n\r\nv=0\r\n")          # and then nothing more
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 10)
        assert status.startswith(b"HTTP/1.1 408")
        writer.close()
        assert service.sessions == {} and service.mux.by_ufrag == {}
        assert service.metrics.offers_rejected.labels("408")._value.get() == 1
    finally:
        await service.stop()
