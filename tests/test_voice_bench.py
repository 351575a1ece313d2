"""The voice bench's judging code, without a lab: the barge-in table, answer starts in a browser's
getStats samples, and the caller's playout clock (what a listener would hear of audio sent ahead)."""

from __future__ import annotations

import pytest

from splitrelay.bench.voice import _answers, _neteq_per_second, barge_in_table
from splitrelay.client.caller import Caller

LOUD, QUIET = b"\x00\x20" * 960, bytes(1920)  # 20 ms frames: 8192 of 32767 and digital silence


def test_the_barge_in_table_gives_each_steps_median_and_worst_over_every_run_that_worked():
    runs = [{"agent_stop_ms": v, "latency_ms": 2 * v, "error": None} for v in (40.0, 44.0, 42.0)]
    reports = {"a": {"barge_ins": runs[:2]}, "b": {"barge_ins": [runs[2], {"latency_ms": 999.0, "error": "x"}]}}
    table = barge_in_table(reports).splitlines()
    assert "(n = 3)" in table[0]
    assert "| agent flushes its queue, cancels the reply | 42 | 44 |" in table
    assert "| last audible agent frame ends, out of the client's receive path | 84 | 88 |" in table


def test_an_answer_starts_after_a_quiet_stretch_not_at_each_loud_sample():
    levels = [0.0] * 5 + [0.2] * 10 + [0.0] * 3 + [0.2] * 5 + [0.0] * 10 + [0.3] * 5
    samples = [{"t": 100.0 * i, "inLevel": level} for i, level in enumerate(levels)]
    assert _answers(samples) == [500.0, 3300.0]  # a 300 ms pause is inside an answer, 1 s is between two


def test_neteqs_mean_delay_per_second_is_the_delay_added_over_the_samples_emitted():
    samples = [{"t": 100.0 * i, "jbDelay": 0.04 * 480 * i, "jbTarget": 0.02 * 480 * i, "jbEmitted": 480 * i}
               for i in range(21)]
    assert _neteq_per_second(samples, 0.0, 2) == [(40.0, 20.0), (40.0, 20.0)]


async def test_the_playout_clock_plays_speech_back_to_back_and_catches_up_only_on_quiet_frames():
    caller = Caller("http://127.0.0.1:9/whip")
    try:
        for at in (10.0, 10.0, 10.0, 10.02):        # three frames at once (sent ahead), then one in time
            caller._hear(LOUD, now=at)
        assert [round(end, 3) for end, _, _ in caller.played] == [10.02, 10.04, 10.06, 10.08]
        for at in (10.04, 10.06, 10.08):            # quiet frames in time: each skipped while behind
            caller._hear(QUIET, now=at)
        caller._hear(LOUD, now=10.10)
        assert round(caller.played[-1][0], 3) == 10.12   # caught up: speech plays as it comes out
        assert [loud for _, loud, _ in caller.played] == [True] * 4 + [False] * 3 + [True]
    finally:
        await caller.pc.close()


@pytest.mark.parametrize("arrived", [None, 1.5])
async def test_a_heard_frame_keeps_its_packets_arrival_when_the_receive_path_knows_it(arrived):
    caller = Caller("http://127.0.0.1:9/whip")
    try:
        caller._hear(LOUD, arrived)
        assert caller.played[0][2] == arrived
    finally:
        await caller.pc.close()
