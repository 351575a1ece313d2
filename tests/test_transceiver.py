"""The transceiver with real loopback aiortc peers (direct mode: no relay, no namespaces)."""

from __future__ import annotations

import asyncio
import fractions
import math
import socket
import struct
import time

import aiohttp
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame
from yarl import URL

from splitrelay.wire import hint, stun
from splitrelay.transceiver.handlers import (
    FRAME_SAMPLES, SAMPLE_RATE, PcmFrame, handler_factory, parse_handler_spec,
)
from splitrelay.client.probe import goertzel_power, run_probe, run_probes
from splitrelay.transceiver.service import Transceiver, TransceiverConfig
from splitrelay.transceiver.session import OutboundAudio
from splitrelay.wire.whip import SESSION_ID

BACKEND_ID = 9


@pytest.fixture
async def transceiver():
    service = Transceiver(TransceiverConfig(backend_id=BACKEND_ID, bind_port=0, whip_port=0))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def offer_sdp(datachannel: bool = False) -> str:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio")
    if datachannel:
        pc.createDataChannel("chat")
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


async def test_cors_preflight_allows_no_origin_unless_configured(transceiver):
    async with aiohttp.ClientSession() as http:
        async with http.options(transceiver.whip_url, headers={"Origin": "https://evil.example"}) as resp:
            assert resp.status == 204
            assert "Access-Control-Allow-Origin" not in resp.headers
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


async def test_the_shared_socket_buffers_seconds_of_media():
    """One socket carries every session: a stall of the loop must not overflow the kernel's default buffer."""
    from splitrelay.transceiver.mux import RECV_BUFFER_BYTES, UdpMux

    mux = await UdpMux.bind("127.0.0.1", 0)
    try:
        sock = mux.transport.get_extra_info("socket")
        # the kernel reports twice what was set (bookkeeping overhead); as root the force option applies
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= RECV_BUFFER_BYTES
    finally:
        mux.transport.close()


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


# -- real callers speaking distinct tones: the mux must give each its own voice back ---------------

class ToneTrack(MediaStreamTrack):
    """48 kHz mono sine at ``freq`` Hz, paced at 20 ms."""

    kind = "audio"

    def __init__(self, freq: float) -> None:
        super().__init__()
        self.freq = freq
        self._index = 0
        self._start: float | None = None

    async def recv(self) -> AudioFrame:
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        await asyncio.sleep(max(0.0, self._start + self._index * 0.02 - loop.time()))
        first = self._index * FRAME_SAMPLES
        samples = [int(12000 * math.sin(2 * math.pi * self.freq * (first + i) / SAMPLE_RATE))
                   for i in range(FRAME_SAMPLES)]
        frame = AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(struct.pack(f"<{FRAME_SAMPLES}h", *samples))
        frame.pts, frame.sample_rate = first, SAMPLE_RATE
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        self._index += 1
        return frame


class Caller:
    """A plain aiortc WHIP client: speaks a tone, measures the tones it hears, chats on a data channel."""

    def __init__(self, whip_url: str, freq: float, listen_for: tuple[float, ...] = (),
                 token: str | None = None, family: int | None = None) -> None:
        self.whip_url, self.freq, self.token, self.family = whip_url, freq, token, family
        self.freqs = tuple(dict.fromkeys((freq, *listen_for)))
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTrack(ToneTrack(freq))
        self.channel = self.pc.createDataChannel("chat")
        self.connected, self.channel_open, self.heard_own = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self.messages: asyncio.Queue = asyncio.Queue()
        self.powers: list[dict[float, float]] = []   # per received frame, goertzel power by frequency
        self.location: str | None = None
        self.answer: str | None = None
        self.public_id: str | None = None
        self._loud_run = 0
        self._tasks: list[asyncio.Task] = []
        self.pc.on("connectionstatechange", self._state)
        self.pc.on("track", lambda track: self._tasks.append(asyncio.ensure_future(self._listen(track))))
        self.channel.on("open", self.channel_open.set)
        self.channel.on("message", self.messages.put_nowait)

    def _state(self) -> None:
        if self.pc.connectionState == "connected":
            self.connected.set()

    async def _listen(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                channels = len(frame.layout.channels)
                count = frame.samples * channels
                samples = struct.unpack(f"<{count}h", bytes(frame.planes[0])[: 2 * count])[::channels]
                power = {f: goertzel_power(samples, f, frame.sample_rate) for f in self.freqs}
                self.powers.append(power)
                self._loud_run = self._loud_run + 1 if power[self.freq] > 0.01 else 0
                if self._loud_run >= 25:  # half a second of our own tone, uninterrupted
                    self.heard_own.set()
        except MediaStreamError:
            return

    async def call(self, http: aiohttp.ClientSession) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        headers = {"Content-Type": "application/sdp"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        offer = self.pc.localDescription.sdp
        if self.family:  # offer only candidates of one address family
            offer = "\r\n".join(line for line in offer.split("\r\n") if not line.startswith("a=candidate:")
                                 or (":" in line.split()[4]) == (self.family == 6))
        async with http.post(self.whip_url, data=offer, headers=headers) as resp:
            assert resp.status == 201, await resp.text()
            assert resp.content_type == "application/sdp"
            self.answer = await resp.text()
            self.location = str(resp.url.join(URL(resp.headers["Location"])))
            self.public_id = resp.headers[SESSION_ID]
        await self.pc.setRemoteDescription(RTCSessionDescription(self.answer, "answer"))

    @property
    def session_id(self) -> str:
        """The session's public id (logs, the admin listener); its Location holds another, secret one."""
        assert self.public_id
        return self.public_id

    @property
    def ufrag(self) -> str:
        assert self.answer
        return next(line.split(":", 1)[1] for line in self.answer.splitlines() if line.startswith("a=ice-ufrag:"))

    def recent(self, frames: int = 25) -> list[dict[float, float]]:
        return self.powers[-frames:]

    async def hangup(self, http: aiohttp.ClientSession | None = None) -> None:
        if http and self.location:
            async with http.delete(self.location) as resp:
                assert resp.status == 200
        for task in self._tasks:
            task.cancel()
        await self.pc.close()


async def until(event: asyncio.Event, what: str, timeout: float = 10.0) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}") from None


async def ended(service: Transceiver, session_id: str, timeout: float = 10.0) -> dict:
    """Wait (on the session's own event) until the service has fully ended a session; its record."""
    session = service.sessions.get(session_id)
    if session is not None:
        await until(session.ended, f"session {session_id} to end", timeout)
    for _ in range(500):  # end_session runs as a task after the event: a bounded hand-over
        record = service.find(session_id)
        if session_id not in service.sessions and record and record["end_reason"]:
            return record
        await asyncio.sleep(0.01)
    raise AssertionError(f"session {session_id} ended but was not cleaned up")


async def test_three_callers_each_hear_only_their_own_voice(transceiver):
    """Three sessions on one mux socket, each speaking its own tone: each hears its tone, not another's."""
    freqs = (500.0, 900.0, 1700.0)
    callers = [Caller(transceiver.whip_url, f, listen_for=freqs) for f in freqs]
    async with aiohttp.ClientSession() as http:
        try:
            await asyncio.gather(*(c.call(http) for c in callers))
            assert len({c.ufrag for c in callers}) == 3
            assert transceiver.mux.sessions == 3
            for c in callers:
                await until(c.connected, f"caller {c.freq:g} Hz to connect")
            for c in callers:
                await until(c.heard_own, f"caller {c.freq:g} Hz to hear its own tone back")
            for c in callers:
                own = sum(p[c.freq] for p in c.recent()) / 25
                for other in freqs:
                    if other != c.freq:
                        leaked = sum(p[other] for p in c.recent()) / 25
                        assert leaked < own / 100, (c.freq, other, own, leaked)
            # one socket: every session's packets came through the mux's one port
            assert len(transceiver.mux.by_addr) == 3
            assert {c.session_id for c in callers} == set(transceiver.sessions)
        finally:
            for c in callers:
                await c.hangup(http)
    for c in callers:
        assert (await ended(transceiver, c.session_id))["end_reason"] == "deleted"
    assert transceiver.mux.by_ufrag == {} and transceiver.mux.by_addr == {}


async def test_state_history_timings_and_data_channel(transceiver):
    caller = Caller(transceiver.whip_url, 700.0)
    async with aiohttp.ClientSession() as http:
        await caller.call(http)
        await until(caller.connected, "connect")
        await until(caller.channel_open, "data channel")
        caller.channel.send("hello")
        assert await asyncio.wait_for(caller.messages.get(), 5) == "hello"
        caller.channel.send(b"\x00\x01binary")
        assert await asyncio.wait_for(caller.messages.get(), 5) == b"\x00\x01binary"
        await until(caller.heard_own, "echo")
        stats = await transceiver.sessions[caller.session_id].stats()
        assert stats["packets_received"] > 0 and stats["packets_sent"] > 0 and stats["bytes_sent"] > 0
        assert stats["jitter_ms"] is not None
        live = transceiver.find(caller.session_id)
        assert live["connection_states"] == ["new", "connecting", "connected"]
        assert live["messages_in"] == 2 and live["messages_out"] == 2
        await caller.hangup(http)
    record = await ended(transceiver, caller.session_id)
    assert record["ice_states"] == ["new", "checking", "completed", "closed"]
    assert record["dtls_states"] == ["new", "connecting", "connected", "closed"]
    assert record["connection_states"] == ["new", "connecting", "connected", "closed"]
    assert record["gathering_states"] == ["new", "gathering", "complete"]
    assert record["end_reason"] == "deleted"
    times = [change["at_ms"] for change in record["history"]]
    assert times == sorted(times) and len(times) == 11
    phases = [record[k] for k in ("answer_ms", "ice_connected_ms", "dtls_connected_ms", "ended_ms")]
    assert 0 < phases[0] and phases == sorted(phases)
    assert record["frames_in"] > 25 and record["frames_out"] > 25
    assert transceiver.mux.by_ufrag == {} and transceiver.mux.by_addr == {}


async def test_client_hangup_without_delete_ends_the_session(transceiver):
    caller = Caller(transceiver.whip_url, 700.0)
    async with aiohttp.ClientSession() as http:
        await caller.call(http)
        await until(caller.connected, "connect")
    await caller.hangup()  # DTLS close_notify, no DELETE
    record = await ended(transceiver, caller.session_id)
    assert record["end_reason"] == "client closed"
    assert transceiver.mux.by_ufrag == {} and transceiver.mux.by_addr == {}


async def test_consent_expiry_ends_the_session(transceiver, monkeypatch):
    """The client's packets stop arriving: consent freshness (RFC 7675) fails, the session ends."""
    import aioice.ice

    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.1)
    monkeypatch.setattr(aioice.ice, "CONSENT_FAILURES", 2)
    caller = Caller(transceiver.whip_url, 700.0)
    async with aiohttp.ClientSession() as http:
        await caller.call(http)
        await until(caller.connected, "connect")
        session = transceiver.sessions[caller.session_id]
        await until(session.connected, "server side connected")
        monkeypatch.setattr(transceiver.mux, "datagram_received", lambda data, addr: None)  # path goes dark
        record = await ended(transceiver, caller.session_id, timeout=15)
        assert record["end_reason"] == "consent expired"
        assert transceiver.mux.by_ufrag == {} and transceiver.mux.by_addr == {}
        await caller.hangup()


async def test_session_that_never_connects_times_out():
    service = Transceiver(TransceiverConfig(backend_id=BACKEND_ID, bind_port=0, whip_port=0, connect_timeout=0.5))
    await service.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(service.whip_url, data=await offer_sdp(),
                                 headers={"Content-Type": "application/sdp"}) as resp:
                assert resp.status == 201
                session_id = resp.headers[SESSION_ID]
        assert service.mux.sessions == 1
        record = await ended(service, session_id)
        assert record["end_reason"] == "connect timeout"
        assert record["connection_states"][-1] == "closed"
        assert service.mux.by_ufrag == {} and service.sessions == {}
    finally:
        await service.stop()


async def test_shutdown_ends_live_sessions(transceiver):
    caller = Caller(transceiver.whip_url, 700.0)
    async with aiohttp.ClientSession() as http:
        await caller.call(http)
        await until(caller.connected, "connect")
    await transceiver.stop()
    assert transceiver.sessions == {} and transceiver.mux.by_ufrag == {}
    assert transceiver.find(caller.session_id)["end_reason"] == "shutdown"
    await caller.hangup()


# -- WHIP details ---------------------------------------------------------------------------------

async def test_whip_patch_of_an_unknown_session_is_404_and_options_advertise_sdp(transceiver):
    async with aiohttp.ClientSession() as http:
        async with http.options(transceiver.whip_url) as resp:
            assert resp.headers["Accept-Post"] == "application/sdp"
            assert "PATCH" in resp.headers["Access-Control-Allow-Methods"]
        headers = {"Content-Type": "application/trickle-ice-sdpfrag", "If-Match": "*"}
        async with http.patch(transceiver.whip_url + "/sessions/whatever", data="a=end-of-candidates",
                              headers=headers) as resp:
            assert resp.status == 404


async def test_unbundled_offer_is_refused(transceiver):
    sdp = "\r\n".join(line for line in (await offer_sdp(datachannel=True)).split("\r\n")
                      if not line.startswith("a=group:BUNDLE"))
    async with aiohttp.ClientSession() as http:
        async with http.post(transceiver.whip_url, data=sdp, headers={"Content-Type": "application/sdp"}) as resp:
            assert resp.status == 400 and "BUNDLE" in await resp.text()
    assert transceiver.sessions == {} and transceiver.mux.by_ufrag == {}


@pytest.mark.parametrize("drop,reason", [("a=fingerprint", "no DTLS fingerprint"),  # refused before aiortc
                                         ("a=setup", "bad offer: AttributeError")])  # aiortc raises
async def test_offer_aiortc_cannot_use_is_400_and_leaves_nothing(transceiver, drop, reason):
    sdp = "\r\n".join(line for line in (await offer_sdp()).split("\r\n") if not line.startswith(drop))
    async with aiohttp.ClientSession() as http:
        async with http.post(transceiver.whip_url, data=sdp, headers={"Content-Type": "application/sdp"}) as resp:
            text = await resp.text()
            assert resp.status == 400 and reason in text and text.count("\n") == 1
    assert transceiver.sessions == {} and transceiver.mux.by_ufrag == {}


async def test_401_names_the_scheme():
    service = Transceiver(TransceiverConfig(backend_id=BACKEND_ID, bind_port=0, whip_port=0, whip_token="t"))
    await service.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(service.whip_url, data=await offer_sdp(),
                                 headers={"Content-Type": "application/sdp", "Authorization": "Bearer u"}) as resp:
                assert resp.status == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
                assert await resp.text() == "wrong bearer token\n"
    finally:
        await service.stop()


# -- the mux on its own ---------------------------------------------------------------------------

async def test_public_candidates_list_both_families_on_a_dual_stack_socket():
    """Relay with an IPv4 and an IPv6 public address: both are the candidates, nothing else."""
    service = Transceiver(TransceiverConfig(
        backend_id=BACKEND_ID, bind_host="::", bind_port=0, whip_port=0,
        public_candidates=[("198.51.100.7", 3478), ("2001:db8::7", 3478)]))
    await service.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(service.whip_url, data=await offer_sdp(),
                                 headers={"Content-Type": "application/sdp"}) as resp:
                answer = await resp.text()
        candidates = [line for line in answer.splitlines() if line.startswith("a=candidate")]
        assert len(candidates) == 2
        assert " 198.51.100.7 3478 typ host" in candidates[0] and " 2001:db8::7 3478 typ host" in candidates[1]
    finally:
        await service.stop()


async def test_dual_stack_mux_carries_ipv4_and_ipv6_callers():
    """One socket bound to '::': an IPv4-only and an IPv6-only caller, each paired on its own family."""
    service = Transceiver(TransceiverConfig(backend_id=BACKEND_ID, bind_host="::", bind_port=0, whip_port=0))
    await service.start()
    port = service.mux.local_address[1]
    service.mux.public_candidates = [("127.0.0.1", port), ("::1", port)]  # direct mode, both families
    callers = [Caller(service.whip_url, 600.0, family=4), Caller(service.whip_url, 1100.0, family=6)]
    try:
        async with aiohttp.ClientSession() as http:
            await asyncio.gather(*(c.call(http) for c in callers))
            for c in callers:
                await until(c.heard_own, f"IPv{c.family} caller to hear its tone")
            families = {}
            for addr, protocol in service.mux.by_addr.items():
                assert not addr[0].startswith("::ffff:")  # aioice sees IPv4 clients as IPv4
                families.setdefault(protocol.receiver.local_username, set()).add(":" in addr[0])
            # the server checked each caller on the family it offered (the caller may also reach us
            # over the other family: a peer-reflexive pair, as ICE allows)
            assert False in families[callers[0].ufrag] and True in families[callers[1].ufrag]
            for c in callers:
                await c.hangup(http)
    finally:
        await service.stop()


async def test_mux_counts_drops_by_reason(transceiver):
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        for payload in (b"\x80" * 40, stun.build_binding_request(hint.encode(BACKEND_ID) + ":x"),
                        stun.build_binding_request(b"no-colon-here")):
            await loop.sock_sendto(sock, payload, transceiver.mux.local_address)
        for _ in range(100):
            if transceiver.mux.dropped == 3:
                break
            await asyncio.sleep(0.01)
        assert dict(transceiver.mux.drops) == {"not_stun": 1, "unknown_ufrag": 1, "bad_stun": 1}
    finally:
        sock.close()


# -- handlers -------------------------------------------------------------------------------------

class RecordingIO:
    session_id = "test"

    def __init__(self) -> None:
        self.audio: list[tuple[float, PcmFrame]] = []
        self.text: list[str] = []
        self.bytes: list[bytes] = []
        self.audio_sent = asyncio.Event()

    def send_audio(self, frame: PcmFrame) -> None:
        self.audio.append((time.monotonic(), frame))
        self.audio_sent.set()

    async def audio_count(self, count: int, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while len(self.audio) < count:
                self.audio_sent.clear()
                await self.audio_sent.wait()

    def clear_audio(self) -> float:
        return 0.0

    def send_text(self, text: str) -> None:
        self.text.append(text)

    def send_bytes(self, data: bytes) -> None:
        self.bytes.append(data)


async def test_echo_delay_is_a_delay_line_not_a_stall():
    io = RecordingIO()
    handler = handler_factory("echo:delay=0.2")(io)
    start = time.monotonic()
    for i in range(10):  # ten frames arriving back to back must all come out ~0.2 s later, in order
        await handler.on_audio(PcmFrame(bytes([i]) * 1920, time=time.monotonic(), pts=960 * i))
    # a stall would hold each call 0.2 s: 2 s in all, and frames out 0.2 s apart
    assert time.monotonic() - start < 0.1 and io.audio == []
    await io.audio_count(10, timeout=2)      # however late a busy machine runs the timers
    assert [f.pts for _, f in io.audio] == [960 * i for i in range(10)]
    out = [t - start for t, _ in io.audio]
    assert min(out) >= 0.18 and max(out) - min(out) < 0.1, out
    await handler.on_bytes(b"\x01")
    assert io.bytes == [b"\x01"]


def test_handler_registry_and_options():
    assert handler_factory("tone", frequency=880)(RecordingIO()).frequency == 880.0
    assert parse_handler_spec("tone:frequency=880,amplitude=100") == ("tone", {"frequency": 880, "amplitude": 100})
    with pytest.raises(ValueError, match="unknown handler"):
        handler_factory("nope")
    with pytest.raises(ValueError, match="unexpected keyword"):
        handler_factory("echo:volume=3")
    with pytest.raises(ValueError, match="tone frequency"):
        handler_factory("tone:frequency=5")


def test_outbound_audio_reframes_any_chunk_size_and_bounds_the_backlog():
    out = OutboundAudio()
    out.push(PcmFrame(b"\x01\x00" * 1500))     # 1.5 frames
    assert out.backlog == 1500 / SAMPLE_RATE
    out.push(PcmFrame(b"\x01\x00" * 60 * 960))  # more than a second: the oldest whole frames go
    assert out.overflow_frames == 12 and out.backlog == (1500 + 48 * 960) / SAMPLE_RATE <= 1.0
    with pytest.raises(ValueError, match="48000 Hz"):
        out.push(PcmFrame(b"\x00\x00" * 160, sample_rate=8000))


def test_clear_audio_drops_what_the_handler_queued_and_not_more():
    out = OutboundAudio()
    out.push(PcmFrame(b"\x01\x00" * 10 * 960))  # 200 ms of a reply that the caller interrupts
    assert out.clear() == pytest.approx(0.2)
    assert out.backlog == 0 and out.cleared_frames == 10
    assert out.clear() == 0.0                    # nothing left: a second flush drops nothing
    out.push(PcmFrame(b"\x01\x00" * 960))       # and the next reply queues normally
    assert out.backlog == pytest.approx(0.02)
