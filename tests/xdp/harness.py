"""What every XDP test module shares: the relay's fixed test setup and how to run its programs.

The programs run on crafted frames through BPF_PROG_TEST_RUN: no packet leaves
the host, test_run only reports the verdict.  The package's tests run in a
private network namespace whose veth pair gives the tx_ports devmap real
ifindexes (slot 0 "public", slot 1 "internal"); test_run's ingress is that
namespace's loopback (ifindex 1), so a slot holding lo is "the ingress
interface" and turns a redirect into XDP_TX.
"""

from __future__ import annotations

import uuid

from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether
from splitrelay.bpf.testrun import XDP_REDIRECT, RunResult, run_xdp

from .. import packets as P
from ..vectors import rfc5769

V = rfc5769()
BACKEND_ID = 7
LO_IFINDEX = 1  # test_run's ingress device
VETH = ("srApub", "srAint")
INTERNAL_IP4, INTERNAL_IP6 = "10.1.0.1", "fd00:1::1"   # the relay's internal addresses when translating
INTERNAL_IP4_B, INTERNAL_IP6_B = "10.1.0.2", "fd00:1::2"   # ... its second address set (several-address tests)
RELAY_OWN_IP4, RELAY_OWN_IP6 = "10.1.0.254", "fd00:1::fe"   # DNAT: the relay's own internal addresses
PORTS = (41000, 41003)   # translating: a pool of 4 flow ports, so exhaustion is cheap to reach


def instance_name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def set_slots(dp, links, **slots) -> None:
    """Fill tx_ports: slot 0 = public veth, slot 1 = internal veth unless overridden; others empty."""
    wanted = {0: links[VETH[0]], 1: links[VETH[1]]}
    wanted.update({int(k[4:]): v for k, v in slots.items()})  # slot2=..., slot0=...
    for slot in range(4):
        dp.set_tx_slot(slot, wanted.get(slot))


def public(dp, frame: bytes) -> RunResult:
    return run_xdp(dp.program_fd("xdp_public"), frame)


def internal(dp, frame: bytes) -> RunResult:
    return run_xdp(dp.program_fd("xdp_internal"), frame)


def counts(dp) -> dict[str, int]:
    return {name: c.packets for name, c in dp.counters().items() if c.packets}


def assert_forwarded_to_backend(result: RunResult, *, v6=False, sport=P.CLIENT_PORT):
    assert result.verdict == XDP_REDIRECT, result.name
    pkt = Ether(result.data)
    assert pkt.src == P.RELAY_INT_MAC and pkt.dst == P.BACKEND_MAC
    assert Dot1Q not in pkt
    l3 = pkt[IPv6] if v6 else pkt[IP]
    assert l3.dst == (P.BACKEND_IP6 if v6 else P.BACKEND_IP4)
    assert l3.src == (P.CLIENT_IP6 if v6 else P.CLIENT_IP4)  # the transceiver sees the real client
    assert pkt[UDP].dport == P.BACKEND_PORT and pkt[UDP].sport == sport
    assert P.checksums_valid(result.data)
    return pkt


def confirm_flow(dp, *, v6=False, sport=P.CLIENT_PORT, internal_port: int | None = None) -> None:
    """The backend answers the client's request (a Binding success response through xdp_internal): its
    pending flow is confirmed and carries media.  Translating, the answer goes to ``internal_port``."""
    answer = V["2.2"]
    if internal_port is None:
        frame = backend_reply_frame(answer, v6=v6, dport=sport)
    else:
        frame = P.udp_frame(answer, v6=v6, src=P.BACKEND_IP6 if v6 else P.BACKEND_IP4,
                            dst=INTERNAL_IP6 if v6 else INTERNAL_IP4, sport=P.BACKEND_PORT, dport=internal_port,
                            src_mac=P.BACKEND_MAC, dst_mac=P.RELAY_INT_MAC)
    result = internal(dp, frame)
    assert result.verdict == XDP_REDIRECT, result.name


def backend_reply_frame(payload: bytes, *, v6=False, dport=P.CLIENT_PORT, **kw) -> bytes:
    return P.udp_frame(payload, v6=v6, src=P.BACKEND_IP6 if v6 else P.BACKEND_IP4,
                       dst=P.CLIENT_IP6 if v6 else P.CLIENT_IP4, sport=P.BACKEND_PORT, dport=dport,
                       src_mac=P.BACKEND_MAC, dst_mac=P.RELAY_INT_MAC, **kw)
