"""The one WHIP client (client/whip.py) against a real transceiver that wants a bearer token: what a
201 gives, each refusal as a typed error with the endpoint's own reason, and a request nobody answers."""

from __future__ import annotations

import socket

import aiohttp
import pytest

from splitrelay.client.probe import run_probe
from splitrelay.client.whip import RestartRefused, WhipClient, WhipRefused, WhipUnreachable
from splitrelay.errors import SplitrelayError
from splitrelay.transceiver.service import Transceiver, TransceiverConfig

from .test_transceiver import BACKEND_ID, offer_sdp

TOKEN = "static-" + "t" * 32


@pytest.fixture
async def guarded():
    service = Transceiver(TransceiverConfig(backend_id=BACKEND_ID, bind_port=0, whip_port=0, whip_token=TOKEN))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_an_offer_gives_the_answer_the_secret_resource_the_public_id_and_the_etag(guarded):
    async with aiohttp.ClientSession() as http:
        whip = WhipClient(http, TOKEN)
        answer = await whip.offer(guarded.whip_url, await offer_sdp())
        session = guarded.sessions[answer.session_id]
        assert answer.sdp.startswith("v=0") and f"a=ice-ufrag:{session.ufrag}" in answer.sdp
        assert answer.location.startswith(guarded.whip_url + "/sessions/")            # absolute
        assert answer.session_id not in answer.location                                # a capability
        assert answer.etag == f'"{session.etag}"'
        with pytest.raises(RestartRefused) as refused:
            await whip.restart(answer.location, "a=ice-ufrag:abcd\r\na=ice-pwd:" + "p" * 22 + "\r\n",
                               if_match='"stale"')
        assert (refused.value.status, str(refused.value)) == (
            412, "ICE restart refused: 412 If-Match does not name this session's current ETag")
        assert await whip.delete(answer.location) == 200
        assert answer.session_id not in guarded.sessions
        assert await whip.delete(answer.location) == 404                                # gone with it


async def test_a_refused_offer_is_a_typed_error_with_the_endpoints_status_and_reason(guarded):
    async with aiohttp.ClientSession() as http:
        for token, reason in ((None, "missing bearer token"), ("guess", "wrong bearer token")):
            with pytest.raises(WhipRefused) as refused:
                await WhipClient(http, token).offer(guarded.whip_url, await offer_sdp())
            assert (refused.value.status, refused.value.reason) == (401, reason)
            assert str(refused.value) == f"WHIP {guarded.whip_url} answered 401: {reason}"
            assert isinstance(refused.value, SplitrelayError)
        with pytest.raises(WhipRefused) as refused:
            await WhipClient(http, TOKEN).offer(guarded.whip_url, "not sdp")
        assert str(refused.value) == f"WHIP {guarded.whip_url} answered 400: the body is not an SDP offer (no v=0)"
    assert guarded.sessions == {}


async def test_the_probe_reports_a_refused_offer_in_the_endpoints_words(guarded):
    report = await run_probe(guarded.whip_url, duration=0.1, token="guess", connect_timeout=5.0)
    assert not report.ok
    assert report.error == f"WHIP {guarded.whip_url} answered 401: wrong bearer token"


async def test_a_request_nobody_answers_is_unreachable_and_never_names_the_secret_resource():
    url = f"http://127.0.0.1:{closed_port()}/whip"
    async with aiohttp.ClientSession() as http:
        whip = WhipClient(http, TOKEN)
        with pytest.raises(WhipUnreachable) as nobody:
            await whip.offer(url, "v=0\r\n")
        assert nobody.value.status == 0
        assert str(nobody.value).startswith(f"WHIP request to {url} failed: ClientConnectorError: ")
        secret = url + "/sessions/s3cretCapability"
        for request in (whip.delete(secret), whip.restart(secret, "")):
            with pytest.raises(WhipUnreachable) as nobody:
                await request
            assert str(nobody.value).startswith("WHIP request to the session's resource failed: ")
            assert "s3cret" not in str(nobody.value)
