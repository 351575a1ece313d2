"""The routing decision (edge/routing.py) as a pure function, the planes' shared contract, and the
library's error texts.

The XDP program is held to ``route`` by the differential fuzz and the malformed-packet
corpus (tests/xdp/); here the function itself is pinned down case by case, with no
kernel and no sockets.
"""

from __future__ import annotations

import pytest
from splitrelay.bpf import consts
from splitrelay.edge.null_plane import NullPlane
from splitrelay.edge.plane import DataPlane, PlaneConfig
from splitrelay.edge.records import Backend, DataPlaneError, RelayConfig, Session, check_ufrag
from splitrelay.edge.routing import Decision, RoutingTables, route
from splitrelay.edge.userspace.plane import UserspacePlane
from splitrelay.errors import SplitrelayError
from splitrelay.wire import hint, stun

from .vectors import HINT_V2_KEY

MAC = "02:00:00:00:00:01"
RTP = bytes([0x80, 0x6F]) + b"\0" * 40


def tables(**kw) -> RoutingTables:
    """Session 'evtj' on backend 7 (dual stack), backend 9 IPv4 only, strict policy."""
    base = dict(sessions={"evtj": Session("evtj", 7, 0), "only4": Session("only4", 9, 0)},
                backends={7: Backend(7, 5000, MAC, MAC, ip4="10.0.0.7", ip6="fd00::7"),
                          9: Backend(9, 5000, MAC, MAC, ip4="10.0.0.9")})
    base.update(kw)
    return RoutingTables(**base)


def request(username: str) -> bytes:
    return stun.build_binding_request(username)


@pytest.mark.parametrize("payload,counter", [
    (b"", "IN_DROP_UNKNOWN_CLASS"),
    (bytes([16]) + b"\0" * 20, "IN_DROP_UNKNOWN_CLASS"),          # ZRTP
    (bytes([0x40]) + b"\0" * 20, "IN_DROP_UNKNOWN_CLASS"),        # TURN ChannelData
    (RTP, "IN_DROP_NO_FLOW"),
    (bytes([22]) + b"\0" * 20, "IN_DROP_NO_FLOW"),                # DTLS
    (stun.build_message(stun.BINDING_SUCCESS), "IN_DROP_NO_FLOW"),
    (b"\0\1\0\0", "IN_DROP_BAD_STUN"),
    (stun.build_message(stun.BINDING_REQUEST), "IN_DROP_NO_USERNAME"),
    (request("ev-j:cli"), "IN_DROP_BAD_USERNAME"),
    (request("strangerX:cli"), "IN_DROP_UNKNOWN_UFRAG"),
    (request(hint.encode(7) + ":c"), "IN_DROP_UNKNOWN_UFRAG"),     # a hint under the strict policy
    (request(hint.encode(77) + ":c"), "IN_DROP_NO_BACKEND"),       # ... naming no backend: in any policy
], ids=["empty", "zrtp", "turn", "rtp", "dtls", "stun-answer", "short", "no-username", "bad-char",
        "unknown", "hint-strict", "hint-unregistered"])
def test_a_first_packet_without_a_flow_is_dropped_with_its_reason(payload, counter):
    assert route(payload, tables()) == Decision(counter)


def test_a_registered_ufrag_opens_a_flow_to_its_backend():
    assert route(request("evtj:cli"), tables()) == Decision("IN_FWD_STUN_UFRAG", 7, "evtj", opens_flow=True)


def test_a_consent_check_on_its_own_flow_refreshes_it_beyond_the_allowance():
    full = tables(session_flows={"evtj": consts.DEFAULT_SESSION_FLOWS})
    assert route(request("evtj:cli"), full, flow_backend=7) == Decision("IN_FWD_STUN_UFRAG", 7, "evtj")
    assert route(request("evtj:cli"), full) == Decision("IN_DROP_SESSION_FLOWS")
    assert route(request("evtj:cli"), tables(session_flows={"evtj": 99}, max_session_flows=0)).forwarded


def test_media_follows_the_flow_and_its_backend():
    assert route(RTP, tables(), flow_backend=7) == Decision("IN_FWD_FLOW", 7)
    assert route(RTP, tables(), flow_backend=8) == Decision("IN_DROP_NO_BACKEND")
    assert route(RTP, tables(), family=6, flow_backend=9) == Decision("IN_DROP_FAMILY")


def test_a_full_flow_table_refuses_new_flows_but_not_a_known_client():
    assert route(request("evtj:cli"), tables(), flows_full=True) == Decision("IN_DROP_FLOW_FULL")
    assert route(request("evtj:cli"), tables(), flows_full=True, flow_backend=7).forwarded
    moved = route(request("evtj:cli"), tables(), flows_full=True, flow_backend=9, flow_pending=True)
    assert moved == Decision("IN_FWD_STUN_UFRAG", 7, "evtj", opens_flow=True)   # a pending entry moves


def test_a_pending_flow_carries_stun_but_no_media():
    assert route(RTP, tables(), flow_backend=7, flow_pending=True) == Decision("IN_DROP_PENDING")
    dtls = bytes([22]) + b"\0" * 20
    assert route(dtls, tables(), flow_backend=7, flow_pending=True) == Decision("IN_DROP_PENDING")
    answer = stun.build_message(stun.BINDING_SUCCESS)   # the client's answer to the transceiver's check
    assert route(answer, tables(), flow_backend=7, flow_pending=True) == Decision("IN_FWD_FLOW", 7)
    assert route(request("evtj:cli"), tables(), flow_backend=7, flow_pending=True) == \
        Decision("IN_FWD_STUN_UFRAG", 7, "evtj")


def test_a_request_naming_another_backends_session_never_moves_a_confirmed_flow():
    """RTP-Bleed style: a request from a live call's 5-tuple with a ufrag of a session elsewhere."""
    assert route(request("only4:cli"), tables(), flow_backend=7) == Decision("IN_DROP_TAKEOVER")
    assert route(request("only4:cli"), tables(), flow_backend=7, flow_pending=True).opens_flow


def test_a_hint_without_a_session_is_held_to_the_allowance_of_confirmed_flows():
    ufrag = hint.encode(9)
    full = tables(policy="hint", session_flows={ufrag: consts.DEFAULT_SESSION_FLOWS})
    assert route(request(ufrag + ":c"), full) == Decision("IN_DROP_SESSION_FLOWS")
    assert route(request(ufrag + ":c"), full, flow_backend=9).forwarded   # its own flows' checks pass


def test_only_a_stun_answer_or_check_confirms_a_pending_flow():
    assert stun.confirms_flow(stun.build_message(stun.BINDING_SUCCESS))
    assert stun.confirms_flow(request("cli:evtj"))
    assert not stun.confirms_flow(stun.build_message(0x0111))   # an error response: MESSAGE-INTEGRITY failed
    assert not stun.confirms_flow(RTP)
    assert not stun.confirms_flow(stun.build_message(stun.BINDING_SUCCESS)[:19])


def test_an_ipv6_client_of_an_ipv4_only_backend_is_a_family_mismatch():
    assert route(request("only4:cli"), tables(), family=6) == Decision("IN_DROP_FAMILY")


def test_hints_route_under_the_hint_policy_and_keyed_ones_only_with_their_tag():
    loose = tables(policy="hint")
    ufrag = hint.encode(9)
    assert route(request(ufrag + ":c"), loose) == Decision("IN_FWD_STUN_HINT", 9, ufrag, opens_flow=True)
    keyed = tables(policy="hint", hint_key=HINT_V2_KEY)
    assert route(request(ufrag + ":c"), keyed) == Decision("IN_DROP_UNKNOWN_UFRAG")        # v1 needs no key
    tagged = hint.encode(9, key=HINT_V2_KEY)
    assert route(request(tagged + ":c"), keyed).counter == "IN_FWD_STUN_HINT"
    forged = tagged[:12] + ("AAAA" if tagged[12:] != "AAAA" else "BBBB")
    assert route(request(forged + ":c"), keyed) == Decision("IN_DROP_FORGED_HINT")


def test_a_session_wins_over_the_hint_its_ufrag_carries():
    ufrag = hint.encode(9)
    both = tables(policy="hint", sessions={ufrag: Session(ufrag, 7, 0)})
    assert route(request(ufrag + ":c"), both) == Decision("IN_FWD_STUN_UFRAG", 7, ufrag, opens_flow=True)


# -- one ufrag syntax ----------------------------------------------------------------------------

@pytest.mark.parametrize("ufrag,ok", [("evtj", True), ("a+/9", True), ("a" * 32, True), ("abc", False),
                                      ("a" * 33, False), ("ev-j", False), ("évtj", False), ("evtj:", False)])
def test_one_ufrag_syntax_for_the_parser_the_planes_and_the_api(ufrag, ok):
    assert stun.is_ufrag(ufrag) is ok
    assert (stun.server_ufrag(request(ufrag + ":cli")) == ufrag) if ok else True
    if ok:
        assert check_ufrag(ufrag) == ufrag
    else:
        with pytest.raises(DataPlaneError):
            check_ufrag(ufrag)


# -- exact error texts ---------------------------------------------------------------------------

def test_error_texts_are_pinned():
    with pytest.raises(DataPlaneError) as exc:
        check_ufrag("ev-j")
    assert str(exc.value) == "ufrag must be 4..32 ice-chars (A-Z a-z 0-9 + /), got 'ev-j'"
    with pytest.raises(DataPlaneError) as exc:
        RelayConfig(relay_port=3478, public_mac=MAC, gateway_mac=MAC, policy="loose", public_ip4="192.0.2.1")
    assert str(exc.value) == "policy must be one of ['hint', 'strict'], got 'loose'"
    with pytest.raises(DataPlaneError) as exc:
        Backend(0, 5000, MAC, MAC, ip4="10.0.0.1")
    assert str(exc.value) == "backend id must be 1..262143, got 0"
    with pytest.raises(stun.StunError) as exc:
        stun.server_ufrag(b"\0\1\0\0")
    assert str(exc.value) == "bad_stun: 4 bytes is shorter than a STUN header"
    with pytest.raises(hint.HintError) as exc:
        hint.encode(0)
    assert str(exc.value) == "backend id must be 1..262143, got 0"


def test_every_library_error_is_a_splitrelay_error():
    from splitrelay.bench.loadgen import LoadgenError
    from splitrelay.bench.suite import BenchError
    from splitrelay.bpf.syscall import BpfError
    from splitrelay.client.caller import CallError
    from splitrelay.client.whip import RestartRefused, WhipError
    from splitrelay.client.probe import ProbeError
    from splitrelay.wire.control_client import ControlError
    from splitrelay.edge.neighbours import NeighbourError
    from splitrelay.lab.netns import LabError
    from splitrelay.transceiver.mux import MuxError
    from splitrelay.transceiver.registration import RegistrationError

    for cls in (DataPlaneError, stun.StunError, hint.HintError, BpfError, ControlError, NeighbourError, LabError,
                MuxError, RegistrationError, ProbeError, RestartRefused, WhipError, CallError, LoadgenError,
                BenchError):
        assert issubclass(cls, SplitrelayError), cls


# -- the planes' contract ------------------------------------------------------------------------

def test_both_planes_and_the_null_plane_declare_the_contract():
    assert isinstance(NullPlane(), DataPlane)
    config = PlaneConfig(public_iface="pub", internal_iface="int", public_ip4="192.0.2.1", max_flows=4)
    assert isinstance(UserspacePlane(config), DataPlane)


def test_the_null_plane_holds_nothing_and_refuses_writes_in_one_line():
    plane = NullPlane()
    assert plane.backends() == [] and plane.flows() == [] and plane.config() is None
    assert plane.del_backend(1) is False and plane.del_sessions(["evtj"]) == {"evtj": False}
    assert plane.age_flows(30) == 0 and all(c.packets == 0 for c in plane.counters().values())
    with pytest.raises(DataPlaneError) as exc:
        plane.set_session("evtj", 1)
    assert str(exc.value) == "this relay has no data plane"
