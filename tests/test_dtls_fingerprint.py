# ruff: noqa: F811 - test parameters named after the imported `transceiver` fixture request it
"""libdatachannel callers that start together all connect: the answer names the transceiver's DTLS
certificate by one sha-256 fingerprint (dtls_fingerprint.py), and the transceiver's checks wait for the
client's first one (mux.py MuxedConnection.connect).

They failed at random: ICE connected, then "DTLS alert: unknown CA" (or "Got a remote candidate without
ICE transport" when that failure closed ICE under the answer's candidates).  Our early check gave
libdatachannel a pair to check the moment the answer reached its ICE agent, before it stored the answer
for DTLS; its DTLS then hashed our certificate with sha-256 against the answer's last line, sha-512, or
met it with no answer stored at all.  12 callers at once on loopback lost 25 of 240 calls, 2 of 240
with the one fingerprint, 0 of 240 with both; through the XDP lab 17 of 120 before, 11 of 120 with the
one fingerprint, 0 of 120 with both (no relay counter dropped a packet of theirs).
"""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from splitrelay.client import node_call
from splitrelay.transceiver.dtls_fingerprint import sha256_only

from .test_dtls_setup import transceiver  # noqa: F401 - the loopback transceiver fixture

FINGERPRINT = re.compile(r"^a=fingerprint:(\S+) (\S+)\r?$", re.M)
CALLERS = 12


def aiortc_client() -> tuple[RTCPeerConnection, asyncio.Event]:
    """An aiortc caller with one audio m-line, and the event of its peer connection connecting."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio")
    connected = asyncio.Event()
    pc.on("connectionstatechange", lambda: connected.set() if pc.connectionState == "connected" else None)
    return pc, connected


async def post_offer(pc: RTCPeerConnection, whip_url: str) -> str:
    """``pc``'s offer POSTed; the answer."""
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http:
        async with http.post(whip_url, data=pc.localDescription.sdp,
                             headers={"Content-Type": "application/sdp"}) as resp:
            assert resp.status == 201, await resp.text()
            return await resp.text()


async def test_the_answer_names_the_certificate_by_one_sha256_fingerprint_that_the_handshake_matches(transceiver):
    pc, connected = aiortc_client()
    try:
        answer = await post_offer(pc, transceiver.whip_url)
        [(algorithm, value)] = FINGERPRINT.findall(answer)   # aiortc's own answer lists sha-256, -384, -512
        assert algorithm == "sha-256"
        [session] = transceiver.sessions.values()
        [dtls] = {t.receiver.transport for t in session.pc.getTransceivers()}
        assert value == next(f.value for f in dtls.getLocalParameters().fingerprints if f.algorithm == "sha-256")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await asyncio.wait_for(connected.wait(), 20)   # aiortc checks the certificate against that line
    finally:
        await pc.close()


def test_only_sha256_fingerprint_lines_are_kept_and_an_answer_without_one_keeps_its_own():
    lines = ["v=0", "a=fingerprint:sha-384 AA", "a=fingerprint:SHA-256 BB", "a=fingerprint:sha-512 CC",
             "a=fingerprint:sha-2560 DD", "a=setup:passive", ""]
    kept = sha256_only(RTCSessionDescription(sdp="\r\n".join(lines), type="answer"))
    assert (kept.sdp, kept.type) == ("v=0\r\na=fingerprint:SHA-256 BB\r\na=setup:passive\r\n", "answer")
    other = RTCSessionDescription(sdp="v=0\r\na=fingerprint:sha-512 CC\r\n", type="answer")
    assert sha256_only(other) is other


async def test_libdatachannel_callers_starting_together_all_connect_and_check_our_certificate(transceiver):
    # 12 at once, twice (~10 s); each caller also reports our certificate's fingerprint as its DTLS
    # hashed it: before, each failed call had our own certificate (its sha-256 matched the answer's
    # sha-256 line) hashed with sha-256 while the line libdatachannel checks (the last) was sha-512
    if reason := node_call.unavailable_reason("libdatachannel"):
        pytest.skip(reason)
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(CALLERS) as pool:
        reports = []
        for _ in range(2):
            reports += [r for rs in await asyncio.gather(*(
                loop.run_in_executor(pool, node_call.node_calls, "libdatachannel", transceiver.whip_url)
                for _ in range(CALLERS))) for r in rs]
    for report in reports:
        algorithm, _ = report["answer_fingerprints"][-1]   # libdatachannel keeps the last line
        assert report["certificate"]["algorithm"] == algorithm, report
        assert [report["certificate"]["value"]] == [v for a, v in report["answer_fingerprints"] if a == algorithm]
    assert [r["error"] for r in reports] == [None] * len(reports)


async def test_the_transceiver_checks_a_client_only_after_the_clients_first_check(transceiver):
    # an aiortc client that holds the answer 1 s before applying it, as a busy caller may: the
    # transceiver's first check came within a few ms of its answer before (mux.py MuxedConnection.connect)
    pc, connected = aiortc_client()
    try:
        client = pc.getTransceivers()[0].sender.transport.transport._connection
        order: list[str] = []
        ours = asyncio.Event()
        received, start = client.request_received, client.check_start

        def request_received(message, addr, protocol):  # noqa: ANN001, ANN202 - aioice's hook
            order.append("transceiver")
            ours.set()
            received(message, addr, protocol)

        def check_start(pair):  # noqa: ANN001, ANN202
            order.append("client")
            return start(pair)

        client.request_received, client.check_start = request_received, check_start
        answer = await post_offer(pc, transceiver.whip_url)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ours.wait(), 1.0)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await asyncio.wait_for(connected.wait(), 20)
        assert order[0] == "client" and "transceiver" in order, order   # it did check back, after
    finally:
        await pc.close()
