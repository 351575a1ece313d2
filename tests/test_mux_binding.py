"""The mux binds a client address to a session only once aioice authenticated it (issue 22, 4): forged
Binding Requests carrying a live session's ufrag, from other addresses, bind and move nothing; a later
authenticated check rebinds an address; a silent address expires.  Real transceiver, real aiortc
callers and real UDP sockets on loopback."""

from __future__ import annotations

import asyncio
import socket

import aiohttp

from splitrelay.transceiver.service import Transceiver
from splitrelay.wire import stun
from splitrelay.wire.whip import SESSION_ID

from .test_ice_restart import connected_caller, hears_itself_again
from .test_transceiver import offer_sdp
from .test_transceiver_admission import serving

BACKEND_ID = 9


def attribute(sdp: str, name: str) -> str:
    return next(line.split(":", 1)[1] for line in sdp.splitlines() if line.startswith(f"a={name}:"))


class Peer:
    """A bare UDP socket speaking STUN to the mux, as a client (or a forger) would."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()

    async def send(self, payload: bytes, to: tuple[str, int]) -> None:
        await asyncio.get_running_loop().sock_sendto(self.sock, payload, to)

    async def check(self, to: tuple[str, int], username: str, password: str) -> int:
        """A Binding Request signed with ``password``; the STUN class of the answer (0x0101 success,
        0x0111 error), awaited on the socket itself."""
        request = stun.build_binding_request(username, password=password)
        await self.send(request, to)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(5):
            while True:  # skip the session's own checks to us; the answer carries our transaction id
                data = await loop.sock_recv(self.sock, 2048)
                if data[8:20] == request[8:20]:
                    return int.from_bytes(data[:2], "big")

    def close(self) -> None:
        self.sock.close()


async def answered(service: Transceiver, http: aiohttp.ClientSession) -> tuple[str, str, str]:
    """Offer a session that will never connect on its own: (USERNAME for its checks, its ICE password,
    session id)."""
    offer = await offer_sdp()
    async with http.post(service.whip_url, data=offer, headers={"Content-Type": "application/sdp"}) as resp:
        assert resp.status == 201
        answer = await resp.text()
        session_id = resp.headers[SESSION_ID]
    username = f"{attribute(answer, 'ice-ufrag')}:{attribute(offer, 'ice-ufrag')}"
    return username, attribute(answer, "ice-pwd"), session_id


async def test_forged_checks_with_a_live_ufrag_from_64_addresses_bind_nothing_and_the_call_keeps_audio():
    forgers = [Peer() for _ in range(64)]
    async with serving() as service:
        try:
            async with aiohttp.ClientSession() as http:
                caller = await connected_caller(service, http)
                session = service.sessions[caller.session_id]
                username = f"{session.ufrag}:{attribute(caller.pc.localDescription.sdp, 'ice-ufrag')}"
                bound_before = dict(service.mux.by_addr)
                selected = session.ice_connections[0]._nominated[1].remote_addr  # noqa: SLF001
                classes = [await f.check(service.mux.local_address, username, "wrong-password-0123456789")
                           for f in forgers]
                assert classes == [0x0111] * 64                       # aioice: 401, signed by nobody
                for forger in forgers:                                # then media, as if the call were theirs
                    await forger.send(b"\x80\x6f" + bytes(170), service.mux.local_address)
                for _ in range(200):
                    if service.mux.drops["not_stun"] >= 64:
                        break
                    await asyncio.sleep(0.01)
                assert service.mux.drops["not_stun"] == 64
                assert service.mux.by_addr == bound_before
                assert not {f.address for f in forgers} & set(service.mux.by_addr)
                assert session.ice_connections[0]._nominated[1].remote_addr == selected  # noqa: SLF001
                await hears_itself_again(caller, "the call's echo after 64 forged checks")
                await caller.hangup(http)
        finally:
            for forger in forgers:
                forger.close()


async def test_an_authenticated_check_rebinds_an_address_and_a_forged_one_does_not_move_it_back():
    """A relay port recycled to a new caller: that caller's authenticated check moves the address to its
    own session; a forged check naming the old session from it moves nothing."""
    port = Peer()
    async with serving() as service:
        try:
            async with aiohttp.ClientSession() as http:
                old_user, old_pwd, _ = await answered(service, http)
                new_user, new_pwd, _ = await answered(service, http)
            mux, to = service.mux, service.mux.local_address

            def owner() -> str | None:
                protocol = mux.by_addr.get(port.address)
                return protocol.receiver.local_username if protocol else None

            assert await port.check(to, old_user, "not-the-password-0123456") == 0x0111
            assert owner() is None                                        # unauthenticated: not bound
            assert await port.check(to, old_user, old_pwd) == 0x0101
            assert owner() == old_user.split(":")[0]
            assert await port.check(to, new_user, new_pwd) == 0x0101
            assert owner() == new_user.split(":")[0]                      # the later authenticated binding wins
            assert await port.check(to, old_user, "not-the-password-0123456") == 0x0111
            assert owner() == new_user.split(":")[0]
        finally:
            port.close()


async def test_a_silent_address_expires_and_its_media_then_reaches_no_session():
    peer = Peer()
    async with serving(address_timeout=0.3) as service:
        try:
            expired: asyncio.Future = asyncio.get_running_loop().create_future()
            service.mux.on_expire.append(lambda addr: expired.done() or expired.set_result(addr))
            async with aiohttp.ClientSession() as http:
                username, password, _ = await answered(service, http)
            assert await peer.check(service.mux.local_address, username, password) == 0x0101
            assert peer.address in service.mux.by_addr
            async with asyncio.timeout(10):
                assert await expired == peer.address
            assert peer.address not in service.mux.by_addr and service.mux.expired == 1
            await peer.send(b"\x80\x6f" + bytes(170), service.mux.local_address)
            for _ in range(200):
                if service.mux.drops["not_stun"]:
                    break
                await asyncio.sleep(0.01)
            assert dict(service.mux.drops) == {"not_stun": 1}
            assert service.metrics.mux_addresses_expired._value.get() == 1
        finally:
            peer.close()


async def test_a_live_call_keeps_its_binding_past_the_address_timeout():
    """A call sends every 20 ms: its address never goes silent long enough to expire."""
    async with serving(address_timeout=0.5) as service:
        async with aiohttp.ClientSession() as http:
            caller = await connected_caller(service, http)
            bound = dict(service.mux.by_addr)
            for _ in range(3):  # three timeouts' worth of talking
                await hears_itself_again(caller, "the echo")
            assert service.mux.expired == 0 and service.mux.by_addr == bound
            await caller.hangup(http)

