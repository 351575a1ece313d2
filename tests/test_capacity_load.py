"""The capacity bench's load client and ramp measure real calls: their echo, their loss and both CPUs.

Short forms (a couple of calls, seconds): they check that every figure is measured from real
libdatachannel calls through the XDP relay into a pinned transceiver, not how many calls fit (the
machine is shared).
"""

from __future__ import annotations

import json

import pytest

from splitrelay.bench import capacity_load
from splitrelay.client import load_client
from splitrelay.lab.stack import start_lab, stop_lab

from .conftest import needs_root

needs_node = pytest.mark.skipif(load_client.unavailable_reason() is not None,
                                reason=str(load_client.unavailable_reason()))


def test_the_pulse_echo_is_the_only_packet_of_its_cycle_above_the_threshold():
    frames = load_client.make_frames()
    cycle = [load_client.base64.b64decode(p) for p in frames["cycle"]]
    sizes = load_client.echo_sizes(cycle)[load_client.CYCLE_FRAMES:]
    loud = [i % load_client.CYCLE_FRAMES for i, size in enumerate(sizes) if size >= frames["echo_threshold"]]
    assert loud and set(loud) <= {load_client.PULSE_INDEX, load_client.PULSE_INDEX + 1}
    assert sizes[load_client.PULSE_INDEX] >= frames["echo_threshold"]      # the run starts at the pulse itself
    assert max(len(p) for p in cycle) < 200                               # pre-encoded: a few bytes a frame


@pytest.fixture(scope="module")
def load_lab():
    info = start_lab(transceivers=1, handler="echo")
    try:
        yield info["name"]
    finally:
        stop_lab(info["name"])


def assert_cpu_measured(cpu: dict) -> None:
    assert cpu["slices"] >= 1 and cpu["pct"] > 0
    assert cpu["us_per_call_s_p10"] <= cpu["us_per_call_s_p90"] and cpu["us_per_call_s"] > 0


@needs_root
@needs_node
def test_echo_calls_report_their_round_trip_loss_and_both_cpus(load_lab):
    result = capacity_load.measure_profile(load_lab, "echo", [1, 2], duration=5.0)   # 2 lag scrapes in it
    json.dumps(result)
    assert result["profile"] == "echo" and result["handler"] == "echo"
    assert [s["sessions"] for s in result["steps"]] == [1, 2][: len(result["steps"])]
    first = result["steps"][0]
    assert first["connected"] == 1 and first["errors"] == []
    assert first["rtt_samples"] >= 3 and 0 < first["rtt_ms_p50"] <= first["rtt_ms_p99"] < 500
    assert first["pulse_loss"] is not None and first["downlink_loss"] is not None
    assert first["packets_sent"] >= 140 and first["packets_received"] >= 140
    assert first["packets_received_small"] == 0          # the echo's silence is the outbound encoder's
    assert first["window_s"] >= 1.5
    assert_cpu_measured(first["transceiver_cpu"])
    assert_cpu_measured(first["client_cpu"])
    assert 0 < first["transceiver_loop_lag_ms_p99"] <= 1000     # scraped from its /metrics over the window
    assert 0 < first["transceiver_in_to_out_ms_p99"] <= 1000    # the echo's frames through the transceiver
    assert result["limited_by"] in (None, "client", "transceiver", "contended")
    assert result["lower_bound"] == (result["limited_by"] != "transceiver")
    assert "## 7. Calls per transceiver core" in "\n".join(capacity_load.markdown({"profiles": {"echo": result}}))


@needs_root
@needs_node
def test_a_handler_that_does_not_echo_loses_every_pulse(load_lab, monkeypatch):
    monkeypatch.setitem(capacity_load.PROFILES, "tone", ("tone", 0.0, 1.0))   # loud all the time, no echo
    result = capacity_load.measure_profile(load_lab, "tone", [1], duration=2.0)
    step = result["steps"][0]
    assert step["connected"] == 1 and step["packets_received"] > 50
    assert step["rtt_samples"] == 0 and step["rtt_ms_p50"] is None and step["pulse_loss"] == 1.0
    assert result["stopped_because"] == "loss 1.0 > 0.01" and result["capacity"] == 0


@needs_root
@needs_node
def test_the_conversation_echoes_only_while_it_speaks_and_sends_comfort_frames_as_dtx_while_it_listens(load_lab):
    # the cycle is 10 s, speaking from 6 s of the caller's stream: 8 s of talk has ~2 s of speaking
    result = capacity_load.measure_profile(load_lab, "conversation", [1], duration=8.0)
    assert result["phase_spread_s"] == 10.0
    step = result["steps"][0]
    assert step["connected"] == 1 and step["errors"] == []
    # the 6-7 byte comfort frames, one in 20 of the ~6 s of listening (DTX), the RTP time running on
    assert 10 <= step["packets_received_small"] <= 30
    assert step["downlink_loss"] == 0 and step["gap_lateness_ms_p99"] < 100
    assert step["rtt_samples"] >= 2 and step["rtt_ms_p50"] > 0
    assert step["pulse_loss"] <= 0.5                      # pulses sent while it speaks come back
    assert 2 <= step["pulses_expected_per_call"][0] <= 5


def test_the_conversation_calls_are_not_in_step_the_second_speaks_twice_as_long_in_the_window(load_lab):
    # 2 calls, spread over the 10 s cycle: the second started 5 s before the window, so the window's 8 s are
    # its stream's 5-13 s (4 s of speaking, 6-10 s) against the first's 0-8 s (2 s): all in step, both got ~4
    result = capacity_load.measure_profile(load_lab, "conversation", [1, 2], duration=8.0)
    assert len(result["steps"]) == 2, result["stopped_because"]
    first, second = result["steps"][1]["pulses_expected_per_call"]
    assert 2 <= first <= 5 and second >= first + 3
    assert result["steps"][1]["pulse_loss"] <= 0.5
    # a round trip is timed only for a pulse sent while the agent speaks: the loud run that starts its
    # speaking phase is not the echo of the pulse before it (such samples made the p99 408 ms at 80 calls)
    assert 0 < result["steps"][1]["rtt_samples"] <= first + second


def test_the_conversation_hears_speech_in_a_frame_with_one_loud_sample_and_echoes_only_while_it_speaks():
    import asyncio

    from splitrelay.transceiver.conversation import ConversationHandler
    from splitrelay.transceiver.handlers import FRAME_SAMPLES, PcmFrame

    class Io:
        sent: list = []

        def send_audio(self, frame: PcmFrame) -> None:
            self.sent.append(frame.pts)

    handler = ConversationHandler(Io(), cycle=1.0, speak_share=0.5)   # listens 0-0.5 s, speaks 0.5-1 s
    quiet, loud = [0] * FRAME_SAMPLES, [0] * FRAME_SAMPLES
    quiet[500], loud[500] = 1023, -1025                                 # the VAD's bar: a peak of 1024

    async def hear() -> None:
        for pts, samples in ((0, quiet), (960, loud), (24000, quiet), (24960, loud)):
            await handler.on_audio(PcmFrame(PcmFrame.from_array(samples).samples, pts=pts))

    asyncio.run(hear())
    assert handler.frames_heard == 4 and handler.speech_frames == 2
    assert Io.sent == [24000, 24960]


def test_the_conversation_handler_refuses_a_speak_share_outside_zero_to_one_and_a_dtx_not_0_or_1():
    from splitrelay.transceiver.handlers import handler_factory

    with pytest.raises(ValueError, match=r"^conversation speak_share must be 0\.\.1, got 2$"):
        handler_factory("conversation:speak_share=2")
    with pytest.raises(ValueError, match=r"^conversation cycle must be 0\.1\.\.3600 s, got 0$"):
        handler_factory("conversation:cycle=0")
    with pytest.raises(ValueError, match=r"^conversation dtx must be 0 or 1, got 'yes'$"):
        handler_factory("conversation:dtx=yes")


@pytest.mark.skipif(capacity_load.voice_unavailable() is not None, reason="no voice extras (espeak-ng)")
def test_the_voice_caller_speaks_a_sentence_then_pauses_and_sends_no_pulse():
    frames = load_client.make_speech_frames()
    cycle = [load_client.base64.b64decode(p) for p in frames["cycle"]]
    pause = round(load_client.SPEECH_PAUSE_S * 1000 / load_client.FRAME_MS)
    assert frames["pulse_index"] == -1 and 1.0 < frames["speech_s"] < 4.0
    assert len(cycle) == pause + round(frames["speech_s"] * 1000 / load_client.FRAME_MS)
    speech, silence = cycle[:-pause], cycle[-pause + 5:]
    assert sum(map(len, speech)) / len(speech) > 2 * max(map(len, silence))   # the words cost more bytes


@needs_root
@needs_node
@pytest.mark.skipif(capacity_load.voice_unavailable() is not None, reason="no voice extras")
def test_the_voice_agent_answers_the_speaking_caller_and_its_cost_is_measured(load_lab):
    result = capacity_load.measure_profile(load_lab, "voice", [1], duration=8.0)
    step = result["steps"][0]
    assert step["connected"] == 1 and step["errors"] == []
    assert step["packets_received_large"] >= 25            # its spoken answer: loud packets, not the silence
    assert step["rtt_samples"] == 0 and step["gap_lateness_ms_p99"] is not None
    assert_cpu_measured(step["transceiver_cpu"])


METRICS = """# HELP splitrelay_transceiver_event_loop_lag_seconds How late
splitrelay_transceiver_event_loop_lag_seconds_bucket{le="0.002"} %d
splitrelay_transceiver_event_loop_lag_seconds_bucket{le="0.02"} %d
splitrelay_transceiver_event_loop_lag_seconds_bucket{le="0.05"} %d
splitrelay_transceiver_event_loop_lag_seconds_bucket{le="+Inf"} %d
splitrelay_transceiver_event_loop_lag_seconds_count %d
"""


def test_the_loop_lag_p99_is_read_from_the_buckets_between_two_scrapes():
    before = capacity_load.lag_buckets(METRICS % (500, 600, 600, 600, 600))
    assert before == {0.002: 500.0, 0.02: 600.0, 0.05: 600.0, float("inf"): 600.0}
    quiet = capacity_load.lag_buckets(METRICS % (699, 800, 800, 800, 800))
    late = capacity_load.lag_buckets(METRICS % (650, 760, 798, 800, 800))   # 2 of 200 past 20 ms
    assert capacity_load.lag_p99_ms(before, quiet) == 2.0
    assert capacity_load.lag_p99_ms(before, late) == 50.0
    assert capacity_load.lag_p99_ms(before, before) is None                  # no sample between


def step_at(trx_pct: float, client_pct: float, other_pct: float, lag_ms: float | None) -> dict:
    return {"transceiver_cpu": {"pct": trx_pct}, "client_cpu": {"pct": client_pct},
            "other_work_on_transceiver_core_pct": other_pct, "transceiver_loop_lag_ms_p99": lag_ms}


def test_a_late_loop_makes_the_step_the_transceivers_unless_the_client_or_other_work_was_the_limit():
    assert capacity_load._limited_by(step_at(83, 40, 2, 50.0)) == "transceiver"
    assert capacity_load._limited_by(step_at(83, 40, 2, 10.0)) is None
    assert capacity_load._limited_by(step_at(83, 40, 2, None)) is None
    assert capacity_load._limited_by(step_at(83, 95, 2, 50.0)) == "client"
    assert capacity_load._limited_by(step_at(60, 40, 30, 50.0)) == "contended"
