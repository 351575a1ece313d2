"""Real sockets across the lab: client -> relay (XDP, ip_forward=0) -> transceiver and back."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from splitrelay.bpf import consts
from splitrelay.wire import hint, stun
from splitrelay.edge.xdp.maps import XdpMaps
from splitrelay.lab.netns import in_netns

from .conftest import needs_root

pytestmark = needs_root
BACKEND_PORT = 5000


class EchoServer:
    """A transceiver stand-in: echoes every datagram and remembers who it came from."""

    def __init__(self, netns: str, ip: str, family: int = socket.AF_INET) -> None:
        def make() -> socket.socket:
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.bind((ip, BACKEND_PORT))
            return s

        self.sock = in_netns(netns, make)
        self.sock.settimeout(0.2)
        self.peers: set[tuple] = set()
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            self.peers.add(peer[:2])
            self.count += 1
            self.sock.sendto(data, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def client_socket(lab, family: int = socket.AF_INET) -> socket.socket:
    s = in_netns(lab.client.netns, lambda: socket.socket(family, socket.SOCK_DGRAM))
    s.settimeout(1.0)
    return s


def ping(sock: socket.socket, payload: bytes, dest: tuple) -> tuple[bytes, tuple]:
    sock.sendto(payload, dest)
    return sock.recvfrom(2048)


TRANSLATE = pytest.mark.parametrize("relay_lab", [False, True], ids=["dnat", "translate"], indirect=True)


@TRANSLATE
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_session_through_xdp_with_real_sockets(relay_lab, v6):
    lab, dp = relay_lab
    translating = dp.config().translate
    family = socket.AF_INET6 if v6 else socket.AF_INET
    t1, t2 = lab.transceivers
    servers = [EchoServer(t.netns, t.ip6 if v6 else t.ip4, family) for t in (t1, t2)]
    try:
        relay = (lab.relay_public.ip6 if v6 else lab.relay_public.ip4, lab.relay_port)
        dp.set_session("sessionOne", t2.backend_id)
        client = client_socket(lab, family)
        request = stun.build_binding_request("sessionOne:cli1")
        data, source = ping(client, request, relay)
        assert data == request and source[:2] == relay  # the client only ever sees the relay
        client_addr = (lab.client.ip6 if v6 else lab.client.ip4, client.getsockname()[1])
        if translating:                                   # the transceiver sees the relay's (address, flow port)
            port = dp.flow(client_addr).internal_port
            internal = lab.relay_internal.ip6 if v6 else lab.relay_internal.ip4
            assert servers[1].peers == {(internal, port)} and port
        else:
            assert servers[1].peers == {client_addr}     # the transceiver sees the real client
        assert servers[0].count == 0                      # and only the owner got it
        media = [bytes([0x80, 0x6F]) + i.to_bytes(4, "big") + b"\0" * 160 for i in range(200)]
        for packet in media:
            data, source = ping(client, packet, relay)
            assert data == packet and source[:2] == relay
        counters = dp.counters()
        assert counters["IN_FWD_STUN_UFRAG"].packets == 1
        assert counters["IN_FWD_FLOW"].packets == 200
        assert counters["OUT_FWD_CONFIRM"].packets == 1    # the echoed request: the backend's own check
        assert counters["OUT_FWD"].packets == 200
        flow = dp.flow(client_addr)
        assert flow.packets == 201 and flow.rx_packets == 201 and flow.backend_id == t2.backend_id
        client.close()
    finally:
        for s in servers:
            s.close()


def test_relay_forwards_nothing_in_its_kernel(relay_lab):
    lab, dp = relay_lab
    forward = lab.run(lab.relay_public.netns, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip()
    assert forward == "0"
    server = EchoServer(lab.transceivers[0].netns, lab.transceivers[0].ip4)
    try:
        client = client_socket(lab)
        client.settimeout(0.3)
        # unknown session: XDP drops it, and the kernel would not forward it either
        with pytest.raises(TimeoutError):
            ping(client, stun.build_binding_request("strangerX:cli1"), (lab.relay_public.ip4, 3478))
        # addressed straight at the transceiver: the relay's kernel does not route it
        with pytest.raises(TimeoutError):
            ping(client, b"\x80" * 40, (lab.transceivers[0].ip4, BACKEND_PORT))
        assert server.count == 0
        assert dp.counters()["IN_DROP_UNKNOWN_UFRAG"].packets == 1
        client.close()
    finally:
        server.close()


@pytest.mark.parametrize("relay_lab", [False, True, 2], ids=["dnat", "translate", "translate-2addrs"],
                         indirect=True)
def test_reload_and_agent_restart_lose_no_packet(relay_lab):
    """Ping-pong while the program is reloaded and a second loader adopts the pinned maps (and, translating,
    refills the port pool around the live flow's port, as a restarted agent does).  With two internal
    addresses, a first flow takes the first one, so the live flow holds a pair on the second."""
    lab, dp = relay_lab
    cfg = dp.config()
    translating = cfg.translate
    t1 = lab.transceivers[0]
    server = EchoServer(t1.netns, t1.ip4)
    dp.set_session("reloadTest", t1.backend_id)
    relay = (lab.relay_public.ip4, lab.relay_port)
    internal_ip = lab.relay_internal.ip4
    if cfg.internal_more:   # the pool interleaves the sets: the next flow gets the second address
        first = client_socket(lab)
        ping(first, stun.build_binding_request("reloadTest:cli0"), relay)
        first.close()
        internal_ip = cfg.internal_more[0]
    client = client_socket(lab)
    sent = received = 0
    done = threading.Event()

    def traffic() -> None:
        nonlocal sent, received
        ping(client, stun.build_binding_request("reloadTest:cli1"), relay)
        deadline = time.monotonic() + 20
        while not done.is_set() and time.monotonic() < deadline and sent < 20000:
            packet = bytes([0x80, 0x6F]) + sent.to_bytes(4, "big") + b"\0" * 100
            sent += 1
            try:
                data, _ = ping(client, packet, relay)
                received += data == packet
            except TimeoutError:
                pass

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        swaps = 0
        for _ in range(3):
            before = sent
            while sent < before + 200 and worker.is_alive():  # traffic is flowing between swaps
                time.sleep(0.01)
            in_netns(lab.relay_public.netns, dp.reload)
            swaps += 1
            restarted = XdpMaps(instance=dp.instance)  # what a restarted agent does
            in_netns(lab.relay_public.netns, restarted.load)
            if translating:
                in_netns(lab.relay_public.netns, restarted.ports.refill)
            in_netns(lab.relay_public.netns,
                     lambda r=restarted: r.attach(lab.relay_public.ifname, lab.relay_internal.ifname, "native"))
            swaps += 1
        before = sent
        while sent < before + 200 and worker.is_alive():
            time.sleep(0.01)
    finally:
        done.set()
        worker.join()
        server.close()
        client.close()
    print(f"\nreload/restart: {sent} packets sent, {received} echoed, across {swaps} program swaps")
    assert swaps == 6 and sent > 1000
    assert received == sent, f"lost {sent - received} of {sent} packets across {swaps} program swaps"
    if translating:   # every refill skipped the live flow's port: the transceiver saw one peer throughout
        assert len({peer for peer in server.peers if peer[0] == internal_ip}) == 1
        assert len(server.peers) == 1 + bool(cfg.internal_more)


def test_stolen_ufrag_flood_cannot_crowd_out_a_live_call(relay_lab):
    """A bounded flood of Binding Requests with a live session's ufrag from many ports, and of
    forged routing hints, while the real client keeps talking."""
    lab, dp = relay_lab
    t1 = lab.transceivers[0]
    server = EchoServer(t1.netns, t1.ip4)
    relay = (lab.relay_public.ip4, lab.relay_port)
    dp.set_session("victimSess", t1.backend_id)
    client = client_socket(lab)
    flooders = [client_socket(lab) for _ in range(100)]
    try:
        ping(client, stun.build_binding_request("victimSess:cli1"), relay)
        stolen = stun.build_binding_request("victimSess:evil")
        forged = stun.build_binding_request(hint.encode(t1.backend_id) + ":evil")
        lost = 0
        for round_ in range(20):                       # 20 x 100 stolen + 20 x 100 forged requests
            for s in flooders:
                s.sendto(stolen, relay)
                s.sendto(forged, relay)
            packet = bytes([0x80, 0x6F]) + round_.to_bytes(4, "big") + b"\0" * 100
            try:
                data, _ = ping(client, packet, relay)
                lost += data != packet
            except TimeoutError:
                lost += 1
        assert lost == 0
        # this backend is an echo, so it "answers" the flooders' checks too (a transceiver answers only
        # checks with the session's password): even so they get no more than the session's allowance of
        # flows that carry media, real flow included, plus the ring of pending ones a request opens
        victim_flows = [f for f in dp.flows() if f.ufrag == "victimSess"]
        confirmed = [f for f in victim_flows if not f.pending]
        assert len(confirmed) <= 4
        assert len(victim_flows) - len(confirmed) <= consts.PENDING_FLOWS
        real = dp.flow((lab.client.ip4, client.getsockname()[1]))
        assert real is not None and not real.pending
        counters = dp.counters()
        assert counters["IN_DROP_UNKNOWN_UFRAG"].packets == 2000   # strict: forged hints open nothing
        assert len(dp.flows()) == len(victim_flows)                 # and nothing else entered the table
    finally:
        server.close()
        client.close()
        for s in flooders:
            s.close()
