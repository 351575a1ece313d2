"""The Python reference parser on the shared vectors (the XDP program is held to the same ones)."""

import struct

import pytest
from aioice import stun as aioice_stun
from hypothesis import given, settings
from hypothesis import strategies as st
from splitrelay.edge import hint, stun

from .vectors import HINT_V2_KEY, hint_v1, hint_v2, rfc5769, rfc7983

V = rfc5769()


def test_rfc5769_request_gives_server_ufrag():
    assert stun.classify(V["2.1"]) == stun.STUN
    assert stun.server_ufrag(V["2.1"]) == "evtj"


@pytest.mark.parametrize("name", ["2.2", "2.3"])
def test_rfc5769_responses_route_by_flow(name):
    assert stun.server_ufrag(V[name]) is None


def test_rfc5769_long_term_username_is_not_an_ice_ufrag():
    with pytest.raises(stun.StunError) as err:
        stun.server_ufrag(V["2.4"])
    assert err.value.reason == "bad_username"


@pytest.mark.parametrize("name", ["2.1", "2.2", "2.3", "2.4"])
def test_vectors_are_valid_stun_for_aioice_too(name):
    msg = aioice_stun.parse_message(V[name])
    assert stun.parse_header(V[name]).transaction_id == msg.transaction_id


@pytest.mark.parametrize("byte,cls", sorted(rfc7983().items()))
def test_rfc7983_table(byte, cls):
    assert stun.classify(bytes([byte]) + b"\0" * 3) == cls


def test_empty_payload():
    assert stun.classify(b"") == stun.EMPTY


@pytest.mark.parametrize("ufrag,expected,comment", hint_v1())
def test_hint_vectors(ufrag, expected, comment):
    assert hint.decode(ufrag) == expected, comment


@pytest.mark.parametrize(
    "username,reason",
    [
        ("abc:def", "bad_username"),            # 3-char ufrag
        ("a" * 33 + ":x", "bad_username"),      # over-long
        ("evtj-h6vY", "bad_username"),          # no colon
        ("ev tj:h6vY", "bad_username"),         # not ice-chars
        ("", "bad_username"),
    ],
)
def test_bad_usernames(username, reason):
    with pytest.raises(stun.StunError) as err:
        stun.server_ufrag(stun.build_binding_request(username))
    assert err.value.reason == reason


def test_built_request_is_a_valid_ice_check():
    raw = stun.build_binding_request("BAABAbCd0123+/xY:cli1", password="x" * 22)
    msg = aioice_stun.parse_message(raw)
    assert msg.check_message_integrity(b"x" * 22)  # parse_message already checked FINGERPRINT
    assert msg.attributes["USERNAME"] == "BAABAbCd0123+/xY:cli1"
    assert stun.server_ufrag(raw) == "BAABAbCd0123+/xY"


def test_missing_username_and_walk_bound():
    header = struct.pack("!HHI", 1, 0, stun.MAGIC_COOKIE) + b"\1" * 12
    with pytest.raises(stun.StunError) as err:
        stun.server_ufrag(header)
    assert err.value.reason == "no_username"
    filler = b"".join(struct.pack("!HH", 0x8022, 4) + b"abcd" for _ in range(stun.MAX_ATTRS))
    user = struct.pack("!HH", 6, 9) + b"evtj:h6vY\0\0\0"
    body = filler + user
    msg = struct.pack("!HHI", 1, len(body), stun.MAGIC_COOKIE) + b"\1" * 12 + body
    with pytest.raises(stun.StunError) as err:
        stun.server_ufrag(msg)
    assert err.value.reason == "no_username"


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=hint.MAX_BACKEND_ID))
def test_hint_round_trip(backend_id):
    ufrag = hint.encode(backend_id)
    assert hint.decode(ufrag) == backend_id
    assert stun.server_ufrag(stun.build_binding_request(ufrag + ":abcd")) == ufrag


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_truncation_only_raises_typed_errors(data):
    raw = V["2.1"]
    cut = data.draw(st.integers(min_value=0, max_value=len(raw)))
    try:
        ufrag = stun.server_ufrag(raw[:cut])
    except stun.StunError as err:
        assert err.reason in {"bad_stun", "no_username", "bad_username"}
    else:
        assert ufrag == "evtj"


def test_siphash_matches_the_published_vectors():
    key = bytes(range(16))
    assert hint.siphash24(key, b"") == 0x726FDB47DD0E0E31
    assert hint.siphash24(key, bytes(range(15))) == 0xA129CA6149BE45E5


@pytest.mark.parametrize("ufrag,expected,comment", hint_v2())
def test_keyed_hint_vectors(ufrag, expected, comment):
    assert hint.inspect(ufrag, HINT_V2_KEY) == expected, comment


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=hint.MAX_BACKEND_ID), st.binary(min_size=16, max_size=16))
def test_keyed_hint_round_trip_and_tamper(backend_id, key):
    ufrag = hint.encode(backend_id, key=key)
    assert len(ufrag) == 16 and hint.decode(ufrag, key) == backend_id
    assert hint.decode(ufrag) is None                       # a relay without the key ignores v2
    tampered = ufrag[:5] + ("A" if ufrag[5] != "A" else "B") + ufrag[6:]
    assert hint.inspect(tampered, key) == hint.FORGED
