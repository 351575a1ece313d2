"""ICE-TCP spliced in the kernel (issue 20): a bench-only experiment beside the agent's userspace bridge.

``bpf/tcp_splice.c`` carries RFC 4571 frames between a client's TCP connection
and its UDP socket toward the transceiver with sockhashes and ``sk_skb``
verdicts, so after the first frame no packet wakes a process.  The agent does
not use it: measured against ``edge/ice_tcp.py`` in one run
(``python -m splitrelay.bench.ice_tcp_path --splice``, BENCHMARKS.md), and what
this kernel (6.18) allows and refuses is written down in that C file and in
DESIGN.md.  This module is the smallest thing that runs it: ``Splice`` loads
and pairs sockets; ``serve`` is a one-backend splicing bridge (first frame
read here, then the kernel carries; a connection whose stream stops lining up
with skbs falls back to framing here) for the benchmark's relay namespace.

    python -m splitrelay.edge.ice_tcp_splice --listen IP:PORT --bind IP --backend IP:PORT
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes as ct
import json
import os
import select
import signal
import socket
import struct
import sys
import time

from splitrelay.bpf import SOURCE_DIR
from splitrelay.edge.ice_tcp_limits import MAX_FRAME
from splitrelay.errors import SplitrelayError

SO_COOKIE = 57                       # asm-generic/socket.h
SK_SKB_VERDICT = 38                  # enum bpf_attach_type BPF_SK_SKB_VERDICT (bcc 0.26 names it too)
SWEEP_S = 0.05                       # how often the benchmark's bridge looks at its spliced connections
STATS = ("spliced_in", "spliced_out", "unpaired", "desynced", "passed", "bad")   # tcp_splice.c S_*


class SpliceError(SplitrelayError):
    """The splice could not be loaded or a socket not paired (one-line reason)."""


def cookie(sock: socket.socket) -> int:
    return struct.unpack("Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


class Splice:
    """tcp_splice.c loaded, its two verdicts attached to its two sockhashes."""

    def __init__(self, max_pairs: int = 65536) -> None:
        from bcc import BPF
        from bcc.libbcc import lib

        self._lib = lib
        try:
            self.bpf = BPF(src_file=str(SOURCE_DIR / "tcp_splice.c").encode(),
                           cflags=[f"-DSPLICE_MAX_FRAME={MAX_FRAME}", f"-DSPLICE_PAIRS={max_pairs}"])
            self.tcp_fn = self.bpf.load_func(b"tcp_verdict", BPF.SK_SKB)
            self.udp_fn = self.bpf.load_func(b"udp_verdict", BPF.SK_SKB)
        except Exception as exc:
            raise SpliceError(f"cannot load {SOURCE_DIR / 'tcp_splice.c'}: {exc}") from exc
        self.udp_of_tcp = lib.bpf_table_fd(self.bpf.module, b"udp_of_tcp")   # bcc 0.26 has no SOCKHASH Table
        self.tcp_of_udp = lib.bpf_table_fd(self.bpf.module, b"tcp_of_udp")
        BPF.attach_func(self.tcp_fn, self.tcp_of_udp, SK_SKB_VERDICT)   # TCP sockets are tcp_of_udp's values
        BPF.attach_func(self.udp_fn, self.udp_of_tcp, SK_SKB_VERDICT)
        self.program_ids = [self._prog_id(fn.fd) for fn in (self.tcp_fn, self.udp_fn)]

    @staticmethod
    def _prog_id(fd: int) -> int:
        from splitrelay.bpf.syscall import prog_info
        return prog_info(fd).id

    def _put(self, map_fd: int, key: int, fd: int) -> None:
        k, v = ct.c_uint64(key), ct.c_int(fd)
        if self._lib.bpf_update_elem(map_fd, ct.byref(k), ct.byref(v), 0) < 0:
            raise SpliceError(f"cannot add a socket to a sockhash: {os.strerror(ct.get_errno())}")

    def pair(self, tcp: socket.socket, udp: socket.socket) -> None:
        """From now on the kernel carries this pair (the UDP socket first: no reply is framed before
        the TCP socket is in place to send it)."""
        self._put(self.udp_of_tcp, cookie(tcp), udp.fileno())
        self._put(self.tcp_of_udp, cookie(udp), tcp.fileno())

    def forget(self, tcp_cookie: int) -> None:
        """A closed connection's desync mark (the kernel drops closed sockets from the sockhashes)."""
        with contextlib.suppress(KeyError):
            del self.bpf[b"desynced"][ct.c_uint64(tcp_cookie)]

    def stats(self) -> dict:
        table = self.bpf[b"splice_stats"]
        return {name: table[ct.c_int(i)].value for i, name in enumerate(STATS)}


def read_exactly(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes from a stream socket (ConnectionError when it closes first)."""
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed in the middle of a frame")
        out += chunk
    return out


def _read_frame(sock: socket.socket) -> bytes:
    size = int.from_bytes(read_exactly(sock, 2), "big")
    if not 0 < size <= MAX_FRAME:
        raise ConnectionError("oversized first frame")
    return read_exactly(sock, size)


def serve(listen: tuple[str, int], bind_ip: str, backend: tuple[str, int], ready=None,  # noqa: ANN001
          stop=None, sweep_s: float = SWEEP_S) -> Splice:  # noqa: ANN001
    """One backend, no routing (a benchmark's bridge, not the agent's): accept, read the first frame,
    pair, send it; then every ``sweep_s`` look at each spliced connection for passed data (a desynced
    one, framed here) and its end.  Not epoll: after every skb the kernel wakes the socket's waiters
    (sk_psock_verdict_data_ready), and a spliced socket always polls readable (the popped length
    bytes are never counted as read), so waiting on it costs a wakeup per frame: measured ~10 us of
    this process per relayed packet, as much as the userspace bridge's work."""
    splice = Splice()
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(listen)
    server.listen(1024)
    conns: list[tuple[socket.socket, socket.socket, int, bytearray]] = []
    if ready:
        ready(splice)
    next_sweep = time.monotonic() + sweep_s
    while not (stop and stop()):
        if select.select([server], [], [], max(0.0, next_sweep - time.monotonic()))[0]:
            tcp, _ = server.accept()
            tcp.settimeout(5.0)
            try:
                first = _read_frame(tcp)
            except (OSError, ConnectionError):
                tcp.close()
                continue
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((bind_ip, 0))
            udp.connect(backend)
            tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tcp.setblocking(False)
            splice.pair(tcp, udp)
            udp.send(first)
            conns.append((tcp, udp, cookie(tcp), bytearray()))
        if time.monotonic() >= next_sweep:
            next_sweep = time.monotonic() + sweep_s
            conns = [conn for conn in conns if _sweep(splice, *conn)]
    return splice


def _sweep(splice: Splice, tcp: socket.socket, udp: socket.socket, tcp_cookie: int, buf: bytearray) -> bool:
    """Frame what the kernel passed up (a desynced connection) and send it on; False once it ended."""
    for _ in range(64):
        try:
            data = tcp.recv(65536)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            splice.forget(tcp_cookie)
            tcp.close()
            udp.close()
            return False
        buf += data
        while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
            size = int.from_bytes(buf[:2], "big")
            with contextlib.suppress(OSError):
                udp.send(buf[2:2 + size])
            del buf[:2 + size]
    return True


def main(argv: list[str] | None = None) -> int:
    def address(text: str) -> tuple[str, int]:
        host, port = text.rsplit(":", 1)
        return host, int(port)

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=address, required=True, help="IP:PORT for the clients' TCP")
    parser.add_argument("--bind", required=True, help="the relay's internal address for the UDP sockets")
    parser.add_argument("--backend", type=address, required=True, help="IP:PORT of the one transceiver")
    args = parser.parse_args(argv)

    def ready(splice: Splice) -> None:
        print(f"ready {' '.join(map(str, splice.program_ids))}", flush=True)

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    try:
        splice = serve(args.listen, args.bind, args.backend, ready, stop=lambda: bool(stopping))
    except SpliceError as exc:
        print(f"ice_tcp_splice: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(splice.stats()), flush=True)   # the benchmark reads this last line
    return 0


if __name__ == "__main__":
    sys.exit(main())
