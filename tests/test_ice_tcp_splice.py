"""The in-kernel ICE-TCP splice (bpf/tcp_splice.c, edge/ice_tcp_splice.py): what this kernel does with it.

Real sockets on a private namespace's loopback, the real verdict programs: a
client's TCP connection spliced to a UDP socket toward a UDP echo (the
transceiver's place).  The last test is one reason the agent does not use it; the other (a client that
sends and does not read stalls or misframes the splice) showed in varying forms from run to run, so it
is described in DESIGN.md rather than tested.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import subprocess
import threading
import time

import pytest

from splitrelay.edge.ice_tcp_limits import MAX_FRAME
from splitrelay.edge.ice_tcp_splice import read_exactly as _read_exactly
from tests.netns import private_netns

pytestmark = pytest.mark.skipif(__import__("os").geteuid() != 0, reason="loads BPF programs (root)")

SIOCOUTQ, FIONREAD = 0x5411, 0x541B


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def _wait(predicate, timeout: float = 10.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture
def spliced():
    """(splice, client TCP socket, relay-side TCP socket, relay-side UDP socket, echo socket), paired;
    the echo sends every datagram back."""
    from splitrelay.edge.ice_tcp_splice import Splice

    with private_netns():
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        splice = Splice(max_pairs=64)
        echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        echo.bind(("127.0.0.1", 0))
        echo.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        echo.settimeout(0.2)
        running = [True]

        def reflect() -> None:
            while running[0]:
                try:
                    data, addr = echo.recvfrom(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                echo.sendto(data, addr)

        thread = threading.Thread(target=reflect, daemon=True)
        thread.start()
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen()
        client = socket.create_connection(server.getsockname(), timeout=5)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        relay_tcp, _ = server.accept()
        relay_tcp.setblocking(False)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        udp.connect(echo.getsockname())
        splice.pair(relay_tcp, udp)
        try:
            yield splice, client, relay_tcp, udp, echo
        finally:
            running[0] = False
            thread.join(2)
            for sock in (client, relay_tcp, udp, echo, server):
                sock.close()


def test_the_splice_carries_frames_both_ways_with_the_length_popped_and_pushed(spliced):
    splice, client, relay_tcp, _udp, _echo = spliced
    for seq in range(50):
        packet = bytes([0x80, 0x6F]) + struct.pack("!I", seq) + bytes(166)
        client.sendall(_frame(packet))
        size = int.from_bytes(_read_exactly(client, 2), "big")
        assert _read_exactly(client, size) == packet   # the echo got exactly the packet, no length bytes
    assert splice.stats() | {"unpaired": 0} == {"spliced_in": 50, "spliced_out": 50, "unpaired": 0,
                                                 "desynced": 0, "passed": 0, "bad": 0}
    with pytest.raises(BlockingIOError):   # nothing reached the relay's process
        relay_tcp.recv(100)


def test_a_connection_reaches_only_its_own_transceiver_socket(spliced):
    """Each verdict redirects by the receiving socket's own cookie: what one caller sends cannot be
    steered into another caller's pair, whatever it contains."""
    splice, client, _relay_tcp, _udp, _echo = spliced
    other_backend = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other_backend.bind(("127.0.0.1", 0))
    other_backend.settimeout(0.3)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    other_client = socket.create_connection(server.getsockname(), timeout=5)
    other_tcp, _ = server.accept()
    other_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other_udp.bind(("127.0.0.1", 0))
    other_udp.connect(other_backend.getsockname())
    try:
        splice.pair(other_tcp, other_udp)
        for seq in range(20):
            packet = bytes([0x80, 0x6F]) + struct.pack("!I", seq) + bytes(100)
            client.sendall(_frame(packet))
            size = int.from_bytes(_read_exactly(client, 2), "big")
            assert _read_exactly(client, size) == packet
        with pytest.raises(TimeoutError):
            other_backend.recv(2048)
        other_client.settimeout(0.3)
        with pytest.raises(TimeoutError):
            other_client.recv(10)
    finally:
        for sock in (other_backend, server, other_client, other_tcp, other_udp):
            sock.close()


def test_a_frame_split_across_segments_desyncs_the_connection_and_the_process_frames_it(spliced):
    from splitrelay.edge.ice_tcp_splice import _sweep, cookie

    splice, client, relay_tcp, udp, _echo = spliced
    packet = bytes([0x80, 0x6F]) + bytes(300)
    framed = _frame(packet)
    client.sendall(framed[:100])   # TCP_NODELAY: two segments, neither one whole frame
    assert _wait(lambda: splice.stats()["desynced"] == 1)
    client.sendall(framed[100:])
    assert _wait(lambda: splice.stats()["passed"] == 1)
    relay_udp_echo = bytearray()
    assert _sweep(splice, relay_tcp, udp, cookie(relay_tcp), relay_udp_echo)   # the bench bridge's fallback
    size = int.from_bytes(_read_exactly(client, 2), "big")   # its echo is still spliced back
    assert _read_exactly(client, size) == packet
    assert splice.stats()["spliced_in"] == 0


def test_an_oversized_or_unframed_first_read_is_passed_up_never_sent_on(spliced):
    splice, client, relay_tcp, _udp, _echo = spliced
    client.sendall((MAX_FRAME + 1).to_bytes(2, "big") + bytes(MAX_FRAME + 1))
    assert _wait(lambda: splice.stats()["desynced"] == 1)
    assert splice.stats()["spliced_in"] == 0
    assert len(relay_tcp.recv(65536)) > 0   # the process gets it (and would close it as "oversized")


def test_a_datagram_longer_than_a_frame_from_the_transceiver_side_is_dropped(spliced):
    splice, client, _relay_tcp, udp, echo = spliced
    echo.sendto(bytes(MAX_FRAME + 1), udp.getsockname())
    assert _wait(lambda: splice.stats()["bad"] == 1)
    client.settimeout(0.3)
    with pytest.raises(TimeoutError):
        client.recv(10)


def _flood_a_client_that_does_not_read(splice, client: socket.socket, udp: socket.socket,  # noqa: ANN001
                                      echo: socket.socket, count: int, packet: bytes) -> None:
    """The transceiver's side sends ``count`` datagrams toward a client that reads nothing (as media
    would flow to a caller that stopped reading), and the verdict has framed every one of them."""
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for n in range(count):
        echo.sendto(packet, udp.getsockname())
        if n % 500 == 499:   # the UDP socket's receive buffer must not overflow before the verdict runs
            assert _wait(lambda n=n: splice.stats()["spliced_out"] > n - 250, timeout=10)
    assert _wait(lambda: splice.stats()["spliced_out"] >= count, timeout=30)


def _skb_heads() -> int:
    """Socket buffers allocated on the machine (/proc/slabinfo skbuff_head_cache, active objects)."""
    for line in open("/proc/slabinfo"):
        if line.startswith("skbuff_head_cache "):
            return int(line.split()[1])
    raise AssertionError("no skbuff_head_cache in /proc/slabinfo")


def test_a_client_that_never_reads_queues_the_transceivers_replies_in_the_kernel_without_bound(spliced):
    """Why the agent keeps its userspace bridge (MAX_PENDING 256 KiB per connection): spliced, every
    reply toward a client that does not read waits in the TCP socket's psock queue, beyond its send
    buffer and outside every socket memory limit (measured 2026-12-07 on 6.18: 100,000 1 KB replies
    held 244 MB of slab until the connection closed).  If a kernel ever bounds it, this fails: re-measure."""
    splice, client, relay_tcp, udp, echo = spliced
    count, packet = 20000, bytes([0x80, 0x6F]) + bytes(1000)   # 20 MB; the send buffer grows to 4 MB
    heads = _skb_heads()
    _flood_a_client_that_does_not_read(splice, client, udp, echo, count, packet)
    held = struct.unpack("i", fcntl.ioctl(relay_tcp, SIOCOUTQ, b"\0" * 4))[0]   # the TCP socket's own queue
    held += struct.unpack("i", fcntl.ioctl(client, FIONREAD, b"\0" * 4))[0]
    assert struct.unpack("i", fcntl.ioctl(udp, FIONREAD, b"\0" * 4))[0] == 0   # not waiting in UDP either
    assert held < count * len(packet) // 4   # the socket limits hold a quarter of it at most ...
    assert splice.stats()["bad"] == 0
    assert _skb_heads() - heads > count // 2   # ... the rest waits in socket buffers nothing limits
