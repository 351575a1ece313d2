"""bench/cpu_ab.py's pure parts: what a variant is, and what py-spy's collapsed stacks say."""

from __future__ import annotations

import pytest

from splitrelay.bench.cpu_ab import parse_variant, top_frames


def test_a_variant_is_a_name_and_its_environment():
    assert parse_variant("before:PYTHONPATH=/tmp/base/py,SPLITRELAY_EVENT_LOOP=asyncio") == (
        "before", {"PYTHONPATH": "/tmp/base/py", "SPLITRELAY_EVENT_LOOP": "asyncio"})
    assert parse_variant("after:") == ("after", {})


@pytest.mark.parametrize("spec, message", [
    (":A=b", "a variant is name:KEY=VALUE,..., got ':A=b'"),
    ("x:A", "variant x: 'A' is not KEY=VALUE"),
])
def test_a_malformed_variant_is_refused_with_what_is_wrong(spec, message):
    with pytest.raises(ValueError) as exc:
        parse_variant(spec)
    assert str(exc.value) == message


def test_top_frames_counts_own_and_inclusive_samples_once_per_stack(tmp_path):
    raw = tmp_path / "t.raw"
    raw.write_text("main (a/m.py:1);loop (b/l.py:2);encode (t/opus.py:3) 6\n"
                   "main (a/m.py:1);loop (b/l.py:2);loop (b/l.py:9) 3\n"
                   "main (a/m.py:1);select (s/sel.py:4) 1\n")
    top = top_frames(raw)
    assert top["samples"] == 10
    assert top["self"] == [("encode (opus.py)", 60.0), ("loop (l.py)", 30.0), ("select (sel.py)", 10.0)]
    assert dict(top["inclusive"]) == {"main (m.py)": 100.0, "loop (l.py)": 90.0, "encode (opus.py)": 60.0,
                                      "select (sel.py)": 10.0}
