"""The translation cost bench (bench/translate_cost.py) measures what it says, on a few runs."""

from __future__ import annotations

from splitrelay.bench.translate_cost import measure

from .conftest import needs_root

pytestmark = needs_root


def test_the_translation_bench_times_both_programs_in_both_modes_and_counts_both_directions_memory():
    out = measure(runs=50, trials=1)
    for mode in ("dnat", "translate"):
        for prog in ("xdp_public", "xdp_internal"):
            assert 0 < out["ns_per_packet"][mode][prog] < 1e6
    assert out["entries"]["port_slots"] == 65536
    per_flow = out["bytes_per_flow"]
    assert per_flow["translate"] > per_flow["dnat"] > 0
