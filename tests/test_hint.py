"""Routing hints: wire/hint.py and bpf/hint.h on the shared vector files.

The C decoder is compiled here as plain userspace C (no BPF, no root) and reads
the vector files itself, so the files' format is proven parseable from C and
both decoders are held to the same expectations.  tests/xdp/test_oracles.py checks the
loaded XDP program on the same files.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from aioice import Connection
from aioice.utils import random_string
from hypothesis import given, settings
from hypothesis import strategies as st
from splitrelay.bpf import SOURCE_DIR
from splitrelay.wire import hint, stun
from .vector_files import FORGED, VECTOR_DIR, hint_key, load_hints

V1 = load_hints("hint_v1.txt")
V2 = load_hints("hint_v2.txt")
KEY = hint_key("hint_v2.txt")
ICE = st.sampled_from(hint.ALPHABET)


def test_vector_files_cover_the_cases_the_c_test_needs():
    ids = {v.expected for v in V1 if isinstance(v.expected, int)}
    assert {1, 2, 63, 64, 4095, 262143} <= ids
    assert {len(v.ufrag) for v in V1 if v.expected is None} >= {4, 8, 15, 16, 17, 32}
    assert {v.expected for v in V2} >= {None, FORGED} and KEY is not None


@pytest.mark.parametrize("vec", V1, ids=lambda v: v.ufrag)
def test_v1_vectors(vec):
    assert hint.inspect(vec.ufrag) == vec.expected, vec.comment
    assert hint.decode(vec.ufrag) == vec.expected, vec.comment
    assert hint.decode(vec.ufrag.encode()) == vec.expected, vec.comment
    assert hint.decode(vec.ufrag, KEY) is None, "a keyed relay routes no v1 hint"


@pytest.mark.parametrize("vec", V2, ids=lambda v: v.ufrag)
def test_v2_vectors(vec):
    assert hint.inspect(vec.ufrag, KEY) == vec.expected, vec.comment
    assert hint.decode(vec.ufrag, KEY) == (vec.expected if isinstance(vec.expected, int) else None)


@pytest.mark.parametrize("vec", V1, ids=lambda v: v.ufrag)
def test_v1_vectors_through_the_stun_parser(vec):
    """What the relay decides for a Binding Request whose server ufrag is the vector."""
    raw = stun.build_binding_request(vec.ufrag + ":cli1")
    try:
        ufrag = stun.server_ufrag(raw)
    except stun.BadUsername:
        assert vec.expected is None, vec.comment     # never reaches the hint decoder
        return
    assert hint.decode(ufrag) == vec.expected, vec.comment


def test_siphash_matches_the_published_vectors():
    """SipHash-2-4 reference vectors: key 00..0f, message 00..(n-1)."""
    key = bytes(range(16))
    assert hint.siphash24(key, b"") == 0x726FDB47DD0E0E31
    assert hint.siphash24(key, bytes(range(1))) == 0x74F839C593DC67FD
    assert hint.siphash24(key, bytes(range(8))) == 0x93F5F5799A932462
    assert hint.siphash24(key, bytes(range(15))) == 0xA129CA6149BE45E5


def test_aioice_and_aiortc_ufrags_carry_no_hint():
    """A peer's own ICE stack never produces something the relay would take for a hint."""
    for _ in range(500):
        assert hint.decode(random_string(4)) is None
    assert hint.decode(Connection(ice_controlling=True).local_username) is None
    from aiortc import RTCIceGatherer
    assert hint.decode(RTCIceGatherer().getLocalParameters().usernameFragment) is None


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=hint.MAX_BACKEND_ID))
def test_round_trip(backend_id):
    ufrag = hint.encode(backend_id)
    assert len(ufrag) == hint.V1_LENGTH and hint.decode(ufrag) == backend_id
    assert stun.server_ufrag(stun.build_binding_request(ufrag + ":abcd")) == ufrag


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=hint.MAX_BACKEND_ID), st.binary(min_size=16, max_size=16))
def test_keyed_round_trip_and_tamper(backend_id, key):
    ufrag = hint.encode(backend_id, key=key)
    assert len(ufrag) == 16 and hint.decode(ufrag, key) == backend_id
    assert hint.decode(ufrag) is None                       # a relay without the key ignores v2
    tampered = ufrag[:5] + ("A" if ufrag[5] != "A" else "B") + ufrag[6:]
    assert hint.inspect(tampered, key) == hint.FORGED


@settings(max_examples=500, deadline=None)
@given(st.text(ICE, min_size=stun.UFRAG_MIN, max_size=stun.UFRAG_MAX))
def test_any_ice_ufrag_decodes_as_the_layout_says(ufrag):
    value = {c: i for i, c in enumerate(hint.ALPHABET)}
    backend = (value[ufrag[0]] == 1 and len(ufrag) == 16 and
               (value[ufrag[1]] << 12 | value[ufrag[2]] << 6 | value[ufrag[3]]))
    assert hint.decode(ufrag) == (backend or None)


@pytest.mark.parametrize("bad", [0, -1, hint.MAX_BACKEND_ID + 1, "1", 1.0])
def test_encode_refuses_ids_a_hint_cannot_carry(bad):
    with pytest.raises(hint.HintError):
        hint.encode(bad)


# --- the C decoder, as userspace C -------------------------------------------------------------

_HARNESS = r"""
#include <stdio.h>
#include <string.h>
#include <linux/types.h>
#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif
#include "splitrelay.h"
#include "hint.h"

/* Reads a hint vector file; prints "<ufrag> <decision>" per vector. The relay only calls
 * hint_decode on a ufrag copy_ufrag accepted (4..32 ice-chars), so anything else is "none". */
int main(int argc, char **argv)
{
	struct sr_config cfg;
	char line[512], ufrag[256], expected[64];
	memset(&cfg, 0, sizeof(cfg));
	if (argc > 2) {
		cfg.hint_key_set = 1;
		for (int i = 0; i < 16; i++)
			sscanf(argv[2] + 2 * i, "%2hhx", &cfg.hint_key[i]);
	}
	FILE *f = fopen(argv[1], "r");
	if (!f)
		return 2;
	while (fgets(line, sizeof(line), f)) {
		if (line[0] == '#' || sscanf(line, "%255s %63s", ufrag, expected) != 2)
			continue;
		size_t len = strlen(ufrag);
		int ok = len >= SR_UFRAG_MIN && len <= SR_UFRAG_MAX;
		for (size_t i = 0; ok && i < len; i++)
			ok = ice_char_value((unsigned char)ufrag[i]) >= 0;
		int r = HINT_NONE;
		if (ok) {
			struct sr_ufrag_key key;
			memset(&key, 0, sizeof(key));
			memcpy(key.ufrag, ufrag, len);
			r = hint_decode(&key, (__u32)len, &cfg);
		}
		if (r == HINT_FORGED)
			printf("%s forged\n", ufrag);
		else if (r == HINT_NONE)
			printf("%s none\n", ufrag);
		else
			printf("%s %d\n", ufrag, r);
	}
	return 0;
}
"""


@pytest.fixture(scope="module")
def c_decoder(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    work = tmp_path_factory.mktemp("hintc")
    (work / "harness.c").write_text(_HARNESS)
    exe = work / "harness"
    flags = ["-std=gnu11", "-O1", "-Wall", "-Werror", "-Wno-unknown-pragmas", "-I", str(SOURCE_DIR)]
    subprocess.run([cc, *flags, "-o", str(exe), str(work / "harness.c")], check=True, capture_output=True,
                   text=True)

    def run(name: str, key: bytes | None = None) -> list[tuple[str, str]]:
        args = [str(exe), str(VECTOR_DIR / name)] + ([key.hex()] if key else [])
        out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
        return [tuple(line.split()) for line in out.splitlines()]

    return run


def _spelled(expected: int | str | None) -> str:
    return "none" if expected is None else str(expected)


@pytest.mark.parametrize("name,key", [("hint_v1.txt", None), ("hint_v2.txt", KEY), ("hint_v1.txt", KEY),
                                      ("hint_v2.txt", None)])
def test_c_decoder_agrees_with_python_on_the_files(c_decoder, name, key):
    got = c_decoder(name, key)
    vectors = load_hints(name)
    assert [u for u, _ in got] == [v.ufrag for v in vectors]
    for (ufrag, decision), vec in zip(got, vectors, strict=True):
        assert decision == _spelled(hint.inspect(ufrag, key)), (ufrag, vec.comment)
        if (name == "hint_v2.txt") == (key is not None):   # the file's own expectations
            assert decision == _spelled(vec.expected), (ufrag, vec.comment)
