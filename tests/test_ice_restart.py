"""ICE restart through WHIP (RFC 9725 PATCH) with real aiortc callers on loopback: the call moves
to a new ICE generation, DTLS/SRTP untouched, and every bad PATCH leaves the call as it was."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from splitrelay.client.ice_restart import add_host_candidates, ice_connection, restart_ice
from splitrelay.client.whip import RestartRefused
from splitrelay.transceiver.service import Transceiver, TransceiverConfig
from splitrelay.wire import hint
from splitrelay.wire.sdpfrag import MEDIA_TYPE, IceFragment

from . import test_transceiver
from .test_transceiver import BACKEND_ID, Caller, until
from .test_transceiver_registration import BACKEND_IP, TOKEN, Agent

transceiver = test_transceiver.transceiver  # the direct-mode transceiver fixture


async def connected_caller(service: Transceiver, http: aiohttp.ClientSession, freq: float = 700.0) -> Caller:
    caller = Caller(service.whip_url, freq)
    await caller.call(http)
    await until(caller.heard_own, "the first echo")
    return caller


async def hears_itself_again(caller: Caller, what: str) -> None:
    caller.heard_own.clear()
    caller._loud_run = 0  # noqa: SLF001 - count half a second of echo from now on
    await until(caller.heard_own, what)


def cut_address(service: Transceiver, gone: tuple[str, int]) -> None:
    """The client's old network is gone: nothing from or to that address crosses the mux."""
    mux = service.mux
    receive, send = mux.datagram_received, mux.send
    mux.datagram_received = lambda data, addr: None if (addr[0], addr[1]) == gone else receive(data, addr)
    mux.send = lambda data, addr: None if (addr[0], addr[1]) == gone else send(data, addr)


async def test_an_ice_restart_onto_a_new_network_keeps_the_call_and_its_dtls(transceiver):
    async with aiohttp.ClientSession() as http:
        caller = await connected_caller(transceiver, http)
        session = transceiver.sessions[caller.session_id]
        dtls_before = list(session.states.states["dtls"])
        connection = ice_connection(caller.pc)
        old_ufrag, old_etag = session.ufrag, f'"{session.etag}"'
        old_client = connection._nominated[1].local_candidate  # noqa: SLF001
        new_network = await add_host_candidates(connection, "127.0.0.1")
        first_media_at: list[float] = []
        protocol = next(p for p in connection._protocols if p.local_candidate is new_network[0])  # noqa: SLF001
        received = protocol.datagram_received

        def stamp(data: bytes, addr: tuple) -> None:  # the first RTP/RTCP/DTLS datagram on the new path
            if data and 128 <= data[0] <= 191 and not first_media_at:
                first_media_at.append(time.monotonic())
            received(data, addr)

        protocol.datagram_received = stamp
        cut_address(transceiver, (old_client.host, old_client.port))
        started = time.monotonic()
        result = await restart_ice(caller.pc, caller.location, http, if_match=old_etag, candidates=new_network)
        await hears_itself_again(caller, "the echo after the ICE restart")
        media_gap_ms = (first_media_at[0] - started) * 1000.0
        print(f"ICE restart: PATCH 200 in {result.patch_ms:.0f} ms, new pair nominated in "
              f"{result.nominated_ms:.0f} ms, media on the new path {media_gap_ms:.0f} ms after the PATCH")
        assert result.pair.local_candidate is new_network[0]
        assert result.etag and result.etag != old_etag
        assert session.ufrag != old_ufrag and hint.decode(session.ufrag) == BACKEND_ID
        assert session.states.states["dtls"] == dtls_before == ["new", "connecting", "connected"]  # same DTLS
        assert old_ufrag not in transceiver.mux.by_ufrag and session.ufrag in transceiver.mux.by_ufrag
        assert [p["reason"] for p in session.to_dict()["paths"]] == ["nominated", "restarted"]
        assert transceiver.metrics.path_changes.labels("restarted")._value.get() == 1
        assert transceiver.metrics.ice_restart._sum.get() > 0
        assert session.to_dict()["paths"][-1]["remote"] == f"127.0.0.1:{new_network[0].port}"
        await caller.hangup(http)


async def test_bad_patches_get_the_right_4xx_and_the_call_goes_on(transceiver):
    async with aiohttp.ClientSession() as http:
        caller = await connected_caller(transceiver, http)
        session = transceiver.sessions[caller.session_id]
        etag = f'"{session.etag}"'
        connection = ice_connection(caller.pc)
        good = IceFragment(ufrag="newUfrag1", pwd="n" * 22, mid="0", end_of_candidates=True,
                           candidates=[f"candidate:{c.to_sdp()}" for c in connection.local_candidates])
        current = IceFragment(ufrag=connection.local_username, pwd=connection.local_password, mid="0")
        cases = [
            ({"If-Match": etag, "Content-Type": "application/sdp"}, good, 415, "Content-Type"),
            ({"Content-Type": MEDIA_TYPE}, good, 428, "needs If-Match"),
            ({"If-Match": '"stale"', "Content-Type": MEDIA_TYPE}, good, 412, "current ETag"),
            ({"If-Match": etag, "Content-Type": MEDIA_TYPE}, IceFragment(mid="0"), 400, "no ICE credentials"),
            ({"If-Match": etag, "Content-Type": MEDIA_TYPE}, IceFragment(ufrag="a:b!", pwd="p" * 22), 400,
             "a=ice-ufrag is not"),
            ({"If-Match": etag, "Content-Type": MEDIA_TYPE}, current, 422, "trickle ICE is not supported"),
        ]
        for headers, fragment, status, reason in cases:
            async with http.patch(caller.location, data=fragment.serialize(), headers=headers) as resp:
                assert (resp.status, reason in await resp.text()) == (status, True), (status, reason)
        async with http.patch(caller.location.rsplit("/", 1)[0] + "/nosuch", data=good.serialize(),
                              headers={"If-Match": "*", "Content-Type": MEDIA_TYPE}) as resp:
            assert resp.status == 404
        assert f'"{session.etag}"' == etag                        # nothing restarted...
        assert connection.local_username != "newUfrag1"
        await hears_itself_again(caller, "the echo after the refused PATCHes")   # ...and the call goes on
        with pytest.raises(RestartRefused) as exc:                # the client helper rolls back on a refusal
            await restart_ice(caller.pc, caller.location, http, if_match='"stale"')
        assert exc.value.status == 412
        await hears_itself_again(caller, "the echo after a refused restart")
        await caller.hangup(http)


async def test_patch_of_a_resource_nobody_was_given_is_404_even_with_the_bearer_token():
    service = Transceiver(TransceiverConfig(backend_id=BACKEND_ID, bind_port=0, whip_port=0, whip_token="s3cret"))
    await service.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.patch(service.whip_url + "/sessions/x", data="a=ice-ufrag:abcd\r\n",
                                  headers={"If-Match": "*", "Content-Type": MEDIA_TYPE,
                                           "Authorization": "Bearer s3cret"}) as resp:
                assert resp.status == 404 and await resp.text() == "no such session\n"
    finally:
        await service.stop()


async def test_a_restart_registers_the_new_ufrag_first_and_retires_the_old_one():
    agent = Agent()
    await agent.start()
    service = Transceiver(TransceiverConfig(backend_id=BACKEND_ID, bind_port=0, whip_port=0,
                                            relay_control=agent.url, relay_token=TOKEN, backend_ip=BACKEND_IP,
                                            ufrag_pool=0))  # the agent holds exactly the live ufrags
    await service.start()
    try:
        async with aiohttp.ClientSession() as http:
            caller = await connected_caller(service, http)
            old = service.sessions[caller.session_id].ufrag
            assert agent.ufrags() == {old: BACKEND_ID}
            result = await restart_ice(caller.pc, caller.location, http)          # If-Match: *
            new = service.sessions[caller.session_id].ufrag
            for _ in range(200):  # the old ufrag goes once the new pair is nominated (a task)
                if agent.ufrags() == {new: BACKEND_ID}:
                    break
                await asyncio.sleep(0.01)
            assert agent.ufrags() == {new: BACKEND_ID}
            result = await restart_ice(caller.pc, caller.location, http, if_match=result.etag)  # twice
            await hears_itself_again(caller, "the echo after two restarts")
            await caller.hangup(http)
        assert agent.ufrags() == {}                                          # every generation unregistered
    finally:
        await service.stop()
        await agent.stop()
