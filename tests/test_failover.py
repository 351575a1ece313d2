"""Calls survive a relay's death (issue 12, 3a and 3b), at the mux/ICE level: real aiortc callers,
real UDP sockets on loopback, and small translating relays that do what `edge serve --datapath
userspace` does (and the XDP relay after translation): the transceiver sees a client through a
relay's internal address and a per-flow port, never the client's own address."""

from __future__ import annotations

import asyncio
import socket
import time

import aioice.ice
import aiohttp
import pytest

from splitrelay.client.ice_failover import keep_alive, nominate_like_a_browser, switch_to
from splitrelay.client.ice_restart import ice_connection
from splitrelay.transceiver.relays import Relay
from splitrelay.transceiver.service import Transceiver, TransceiverConfig

from .test_transceiver import BACKEND_ID, Caller, until

Address = tuple[str, int]


class TranslatingRelay:
    """Public socket for clients; per client flow, a socket on the internal address towards the backend."""

    def __init__(self, public: Address, internal_host: str, backend: Address) -> None:
        self.public, self.internal_host, self.backend = public, internal_host, backend
        self.loop = asyncio.get_running_loop()
        self.flows: dict[Address, socket.socket] = {}
        self.sock = self._bound(public)
        self.loop.add_reader(self.sock.fileno(), self._from_client)

    @staticmethod
    def _bound(addr: Address) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(addr)
        sock.setblocking(False)
        return sock

    @property
    def flow_sources(self) -> list[Address]:
        return [s.getsockname() for s in self.flows.values()]

    def _from_client(self) -> None:
        for _ in range(64):
            try:
                data, client = self.sock.recvfrom(2048)
            except BlockingIOError:
                return
            flow = self.flows.get(client)
            if flow is None:
                flow = self.flows[client] = self._bound((self.internal_host, 0))   # a per-flow port
                self.loop.add_reader(flow.fileno(), self._from_backend, flow, client)
            flow.sendto(data, self.backend)

    def _from_backend(self, flow: socket.socket, client: Address) -> None:
        for _ in range(64):
            try:
                data, _ = flow.recvfrom(2048)
            except BlockingIOError:
                return
            self.sock.sendto(data, client)

    def kill(self) -> None:
        """The relay dies: its public address stops answering, its flows are gone."""
        if self.sock.fileno() < 0:
            return
        for sock in [self.sock, *self.flows.values()]:
            self.loop.remove_reader(sock.fileno())
            sock.close()
        self.flows.clear()


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture
async def two_relays():
    """A transceiver behind relays 'a' (preferred) and 'b', each translating."""
    service = Transceiver(TransceiverConfig(backend_id=BACKEND_ID, bind_port=0, whip_port=0))
    await service.start()
    backend = service.mux.local_address
    a_pub, b_pub = ("127.0.0.11", free_port("127.0.0.11")), ("127.0.0.12", free_port("127.0.0.12"))
    relays = {"a": TranslatingRelay(a_pub, "127.0.0.21", backend),
              "b": TranslatingRelay(b_pub, "127.0.0.22", backend)}
    service.config.relays = [Relay("a", (a_pub,)), Relay("b", (b_pub,))]
    send = service.mux.send  # as behind real relays: no route from the transceiver to a client's own address
    service.mux.send = lambda data, addr: send(data, addr) if addr[0].startswith("127.0.0.2") else None
    try:
        yield service, relays
    finally:
        for relay in relays.values():
            relay.kill()
        await service.stop()


async def call(service: Transceiver, http: aiohttp.ClientSession) -> Caller:
    caller = Caller(service.whip_url, 700.0, family=4)
    await caller.call(http)
    await until(caller.heard_own, "the first echo")
    return caller


def sends_to(service: Transceiver, caller: Caller) -> Address:
    """Where the transceiver sends this caller's media now (the selected pair's remote address)."""
    [connection] = [c for c in service.sessions[caller.session_id].ice_connections if not c._closing]  # noqa: SLF001
    return connection._nominated[1].remote_addr  # noqa: SLF001


async def backup_authenticated(service: Transceiver, caller: Caller, relay: TranslatingRelay) -> None:
    """Wait (bounded) until the transceiver's pair through ``relay`` has succeeded both ways."""
    [connection] = [c for c in service.sessions[caller.session_id].ice_connections if not c._closing]  # noqa: SLF001
    for _ in range(500):
        if any(p.remote_addr in relay.flow_sources and p.state == aioice.ice.CandidatePair.State.SUCCEEDED
               for p in connection._check_list):  # noqa: SLF001
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the backup pair was never authenticated")


async def echo_back(caller: Caller, what: str, timeout: float = 10.0) -> float:
    """Seconds until the caller's own voice is heard again (then half a second of it must follow)."""
    started = time.monotonic()
    caller.heard_own.clear()
    caller._loud_run = 0  # noqa: SLF001
    heard_at = None
    seen = len(caller.powers)
    while heard_at is None and time.monotonic() - started < timeout:
        if any(p[caller.freq] > 0.01 for p in caller.powers[seen:]):
            heard_at = time.monotonic()
        seen = len(caller.powers)
        await asyncio.sleep(0.005)
    await until(caller.heard_own, what, timeout)
    return (heard_at or time.monotonic()) - started


async def test_the_transceiver_follows_a_client_that_moves_to_another_relays_candidate(two_relays):
    """3a: aioice as the controlled agent follows the client's nomination of the backup pair."""
    service, relays = two_relays
    async with aiohttp.ClientSession() as http:
        caller = await call(service, http)
        assert sends_to(service, caller)[0] == "127.0.0.21"          # through the preferred relay a
        connection = ice_connection(caller.pc)
        nominate_like_a_browser(connection)
        await keep_alive(connection, relays["b"].public)            # the backup pair, kept alive
        await backup_authenticated(service, caller, relays["b"])
        relays["a"].kill()
        killed = time.monotonic()
        await switch_to(connection, relays["b"].public)             # the browser's switch, ~5 s in Chrome
        switched = time.monotonic()
        heard = await echo_back(caller, "the echo through relay b")
        print(f"3a: client switch {1000 * (switched - killed):.0f} ms, audio back "
              f"{1000 * heard:.0f} ms after the switch")
        assert sends_to(service, caller) in relays["b"].flow_sources
        paths = service.sessions[caller.session_id].to_dict()["paths"]
        assert [p["reason"] for p in paths] == ["nominated"] and paths[0]["remote"].startswith("127.0.0.22:")
        assert service.sessions[caller.session_id].states.states["dtls"][-1] == "connected"
        await caller.hangup(http)


async def test_the_transceiver_latches_onto_a_standby_relay_that_took_the_floating_address(two_relays,
                                                                                            monkeypatch):
    """3b: same public address, new internal address and per-flow port; the client changes nothing.
    The first consent check from the new source authenticates it, media follows."""
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.5)  # the caller's consent checks: Chrome ~2.5 s
    service, relays = two_relays
    async with aiohttp.ClientSession() as http:
        caller = await call(service, http)
        old = sends_to(service, caller)
        assert old[0] == "127.0.0.21"
        relays["a"].kill()
        moved = time.monotonic()
        relays["a"] = TranslatingRelay(relays["a"].public, "127.0.0.23", service.mux.local_address)  # standby
        heard = await echo_back(caller, "the echo through the standby relay")
        print(f"3b: audio back {1000 * heard:.0f} ms after the address moved "
              f"({1000 * (time.monotonic() - moved):.0f} ms)")
        assert sends_to(service, caller)[0] == "127.0.0.23"
        paths = service.sessions[caller.session_id].to_dict()["paths"]
        assert [p["reason"] for p in paths] == ["latched"]
        assert service.sessions[caller.session_id].states.states["dtls"][-1] == "connected"
        await caller.hangup(http)


async def test_backup_keepalives_and_stray_media_never_move_a_live_call(two_relays):
    service, relays = two_relays
    async with aiohttp.ClientSession() as http:
        caller = await call(service, http)
        selected = sends_to(service, caller)
        connection = ice_connection(caller.pc)
        nominate_like_a_browser(connection)
        await keep_alive(connection, relays["b"].public)  # the client keeps its backup pair alive...
        await backup_authenticated(service, caller, relays["b"])   # ...and answers our triggered check
        # and something forges media towards the transceiver from an address it never authenticated
        dropped = service.mux.drops["not_stun"]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stray:
            stray.bind(("127.0.0.24", 0))
            for _ in range(50):
                stray.sendto(b"\x80\x6f" + bytes(170), service.mux.local_address)
        await echo_back(caller, "the echo on the original path")
        assert service.mux.drops["not_stun"] - dropped == 50
        assert service.sessions[caller.session_id].to_dict()["paths"] == []
        assert sends_to(service, caller) == selected
        assert service.sessions[caller.session_id].to_dict()["paths"] == []
        await caller.hangup(http)
