"""Deliberate differential oracles: the C decoders against their Python twins on shared vectors.

Each duplication here is on purpose (docs/DESIGN.md, "Oracles"): the STUN walk in
relay.c against wire/stun.py, hint.h against wire/hint.py, on the RFC 5769, RFC 7983
and routing-hint vector files.
"""

from __future__ import annotations


from splitrelay.bpf.testrun import XDP_REDIRECT
from splitrelay.edge.records import Backend
from splitrelay.wire import hint, stun

from .. import packets as P
from ..vectors import HINT_V2_KEY, hint_v1, hint_v2, rfc7983
from .harness import (
    confirm_flow,
    V,
    counts,
    public,
)


def test_c_and_python_hint_decoders_agree_on_the_vectors(relay):
    cfg = relay.config()
    cfg.policy = "hint"
    relay.configure(cfg)
    relay.del_session("evtj")  # only hints route here
    vectors = hint_v1()
    for backend_id in {e for _, e, _ in vectors if e}:
        relay.set_backend(Backend(backend_id, P.BACKEND_PORT + 1, P.BACKEND_MAC, P.RELAY_INT_MAC,
                                  ip4=P.BACKEND_IP4))
    for ufrag, expected, comment in vectors:
        assert hint.decode(ufrag) == expected, comment
        req = stun.build_binding_request(ufrag + ":cli1")
        result = public(relay, P.udp_frame(req, sport=41000))
        assert (result.verdict == XDP_REDIRECT) == (expected is not None), comment
        if expected is not None:
            assert relay.flow((P.CLIENT_IP4, 41000)).backend_id == expected, comment


def test_rfc7983_classes_match_the_python_reference(relay):
    public(relay, P.udp_frame(V["2.1"]))  # a confirmed flow, so every routable class would be forwarded
    confirm_flow(relay)
    forwardable = {"dtls", "rtp"}
    for first, cls in rfc7983().items():
        assert stun.classify(bytes([first])) == cls
        if cls == "stun":
            continue  # STUN bodies are judged by the parser, below
        result = public(relay, P.udp_frame(bytes([first]) + b"\0" * 40))
        assert (result.verdict == XDP_REDIRECT) == (cls in forwardable), (first, cls)


def test_c_and_python_stun_parsers_agree_on_truncations(relay):
    """Every prefix of a valid request: the C verdict and reason equal the reference parser's."""
    reasons = {"bad_stun": "IN_DROP_BAD_STUN", "no_username": "IN_DROP_NO_USERNAME",
               "bad_username": "IN_DROP_BAD_USERNAME"}
    raw = V["2.1"]
    for cut in range(1, len(raw) + 1):
        relay.reset_counters()
        relay.bpf[b"flows"].clear()
        relay.recount_session_flows()  # give the session its allowance back
        payload = raw[:cut]
        try:
            ufrag = stun.server_ufrag(payload)
            expected = "IN_FWD_STUN_UFRAG" if ufrag else "IN_DROP_NO_FLOW"
        except stun.StunError as err:
            expected = reasons[err.reason]
        public(relay, P.udp_frame(payload))
        assert counts(relay) == {expected: 1}, cut


def test_c_and_python_agree_on_keyed_hints(relay):
    """The SipHash tag check in XDP decides exactly as wire/hint.py on the v2 vectors."""
    cfg = relay.config()
    cfg.policy, cfg.hint_key = "hint", HINT_V2_KEY
    relay.configure(cfg)
    assert relay.config().hint_key == HINT_V2_KEY
    relay.del_session("evtj")
    for backend_id in {e for _, e, _ in hint_v2() if isinstance(e, int)}:
        relay.set_backend(Backend(backend_id, P.BACKEND_PORT + 1, P.BACKEND_MAC, P.RELAY_INT_MAC,
                                  ip4=P.BACKEND_IP4))
    for ufrag, expected, comment in hint_v2():
        relay.reset_counters()
        result = public(relay, P.udp_frame(stun.build_binding_request(ufrag + ":cli1"), sport=43000))
        want = {"forged": "IN_DROP_FORGED_HINT", None: "IN_DROP_UNKNOWN_UFRAG"}.get(expected, "IN_FWD_STUN_HINT")
        assert counts(relay) == {want: 1}, comment
        assert (result.verdict == XDP_REDIRECT) == isinstance(expected, int), comment
