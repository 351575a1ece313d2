"""bench/udpgen, the benchmark's C load generator, and its Python wrapper bench/loadgen.py.

The benchmark trusts udpgen's counts, so these tests hold it to independent
witnesses: the kernel (a UDP datagram with a bad checksum never reaches a
socket), a raw capture checked field by field in Python, and the project's
reference STUN parser.  All traffic runs between two namespaces of this test
module joined by one veth pair with private addresses; nothing touches the
host's interfaces.  Every udpgen run is bounded by --duration/--count and every
process is killed by PID when a test ends, pass or fail.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import struct
import subprocess
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pnetns
from splitrelay.bench import loadgen
from splitrelay.bench.loadgen import LoadgenError
from splitrelay.wire import stun
from splitrelay.wire.udp import internet_checksum
from splitrelay.lab.netns import in_netns, netns_socket

from .conftest import TEST_STEM, needs_root
from .packets import checksums_valid, udp_frame

pytestmark = [needs_root, pytest.mark.timeout(60)]

GEN_IP, SINK_IP = "10.201.0.1", "10.201.0.2"
GEN_IP6, SINK_IP6 = "fd00:201::1", "fd00:201::2"
IFA_F_NODAD = 0x02
FLOW_NET = "10.201.1.0/24"          # packet-mode source addresses; the sink routes them back via GEN_IP
FLOW_BASE_IP = "10.201.1.1"
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
PRIORITY = 0x6E0001FF               # what udpgen puts in PRIORITY


@dataclass
class Net:
    """Generator namespace --veth-- sink namespace."""

    gen: str
    sink: str
    gen_if: str
    sink_if: str
    gen_mac: str
    sink_mac: str


def _ipr(netns: str, fn):
    def call():
        with IPRoute() as ipr:
            return fn(ipr)
    return in_netns(netns, call)


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    """Two namespaces named with this run's stem (the session leak check finds them) and a veth between them."""
    tag = secrets.token_hex(3)
    prefix = f"{TEST_STEM}{tag}"
    gen, sink = f"{prefix}-g", f"{prefix}-s"
    gen_if, sink_if = f"ug{tag}", f"ug{tag}s"
    made: list[str] = []
    try:
        for ns in (gen, sink):
            pnetns.create(ns)
            made.append(ns)
        peer = os.open(f"/run/netns/{sink}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            # created inside the generator namespace with its peer already in the sink's: never on the host
            _ipr(gen, lambda ipr: ipr.link("add", ifname=gen_if, kind="veth",
                                           peer={"ifname": sink_if, "net_ns_fd": peer}))
        finally:
            os.close(peer)

        def side(ifname: str, address: str, address6: str, route: tuple[str, str] | None):
            def configure(ipr: IPRoute) -> str:
                for dev in ("lo", ifname):
                    ipr.link("set", index=ipr.link_lookup(ifname=dev)[0], state="up")
                index = ipr.link_lookup(ifname=ifname)[0]
                ipr.addr("add", index=index, address=address, prefixlen=24)
                # no DAD: usable at once, and nobody else is on this link
                ipr.addr("add", index=index, address=address6, prefixlen=64, flags=IFA_F_NODAD)
                if route:
                    ipr.route("add", dst=route[0], gateway=route[1])
                return ipr.get_links(index)[0].get_attr("IFLA_ADDRESS")
            return configure

        gen_mac = _ipr(gen, side(gen_if, GEN_IP, GEN_IP6, None))
        sink_mac = _ipr(sink, side(sink_if, SINK_IP, SINK_IP6, (FLOW_NET, GEN_IP)))
        yield Net(gen, sink, gen_if, sink_if, gen_mac, sink_mac)
    finally:
        for ns in made:
            pnetns.remove(ns)  # takes the veth with it


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts; any still running at the end is killed by PID and reaped."""
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def udpgen(*args: str, netns: str | None = None, timeout: float = 15) -> subprocess.CompletedProcess:
    cmd = [str(loadgen.udpgen_path()), *args]
    if netns:
        cmd = ["nsenter", f"--net=/run/netns/{netns}", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


class Capture:
    """Frames arriving on the sink's veth, read back after the traffic (a big receive buffer holds them)."""

    def __init__(self, net: Net) -> None:
        self.sock = netns_socket(net.sink, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE (root): keep every frame
        self.sock.bind((net.sink_if, ETH_P_IP))
        self.sock.setblocking(False)

    def frames(self) -> list[bytes]:
        out = []
        while True:
            try:
                frame, addr = self.sock.recvfrom(65536)
            except BlockingIOError:
                return out
            if addr[2] != PACKET_OUTGOING:  # the sink's own answers leave through here too
                out.append(frame)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def capture(net: Net) -> Iterator[Capture]:
    cap = Capture(net)
    try:
        yield cap
    finally:
        cap.close()


def ones_sum(data: bytes) -> int:
    return ~internet_checksum(data) & 0xFFFF


def parse_udp(frame: bytes) -> tuple[str, int, str, int, bytes, bool]:
    """(src ip, src port, dst ip, dst port, payload, both checksums verify) of an Ethernet/IPv4/UDP frame."""
    assert frame[12:14] == b"\x08\x00" and frame[14] == 0x45 and frame[23] == socket.IPPROTO_UDP
    ip = frame[14:34]
    udp_len = struct.unpack_from("!H", frame, 38)[0]
    udp = frame[34:34 + udp_len]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, socket.IPPROTO_UDP, udp_len)
    ok = ones_sum(ip) == 0xFFFF and struct.unpack_from("!H", udp, 6)[0] != 0 and ones_sum(pseudo + udp) == 0xFFFF
    sport, dport = struct.unpack_from("!HH", udp)
    return socket.inet_ntoa(ip[12:16]), sport, socket.inet_ntoa(ip[16:20]), dport, udp[8:], ok


def udp_csum_errors(netns: str) -> int:
    def read() -> int:
        # /proc/thread-self: this thread's namespace (/proc/net follows the process's main thread)
        snmp = Path("/proc/thread-self/net/snmp").read_text().splitlines()
        rows = [line.split() for line in snmp if line.startswith("Udp:")]
        return int(dict(zip(rows[0], rows[1], strict=True))["InCsumErrors"])
    return in_netns(netns, read)


def expected_request(username: str, request: bytes) -> bytes:
    """What the reference builder makes with udpgen's transaction id: USERNAME, PRIORITY, FINGERPRINT."""
    return stun.build_message(stun.BINDING_REQUEST,
                              [(stun.ATTR_USERNAME, username.encode()),
                               (stun.ATTR_PRIORITY, struct.pack("!I", PRIORITY))],
                              transaction_id=request[8:20], fingerprint=True)


# -- command line and wrapper ----------------------------------------------------------------

@pytest.mark.parametrize("args", [
    [],
    ["blast"],
    ["send"],
    ["sink"],
    ["sink", "--bind", "10.0.0.1"],
    ["sink", "--bind", "10.0.0.1:70000"],
    ["sink", "--bind", "::1:5000"],
    ["sink", "--bind", "10.0.0.1:5", "--flows", "3"],
    ["sink", "--bind", "10.0.0.1:5", "--bogus"],
    ["sink", "--bind", "10.0.0.1:5", "extra"],
    ["sink", "--bind", "10.0.0.1:5", "--duration"],
    ["send", "--dst", "10.0.0.1:5", "--size", "27"],
    ["send", "--dst", "10.0.0.1:5", "--batch", "1025"],
    ["send", "--dst", "10.0.0.1:5", "--flows", "0"],
    ["send", "--dst", "10.0.0.1:5", "--rate", "fast"],
    ["send", "--dst", "10.0.0.1:0"],
    ["send", "--dst", "10.0.0.1:5", "--stun-username", "a:b", "--usernames", "/dev/null"],
    ["send", "--dst", "10.0.0.1:5", "--src-port", "65000", "--flows", "1000"],
    ["send", "--dst", "10.0.0.1:5", "--shuffle"],
    ["send", "--dst", "10.0.0.1:5", "--iface", "lo"],
    ["send", "--dst", "[fd00::1]:5", "--iface", "lo", "--src-mac", "02:00:00:00:00:01",
     "--dst-mac", "02:00:00:00:00:02", "--src-ip", "fd00::2"],
    ["send", "--dst", "10.0.0.1:5", "--iface", "lo", "--src-mac", "02:00:00:00:00:01",
     "--dst-mac", "02:00:00:00:00:02"],
    ["send", "--dst", "10.0.0.1:5", "--iface", "lo", "--src-mac", "02:00:00:00:00:01",
     "--dst-mac", "nope", "--src-ip", "10.0.0.2"],
    ["send", "--dst", "10.0.0.1:5", "--src-ip", "fd00::2"],
    ["ping", "--dst", "10.0.0.1:5", "--new-flow-each"],
    ["ping", "--dst", "10.0.0.1:5", "--count", "0"],
    ["ping", "--dst", "10.0.0.1:5", "--stun-username", ""],
], ids=lambda args: " ".join(args) or "no-mode")
def test_usage_errors_exit_2_with_one_line(args):
    done = udpgen(*args)
    assert done.returncode == 2, done
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("udpgen: "), done.stderr


def test_help_explains_every_mode_and_option():
    done = udpgen("--help")
    assert done.returncode == 0
    source = (loadgen.BENCH_DIR / "udpgen.c").read_text()
    table = source[source.index("OPTS[O_NUM]"):]
    table = table[:table.index("\n};")]
    options = re.findall(r'\] = \{ "([a-z-]+)"', table)
    assert len(options) > 20
    for option in options:
        assert f"--{option}" in done.stdout, option
    for mode in loadgen.MODES:
        assert f"\n{mode} " in done.stdout, mode


def test_runtime_errors_exit_1(net):
    taken = udpgen("send", "--dst", f"{SINK_IP}:9", "--iface", "nosuch0", "--src-mac", "02:00:00:00:00:01",
                   "--dst-mac", "02:00:00:00:00:02", "--src-ip", GEN_IP, netns=net.gen)
    assert taken.returncode == 1 and taken.stderr.startswith("udpgen: --iface nosuch0"), taken
    bind = udpgen("sink", "--bind", "192.0.2.1:5000", netns=net.sink)   # not an address of the namespace
    assert bind.returncode == 1 and "bind 192.0.2.1:5000" in bind.stderr and len(bind.stderr.splitlines()) == 1


def test_argv_turns_keywords_into_flags():
    cmd = loadgen.argv("send", dst="10.0.0.1:5", flows=64, answer_stun=True, src_port=None, shuffle=False,
                       duration=0.25, usernames=Path("/tmp/u"))
    assert cmd[0] == str(loadgen.udpgen_path()) and cmd[1] == "send"
    assert cmd[2:] == ["--dst", "10.0.0.1:5", "--flows", "64", "--answer-stun", "--duration", "0.25",
                       "--usernames", "/tmp/u"]
    with pytest.raises(LoadgenError):
        loadgen.argv("blast")
    with pytest.raises(LoadgenError):
        loadgen.argv("send", dst=["a", "b"])


def test_build_needs_make_and_gcc(tmp_path, monkeypatch):
    (tmp_path / "udpgen.c").write_text("int main(void) { return 0; }\n")
    monkeypatch.setattr(loadgen.shutil, "which", lambda tool: None)
    with pytest.raises(LoadgenError, match="make and gcc not installed"):
        loadgen.udpgen_path(tmp_path)


def test_stale_binary_is_rebuilt(tmp_path):
    for source in (*loadgen.BENCH_DIR.glob("udpgen*.[ch]"), loadgen.BENCH_DIR / "Makefile"):
        (tmp_path / source.name).write_bytes(source.read_bytes())
    built = loadgen.udpgen_path(tmp_path)
    first = built.stat().st_mtime_ns
    assert loadgen.udpgen_path(tmp_path).stat().st_mtime_ns == first        # fresh: not rebuilt
    for part in ("udpgen_send.c", "udpgen.h", "udpgen.c"):                   # any part edited after the build
        os.utime(tmp_path / part, ns=(first + 10**9, first + 10**9))
        assert loadgen.udpgen_path(tmp_path).stat().st_mtime_ns > first, part
        first = built.stat().st_mtime_ns


def test_wait_ready_reports_a_process_that_dies(net, tmp_path, procs):
    with loadgen.serve("sink", netns=net.sink, bind=f"{SINK_IP}:7000", duration=5):
        proc = loadgen.start("sink", netns=net.sink, bind=f"{SINK_IP}:7000", ready_file=tmp_path / "r", duration=5)
        procs.append(proc)
        with pytest.raises(LoadgenError, match="exited 1 before it was ready.*Address already in use"):
            loadgen.wait_ready(proc, tmp_path / "r", timeout=5)


# -- socket mode -----------------------------------------------------------------------------

def test_sink_counts_exactly_what_send_sent(net):
    # 20k pps for 0.2 s: ~4000 datagrams through one veth into a 32 MiB socket buffer, a load the
    # sink drains many times over, so nothing may be lost: the counts must match exactly.
    with loadgen.serve("sink", netns=net.sink, bind=f"{SINK_IP}:7001", duration=10) as sink:
        assert sink.address == f"{SINK_IP}:7001"
        sent = loadgen.run("send", netns=net.gen, dst=sink.address, flows=4, rate=20000, duration=0.2, size=120)
    got = sink.result
    assert 3000 <= sent["sent"] <= 4100 and sent["send_errors"] == 0, sent
    assert sent["flows"] == 4 and sent["flows_open"] is None and sent["stun_sent"] == 0
    assert 0.15 <= sent["elapsed_s"] <= 0.3 and 15000 <= sent["pps"] <= 21000, sent
    assert got["packets"] == sent["sent"] and got["bytes"] == 120 * sent["sent"], (sent, got)
    assert got["max_seq_gap"] == 0 and got["unique_flows"] == 4 and got["stun_answered"] == 0, got
    assert got["elapsed_s"] > 0.1 and got["pps"] > 0


def test_ipv6_sockets(net):
    with loadgen.serve("sink", netns=net.sink, bind=f"[{SINK_IP6}]:7020", answer_stun=True, duration=10) as sink:
        assert sink.address == f"[{SINK_IP6}]:7020"
        sent = loadgen.run("send", netns=net.gen, dst=sink.address, src_ip=GEN_IP6, flows=2, count=500,
                           stun_username="ABCD1234:wxyz", duration=5)
    assert sent["sent"] == 500 and sent["flows_open"] == 2, sent
    assert sink.result["packets"] == 500 and sink.result["unique_flows"] == 2 and sink.result["stun_answered"] == 2


def test_count_stops_the_sender_and_sink_idles_out(net):
    with loadgen.serve("sink", netns=net.sink, bind=f"{SINK_IP}:7002", duration=10, idle=0.2) as sink:
        sent = loadgen.run("send", netns=net.gen, dst=sink.address, flows=3, count=1000, batch=7, duration=5)
        # the sink ends by itself once data stopped for --idle: no signal needed
        result = loadgen.finish(sink.proc, timeout=5)
    assert sent["sent"] == 1000 and sent["elapsed_s"] < 2
    assert result["packets"] == 1000 and result["max_seq_gap"] == 0 and result["unique_flows"] == 3


def test_sink_reports_the_largest_seq_gap(net):
    sock = netns_socket(net.gen, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with loadgen.serve("sink", netns=net.sink, bind=f"{SINK_IP}:7003", duration=10) as sink:
            # gaps of 3 and 13 sequence numbers; going back (reordering) is not a gap
            for seq in (0, 1, 5, 6, 20, 7, 21):
                sock.sendto(b"\x80\x60\0\0" + struct.pack("!I", seq) + bytes(32), (SINK_IP, 7003))
            sock.sendto(b"\x01" + bytes(40), (SINK_IP, 7003))        # not data: no seq
    finally:
        sock.close()
    assert sink.result["packets"] == 8 and sink.result["max_seq_gap"] == 13, sink.result


def test_stun_opening_against_an_answering_sink(net):
    with loadgen.serve("sink", netns=net.sink, bind=f"{SINK_IP}:7004", answer_stun=True, duration=10) as sink:
        sent = loadgen.run("send", netns=net.gen, dst=sink.address, flows=16, stun_username="ABCD1234:wxyz",
                           count=1600, duration=5)
    assert sent["flows_open"] == 16 and sent["stun_sent"] == 16 and sent["sent"] == 1600, sent
    got = sink.result
    assert got["stun_answered"] == 16 and got["packets"] == 1600 and got["unique_flows"] == 16, got


def test_unanswered_stun_opening_is_reported_not_hung(net):
    with loadgen.serve("sink", netns=net.sink, bind=f"{SINK_IP}:7005", duration=10) as sink:  # does not answer
        sent = loadgen.run("send", netns=net.gen, dst=sink.address, flows=2, stun_username="ABCD1234:wxyz",
                           open_timeout=0.35, count=10, duration=5)
    # requests repeat every 100 ms: 4 rounds in 0.35 s (3 if the machine stalls)
    assert sent["flows_open"] == 0 and sent["sent"] == 10 and sent["stun_sent"] in (6, 8), sent
    assert sink.result["packets"] == 10 + sent["stun_sent"]  # a sink without --answer-stun counts STUN as data


def test_stun_request_parses_with_the_reference_parser(net, tmp_path):
    users = ["ABCD1234:wxyz", "Bq0+/9zZ:peer", "wxyzABCDEFGH:c"]
    (tmp_path / "users").write_text("\n".join(users) + "\n\n")
    sock = netns_socket(net.sink, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((SINK_IP, 7006))
        sock.settimeout(5)
        # ping opens its flow with the first username and repeats unanswered requests every 100 ms
        with pytest.raises(LoadgenError, match="no answer to the STUN Binding Request"):
            loadgen.run("ping", netns=net.gen, dst=f"{SINK_IP}:7006", usernames=tmp_path / "users",
                        open_timeout=0.25, count=1)
        requests = []
        sock.settimeout(0)
        while True:
            try:
                requests.append(sock.recv(2048))
            except BlockingIOError:
                break
    finally:
        sock.close()
    assert len(requests) == 3, requests
    for request in requests:
        assert stun.classify(request) == stun.STUN and stun.is_binding_request(request)
        assert stun.server_ufrag(request) == "ABCD1234"
        attrs = list(stun.iter_attributes(request))
        assert [a.type for a in attrs] == [stun.ATTR_USERNAME, stun.ATTR_PRIORITY, stun.ATTR_FINGERPRINT]
        assert attrs[0].value == users[0].encode()
        crc = (zlib.crc32(request[:-8]) ^ stun.FINGERPRINT_XOR) & 0xFFFFFFFF
        assert attrs[2].value == struct.pack("!I", crc)
        assert request == expected_request(users[0], request)   # byte for byte
    assert len({r[8:20] for r in requests}) == 3                # a fresh transaction id each time


# -- ping ------------------------------------------------------------------------------------

def test_ping_against_echo(net, tmp_path):
    samples = tmp_path / "rtt"
    with loadgen.serve("echo", netns=net.sink, bind=f"{SINK_IP}:7007", duration=10) as echo:
        got = loadgen.run("ping", netns=net.gen, dst=echo.address, count=300, interval_us=200, samples=samples)
    assert echo.result["packets"] == 300
    assert got["count"] == 300 and got["received"] == 300 and got["lost"] == 0, got
    order = ["min_us", "p50_us", "p90_us", "p99_us", "p999_us", "max_us"]
    values = [got[k] for k in order]
    assert values == sorted(values) and 0 < got["min_us"] <= got["mean_us"] <= got["max_us"] < 200_000, got
    rtts = sorted(int(line) for line in samples.read_text().split())
    assert len(rtts) == 300
    assert got["min_us"] == pytest.approx(rtts[0] / 1e3, abs=1e-3)
    assert got["p50_us"] == pytest.approx(rtts[149] / 1e3, abs=1e-3)    # nearest rank: ceil(0.5 * 300) = 150
    assert got["p99_us"] == pytest.approx(rtts[296] / 1e3, abs=1e-3)    # ceil(0.99 * 300) = 297
    assert got["max_us"] == pytest.approx(rtts[-1] / 1e3, abs=1e-3)


def test_ping_with_nobody_answering_counts_losses(net):
    with loadgen.serve("sink", netns=net.sink, bind=f"{SINK_IP}:7008", duration=10):
        got = loadgen.run("ping", netns=net.gen, dst=f"{SINK_IP}:7008", count=3, timeout_ms=20, interval_us=0)
    assert got["count"] == 3 and got["received"] == 0 and got["lost"] == 3
    assert got["p50_us"] is None and got["max_us"] is None


def test_ping_new_flow_each_probe_comes_from_a_port_no_earlier_probe_used(net, tmp_path, capture):
    # 30 probes in a 40-port ephemeral range: the kernel's random pick would repeat a port
    # almost surely (and did ~1.5 % of the time in the default range, failing CI once)
    subprocess.run(["ip", "netns", "exec", net.gen, "sh", "-c",
                    "echo '40000 40039' > /proc/sys/net/ipv4/ip_local_port_range"], check=True)
    (tmp_path / "users").write_text("ABCD1234:a\nEFGH5678:b\n")
    with loadgen.serve("sink", netns=net.sink, bind=f"{SINK_IP}:7009", answer_stun=True, duration=10) as sink:
        got = loadgen.run("ping", netns=net.gen, dst=sink.address, count=30, interval_us=100, new_flow_each=True,
                          usernames=tmp_path / "users")
    frames = [parse_udp(f) for f in capture.frames()]
    assert got["received"] == 30 and got["lost"] == 0 and got["p50_us"] <= got["p99_us"] <= got["max_us"], got
    assert sink.result["stun_answered"] == 30 and sink.result["packets"] == 0
    requests = [(sport, payload) for _, sport, _, dport, payload, _ in frames if dport == 7009]
    assert len(requests) == 30
    assert len({sport for sport, _ in requests}) == 30   # a new source port per probe
    assert all(40000 <= sport <= 40039 for sport, _ in requests)
    assert [stun.server_ufrag(p) for _, p in requests] == ["ABCD1234", "EFGH5678"] * 15


# -- packet mode -----------------------------------------------------------------------------

def packet_send(net: Net, **options) -> dict:
    return loadgen.run("send", netns=net.gen, iface=net.gen_if, src_mac=net.gen_mac, dst_mac=net.sink_mac,
                       src_ip=FLOW_BASE_IP, **options)


def flow_of(ip: str, port: int, per_ip: int, base_port: int = 20000) -> int:
    """The flow index i udpgen's packet mode sends from (ip, port): ip = base + i // P, port = BASE + i % P."""
    def number(address: str) -> int:
        return struct.unpack("!I", socket.inet_aton(address))[0]
    return (number(ip) - number(FLOW_BASE_IP)) * per_ip + (port - base_port)


def test_packet_mode_frames_are_correct(net, capture):
    errors_before = udp_csum_errors(net.sink)
    with loadgen.serve("sink", netns=net.sink, bind=f"{SINK_IP}:7010", duration=10) as sink:
        sent = packet_send(net, dst=sink.address, flows=300, ports_per_ip=100, rate=20000, duration=0.2, size=101)
    got = sink.result
    # the kernel verifies UDP checksums of these frames (AF_PACKET frames are not CHECKSUM_PARTIAL):
    # every one reaching the socket proves its checksum, and none may have been dropped for one
    assert 3000 <= sent["sent"] <= 4100 and sent["send_errors"] == 0 and sent["flows_open"] is None, sent
    assert got["packets"] == sent["sent"] and got["bytes"] == 101 * sent["sent"] and got["max_seq_gap"] == 0, got
    assert got["unique_flows"] == 300
    assert udp_csum_errors(net.sink) == errors_before
    frames = capture.frames()
    assert len(frames) == sent["sent"]
    for frame in frames:
        src, sport, dst, dport, payload, ok = parse_udp(frame)
        assert ok and (dst, dport) == (SINK_IP, 7010) and frame[:6] == bytes.fromhex(net.sink_mac.replace(":", ""))
        assert len(payload) == 101 and payload[:2] == b"\x80\x60" and payload[20:] == bytes(81)
        seq = struct.unpack_from("!I", payload, 4)[0]
        # in order: data packet k comes from flow k % 300, i.e. 10.201.1.1 + i // 100, port 20000 + i % 100
        assert flow_of(src, sport, 100) == seq % 300 and 20000 <= sport < 20100, (src, sport, seq)
    assert all(checksums_valid(f) for f in frames[:20])        # and scapy agrees, independently
    stamps = [struct.unpack_from("!Q", parse_udp(f)[4], 12)[0] for f in frames]
    assert stamps == sorted(stamps) and stamps[-1] - stamps[0] < 1e9


def test_the_sink_namespace_drops_bad_udp_checksums(net):
    """The premise of the test above: here the kernel verifies the UDP checksum of raw frames it receives."""
    raw = netns_socket(net.gen, socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        raw.bind((net.gen_if, 0))
        errors_before = udp_csum_errors(net.sink)
        with loadgen.serve("sink", netns=net.sink, bind=f"{SINK_IP}:7014", duration=10) as sink:
            for checksum in (None, 0x1234):   # a correct frame, then one with a wrong UDP checksum
                raw.send(udp_frame(b"\x80\x60" + bytes(26), src=FLOW_BASE_IP, dst=SINK_IP, sport=20000,
                                   dport=7014, src_mac=net.gen_mac, dst_mac=net.sink_mac, udp_checksum=checksum))
    finally:
        raw.close()
    assert sink.result["packets"] == 1
    assert udp_csum_errors(net.sink) == errors_before + 1


def test_packet_mode_shuffles_two_million_flows_repeatably(net, capture):
    def flows_visited(seed: int) -> list[int]:
        with loadgen.serve("sink", netns=net.sink, bind=f"{SINK_IP}:7011", duration=10) as sink:
            sent = packet_send(net, dst=sink.address, flows=2_000_000, shuffle=True, seed=seed, count=3000,
                               duration=5)
        # 20000 + 50000 ports would pass 65535: the default base becomes the highest that fits
        assert sent["sent"] == 3000 and sent["src_port"] == 15536 and sink.result["packets"] == 3000, sent
        assert sink.result["unique_flows"] == 3000   # the first 3000 of a permutation are all distinct
        frames = [parse_udp(f) for f in capture.frames()]
        assert len(frames) == 3000 and all(ok for *_, ok in frames)
        by_seq = sorted((struct.unpack_from("!I", payload, 4)[0], flow_of(ip, port, 50000, 15536))
                        for ip, port, _, _, payload, _ in frames)
        flows = [flow for _, flow in by_seq]
        assert all(0 <= f < 2_000_000 for f in flows)
        return flows

    first = flows_visited(1)
    assert first != sorted(first) and max(first) > 1_000_000
    assert flows_visited(1) == first
    assert flows_visited(2) != first


def test_packet_mode_stun_rounds(net, capture, tmp_path):
    users = ["ABCD1234:a", "EFGH5678:b", "IJKL9012:c"]
    (tmp_path / "users").write_text("\n".join(users))
    with loadgen.serve("sink", netns=net.sink, bind=f"{SINK_IP}:7012", answer_stun=True, duration=10) as sink:
        sent = packet_send(net, dst=sink.address, flows=10, ports_per_ip=4, usernames=tmp_path / "users",
                           open_rounds=2, count=50, duration=5)
    assert sent["stun_sent"] == 20 and sent["sent"] == 50 and sent["flows_open"] is None, sent
    got = sink.result
    assert got["stun_answered"] == 20 and got["packets"] == 50 and got["unique_flows"] == 10, got
    frames = [parse_udp(f) for f in capture.frames()]
    stuns = [(flow_of(ip, port, 4), payload) for ip, port, _, _, payload, ok in frames if ok and payload[0] < 2]
    assert [flow for flow, _ in stuns] == list(range(10)) * 2        # one request per flow per round, in order
    for flow, payload in stuns:
        assert stun.server_ufrag(payload) == users[flow % 3].split(":")[0]
        assert payload == expected_request(users[flow % 3], payload)


def test_sigterm_stops_a_sink_with_its_counts(net, procs, tmp_path):
    proc = loadgen.start("sink", netns=net.sink, bind=f"{SINK_IP}:7013", ready_file=tmp_path / "r", duration=30)
    procs.append(proc)
    loadgen.wait_ready(proc, tmp_path / "r")
    loadgen.run("send", netns=net.gen, dst=f"{SINK_IP}:7013", count=10, duration=5)
    got = loadgen.stop(proc)
    assert got["mode"] == "sink" and got["packets"] == 10
