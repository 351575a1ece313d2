"""The lab's impairment forwarder (lab/impair.py): it delays, jitters and drops what it says, no more.

Real frames between the lab's client and relay namespaces through the forwarder's
own namespace; every assertion is on counts, order and lower bounds of delay
(upper bounds are the machine's business, not the tool's).
"""

from __future__ import annotations

import socket
import struct
import time

import pytest
from splitrelay.lab import impair, procs
from splitrelay.lab.impair import Impairment, read_stats, set_impairment
from splitrelay.lab.netns import LabError
from splitrelay.lab.topology import Lab

from .conftest import needs_root
from .waiting import wait_for

pytestmark = [needs_root, pytest.mark.lab, pytest.mark.timeout(120)]

PORT = 9400
SO_RCVBUFFORCE = 33


@pytest.fixture(scope="module")
def link():
    lab = Lab.create(transceivers=1, impair=Impairment())
    try:
        yield lab
    finally:
        lab.destroy()


def exchange(lab: Lab, count: int, gap_s: float = 0.0, echo: bool = False,
             quiet_s: float = 1.0) -> list[tuple[int, float]]:
    """Send ``count`` numbered datagrams client -> relay; (number, one-way seconds) of each that arrived.
    With ``echo`` the relay answers each, and the answers are what is counted (round trip)."""
    server = lab.socket_in(lab.relay_public.netns)
    server.bind((lab.relay_public.ip4, PORT))
    client = lab.socket_in(lab.client.netns)
    client.bind((lab.client.ip4, 0))
    for sock in (server, client):   # room for the whole burst: the test reads only after sending
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
    got = []
    try:
        for n in range(count):
            client.sendto(struct.pack("!Id", n, time.monotonic()), (lab.relay_public.ip4, PORT))
            if gap_s:
                time.sleep(gap_s)
        receiver = client if echo else server
        receiver.settimeout(quiet_s)
        while len(got) < count:
            if echo:
                server.settimeout(quiet_s)
                try:
                    data, peer = server.recvfrom(64)
                except TimeoutError:
                    break
                server.sendto(data, peer)
            try:
                data, _ = receiver.recvfrom(64)
            except TimeoutError:
                break
            n, sent = struct.unpack("!Id", data)
            got.append((n, time.monotonic() - sent))
    finally:
        server.close()
        client.close()
    return got


def settle(lab: Lab, sent: int, before: dict) -> dict:
    """UDP counters of each direction since ``before``, once the forwarder has seen all ``sent`` frames
    client -> relay (it writes its stats every 0.2 s)."""
    def delta() -> dict | None:
        now = read_stats(lab, "relay1")
        diff = {d: {k: now[d][k] - before[d][k] for k in ("received", "forwarded", "lost", "overflow")}
                for d in now}
        return diff if diff["ab"]["received"] == sent and now["ab"]["queued"] == 0 else None
    return wait_for(delta, 5, "the forwarder's stats")


def test_every_frame_is_held_at_least_the_delay_and_the_other_way_is_not_impaired(link):
    set_impairment(link, "relay1", Impairment(delay_ms=40, directions="ab"))
    before = read_stats(link, "relay1")
    got = exchange(link, 20, gap_s=0.01)
    assert [n for n, _ in got] == list(range(20))
    assert min(one_way for _, one_way in got) >= 0.040
    delta = settle(link, 20, before)
    assert delta["ab"] == {"received": 20, "forwarded": 20, "lost": 0, "overflow": 0}
    assert delta["ba"]["received"] == 0     # nothing came back, and "ab" leaves the other way alone


def test_jitter_varies_the_delay_but_keeps_the_order(link):
    set_impairment(link, "relay1", Impairment(delay_ms=20, jitter_ms=15, seed=7))
    got = exchange(link, 40, gap_s=0.005)
    assert [n for n, _ in got] == list(range(40))                # in order, none lost
    delays = [one_way for _, one_way in got]
    assert min(delays) >= 0.005                                   # delay - jitter
    assert max(delays) - min(delays) > 0.005                      # it does vary


def test_random_loss_drops_about_what_it_says_and_counts_every_frame(link):
    set_impairment(link, "relay1", Impairment(loss=0.25, seed=11))
    before = read_stats(link, "relay1")
    got = exchange(link, 400, gap_s=0.0005, quiet_s=0.5)
    delta = settle(link, 400, before)
    assert delta["ab"]["lost"] + delta["ab"]["forwarded"] == 400
    assert delta["ab"]["forwarded"] == len(got)                  # what it forwarded arrived, nothing else
    assert 60 <= delta["ab"]["lost"] <= 140                       # binomial(400, 0.25): 100 ± 4.6 sd


def test_the_queue_is_bounded_and_what_overflows_is_counted(link):
    set_impairment(link, "relay1", Impairment(delay_ms=300, queue=5))
    before = read_stats(link, "relay1")
    got = exchange(link, 50, quiet_s=1.0)
    delta = settle(link, 50, before)
    assert read_stats(link, "relay1")["ab"]["peak"] == 5
    assert delta["ab"]["overflow"] >= 1
    assert delta["ab"]["forwarded"] + delta["ab"]["overflow"] == 50 and delta["ab"]["forwarded"] == len(got)


def test_tcp_crosses_unimpaired_unless_asked_and_then_is_held_like_udp(link):
    """ICE-TCP's head-of-line blocking is measured through this (bench/ice_tcp_path.py --loss)."""
    def tcp_exchange() -> float:
        server = link.socket_in(link.relay_public.netns, type=socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # the last exchange's TIME_WAIT
        server.bind((link.relay_public.ip4, PORT + 1))
        server.listen()
        client = link.socket_in(link.client.netns, type=socket.SOCK_STREAM)
        try:
            start = time.monotonic()
            client.connect((link.relay_public.ip4, PORT + 1))   # the SYN crosses "ab"
            took = time.monotonic() - start
            conn, _ = server.accept()
            client.sendall(b"x" * 100)
            assert conn.recv(100)
            conn.close()
            return took
        finally:
            client.close()
            server.close()

    def received_ab() -> int:
        time.sleep(impair.STATS_EVERY * 2)   # the forwarder writes its stats every 0.2 s
        return read_stats(link, "relay1")["ab"]["received"]

    set_impairment(link, "relay1", Impairment(delay_ms=40, directions="ab"))
    before = received_ab()
    tcp_exchange()
    assert received_ab() == before                 # not one TCP frame was counted, let alone held
    set_impairment(link, "relay1", Impairment(delay_ms=40, directions="ab", tcp=True))
    before = received_ab()
    assert tcp_exchange() >= 0.040                 # the SYN was held
    assert received_ab() - before >= 3             # SYN, ACK, data at least


def test_the_forwarder_stops_by_itself_after_its_lifetime(link):
    entry = link.impaired["relay1"]
    procs.signal_group(entry["pid"], 15)
    assert procs.wait_exit(entry["pid"], 10.0)
    stats = impair.stats_path(link, "relay1")
    stats.unlink()
    proc = link.popen(entry["netns"], impair.argv(impair.config_path(link, "relay1"), stats, lifetime=1.0))
    entry["pid"] = proc.pid
    assert proc.wait(timeout=15) == 0
    assert stats.exists()


def test_bad_impairments_are_refused_in_one_line():
    with pytest.raises(LabError) as exc:
        Impairment(loss=2)
    assert str(exc.value) == "loss is a probability 0..1, got 2"
    with pytest.raises(LabError, match="directions must be one of both, ab, ba, got 'up'"):
        Impairment(directions="up")
    with pytest.raises(LabError, match="queue must hold 1..1000000 frames, got 0"):
        Impairment(queue=0)
