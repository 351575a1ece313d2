"""The malformed-packet corpus: named frames and what the relay must do with each (data, no logic).

Modelled on Katran's ``lib/testing/fixtures``: every case is a frame from a client
to the relay's public side, the XDP verdict, and the one counter it lands in.
``test_malformed.py`` runs each through BPF_PROG_TEST_RUN and, when the frame
reaches the routing decision (a UDP payload for the relay port), through
``edge.routing.route`` too.  The relay under test has session 'evtj' on backend 7,
strict policy (tests/xdp/conftest.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import raw
from splitrelay.bpf.testrun import XDP_DROP, XDP_PASS, XDP_REDIRECT
from splitrelay.wire import stun

from .. import packets as P
from .harness import V


@dataclass(frozen=True)
class Case:
    name: str
    frame: bytes
    verdict: int      # XDP_PASS, XDP_DROP, XDP_REDIRECT
    counter: str      # the SR_STATS name it is counted under


def _stun_with(attrs: bytes, msg_type: int = 1, length: int | None = None) -> bytes:
    body_len = len(attrs) if length is None else length
    return struct.pack("!HHI", msg_type, body_len, stun.MAGIC_COOKIE) + b"\x07" * 12 + attrs


def _attr(t: int, value: bytes) -> bytes:
    return struct.pack("!HH", t, len(value)) + value + b"\0" * (-len(value) % 4)


_OK = P.udp_frame(V["2.1"])
_ETH_IP = len(Ether()) + 20
_FILLER = b"".join(_attr(0x8022, b"abcd") for _ in range(stun.MAX_ATTRS))
_USER = _attr(6, b"evtj:h6vY")
_QINQ = raw(Ether(src=P.CLIENT_MAC, dst=P.RELAY_PUB_MAC, type=0x88A8) / Dot1Q(vlan=10) / Dot1Q(vlan=20)
            / IP(src=P.CLIENT_IP4, dst=P.PUBLIC_IP4) / UDP(sport=P.CLIENT_PORT, dport=P.RELAY_PORT) / V["2.1"])
_LATER_FRAGMENT = Ether(_OK)
_LATER_FRAGMENT[IP].frag = 10
del _LATER_FRAGMENT[IP].chksum

# (a frame shorter than an Ethernet header never reaches XDP: test_run refuses it too)
CASES = [
    Case("truncated vlan tag", P.udp_frame(V["2.1"], vlan=5)[:16], XDP_PASS, "IN_PASS_OTHER"),
    Case("truncated ipv4 header", _OK[:len(Ether()) + 12], XDP_PASS, "IN_PASS_OTHER"),
    Case("truncated udp header", _OK[:_ETH_IP + 5], XDP_PASS, "IN_PASS_OTHER"),
    Case("truncated stun header", P.udp_frame(V["2.1"][:12]), XDP_DROP, "IN_DROP_BAD_STUN"),
    Case("stun length lies (too long)", P.udp_frame(_stun_with(_USER, length=len(_USER) + 40)), XDP_DROP,
         "IN_DROP_BAD_STUN"),
    Case("stun length not a multiple of 4", P.udp_frame(_stun_with(_USER, length=len(_USER) - 2)), XDP_DROP,
         "IN_DROP_BAD_STUN"),
    Case("attribute length overflows the message",
         P.udp_frame(_stun_with(struct.pack("!HH", 6, 200) + b"evtj:x\0\0")), XDP_DROP, "IN_DROP_BAD_STUN"),
    Case("username missing", P.udp_frame(_stun_with(_attr(0x8022, b"client"))), XDP_DROP, "IN_DROP_NO_USERNAME"),
    Case("username empty", P.udp_frame(_stun_with(_attr(6, b""))), XDP_DROP, "IN_DROP_BAD_USERNAME"),
    Case("username without colon", P.udp_frame(_stun_with(_attr(6, b"evtjh6vY"))), XDP_DROP,
         "IN_DROP_BAD_USERNAME"),
    Case("username over-long", P.udp_frame(_stun_with(_attr(6, b"a" * 40 + b":x"))), XDP_DROP,
         "IN_DROP_BAD_USERNAME"),
    Case("username non-ice-char", P.udp_frame(_stun_with(_attr(6, b"ev-j:x"))), XDP_DROP, "IN_DROP_BAD_USERNAME"),
    Case("more attributes than the walk bound", P.udp_frame(_stun_with(_FILLER + _USER)), XDP_DROP,
         "IN_DROP_NO_USERNAME"),
    Case("username just inside the walk bound", P.udp_frame(_stun_with(_FILLER[8:] + _USER)), XDP_REDIRECT,
         "IN_FWD_STUN_UFRAG"),
    Case("later ipv4 fragment", raw(_LATER_FRAGMENT), XDP_PASS, "IN_PASS_LATER_FRAGMENT"),
    Case("vlan in vlan", _QINQ, XDP_PASS, "IN_PASS_OTHER"),
    Case("empty udp payload", P.udp_frame(b""), XDP_DROP, "IN_DROP_UNKNOWN_CLASS"),
]
