"""`make demo` prints why the voice agent answered when it did (issue 23): the pause, the score, the wait."""

from __future__ import annotations

from splitrelay.cli.demo import turn_decision


def test_a_fixed_window_turn_says_the_silence_heard_and_the_window():
    turn = {"endpoint_ms": 421.3, "reason": "silence", "silence_ms": 400, "model": None}
    assert turn_decision(turn) == "421 ms of silence heard, the fixed window is 400 ms (turn=fixed)"


def test_a_smart_turn_says_the_silence_heard_the_models_score_and_how_long_it_took():
    turn = {"endpoint_ms": 131.0, "reason": "complete", "silence_ms": 96,
            "model": {"score": 0.934, "pause_ms": 70.2, "infer_ms": 55.4}}
    assert turn_decision(turn) == ("131 ms of silence heard, ended because the model said finished; the model, "
                                   "asked after 70 ms of it, scored 0.93 in 55 ms (turn=smart)")


def test_a_turn_the_model_held_to_the_longest_wait_says_so():
    turn = {"endpoint_ms": 1512.0, "reason": "max_wait", "silence_ms": 96,
            "model": {"score": 0.26, "pause_ms": 66.0, "infer_ms": 61.0}}
    assert turn_decision(turn).startswith("1512 ms of silence heard, ended because the model said unfinished; "
                                          "waited the longest; the model, asked after 66 ms of it, scored 0.26")


def test_no_end_of_turn_is_said_plainly():
    assert turn_decision({"endpoint_ms": None}) == "none (the agent detected no end of turn)"
