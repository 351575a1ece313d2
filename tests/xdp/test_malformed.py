"""The malformed-packet corpus (malformed_corpus.py) through the XDP program and the routing decision."""

from __future__ import annotations

import pytest
from scapy.layers.inet import UDP
from scapy.layers.l2 import Ether
from splitrelay.bpf.testrun import XDP_PASS, XDP_REDIRECT
from splitrelay.edge.routing import RoutingTables, route

from .harness import counts, public
from .malformed_corpus import CASES


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_malformed_corpus_is_judged_alike_by_xdp_and_the_routing_decision(relay, case):
    tables = RoutingTables.snapshot(relay)
    result = public(relay, case.frame)
    assert result.verdict == case.verdict, result.name
    assert counts(relay) == {case.counter: 1}
    if case.verdict != XDP_REDIRECT:
        assert result.data == case.frame  # passed and dropped packets are never rewritten
    if case.verdict != XDP_PASS:          # it reached the decision: the function says the same
        payload = bytes(Ether(case.frame)[UDP].payload)
        assert route(payload, tables).counter == case.counter
