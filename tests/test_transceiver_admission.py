"""What an anonymous WHIP client can make a transceiver spend: attacks against a real transceiver with
real aiortc callers on loopback, and the edge agent's real control API in-process (no BPF, no root)
to show that a refused offer leaves nothing registered at the relay."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiortc import RTCSessionDescription
from yarl import URL

from splitrelay.transceiver.service import Transceiver, TransceiverConfig
from splitrelay.wire.sdpfrag import MEDIA_TYPE, IceFragment
from splitrelay.wire.whip import SESSION_ID

from .test_ice_restart import connected_caller, hears_itself_again
from .test_transceiver import Caller, ended, offer_sdp, until
from . import test_transceiver_registration
from .test_transceiver_registration import BACKEND_IP, TOKEN

agent = test_transceiver_registration.agent  # the edge agent's real control API, in-process

BACKEND_ID = 9
SDP = {"Content-Type": "application/sdp"}


@contextlib.asynccontextmanager
async def serving(**config) -> AsyncIterator[Transceiver]:  # noqa: ANN003 - TransceiverConfig's fields
    """A started direct-mode transceiver on ephemeral ports, stopped afterwards."""
    config = {"backend_id": BACKEND_ID, "bind_port": 0, "whip_port": 0, **config}
    service = Transceiver(TransceiverConfig(**config))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


def registered_with(agent_url: str) -> dict:
    return dict(relay_control=agent_url, relay_token=TOKEN, backend_ip=BACKEND_IP, watch_interval=0.05)


async def post(http: aiohttp.ClientSession, url: str, body: str) -> tuple[int, str, dict]:
    async with http.post(url, data=body, headers=SDP) as resp:
        return resp.status, (await resp.text()).strip(), dict(resp.headers)


def refused(service: Transceiver, reason: str) -> float:
    return service.metrics.offers_refused.labels(reason)._value.get()


def session_puts(relay_agent) -> int:  # noqa: ANN001 - test_transceiver_registration.Agent
    return sum(1 for method, route in relay_agent.requests if method == "PUT" and route.startswith("/v1/sessions"))


# -- admission ------------------------------------------------------------------------------------

async def test_offers_that_never_connect_fill_only_max_pending_and_the_next_gets_503_registering_nothing(agent):
    async with serving(**registered_with(agent.url), ufrag_pool=0, max_pending=2, connect_timeout=1.0) as service:
        async with aiohttp.ClientSession() as http:
            held = [await post(http, service.whip_url, await offer_sdp()) for _ in range(2)]
            assert [status for status, _, _ in held] == [201, 201]
            puts = session_puts(agent)
            status, text, headers = await post(http, service.whip_url, await offer_sdp())
            assert (status, text) == (503, "2 sessions are still connecting; try again shortly")
            assert 1 <= int(headers["Retry-After"]) <= 1                     # the oldest times out by then
            assert session_puts(agent) == puts and len(agent.ufrags()) == 2  # nothing reached the relay
            assert len(service.sessions) == 2 and refused(service, "pending") == 1
            for _, _, h in held:                                             # they time out, slots free up
                assert (await ended(service, h[SESSION_ID]))["end_reason"] == "connect timeout"
            assert agent.ufrags() == {}
            caller = Caller(service.whip_url, 700.0)
            await caller.call(http)
            await until(caller.heard_own, "a real caller's echo once the pending offers timed out")
            await caller.hangup(http)


async def test_a_refused_offer_takes_no_ufrag_from_the_pool(agent):
    async with serving(**registered_with(agent.url), ufrag_pool=4, max_pending=1) as service:
        async with aiohttp.ClientSession() as http:
            assert (await post(http, service.whip_url, await offer_sdp()))[0] == 201
            for _ in range(200):  # the pool refills behind the answer: bounded wait for all 4 ready again
                if len(service.ufrags.ready) == 4:
                    break
                await asyncio.sleep(0.01)
            ready, registered = list(service.ufrags.ready), agent.ufrags()
            for _ in range(5):
                assert (await post(http, service.whip_url, await offer_sdp()))[0] == 503
            assert list(service.ufrags.ready) == ready and agent.ufrags() == registered
            assert refused(service, "pending") == 5


async def test_max_sessions_refuses_the_next_offer_and_the_live_call_keeps_its_audio():
    async with serving(max_sessions=1) as service:
        async with aiohttp.ClientSession() as http:
            caller = await connected_caller(service, http)
            status, text, headers = await post(http, service.whip_url, await offer_sdp())
            assert (status, text, headers["Retry-After"]) == (503, "this transceiver is full (1 sessions)", "5")
            assert list(service.sessions) == [caller.session_id] and refused(service, "sessions") == 1
            assert service.metrics.offers_rejected.labels("503")._value.get() == 1
            await hears_itself_again(caller, "the live call's echo after the refusal")
            await caller.hangup(http)


async def test_a_source_past_its_burst_gets_429_while_another_source_is_answered(agent):
    async with serving(**registered_with(agent.url), ufrag_pool=0, offer_rate=0.5, offer_burst=2) as service:
        async with aiohttp.ClientSession() as http:
            statuses = [(await post(http, service.whip_url, await offer_sdp()))[0] for _ in range(2)]
            puts = session_puts(agent)
            status, text, headers = await post(http, service.whip_url, await offer_sdp())
        assert statuses == [201, 201]
        assert (status, text) == (429, "too many offers or ICE restarts from 127.0.0.1: at most 0.5/s after a "
                                       "burst of 2")
        assert 1 <= int(headers["Retry-After"]) <= 2                          # one token at 0.5/s
        assert session_puts(agent) == puts and refused(service, "rate") == 1
        other = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))         # another source, its own bucket
        async with aiohttp.ClientSession(connector=other) as http:
            assert (await post(http, service.whip_url, await offer_sdp()))[0] == 201


async def test_ice_restarts_share_their_sources_rate_and_a_refused_one_leaves_the_call_as_it_was():
    async with serving(offer_rate=0.01, offer_burst=2) as service:  # a token per 100 s: none comes back
        async with aiohttp.ClientSession() as http:
            caller = await connected_caller(service, http)                   # the first token
            session = service.sessions[caller.session_id]
            statuses = []
            for n in range(2):                                                # the second, then none left
                fragment = IceFragment(ufrag=f"restartUfrag{n}", pwd="r" * 22, mid="0", end_of_candidates=True)
                headers = {"If-Match": f'"{session.etag}"', "Content-Type": MEDIA_TYPE}
                async with http.patch(caller.location, data=fragment.serialize(), headers=headers) as resp:
                    statuses.append((resp.status, 1 <= int(resp.headers.get("Retry-After", "0")) <= 100))
            assert statuses == [(200, False), (429, True)]
            assert len(session.retired_ufrags) == 1 and refused(service, "rate") == 1  # one restart only
            await hears_itself_again(caller, "the echo after the refused restart")
            await caller.hangup(http)


async def test_the_rate_limit_remembers_a_bounded_number_of_sources():
    """An attacker with many addresses cannot grow the per-source table: the least recently seen go.
    The refusal comes before the body is read, so a junk body costs each source nothing more."""
    async with serving(offer_rate=1.0, offer_burst=1, offer_sources=4) as service:
        for host in range(2, 42):
            connector = aiohttp.TCPConnector(local_addr=(f"127.0.0.{host}", 0))
            async with aiohttp.ClientSession(connector=connector) as http:
                assert (await post(http, service.whip_url, "junk"))[0] == 400       # admitted, then a bad offer
                assert (await post(http, service.whip_url, "junk"))[0] == 429       # its one token is spent
        buckets = service.admission.buckets
        assert list(buckets.buckets) == [f"127.0.0.{h}" for h in range(38, 42)] and buckets.evicted == 36


def test_the_default_connect_timeout_is_ten_seconds_and_the_cli_teaches_every_limit():
    from splitrelay.cli.transceiver import transceiver_serve

    assert TransceiverConfig(backend_id=1).connect_timeout == 10.0
    options = {p.opts[0]: p for p in transceiver_serve.params}
    for option, default in (("--max-sessions", 0), ("--max-pending", 100), ("--offer-rate", 5.0),
                            ("--offer-burst", 50), ("--connect-timeout", 10.0), ("--address-timeout", 30.0)):
        assert options[option].default == default and options[option].show_default
        assert len(options[option].help) > 30, option  # says what it bounds, not only its name


# -- candidates (issue 22, 3e) -----------------------------------------------------------------------

class Victims:
    """UDP sockets on loopback standing for addresses that never asked to be checked."""

    def __init__(self, count: int, host: str = "127.0.0.1") -> None:
        self.sockets = []
        for _ in range(count):
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((host, 0))
            sock.setblocking(False)
            self.sockets.append(sock)

    @property
    def ports(self) -> list[int]:
        return [s.getsockname()[1] for s in self.sockets]

    def received(self) -> list[list[bytes]]:
        """What each socket got so far (loopback delivers as it is sent)."""
        got = []
        for sock in self.sockets:
            datagrams = []
            while True:
                try:
                    datagrams.append(sock.recv(2048))
                except BlockingIOError:
                    break
            got.append(datagrams)
        return got

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def candidate_lines(hosts_ports: list[tuple[str, int]]) -> list[str]:
    return [f"a=candidate:{i + 1} 1 udp {2130706431 - i} {host} {port} typ host"
            for i, (host, port) in enumerate(hosts_ports)]


def with_candidates(sdp: str, lines: list[str], keep_own: bool = False) -> str:
    """``sdp`` with ``lines`` as its candidates (after its own, if ``keep_own``)."""
    out = []
    for line in sdp.split("\r\n"):
        if line.startswith("a=candidate:") and not keep_own:
            continue
        if line.startswith("a=end-of-candidates"):
            out += lines
            lines = []
        out.append(line)
    assert not lines, "the offer has no a=end-of-candidates to put the candidates before"
    return "\r\n".join(out)


def authenticated_check(answer: str, client_ufrag: str) -> tuple[bytes, tuple[str, int]]:
    """The client's first Binding Request as a real client sends it (USERNAME server:client, under the
    answer's password), and the transceiver's IPv4 candidate it goes to."""
    from aioice import stun as aioice_stun

    fields = dict(line[2:].split(":", 1) for line in answer.split("\r\n") if line.startswith("a=ice-"))
    host, port = next((parts[4], int(parts[5])) for line in answer.split("\r\n")
                      if line.startswith("a=candidate:") and (parts := line.split())[2].lower() == "udp"
                      and "." in parts[4])
    request = aioice_stun.Message(aioice_stun.Method.BINDING, aioice_stun.Class.REQUEST)
    request.attributes.update({"USERNAME": f"{fields['ice-ufrag']}:{client_ufrag}", "PRIORITY": 0x6E0001FF,
                               "ICE-CONTROLLING": 7})
    request.add_message_integrity(fields["ice-pwd"].encode())
    request.add_fingerprint()
    return bytes(request), (host, port)


async def test_an_offer_naming_fifty_victims_checks_none_until_its_client_checks_and_then_sixteen():
    """Measured with the default 10 s connect timeout (this test uses 2 s): for a 4,042-byte offer, without
    the cap the transceiver sent 250 checks (25,000 bytes of STUN, 6.2x) to the 50 victim ports, as the
    issue found through the relay; with it, 80 checks (8,000 bytes, 2.0x) to 16 of them.  Since the
    transceiver checks only after the client's own authenticated check (ice_connection.py, for
    libdatachannel), an offer alone makes it send nothing at all; one that does check gets the cap.
    What is left is aioice's 5 tries per pair in 10 s; the relay bounds what leaves it (issue 22, 3d)."""
    victims = Victims(50)
    async with serving(connect_timeout=2.0) as service:
        try:
            offer = with_candidates(await offer_sdp(), candidate_lines([("127.0.0.1", p) for p in victims.ports]))
            client_ufrag = next(line.split(":", 1)[1] for line in offer.split("\r\n")
                                if line.startswith("a=ice-ufrag:"))
            async with aiohttp.ClientSession() as http:
                status, _, headers = await post(http, service.whip_url, offer)
                assert status == 201
                await ended(service, headers[SESSION_ID])
                assert victims.received() == [[] for _ in victims.ports]   # no check without the client's
                status, answer, headers = await post(http, service.whip_url, offer)
            assert status == 201
            request, to = authenticated_check(answer, client_ufrag)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.bind(("127.0.0.1", 0))
                client.sendto(request, to)
                await ended(service, headers[SESSION_ID])
            got = victims.received()
            checked = [port for port, datagrams in zip(victims.ports, got, strict=True) if datagrams]
            print(f"offer {len(offer)} bytes; {sum(map(len, got))} checks, "
                  f"{sum(len(d) for ds in got for d in ds)} bytes to {len(checked)} victim ports")
            assert checked == victims.ports[:16]                           # the first 16, in the offer's order
            assert all(len(datagrams) <= 7 for datagrams in got)           # aioice: 1 + 6 retransmissions at most
            assert dict(service.mux.candidates_ignored) == {"over_cap": 68}   # 34 per offer
            await service.scrape(None)
            assert service.metrics.candidates_ignored.labels("over_cap")._value.get() == 68
        finally:
            victims.close()


async def test_an_ice_restart_naming_fifty_victims_checks_sixteen_and_the_call_goes_on():
    victims = Victims(50)
    async with serving() as service:
        try:
            async with aiohttp.ClientSession() as http:
                caller = await connected_caller(service, http)
                session = service.sessions[caller.session_id]
                fragment = IceFragment(ufrag="restartUfrag1", pwd="r" * 22, mid="0", end_of_candidates=True,
                                       candidates=[line[2:] for line in candidate_lines(
                                           [("127.0.0.1", p) for p in victims.ports])])
                headers = {"If-Match": f'"{session.etag}"', "Content-Type": MEDIA_TYPE}
                async with http.patch(caller.location, data=fragment.serialize(), headers=headers) as resp:
                    assert resp.status == 200, await resp.text()
                await hears_itself_again(caller, "the echo on the old pair while the restart checks victims")
                hit: set[int] = set()
                for _ in range(300):  # checks start 20 ms apart: all 50 would be under way within 1 s uncapped
                    hit |= {p for p, got in zip(victims.ports, victims.received(), strict=True) if got}
                    if len(hit) >= 16:
                        await asyncio.sleep(1.0)  # and a second more for any beyond the cap to show up
                        hit |= {p for p, got in zip(victims.ports, victims.received(), strict=True) if got}
                        break
                    await asyncio.sleep(0.01)
                assert hit == set(victims.ports[:16])
                assert service.mux.candidates_ignored["over_cap"] == 34
                await caller.hangup(http)
        finally:
            victims.close()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_through_a_relay_loopback_link_local_multicast_and_unspecified_targets_are_never_checked():
    """Relay mode (the answer names a public candidate: here the mux's own address stands for the
    relay's).  The caller's own checks still connect the call, learned as peer-reflexive."""
    port = free_udp_port()
    victims = Victims(1)
    async with serving(bind_port=port, public_address=("127.0.0.1", port)) as service:
        try:
            unreachable = [("127.0.0.1", victims.ports[0]), ("169.254.10.1", 9), ("224.0.0.251", 5353),
                           ("0.0.0.0", 9), ("255.255.255.255", 9), ("::1", 9), ("fe80::1", 9), ("::", 9),
                           ("ff02::1", 9), ("3f2c1a9e-5d2b-4e1f-9a7c-0b1d2e3f4a5b.local", 9)]
            caller = Caller(service.whip_url, 700.0)
            await caller.pc.setLocalDescription(await caller.pc.createOffer())
            offer = with_candidates(caller.pc.localDescription.sdp, candidate_lines(unreachable), keep_own=True)
            async with aiohttp.ClientSession() as http:
                async with http.post(service.whip_url, data=offer, headers=SDP) as resp:
                    assert resp.status == 201
                    caller.answer = await resp.text()
                    caller.location = str(resp.url.join(URL(resp.headers["Location"])))
                    caller.public_id = resp.headers[SESSION_ID]
                await caller.pc.setRemoteDescription(RTCSessionDescription(caller.answer, "answer"))
                await until(caller.heard_own, "the echo, connected on the caller's own checks")
                assert victims.received() == [[]]
                assert service.mux.candidates_ignored["not_routable"] >= len(unreachable)
                await caller.hangup(http)
        finally:
            victims.close()


@pytest.mark.parametrize("relayed", [False, True])
async def test_tcp_candidates_are_never_checked_nor_counted_against_the_cap(relayed):
    port = free_udp_port()
    async with serving(bind_port=port, public_address=("127.0.0.1", port) if relayed else None) as service:
        tcp = [f"a=candidate:{i} 1 tcp {1518280447 - i} 192.0.2.{i} 9 typ host tcptype active"
               for i in range(1, 31)]
        async with aiohttp.ClientSession() as http:
            status, _, _ = await post(http, service.whip_url, with_candidates(await offer_sdp(), tcp))
        assert status == 201
        assert dict(service.mux.candidates_ignored) == {"not_udp": 30}
