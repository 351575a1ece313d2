"""Barge-in heard in Chromium (issue 23): the caller's onset -> the agent silent at the browser's output.

The judging of the page's level crossings is plain code, tested first without a browser; then one
Chromium call through a lab's relay to the voice agent, barging in twice (about a minute: the lab, the
agent's models, the browser).
"""

from __future__ import annotations

import pytest

from splitrelay.bench.browser_barge import barge_ins, measure, spans
from splitrelay.client.browser import unavailable_reason

from .conftest import needs_root


def crossings(which: str, *stretches: tuple[float, float]) -> list[dict]:
    out = []
    for start, end in stretches:
        out += [{"t": start, "which": which, "loud": True}, {"t": end, "which": which, "loud": False}]
    return out


def test_short_quiet_gaps_inside_speech_join_one_span_and_long_ones_split_it():
    levels = crossings("agent", (0, 100), (300, 500), (1500, 1600))
    assert spans(levels, "agent", 600) == [(0, 500), (1500, 1600)]
    assert spans(levels, "caller", 600) == []


def test_a_barge_in_runs_from_the_callers_onset_to_the_end_of_the_agent_speech_it_fell_on():
    levels = sorted(crossings("agent", (1000, 4000), (4200, 5140)) + crossings("caller", (0, 900), (5000, 5400)),
                    key=lambda x: x["t"])
    assert barge_ins(levels) == [140.0]     # the question (the agent silent then) is not a barge-in


def test_an_agent_that_talks_on_over_the_caller_is_measured_to_its_end_not_to_the_onset():
    levels = sorted(crossings("agent", (1000, 9000)) + crossings("caller", (5000, 5400)), key=lambda x: x["t"])
    assert barge_ins(levels) == [4000.0]


@needs_root
@pytest.mark.skipif(unavailable_reason() is not None, reason=f"no browser: {unavailable_reason()}")
def test_chromium_hears_the_agent_fall_silent_soon_after_the_caller_speaks_over_it():
    result = measure(cycles=2)
    assert result.error is None
    assert len(result.latencies_ms) == 2, result          # the agent was talking at both onsets...
    assert max(result.latencies_ms) < 1500, result        # ...and stopped (its story runs 15 s more)
    assert result.jitter_buffer_ms is not None
