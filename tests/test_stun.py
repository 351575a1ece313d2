"""The Python reference STUN parser on the shared vectors (the XDP program is held to the same ones).

tests/xdp/ runs the loaded C program against this module (named corpus,
truncations, differential fuzz); here the reference itself is pinned down: RFC
5769 byte for byte, aioice as a second opinion on valid messages, and the exact
drop reason of every header, walk and USERNAME rule.
"""

from __future__ import annotations

import hashlib
import struct

import pytest
from aioice import stun as aioice_stun
from hypothesis import given, settings
from hypothesis import strategies as st
from splitrelay.wire import stun
from splitrelay.edge.counters import counter_specs
from splitrelay.wire.hint import ALPHABET
from .vector_files import load_classes, load_hex

V = {name: vec.data for name, vec in load_hex("rfc5769.txt").items()}
TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
SHORT_TERM = "VOkJxbRl1RmTxUk/WvJxBt"
KATAKANA = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
CLASSES = load_classes()
ERRORS = (stun.BadStun, stun.NoUsername, stun.BadUsername)


def message(body: bytes, msg_type: int = stun.BINDING_REQUEST, length: int | None = None,
            cookie: int = stun.MAGIC_COOKIE) -> bytes:
    return struct.pack("!HHI", msg_type, len(body) if length is None else length, cookie) + b"\7" * 12 + body


def attr(t: int, value: bytes, pad: bytes = b"\0") -> bytes:
    return stun.encode_attribute(t, value, pad)


def reason(payload: bytes) -> str | None:
    try:
        stun.server_ufrag(payload)
    except stun.StunError as err:
        return err.reason
    return None


# --- RFC 5769 ----------------------------------------------------------------------------------

def test_rfc5769_request_gives_server_ufrag():
    assert stun.classify(V["2.1"]) is stun.PacketClass.STUN
    assert stun.is_binding_request(V["2.1"])
    assert stun.server_ufrag(V["2.1"]) == "evtj"          # padding 0x20, not 0x00: accepted


@pytest.mark.parametrize("name", ["2.2", "2.3"])
def test_rfc5769_responses_are_routed_by_flow(name):
    assert stun.classify(V[name]) == "stun"
    assert not stun.is_binding_request(V[name])
    assert stun.parse_header(V[name]).type == stun.BINDING_SUCCESS
    assert stun.server_ufrag(V[name]) is None
    assert stun.backend_check_ufrag(V[name]) is None


def test_rfc5769_long_term_username_is_not_an_ice_ufrag():
    assert stun.is_binding_request(V["2.4"])
    with pytest.raises(stun.BadUsername) as err:
        stun.server_ufrag(V["2.4"])
    assert err.value.reason == "bad_username"
    assert next(stun.iter_attributes(V["2.4"])).value.decode() == KATAKANA


def test_builder_reproduces_rfc5769_byte_for_byte():
    """MESSAGE-INTEGRITY (short- and long-term keys), FINGERPRINT and padding, as the RFC computes them."""
    sp = dict(transaction_id=TID, password=SHORT_TERM, fingerprint=True, pad=b" ")
    assert stun.build_message(stun.BINDING_REQUEST, [
        (stun.ATTR_SOFTWARE, b"STUN test client"), (stun.ATTR_PRIORITY, bytes.fromhex("6e0001ff")),
        (stun.ATTR_ICE_CONTROLLED, bytes.fromhex("932ff9b151263b36")), (stun.ATTR_USERNAME, b"evtj:h6vY"),
    ], **sp) == V["2.1"]
    assert stun.build_message(stun.BINDING_SUCCESS, [
        (stun.ATTR_SOFTWARE, b"test vector"), (0x0020, bytes.fromhex("0001a147e112a643"))], **sp) == V["2.2"]
    assert stun.build_message(stun.BINDING_SUCCESS, [
        (stun.ATTR_SOFTWARE, b"test vector"),
        (0x0020, bytes.fromhex("0002a1470113a9faa5d3f179bc25f4b5bed2b9d9"))], **sp) == V["2.3"]
    long_term = hashlib.md5(f"{KATAKANA}:example.org:TheMatrIX".encode()).digest()
    assert stun.build_message(stun.BINDING_REQUEST, [
        (stun.ATTR_USERNAME, KATAKANA.encode()), (0x0015, b"f//499k954d6OL34oL9FSTvy64sA"),
        (0x0014, b"example.org")], transaction_id=bytes.fromhex("78ad3433c6ad72c029da412e"),
        password=long_term) == V["2.4"]


@pytest.mark.parametrize("name", ["2.1", "2.2", "2.3", "2.4"])
def test_aioice_agrees_on_the_vectors(name):
    msg = aioice_stun.parse_message(V[name])
    header = stun.parse_header(V[name])
    assert header.transaction_id == msg.transaction_id
    assert header.is_binding_request == (msg.message_method == aioice_stun.Method.BINDING and
                                         msg.message_class == aioice_stun.Class.REQUEST)
    attrs = list(stun.iter_attributes(V[name]))
    assert sum(4 + len(a.value) + (-len(a.value) % 4) for a in attrs) == header.length
    if "USERNAME" in msg.attributes:
        found = [a.value.decode() for a in attrs if a.type == stun.ATTR_USERNAME]
        assert found == [msg.attributes["USERNAME"]]


# --- RFC 7983 classes --------------------------------------------------------------------------

@pytest.mark.parametrize("byte,cls", sorted(CLASSES.items()))
def test_rfc7983_table(byte, cls):
    got = stun.classify(bytes([byte]) + b"\0" * 3)
    assert got is cls and got == cls.value


def test_empty_payload():
    assert stun.classify(b"") is stun.EMPTY == "empty"


def test_module_level_class_names_are_the_enum():
    assert (stun.STUN, stun.DTLS, stun.RTP) == (stun.PacketClass.STUN, "dtls", "rtp")
    assert stun.ROUTED_BY_FLOW == {"dtls", "rtp"}


# --- drop reasons ------------------------------------------------------------------------------

def test_reasons_are_counter_reasons_of_the_data_plane():
    header_reasons = {spec.reason: spec.name for spec in counter_specs()}
    for cls in ERRORS:
        assert issubclass(cls, stun.StunError) and issubclass(cls, ValueError)
        assert header_reasons[cls.reason] == "IN_DROP_" + cls.reason.upper()
    assert stun.REASONS == ("bad_stun", "no_username", "bad_username")


USER = attr(stun.ATTR_USERNAME, b"evtj:h6vY")
FILLER = attr(stun.ATTR_SOFTWARE, b"abcd")


@pytest.mark.parametrize("payload,expected", [
    pytest.param(b"", "bad_stun", id="empty payload"),
    pytest.param(V["2.1"][:19], "bad_stun", id="shorter than a header"),
    pytest.param(message(USER, cookie=0x2112A443), "bad_stun", id="wrong magic cookie"),
    pytest.param(message(USER, msg_type=0x4001), "bad_stun", id="leading bits 01"),
    pytest.param(message(USER, msg_type=0x8001), "bad_stun", id="leading bits 10"),
    pytest.param(message(USER, length=len(USER) - 2), "bad_stun", id="length not a multiple of 4"),
    pytest.param(message(USER, length=len(USER) + 4), "bad_stun", id="length past the datagram"),
    pytest.param(message(struct.pack("!HH", 6, 200) + b"evtj:x\0\0"), "bad_stun", id="attribute past the length"),
    pytest.param(message(struct.pack("!HH", 0x8022, 5) + b"abcd" + USER), "bad_stun",
                 id="overrun before USERNAME"),
    pytest.param(message(USER + b"\0" * 2040), "bad_stun", id="2052 > SR_STUN_MAX_MSG"),
    pytest.param(message(b""), "no_username", id="no attributes"),
    pytest.param(message(FILLER), "no_username", id="only SOFTWARE"),
    pytest.param(message(FILLER * 16 + USER), "no_username", id="17th attribute: not visited"),
    pytest.param(message(FILLER * 15 + USER), None, id="16th attribute: found"),
    pytest.param(message(USER + b"\0" * 2028), None, id="2048 bytes: still routed"),
    pytest.param(message(USER + b"\1\2", length=len(USER)), None, id="bytes past the length: ignored"),
    pytest.param(message(USER + struct.pack("!HH", 1, 999)), None, id="a broken attribute after USERNAME"),
    pytest.param(message(attr(6, b"evtj:h6vY", pad=b"\xff")), None, id="padding is never checked"),
    pytest.param(message(attr(6, b"evtj:a") + attr(6, b"x")), None, id="the first USERNAME counts"),
    pytest.param(message(attr(6, b"evtj:a")[:-4] + b"\0\0", length=8), "bad_stun", id="value cut by the length"),
])
def test_header_and_walk_rules(payload, expected):
    assert reason(payload) == expected
    if expected is None:
        assert stun.server_ufrag(payload) == "evtj"


def test_only_binding_requests_are_bounded_by_max_msg():
    big_indication = message(b"\0" * 4000, msg_type=0x0011)
    assert stun.server_ufrag(big_indication) is None
    assert not stun.is_binding_request(big_indication)


@pytest.mark.parametrize("username,expected", [
    (b"evtj:h6vY", "evtj"),
    (b"evtj:", "evtj"),                                  # an empty client part is not our business
    (b"evtj::x", "evtj"),
    (b"BAABAbCd0123+/xY:cli1", "BAABAbCd0123+/xY"),
    (b"a" * 32 + b":x", "a" * 32),
    (b"AZaz09+/:x", "AZaz09+/"),
    (b"a" * 33 + b":x", "bad_username"),                  # over-long
    (b"a" * 40, "bad_username"),                          # over-long and no colon
    (b"abc:def", "bad_username"),                         # 3 chars
    (b":evtj", "bad_username"),
    (b"", "bad_username"),
    (b"evtjh6vY", "bad_username"),                        # no colon
    (b"ev tj:h6vY", "bad_username"),
    (b"ev-j:h6vY", "bad_username"),
    (b"evtj=:x", "bad_username"),
    (b"ev\0j:x", "bad_username"),
    ("évtj:x".encode(), "bad_username"),
    (KATAKANA.encode() + b":x", "bad_username"),
])
def test_username_rules(username, expected):
    raw = stun.build_binding_request(username)
    if expected == "bad_username":
        with pytest.raises(stun.BadUsername):
            stun.server_ufrag(raw)
    else:
        assert stun.server_ufrag(raw) == expected


@pytest.mark.parametrize("username,expected", [
    ("cliX:evtj", "evtj"),
    ("x:" + "a" * 32, "a" * 32),
    ("c" * 32 + ":evtj", "evtj"),                      # colon at index 32: still found
    ("c" * 33 + ":evtj", None),                        # colon past index 32: not looked for
    ("cliX", None), ("cliX:", None), ("cliX:ev", None), ("cliX:ev-j", None),
    ("cliX:evtj:more", None), ("x:" + "a" * 33, None),
])
def test_backend_check_ufrag(username, expected):
    """xdp_internal learns a flow from the transceiver's own check (USERNAME client:server)."""
    assert stun.backend_check_ufrag(stun.build_binding_request(username)) == expected


def test_backend_check_ufrag_needs_a_routable_binding_request():
    assert stun.backend_check_ufrag(b"") is None
    assert stun.backend_check_ufrag(b"\x16" + stun.build_binding_request("c:evtj")[1:]) is None
    assert stun.backend_check_ufrag(message(FILLER * 16 + attr(6, b"c:evtj"))) is None
    assert stun.backend_check_ufrag(message(attr(6, b"c:evtj") + b"\0" * 2040)) is None


def test_builder_options():
    a = stun.build_binding_request("evtj:x", transaction_id=TID, tie_breaker=7, fingerprint=False)
    assert a == stun.build_binding_request("evtj:x", transaction_id=TID, tie_breaker=7, fingerprint=False)
    assert [x.type for x in stun.iter_attributes(a)] == [6, 0x24, 0x802A]
    b = stun.build_binding_request(b"evtj:x", controlling=False, password=b"k",
                                   before_username=[(0x8022, b"s")], extra_attributes=[(0xC057, b"\0" * 4)])
    assert [x.type for x in stun.iter_attributes(b)] == [0x8022, 6, 0x24, 0x8029, 0xC057, 8, 0x8028]
    with pytest.raises(ValueError):
        stun.build_binding_request("evtj:x", transaction_id=b"short")


# --- properties --------------------------------------------------------------------------------

ufrags = st.text(st.sampled_from(ALPHABET), min_size=stun.UFRAG_MIN, max_size=stun.UFRAG_MAX)
client_parts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
fillers = st.lists(st.tuples(st.just(stun.ATTR_SOFTWARE), st.binary(max_size=9).map(bytes.hex)
                             .map(str.encode)), max_size=stun.MAX_ATTRS - 1)


@st.composite
def requests(draw) -> tuple[bytes, str, str, str | None]:
    ufrag = draw(ufrags)
    username = ufrag + ":" + draw(client_parts)
    password = draw(st.none() | st.text(ALPHABET, min_size=1, max_size=22))
    raw = stun.build_binding_request(username, password=password, fingerprint=draw(st.booleans()),
                                     controlling=draw(st.booleans()), before_username=draw(fillers),
                                     transaction_id=draw(st.binary(min_size=12, max_size=12)))
    return raw, ufrag, username, password


@settings(max_examples=400, deadline=None)
@given(requests())
def test_round_trip_and_aioice_agrees(req):
    raw, ufrag, username, password = req
    assert stun.server_ufrag(raw) == ufrag
    assert stun.is_binding_request(raw)
    msg = aioice_stun.parse_message(raw)                  # also checks FINGERPRINT when present
    assert msg.attributes["USERNAME"] == username
    assert msg.transaction_id == stun.parse_header(raw).transaction_id
    if password is not None:
        assert msg.check_message_integrity(password.encode())
    # and the other way round: what aioice encodes, we decode
    theirs = aioice_stun.Message(aioice_stun.Method.BINDING, aioice_stun.Class.REQUEST, msg.transaction_id)
    theirs.attributes.update({"USERNAME": username, "PRIORITY": 0x6E0001FF, "ICE-CONTROLLING": 7})
    if password is not None:
        theirs.add_message_integrity(password.encode())
    theirs.add_fingerprint()
    assert stun.server_ufrag(bytes(theirs)) == ufrag


@settings(max_examples=400, deadline=None)
@given(requests(), st.data())
def test_truncations_raise_only_typed_errors(req, data):
    raw = req[0]
    cut = data.draw(st.integers(0, len(raw)))
    short = raw[:cut]
    if cut < len(raw):
        with pytest.raises(stun.BadStun):          # the declared length no longer fits
            stun.server_ufrag(short)
    # the same prefix with its length field made consistent: any of our reasons, or the ufrag
    if cut >= stun.HEADER_LEN:
        body = (cut - stun.HEADER_LEN) & ~3
        fixed = short[:2] + struct.pack("!H", body) + short[4:stun.HEADER_LEN + body]
        try:
            assert stun.server_ufrag(fixed) == req[1]
        except stun.StunError as err:
            assert type(err) in ERRORS and err.reason in stun.REASONS


@settings(max_examples=1000, deadline=None)
@given(st.one_of(st.binary(max_size=80),
                 st.builds(lambda t, body: message(body, msg_type=t), st.sampled_from([1, 1, 0x101, 0x11]),
                           st.binary(max_size=60)),
                 st.builds(lambda u, rest: message(attr(6, u) + rest), st.binary(max_size=40),
                           st.binary(max_size=8))))
def test_any_bytes_give_a_typed_error_or_a_valid_ufrag(payload):
    try:
        ufrag = stun.server_ufrag(payload)
    except stun.StunError as err:
        assert type(err) in ERRORS
    else:
        if ufrag is not None:
            assert stun.UFRAG_MIN <= len(ufrag) <= stun.UFRAG_MAX
            assert set(ufrag) <= set(ALPHABET)
            assert (ufrag + ":").encode() in payload
    learned = stun.backend_check_ufrag(payload)
    if learned is not None:
        assert stun.UFRAG_MIN <= len(learned) <= stun.UFRAG_MAX and set(learned) <= set(ALPHABET)
    assert stun.classify(payload) == (CLASSES[payload[0]] if payload else "empty")


@settings(max_examples=200, deadline=None)
@given(st.integers(stun.MAX_ATTRS, stun.MAX_ATTRS + 4), ufrags)
def test_walk_bound(count, ufrag):
    raw = stun.build_binding_request(ufrag + ":c", before_username=[(stun.ATTR_SOFTWARE, b"x")] * count)
    with pytest.raises(stun.NoUsername):
        stun.server_ufrag(raw)
    fewer = stun.build_binding_request(ufrag + ":c", before_username=[(stun.ATTR_SOFTWARE, b"x")] * 15)
    assert stun.server_ufrag(fewer) == ufrag
