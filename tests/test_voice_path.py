"""The transceiver's voice path on its own: the adaptive receive buffer, libopus, push-paced sending.

The buffer is pure bookkeeping with the time passed in, so these tests drive it with real Opus
packets and chosen arrival times: behaviour, not timing.
"""

from __future__ import annotations

import asyncio
import math
import random
import struct

import pytest
from aioice.ice import Connection
from aiortc.rtcrtpreceiver import RTCRtpReceiver

from splitrelay.transceiver.audio import (
    AIORTC_JITTER_BUFFER, FRAME_BYTES, LEAD, QUIET_PEAK, REPLY_LEAD, OutboundAudio, VoiceReceiver, quiet,
    check_aiortc,
)
from splitrelay.transceiver.handlers import FRAME_SAMPLES, FRAME_SECONDS, PcmFrame
from splitrelay.transceiver.jitter import MAX_CONCEALED, WINDOW, AdaptiveJitterBuffer
from splitrelay.transceiver.opus import OpusDecoder, OpusEncoder, packet_samples

T0 = 1000.0


def tone_packets(count: int) -> list[bytes]:
    encoder = OpusEncoder()
    step = 2 * math.pi * 400 / 48000
    return [encoder.encode(struct.pack(f"<{FRAME_SAMPLES}h", *(int(8000 * math.sin(step * (i * FRAME_SAMPLES + n)))
                                                            for n in range(FRAME_SAMPLES))))
            for i in range(count)]


PACKETS = tone_packets(40)


def feed(buffer: AdaptiveJitterBuffer, index: int, arrival: float, seq0: int = 65530) -> None:
    """Packet ``index`` of the stream (sequence numbers wrap past 65535 on purpose)."""
    buffer.put((seq0 + index) & 0xFFFF, (4_294_960_000 + index * FRAME_SAMPLES) & 0xFFFFFFFF, PACKETS[index],
               arrival)


def drain(buffer: AdaptiveJitterBuffer, now: float) -> list:
    out = []
    while (frame := buffer.pop(now)) is not None:
        out.append(frame)
    return out


def test_libopus_encodes_decodes_and_conceals_20_ms_frames():
    decoder = OpusDecoder()
    assert packet_samples(PACKETS[0]) == FRAME_SAMPLES
    assert len(decoder.decode(PACKETS[0])) == FRAME_BYTES
    assert len(decoder.conceal(FRAME_SAMPLES)) == FRAME_BYTES                 # PLC
    assert len(decoder.conceal(FRAME_SAMPLES, PACKETS[2])) == FRAME_BYTES     # FEC from the next packet


def test_the_buffer_starts_at_one_frame_and_releases_in_order_frames_at_once():
    buffer = AdaptiveJitterBuffer()
    assert buffer.delay == pytest.approx(FRAME_SECONDS)
    for i in range(10):   # a clean link: each packet leaves the moment it arrives, across the seq wrap
        feed(buffer, i, T0 + i * FRAME_SECONDS)
        released = drain(buffer, T0 + i * FRAME_SECONDS)
        assert [f.payload for f in released] == [PACKETS[i]]
        assert released[0].timestamp == i * FRAME_SAMPLES
    assert buffer.delay == pytest.approx(FRAME_SECONDS) and buffer.concealed == 0


def test_the_buffer_grows_only_when_jitter_is_measured():
    buffer = AdaptiveJitterBuffer()
    for i in range(20):
        feed(buffer, i, T0 + i * FRAME_SECONDS + (0.0001 if i % 2 else 0.0))
        drain(buffer, T0 + i * FRAME_SECONDS + 0.001)
    assert buffer.delay == pytest.approx(FRAME_SECONDS)      # 100 µs of jitter: still one frame
    for i in range(20, 40):                                  # every other packet 30 ms late
        feed(buffer, i, T0 + i * FRAME_SECONDS + (0.03 if i % 2 else 0.0))
        drain(buffer, T0 + i * FRAME_SECONDS + 0.031)
    assert buffer.jitter == pytest.approx(0.03)
    assert buffer.delay == pytest.approx(0.03 + FRAME_SECONDS / 2)
    assert buffer.concealed == 0 and buffer.late == 0         # in order, so nothing was missing
    assert buffer.wait == pytest.approx(FRAME_SECONDS)        # and a gap is still waited for one frame only


def test_the_jitter_is_the_95th_percentile_of_the_last_window_of_lateness_as_packets_keep_coming():
    # the sorted copy the percentile is read from follows the window packet by packet, ties and evictions included
    rng = random.Random(24)
    buffer = AdaptiveJitterBuffer()
    for i in range(3 * WINDOW + 7):
        late = rng.choice([0.0, 0.0, 0.004, 0.012]) if i < 2 * WINDOW else rng.random() * 0.05
        buffer.put(i, i * FRAME_SAMPLES, PACKETS[i % len(PACKETS)], T0 + i * FRAME_SECONDS + late)
        window = sorted(buffer._lateness)
        assert len(window) == min(i + 1, WINDOW) and buffer._lateness_sorted == window
        assert buffer.jitter == window[int(0.95 * (len(window) - 1))]
    assert buffer.jitter > 0.04


def test_a_gap_waits_the_measured_delay_only_once_the_path_has_reordered():
    buffer = AdaptiveJitterBuffer()
    for i in range(20):                                       # jitter, in order: every other packet 30 ms late
        feed(buffer, i, T0 + i * FRAME_SECONDS + (0.03 if i % 2 else 0.0))
        drain(buffer, T0 + i * FRAME_SECONDS + (0.03 if i % 2 else 0.0))
    feed(buffer, 21, T0 + 21 * FRAME_SECONDS + 0.03)          # 20 is missing, 21 is in: lost, concealed at once
    assert [f.payload for f in drain(buffer, T0 + 21 * FRAME_SECONDS + 0.03)] == [None, PACKETS[21]]
    feed(buffer, 20, T0 + 21 * FRAME_SECONDS + 0.031)         # ...but it was only overtaken
    assert buffer.late == 1 and buffer.wait == buffer.delay > FRAME_SECONDS
    feed(buffer, 23, T0 + 23 * FRAME_SECONDS)                 # from now on a gap is waited for the delay
    assert drain(buffer, T0 + 23 * FRAME_SECONDS) == []
    assert buffer.next_deadline() == pytest.approx(T0 + 22 * FRAME_SECONDS + buffer.delay)


def test_a_lost_packet_is_concealed_at_its_deadline_and_its_late_copy_dropped():
    buffer = AdaptiveJitterBuffer()
    released = []
    for i in (0, 1):
        feed(buffer, i, T0 + i * FRAME_SECONDS)
        released += drain(buffer, T0 + i * FRAME_SECONDS)
    assert [f.payload for f in released] == PACKETS[:2]
    feed(buffer, 3, T0 + 3 * FRAME_SECONDS)                  # 2 is missing: 3 waits for it until its deadline
    assert buffer.next_deadline() == pytest.approx(T0 + 2 * FRAME_SECONDS + buffer.delay)
    frames = drain(buffer, buffer.next_deadline())
    assert [f.payload for f in frames] == [None, PACKETS[3]]
    assert frames[0].next_payload == PACKETS[3]              # the decoder may use its FEC
    assert frames[0].timestamp == 2 * FRAME_SAMPLES and frames[0].samples == FRAME_SAMPLES
    feed(buffer, 2, T0 + 5 * FRAME_SECONDS)                   # the lost one turns up after all
    assert drain(buffer, T0 + 5 * FRAME_SECONDS) == []
    assert (buffer.concealed, buffer.late, buffer.released) == (1, 1, 3)


def test_an_outage_is_concealed_for_a_few_frames_then_the_stream_goes_on_from_what_came():
    buffer = AdaptiveJitterBuffer()
    feed(buffer, 0, T0)
    drain(buffer, T0)
    feed(buffer, 20, T0 + 0.4)                               # 19 packets lost on a path that moved
    frames = drain(buffer, T0 + 0.4)
    assert [f.payload for f in frames] == [None] * MAX_CONCEALED + [PACKETS[20]]
    assert frames[0].timestamp == (20 - MAX_CONCEALED) * FRAME_SAMPLES   # the outage's end is what is filled
    assert (buffer.concealed, buffer.skipped) == (MAX_CONCEALED, 19 - MAX_CONCEALED)


def test_a_stalled_sender_is_waited_for_and_nothing_it_sends_after_is_dropped():
    buffer = AdaptiveJitterBuffer()
    feed(buffer, 0, T0)
    drain(buffer, T0)
    assert drain(buffer, T0 + 0.2) == [] and buffer.next_deadline() is None   # nothing came: nothing to conceal
    for i in range(1, 11):                                   # then the sender catches up in one burst
        feed(buffer, i, T0 + 0.2)
    assert [f.payload for f in drain(buffer, T0 + 0.2)] == PACKETS[1:11]
    assert (buffer.concealed, buffer.late) == (0, 0)
    assert buffer.delay > 5 * FRAME_SECONDS                  # and the buffer learnt that this link stalls


def test_the_aiortc_and_aioice_internals_the_voice_path_relies_on_are_there():
    """An aiortc upgrade that moves these fails here, not in a call (check_aiortc runs per session)."""
    check_aiortc()
    assert AIORTC_JITTER_BUFFER == "_RTCRtpReceiver__jitter_buffer"
    assert AIORTC_JITTER_BUFFER in RTCRtpReceiver._handle_rtp_packet.__code__.co_names
    assert callable(Connection.data_received)


async def test_the_voice_receiver_decodes_and_conceals_what_the_buffer_releases():
    voice = VoiceReceiver()
    for i in (0, 2):
        voice.put(i, i * FRAME_SAMPLES, PACKETS[i])
    first = await voice.recv()
    second = await asyncio.wait_for(voice.recv(), 5)         # 1 never comes: concealed at its deadline
    third = await voice.recv()
    assert [f.pts for f in (first, second, third)] == [0, FRAME_SAMPLES, 2 * FRAME_SAMPLES]
    assert second.received is None and first.received is not None
    assert all(len(f.samples) == FRAME_BYTES for f in (first, second, third))
    assert voice.to_dict()["frames_concealed"] == 1


LOUD = struct.pack(f"<{FRAME_SAMPLES}h", *(int(8000 * math.sin(2 * math.pi * 400 * n / 48000))
                                          for n in range(FRAME_SAMPLES)))  # 20 ms of a 400 Hz tone: never shed


def peak(packet: object, decoder: OpusDecoder) -> int:
    pcm = decoder.decode(bytes(packet))
    return max(abs(x) for x in struct.unpack(f"<{len(pcm) // 2}h", pcm))


@pytest.mark.parametrize("received, lead", [(None, REPLY_LEAD), (0.0, LEAD)], ids=["reply", "live"])
async def test_outbound_sends_pushed_audio_at_once_and_paces_a_burst_by_rtp_time(received, lead):
    """A reply (generated audio) runs one frame ahead of its RTP time, live audio three (a caller's bursts)."""
    out = OutboundAudio()
    out.push(PcmFrame(LOUD * 10, received=received))         # 200 ms of it at once
    ahead = round(lead / FRAME_SECONDS)
    packets = [await asyncio.wait_for(out.recv(), 1) for _ in range(ahead + 1)]
    assert [p.pts for p in packets] == [i * FRAME_SAMPLES for i in range(ahead + 1)]
    pending = asyncio.ensure_future(out.recv())              # the rest waits for its RTP time
    await asyncio.sleep(0)
    assert not pending.done()
    assert (await asyncio.wait_for(pending, 1)).pts == (ahead + 1) * FRAME_SAMPLES
    assert out.clear() == pytest.approx((10 - ahead - 2) * FRAME_SECONDS)
    out.stop()


async def test_clear_drops_every_frame_not_yet_sent_and_the_stream_goes_on_with_silence():
    out, decoder = OutboundAudio(), OpusDecoder()
    out.push(PcmFrame(LOUD * 25))                            # a 500 ms reply
    before = [await asyncio.wait_for(out.recv(), 1) for _ in range(2)]
    assert out.clear() == pytest.approx(23 * FRAME_SECONDS) and out.backlog == 0
    assert out.cleared_frames == 23
    after = [await asyncio.wait_for(out.recv(), 1) for _ in range(5)]
    assert [p.pts for p in before + after] == [i * FRAME_SAMPLES for i in range(7)]  # no gap in RTP time
    peaks = [peak(p, decoder) for p in before + after]
    assert min(peaks[:2]) > 4000                             # the tone was playing...
    assert max(peaks[3:]) < QUIET_PEAK                       # ...and after the codec's tail of it, silence
    out.stop()


async def test_dtx_sends_one_silent_frame_in_twenty_and_the_rtp_time_runs_on_through_the_pause():
    out = OutboundAudio()
    out.dtx = True
    out.push(PcmFrame(LOUD * 2))                             # a 40 ms reply, then nothing to say
    loop = asyncio.get_running_loop()
    packets, times = [], []
    for _ in range(4):
        packets.append(await asyncio.wait_for(out.recv(), 2))
        times.append(loop.time())
    assert [p.pts // FRAME_SAMPLES for p in packets] == [0, 1, 2, 22]   # the pause's frames 0 and 20 only
    assert times[3] - times[2] >= 19 * FRAME_SECONDS                  # the slots between passed, unsent
    assert out.silent_frames == 2 and out.dtx_slots == 19
    out.push(PcmFrame(LOUD))                                 # the reply goes on at the RTP time of now
    assert (await asyncio.wait_for(out.recv(), 1)).pts == 23 * FRAME_SAMPLES
    out.stop()


async def test_a_queue_of_live_audio_sheds_its_quiet_frames_but_never_a_tone_or_a_reply():
    out = OutboundAudio()
    out.push(PcmFrame(bytes(FRAME_BYTES), received=0.0))
    await asyncio.wait_for(out.recv(), 1)
    loud = b"\x40\x1f" * FRAME_SAMPLES                        # 8000: a tone
    for _ in range(20):                                      # a caller's catch-up burst: 400 ms at once
        out.push(PcmFrame(bytes(FRAME_BYTES), received=0.0))
    out.push(PcmFrame(loud, received=0.0))
    out.push(PcmFrame(bytes(FRAME_BYTES)))                   # generated audio (no arrival time) after it
    decoder, peaks = OpusDecoder(), []
    for _ in range(30):                                      # bounded: until the queue is empty
        if out.backlog == 0:
            break
        pcm = decoder.decode(bytes(await asyncio.wait_for(out.recv(), 1)))
        peaks.append(max(abs(x) for x in struct.unpack(f"<{len(pcm) // 2}h", pcm)))
    assert out.backlog == 0 and out.skipped_frames >= 10     # most of the quiet burst was shed...
    assert out.frames_out + out.skipped_frames == 23         # ...and nothing else was lost
    assert max(peaks) > 4000                                 # the tone went out
    assert all(p < 1000 for p in peaks[:2])                  # and the pause before it was shortened, not closed
    out.stop()


@pytest.mark.parametrize("peak_sample", [0, 1, 255, 256, 1023, -1, -256, -1024, 1024, -1025, 2000, -30000, 32767,
                                         -32768])
@pytest.mark.parametrize("at", [0, 480, FRAME_SAMPLES - 1])
def test_a_frame_is_quiet_exactly_when_every_sample_is_within_the_quiet_peak(peak_sample, at):
    # the high-byte test in quiet against its definition, one loud sample anywhere in a low-level frame
    samples = [((n * 37) % 1800) - 900 for n in range(FRAME_SAMPLES)]
    samples[at] = peak_sample
    pcm = struct.pack(f"<{FRAME_SAMPLES}h", *samples)
    assert quiet(pcm) == quiet(bytearray(pcm)) == all(-QUIET_PEAK <= s < QUIET_PEAK for s in samples)
