"""The transceiver registering with an edge agent: the agent's real control API (edge/control.py)
served in-process over an in-memory data path (no BPF, no root), and real loopback aiortc callers."""

from __future__ import annotations

import secrets
import time

import aiohttp
import pytest
from aiohttp import web
from aiortc import RTCSessionDescription
from yarl import URL

from splitrelay.edge.control import ControlAPI
from splitrelay.edge.records import Backend, Session
from splitrelay.transceiver.listeners import serve_app
from splitrelay.transceiver.registration import (
    AgentUnreachable, Registrar, RegistrationError, SessionConflict, Unauthorized,
)
from splitrelay.transceiver.service import Transceiver, TransceiverConfig
from splitrelay.wire.control_client import AsyncControlClient, ControlError
from splitrelay.wire.whip import SESSION_ID

from .test_transceiver import Caller, ended, offer_sdp, until

BACKEND_ID = 9
BACKEND_IP = "192.0.2.10"  # what the relay forwards to (the agent refuses loopback)
TOKEN = "control-secret"


class MemoryDatapath:
    """The maps the control API writes, as dicts."""

    def __init__(self) -> None:
        self.backend_map: dict[int, Backend] = {}
        self.session_map: dict[str, Session] = {}

    def backends(self) -> list[Backend]:
        return list(self.backend_map.values())

    def backend(self, backend_id: int) -> Backend | None:
        return self.backend_map.get(backend_id)

    def set_backend(self, b: Backend) -> None:
        self.backend_map[b.backend_id] = b

    def del_backend(self, backend_id: int) -> bool:
        for ufrag in [u for u, s in self.session_map.items() if s.backend_id == backend_id]:
            del self.session_map[ufrag]
        return self.backend_map.pop(backend_id, None) is not None

    def sessions(self) -> list[Session]:
        return list(self.session_map.values())

    def session(self, ufrag: str) -> Session | None:
        return self.session_map.get(ufrag)

    def set_session(self, ufrag: str, backend_id: int) -> None:
        self.session_map[ufrag] = Session(ufrag, backend_id, time.monotonic_ns())

    def del_session(self, ufrag: str) -> bool:
        return self.session_map.pop(ufrag, None) is not None

    def del_sessions(self, ufrags: list[str]) -> dict[str, bool]:
        return {ufrag: self.del_session(ufrag) for ufrag in ufrags}

    def flows(self, limit: int | None = None) -> list:
        return []

    def del_flow(self, client: tuple[str, int]) -> None: ...

    def counters(self) -> dict:
        return {}


class Agent:
    """An edge agent's control API on 127.0.0.1; ``restart()`` = a new process with empty maps."""

    def __init__(self) -> None:
        self.dp = MemoryDatapath()
        self.boot_id = secrets.token_hex(8)
        self.requests: list[tuple[str, str]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, port: int = 0) -> None:
        api = ControlAPI(self.dp, resolve_mac=lambda ip: "02:00:00:00:00:09", relay_mac="02:00:00:00:00:01",
                         token=TOKEN, observe=lambda m, route, code, s: self.requests.append((m, route)),
                         health=lambda: {"boot_id": self.boot_id, "instance": "test", "relay_port": 3478,
                                         "public_ip": "198.51.100.7", "policy": "strict"})
        self.runner = web.AppRunner(api.app(), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001
        self.url = f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()
            self.runner = None

    async def restart(self) -> None:
        await self.stop()
        self.dp, self.boot_id = MemoryDatapath(), secrets.token_hex(8)
        await self.start(self.port)

    def ufrags(self) -> dict[str, int]:
        return {u: s.backend_id for u, s in self.dp.session_map.items()}


@pytest.fixture
async def agent():
    a = Agent()
    await a.start()
    try:
        yield a
    finally:
        await a.stop()


@pytest.fixture
async def relayed(agent):
    service = Transceiver(TransceiverConfig(
        backend_id=BACKEND_ID, bind_port=0, whip_port=0, relay_control=agent.url, relay_token=TOKEN,
        backend_ip=BACKEND_IP, watch_interval=0.05, ufrag_pool=0))  # registration on the answer's path
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def test_backend_registered_at_start_and_session_before_the_answer(agent, relayed):
    backend = agent.dp.backend(BACKEND_ID)
    assert backend is not None and (backend.ip4, backend.port) == (BACKEND_IP, relayed.mux.local_address[1])
    caller = Caller(relayed.whip_url, 800.0)
    async with aiohttp.ClientSession() as http:
        # the POST returns only after the agent has the session: check the instant the answer arrives
        await caller.pc.setLocalDescription(await caller.pc.createOffer())
        async with http.post(relayed.whip_url, data=caller.pc.localDescription.sdp,
                             headers={"Content-Type": "application/sdp"}) as resp:
            assert resp.status == 201
            registered_at_answer = agent.ufrags()
            caller.answer = await resp.text()
            caller.location = str(resp.url.join(URL(resp.headers["Location"])))
            caller.public_id = resp.headers[SESSION_ID]
        assert registered_at_answer == {caller.ufrag: BACKEND_ID}
        await caller.pc.setRemoteDescription(RTCSessionDescription(caller.answer, "answer"))
        await until(caller.heard_own, "echo through a registered session")
        await caller.hangup(http)  # DELETE
    assert (await ended(relayed, caller.session_id))["end_reason"] == "deleted"
    assert agent.ufrags() == {}
    assert ("DELETE", "/v1/sessions/{ufrag}") in agent.requests


async def test_agent_restart_reregisters_backend_and_live_sessions(agent, relayed):
    callers = [Caller(relayed.whip_url, f) for f in (600.0, 1200.0)]
    async with aiohttp.ClientSession() as http:
        for c in callers:
            await c.call(http)
        for c in callers:
            await until(c.connected, "connect")
        assert set(agent.ufrags()) == {c.ufrag for c in callers}
        relayed.registrar.boot_changed.clear()
        await agent.restart()                                # empty maps, new boot_id
        assert agent.ufrags() == {} and agent.dp.backends() == []
        await until(relayed.registrar.boot_changed, "re-registration")
        assert agent.dp.backend(BACKEND_ID) is not None
        assert agent.ufrags() == {c.ufrag: BACKEND_ID for c in callers}
        assert relayed.registrar.reregistrations == 1
        for c in callers:
            await c.hangup(http)
    assert agent.ufrags() == {}


async def test_sessions_ending_by_themselves_are_unregistered(agent, relayed, monkeypatch):
    """Client hang-up (no DELETE) and consent expiry both take the session off the relay."""
    import aioice.ice

    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.1)
    monkeypatch.setattr(aioice.ice, "CONSENT_FAILURES", 2)
    hangs_up, goes_dark = Caller(relayed.whip_url, 600.0), Caller(relayed.whip_url, 1200.0)
    async with aiohttp.ClientSession() as http:
        await hangs_up.call(http)
        await goes_dark.call(http)
        await until(hangs_up.connected, "connect")
        await until(goes_dark.connected, "connect")
    await hangs_up.hangup()
    assert (await ended(relayed, hangs_up.session_id))["end_reason"] == "client closed"
    assert agent.ufrags() == {goes_dark.ufrag: BACKEND_ID}
    original = relayed.mux.datagram_received
    dark = set(a for a, p in relayed.mux.by_addr.items() if p.receiver.local_username == goes_dark.ufrag)
    monkeypatch.setattr(relayed.mux, "datagram_received",
                        lambda data, addr: None if (addr[0], addr[1]) in dark else original(data, addr))
    assert (await ended(relayed, goes_dark.session_id, timeout=15))["end_reason"] == "consent expired"
    assert agent.ufrags() == {}
    await goes_dark.hangup()


async def test_shutdown_unregisters_live_sessions(agent):
    service = Transceiver(TransceiverConfig(backend_id=BACKEND_ID, bind_port=0, whip_port=0,
                                            relay_control=agent.url, relay_token=TOKEN, backend_ip=BACKEND_IP,
                                            ufrag_pool=0))  # the agent holds exactly the live sessions
    await service.start()
    caller = Caller(service.whip_url, 600.0)
    async with aiohttp.ClientSession() as http:
        await caller.call(http)
    assert agent.ufrags() == {caller.ufrag: BACKEND_ID}
    await service.stop()
    assert agent.ufrags() == {}
    await caller.hangup()


async def test_agent_unreachable_mid_run_refuses_offers_and_creates_nothing(agent, relayed):
    await agent.stop()
    async with aiohttp.ClientSession() as http:
        async with http.post(relayed.whip_url, data=await offer_sdp(),
                             headers={"Content-Type": "application/sdp"}) as resp:
            assert resp.status == 503 and "unreachable" in await resp.text()
    assert relayed.sessions == {} and relayed.mux.by_ufrag == {}


async def test_typed_errors(agent):
    with pytest.raises(Unauthorized) as err:
        await Registrar(agent.url, BACKEND_ID, BACKEND_IP, 5000, token="wrong").start()
    assert err.value.status == 401
    closed = Agent()
    await closed.start()
    await closed.stop()
    with pytest.raises(AgentUnreachable):
        await Registrar(closed.url, BACKEND_ID, BACKEND_IP, 5000, token=TOKEN, timeout=1).start()
    agent.dp.set_backend(Backend(2, 5000, "02:00:00:00:00:02", "02:00:00:00:00:01", ip4="192.0.2.2"))
    agent.dp.set_session("takenUfrag", 2)
    registrar = Registrar(agent.url, BACKEND_ID, BACKEND_IP, 5000, token=TOKEN)
    await registrar.start()
    try:
        with pytest.raises(SessionConflict) as err:
            await registrar.register("takenUfrag")
        assert err.value.status == 409 and "owned by backend 2" in str(err.value)
        await registrar.register("a/b+cdefgh")              # ufrag chars that need quoting in a path
        assert agent.ufrags()["a/b+cdefgh"] == BACKEND_ID
        await registrar.unregister("a/b+cdefgh")
        await registrar.unregister("a/b+cdefgh")            # already gone: 404 is not an error
    finally:
        await registrar.stop()


async def test_a_control_url_that_is_no_agent_is_unreachable_for_the_registrar_and_the_control_client():
    """A web server that answers 200 with a page (a wrong --relay-control) is not taken for an agent."""
    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<html>not an agent</html>", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", page)
    runner, port = await serve_app(app, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}"
    try:
        with pytest.raises(AgentUnreachable) as err:
            await Registrar(url, BACKEND_ID, BACKEND_IP, 5000, token=TOKEN).start()
        assert str(err.value) == f"{url}/v1/health answered with something that is not JSON: not an edge agent"
        async with AsyncControlClient(url, TOKEN) as client:
            with pytest.raises(ControlError) as err:
                await client.put_session("someUfrag", BACKEND_ID)
        assert err.value.status == 0 and "not an edge agent" in str(err.value)
    finally:
        await runner.cleanup()


async def test_direct_mode_registers_nothing():
    service = Transceiver(TransceiverConfig(backend_id=BACKEND_ID, bind_port=0, whip_port=0))
    await service.start()
    try:
        assert service.registrar is None
    finally:
        await service.stop()


async def test_wildcard_bind_needs_a_backend_address(agent):
    service = Transceiver(TransceiverConfig(backend_id=BACKEND_ID, bind_host="0.0.0.0", bind_port=0, whip_port=0,
                                            relay_control=agent.url, relay_token=TOKEN))
    try:
        with pytest.raises(RegistrationError, match="backend_ip"):
            await service.start()
    finally:
        await service.stop()


async def test_failure_after_registration_takes_the_session_back(agent, relayed, monkeypatch):
    from aiortc import RTCPeerConnection

    sdp = await offer_sdp()

    async def broken(self, description):  # noqa: ANN001
        raise RuntimeError("boom")

    monkeypatch.setattr(RTCPeerConnection, "setLocalDescription", broken)
    async with aiohttp.ClientSession() as http:
        async with http.post(relayed.whip_url, data=sdp, headers={"Content-Type": "application/sdp"}) as resp:
            assert resp.status == 500
    assert ("PUT", "/v1/sessions/{ufrag}") in agent.requests      # it was registered...
    assert agent.ufrags() == {}                                    # ...and taken back
    assert relayed.sessions == {} and relayed.mux.by_ufrag == {}
