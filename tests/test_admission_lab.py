"""A transceiver's admission and candidate cap through the real lab: `transceiver serve` behind the XDP
relay and its edge agent, attacked from the client namespace (issue 22, 3e and 4)."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.error
import urllib.request

import pytest

from splitrelay.lab.netns import in_netns
from splitrelay.lab.stack import admin_get, admin_url, start_lab, start_transceiver, stop_lab, whip_token
from splitrelay.lab.topology import Lab

from .conftest import needs_root, relay_ufrags
from .test_transceiver import offer_sdp
from .test_transceiver_admission import candidate_lines, with_candidates
from .waiting import wait_for

pytestmark = needs_root
CONNECT_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def guarded_lab():
    info = start_lab(transceivers=1, handler=None)
    lab = Lab.load(info["name"])
    try:
        start_transceiver(lab, lab.transceivers[0], "echo", [
            "--max-pending", "2", "--connect-timeout", str(CONNECT_TIMEOUT_S), "--ufrag-pool", "0"])
        yield lab, info["whip_url"]
    finally:
        stop_lab(info["name"])


def http(lab: Lab, url: str, body: str | None = None) -> tuple[int, str, dict]:
    """POST an offer, with a token of the lab's, from the client namespace: (status, body, headers)."""
    token = whip_token(lab)

    def call() -> tuple[int, str, dict]:
        request = urllib.request.Request(url, data=body.encode() if body is not None else None,
                                         headers={"Content-Type": "application/sdp",
                                                  "Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return resp.status, resp.read().decode(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(), dict(exc.headers)
    return in_netns(lab.client.netns, call)


def ufrag_of(answer: str) -> str:
    return next(line.split(":", 1)[1] for line in answer.splitlines() if line.startswith("a=ice-ufrag:"))


def metric(lab: Lab, whip_url: str, line_start: str) -> float:
    """A transceiver metric from its admin listener (the WHIP one serves none)."""
    text = admin_get(lab, admin_url(lab.transceivers[0]), "/metrics").decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def test_offers_past_max_pending_get_503_and_the_relay_never_hears_of_them(guarded_lab):
    lab, whip_url = guarded_lab
    held = [http(lab, whip_url, asyncio.run(offer_sdp())) for _ in range(2)]
    assert [status for status, _, _ in held] == [201, 201]
    ufrags = {ufrag_of(answer) for _, answer, _ in held}
    assert relay_ufrags(lab) == ufrags
    status, text, headers = http(lab, whip_url, asyncio.run(offer_sdp()))
    assert (status, text.strip()) == (503, "2 sessions are still connecting; try again shortly")
    assert 1 <= int(headers["Retry-After"]) <= CONNECT_TIMEOUT_S
    assert relay_ufrags(lab) == ufrags                                  # the refused offer registered nothing
    wait_for(lambda: not relay_ufrags(lab), CONNECT_TIMEOUT_S + 15, "the connect timeout to unregister both")
    assert metric(lab, whip_url, 'splitrelay_transceiver_offers_refused_total{reason="pending"}') == 1


def test_an_offer_naming_fifty_victim_ports_draws_checks_to_at_most_sixteen(guarded_lab):
    """The issue's reflection, through the relay: a 4 kB offer whose 50 candidates name ports of a host
    that never asked.  Before the cap (10 s connect timeout) the relay sent 250 checks, 35,500 bytes on
    the wire, there; now the transceiver checks 16 of them at most."""
    lab, whip_url = guarded_lab
    victims = [in_netns(lab.client.netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
               for _ in range(50)]
    try:
        for sock in victims:
            sock.bind((lab.client.ip4, 0))
            sock.setblocking(False)
        ports = [sock.getsockname()[1] for sock in victims]
        offer = with_candidates(asyncio.run(offer_sdp()), candidate_lines([(lab.client.ip4, p) for p in ports]))
        ignored_before = metric(lab, whip_url, "splitrelay_transceiver_remote_candidates_ignored_total")
        sent_at = time.monotonic()
        status, answer, _ = http(lab, whip_url, offer)
        assert status == 201
        ufrag = ufrag_of(answer)
        wait_for(lambda: ufrag not in relay_ufrags(lab), CONNECT_TIMEOUT_S + 15, "the session's connect timeout")
        received: dict[int, list[tuple[bytes, tuple]]] = {}
        for port, sock in zip(ports, victims, strict=True):
            while True:
                try:
                    received.setdefault(port, []).append(sock.recvfrom(2048))
                except BlockingIOError:
                    break
        hit = {port for port, got in received.items() if got}
        packets = sum(len(got) for got in received.values())
        payload = sum(len(data) for got in received.values() for data, _ in got)
        print(f"offer {len(offer)} bytes; {packets} packets ({payload} bytes of payload) to {len(hit)} victim "
              f"ports within {time.monotonic() - sent_at:.1f} s")
        assert hit <= set(ports[:16])                              # never a candidate past the cap
        assert packets <= 16 * 7                                   # aioice tries a pair 7 times at most
        ignored = metric(lab, whip_url, "splitrelay_transceiver_remote_candidates_ignored_total") - ignored_before
        assert ignored == 34
    finally:
        for sock in victims:
            sock.close()
