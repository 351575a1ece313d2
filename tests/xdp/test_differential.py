"""The XDP program against the routing decision it implements (``edge.routing.route``), on fuzzed payloads.

Every payload a client could send to the relay port goes through ``xdp_public``
(BPF_PROG_TEST_RUN) and through ``route``: the counter, the verdict, the
rewrite and the flow's ufrag must agree.  ``make fuzz FUZZ_EXAMPLES=N`` runs N
cases with no per-test timeout and prints a progress line as it goes
(SPLITRELAY_FUZZ_PROGRESS=1) and the count of cases run at the end.
"""

from __future__ import annotations

import os
import sys
import time

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import raw
from splitrelay.bpf.testrun import XDP_REDIRECT
from splitrelay.edge.routing import RoutingTables, route
from splitrelay.wire import hint, stun

from .. import packets as P
from .harness import counts, public

EXAMPLES = int(os.environ.get("SPLITRELAY_FUZZ_EXAMPLES", "1500"))
PROGRESS = os.environ.get("SPLITRELAY_FUZZ_PROGRESS") == "1"
PROGRESS_EVERY_S = 10.0

_usernames = st.text(alphabet=st.sampled_from("evtjBA+/:xyz09 -é\x00"), max_size=40)


@st.composite
def client_payloads(draw):
    """Valid requests, requests with odd usernames, and byte-level mutations and truncations of them."""
    username = draw(st.one_of(st.just("evtj:h6vY"), _usernames,
                              st.builds(lambda b: hint.encode(b) + ":c", st.integers(1, 300))))
    raw_ = bytearray(stun.build_binding_request(username, fingerprint=draw(st.booleans())))
    for _ in range(draw(st.integers(0, 3))):
        raw_[draw(st.integers(0, len(raw_) - 1))] = draw(st.integers(0, 255))
    return bytes(raw_[: draw(st.integers(0, len(raw_)))])


class Progress:
    """Counts the cases run; with SPLITRELAY_FUZZ_PROGRESS=1 prints a line every PROGRESS_EVERY_S."""

    def __init__(self) -> None:
        self.cases = 0
        self.started = self.last = time.monotonic()

    def tick(self) -> None:
        self.cases += 1
        now = time.monotonic()
        if PROGRESS and now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            print(f"fuzz: {self.cases} cases, {self.cases / (now - self.started):.0f}/s, no disagreement so far",
                  file=sys.stderr, flush=True)

    def report(self) -> str:
        return f"fuzz: {self.cases} cases run in {time.monotonic() - self.started:.0f} s: XDP and route() agreed"


def test_differential_fuzz_xdp_agrees_with_the_routing_decision(relay):
    tables = RoutingTables.snapshot(relay)   # nothing below changes them: every case starts flowless
    progress = Progress()

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(payload=client_payloads())
    def one_case(payload: bytes) -> None:
        relay.reset_counters()
        relay.bpf[b"flows"].clear()
        relay.recount_session_flows()  # give the session its allowance back
        result = public(relay, P.udp_frame(payload))
        expected = route(payload, tables)
        assert counts(relay) == {expected.counter: 1}, payload.hex()
        assert (result.verdict == XDP_REDIRECT) == expected.forwarded, payload.hex()
        if not expected.forwarded:
            assert result.data == P.udp_frame(payload)  # a dropped packet is not rewritten
        else:  # the reference rewrite: DNAT + MACs, checksums computed from scratch by scapy
            assert relay.flow((P.CLIENT_IP4, P.CLIENT_PORT)).ufrag == expected.ufrag
            backend = tables.backends[expected.backend_id]
            want = Ether(P.udp_frame(payload))
            want.src, want.dst = backend.smac, backend.dmac
            want[IP].dst, want[UDP].dport = backend.ip4, backend.port
            del want[IP].chksum
            del want[UDP].chksum
            assert result.data == raw(want)
        progress.tick()

    one_case()
    print(progress.report(), file=sys.stderr, flush=True)
