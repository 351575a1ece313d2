"""A WHIP client's ICE restart, for aiortc callers (aiortc itself has none).

What a mobile browser does when it changes network: new ICE credentials (and,
on a new network, new host candidates), a PATCH of the session resource with an
``application/trickle-ice-sdpfrag`` body and ``If-Match`` (RFC 9725 4.3.2), the
server's new credentials and candidates back in a 200, then checks of the new
generation.  The DTLS association and the media tracks of the peer connection
are untouched: the same aioice Connection moves to the new generation
(splitrelay.transceiver.ice_restart, shared with the transceiver's side).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass

import aiohttp
from aioice import Candidate
from aioice.ice import CandidatePair, Connection
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack

from splitrelay.client.whip import WhipClient, WhipError
from splitrelay.tokens import TOKEN_ENV
from splitrelay.transceiver.ice_restart import begin_generation, new_credentials, run_generation
from splitrelay.wire.sdpfrag import IceFragment


@dataclass
class RestartResult:
    etag: str | None          # the session's new ETag (quoted, as sent)
    pair: CandidatePair       # the new generation's nominated pair
    patch_ms: float           # PATCH sent until its 200 arrived
    nominated_ms: float       # PATCH sent until the new pair was nominated


def ice_connection(pc: RTCPeerConnection) -> Connection:
    """The aioice Connection under a BUNDLEd peer connection (one ICE transport)."""
    dtls = pc.getTransceivers()[0].sender.transport if pc.getTransceivers() else pc.sctp.transport
    return dtls.transport._connection  # noqa: SLF001 - aiortc keeps no public handle (pinned, see mux.py)


async def add_host_candidates(connection: Connection, host: str) -> list[Candidate]:
    """Host candidates on a new local address (a new network), next to the existing ones."""
    candidates = await connection.get_component_candidates(1, [host])
    connection._local_candidates += candidates  # noqa: SLF001
    return candidates


async def restart_ice(pc: RTCPeerConnection, session_url: str, http: aiohttp.ClientSession,
                      if_match: str = "*", candidates: list[Candidate] | None = None,
                      token: str | None = None, timeout: float = 10.0) -> RestartResult:
    """Restart ICE through WHIP.  ``candidates``: the ones to offer (default: every local one;
    pass only a new network's to leave the old one behind).  A refused or unanswered PATCH
    (``RestartRefused``, ``WhipUnreachable``) leaves the old credentials in place."""
    connection = ice_connection(pc)
    ufrag, password = new_credentials()
    offered = connection.local_candidates if candidates is None else candidates
    mid = pc.getTransceivers()[0].mid if pc.getTransceivers() else None
    body = IceFragment(ufrag=ufrag, pwd=password, candidates=[f"candidate:{c.to_sdp()}" for c in offered],
                       mid=mid, end_of_candidates=True).serialize()
    started = time.monotonic()
    previous = connection.local_username, connection.local_password
    begin_generation(connection, ufrag, password)
    try:
        restarted = await WhipClient(http, token).restart(session_url, body, if_match)
    except WhipError:  # refused or unanswered: back to the old credentials, the selected pair carries on
        begin_generation(connection, *previous)
        raise
    patch_ms = (time.monotonic() - started) * 1000.0
    answer = IceFragment.parse(restarted.fragment)
    remote_ufrag, remote_pwd = answer.check_credentials()
    remote = [Candidate.from_sdp(c[len("candidate:"):]) for c in answer.candidates]
    pair = await run_generation(connection, remote_ufrag, remote_pwd, remote, timeout, local=candidates)
    return RestartResult(restarted.etag, pair, patch_ms, (time.monotonic() - started) * 1000.0)


async def _call(http: aiohttp.ClientSession, whip_url: str, timeout: float,
                token: str | None = None) -> tuple[RTCPeerConnection, str]:
    """A connected WHIP call sending silence (the echo handler sends it back as RTP)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(AudioStreamTrack())
    connected = asyncio.Event()

    @pc.on("connectionstatechange")
    def _state() -> None:
        if pc.connectionState == "connected":
            connected.set()

    await pc.setLocalDescription(await pc.createOffer())
    answer = await WhipClient(http, token).offer(whip_url, pc.localDescription.sdp)
    await pc.setRemoteDescription(RTCSessionDescription(answer.sdp, "answer"))
    await asyncio.wait_for(connected.wait(), timeout)
    return pc, answer.location


async def measure(whip_url: str, new_host: str, runs: int = 5, timeout: float = 20.0,
                  token: str | None = None) -> list[dict]:
    """Call, restart ICE onto a new local port of ``new_host``, and time the PATCH until the
    first media (RTP/RTCP) arrives on the new socket; one fresh call per run."""
    results = []
    async with aiohttp.ClientSession() as http:
        for _ in range(runs):
            pc, location = await _call(http, whip_url, timeout, token)
            connection = ice_connection(pc)
            new = await add_host_candidates(connection, new_host)
            protocol = next(p for p in connection._protocols if p.local_candidate is new[0])  # noqa: SLF001
            first_media = asyncio.get_running_loop().create_future()
            received = protocol.datagram_received

            def stamp(data: bytes, addr: tuple, received=received, first_media=first_media) -> None:  # noqa: ANN001
                if data and 128 <= data[0] <= 191 and not first_media.done():
                    first_media.set_result(time.monotonic())
                received(data, addr)

            protocol.datagram_received = stamp
            started = time.monotonic()
            result = await restart_ice(pc, location, http, candidates=new, timeout=timeout)
            media_at = await asyncio.wait_for(first_media, timeout)
            results.append({"patch_ms": round(result.patch_ms, 1), "nominated_ms": round(result.nominated_ms, 1),
                            "media_ms": round((media_at - started) * 1000.0, 1)})
            await WhipClient(http, token).delete(location)
            await pc.close()
    return results


def main() -> None:
    """``python -m splitrelay.client.ice_restart WHIP_URL NEW_HOST [RUNS]``: JSON timings (the offer token,
    if the transceiver wants one, in $SPLITRELAY_WHIP_TOKEN)."""
    url, host, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 5
    print(json.dumps(asyncio.run(measure(url, host, runs, token=os.environ.get(TOKEN_ENV)))))


if __name__ == "__main__":
    main()
