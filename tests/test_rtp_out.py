"""The outbound audio sent past aiortc's RTP sender task (transceiver/rtp_out.py), heard by real callers.

Each call test runs on both send paths (``direct``, the default, and ``aiortc``, the sender task kept for
the A/B): a plain aiortc caller (test_transceiver.Caller) records every RTP and RTCP packet its own
receiver takes, so the checks are what a standard stack saw; libdatachannel (client/node) checks its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcrtpparameters import RTCRtpCodecParameters, RTCRtpHeaderExtensionParameters, RTCRtpSendParameters
from aiortc.rtp import (
    RTCP_RTPFB_NACK, HeaderExtensionsMap, RtcpPsfbPacket, RtcpRtpfbPacket, RtcpSrPacket, RtpPacket,
)

from splitrelay.client import node_call
from splitrelay.client.beeps import goertzel_power
from splitrelay.transceiver import opus, rtp_out
from splitrelay.transceiver.audio import AudioPathError, check_aiortc
from splitrelay.transceiver.handlers import FRAME_SAMPLES, SAMPLE_RATE, PcmFrame
from splitrelay.transceiver.opus import OpusDecoder, OpusEncoder
from splitrelay.transceiver.service import Transceiver
from splitrelay.transceiver.session import Session

from . import test_transceiver
from .test_transceiver import Caller, ended, until
from .test_workers import children, serving

transceiver = test_transceiver.transceiver   # the fixture: a transceiver on loopback, direct mode
PATHS = pytest.mark.parametrize("path", rtp_out.SEND_PATHS)
REPLY_HZ = 1000.0


def tone(freq: float, frames: int, amplitude: int = 8000) -> bytes:
    step = 2 * math.pi * freq / SAMPLE_RATE
    return struct.pack(f"<{frames * FRAME_SAMPLES}h", *(int(amplitude * math.sin(step * n))
                                                      for n in range(frames * FRAME_SAMPLES)))


def steps(packets: list[RtpPacket]) -> tuple[set[int], set[int]]:
    """The sequence number and timestamp steps from each packet to the next."""
    pairs = list(zip(packets, packets[1:], strict=False))
    return ({(b.sequence_number - a.sequence_number) & 0xFFFF for a, b in pairs},
            {(b.timestamp - a.timestamp) & 0xFFFFFFFF for a, b in pairs})


class Heard:
    """Every RTP packet and sender report the caller's aiortc receiver took, in order."""

    def __init__(self, caller: Caller) -> None:
        self.rtp: list[RtpPacket] = []
        self.reports: list[tuple[RtcpSrPacket, int]] = []   # (the report, RTP packets heard when it came)
        receiver = caller.pc.getReceivers()[0]
        handle_rtp, handle_rtcp = receiver._handle_rtp_packet, receiver._handle_rtcp_packet

        async def rtp(packet: RtpPacket, arrival_time_ms: int) -> None:
            self.rtp.append(packet)
            await handle_rtp(packet, arrival_time_ms=arrival_time_ms)

        async def rtcp(packet: Any) -> None:  # noqa: ANN401
            if isinstance(packet, RtcpSrPacket):
                self.reports.append((packet, len(self.rtp)))
            await handle_rtcp(packet)

        receiver._handle_rtp_packet, receiver._handle_rtcp_packet = rtp, rtcp


@contextlib.asynccontextmanager
async def call(transceiver: Transceiver, path: str, monkeypatch: pytest.MonkeyPatch,
               ) -> AsyncIterator[tuple[Caller, Session, Heard, list[dict]]]:
    """An echo call on send path ``path`` whose tone already came back; the errors the loop's exception handler
    saw meanwhile (nothing of the send path may raise into the loop)."""
    monkeypatch.setenv(rtp_out.SEND_PATH_ENV, path)
    loop, errors = asyncio.get_running_loop(), []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    caller = Caller(transceiver.whip_url, 700.0, listen_for=(REPLY_HZ,))
    heard = Heard(caller)
    async with aiohttp.ClientSession() as http:
        try:
            await caller.call(http)
            await until(caller.heard_own, "the echo of the caller's tone")
            session = transceiver.sessions[caller.session_id]
            assert (session.outbound.direct is not None) == (path == "direct")
            yield caller, session, heard, errors
        finally:
            await caller.hangup(http)
            loop.set_exception_handler(None)


def sender_of(session: Session) -> Any:  # noqa: ANN401 - aiortc's RTCRtpSender
    return next(s for s in session.pc.getSenders() if s.track is session.outbound)


@PATHS
async def test_the_caller_hears_every_frame_in_sequence_960_ticks_apart_and_the_sender_reports_count_them(
        transceiver, path, monkeypatch):
    async with call(transceiver, path, monkeypatch) as (caller, session, heard, errors):
        sender = sender_of(session)
        for _ in range(300):   # aiortc sends a report every 0.5-1.5 s: until two have come
            if len(heard.reports) >= 2:
                break
            await asyncio.sleep(0.02)
        # getStats does not suspend, so this is the direct path's count at the same moment (read once the
        # call was down, it had sent one packet more in a CI run)
        stats = await session.stats()
        sent_direct = session.outbound.direct.packets if path == "direct" else None
        got = list(heard.rtp)
    assert len(got) > 50 and len(heard.reports) >= 2
    opus = int(re.search(r"^a=rtpmap:(\d+) opus/", caller.answer, re.M).group(1))
    assert {(p.ssrc, p.payload_type, p.marker, p.extensions.mid) for p in got} == {(sender._ssrc, opus, 1, "0")}
    assert steps(got) == ({1}, {FRAME_SAMPLES})
    assert 0 <= stats["packets_sent"] - len(got) <= 3   # getStats counts what was sent (a few still in flight)
    for report, count in heard.reports:   # each report counts the packets sent before it, all heard by then
        info = report.sender_info
        assert report.ssrc == sender._ssrc and info.packet_count <= count
        last = got[info.packet_count - 1]
        assert info.rtp_timestamp == last.timestamp
        assert info.octet_count == sum(len(p.payload) for p in got[:info.packet_count])
    if path == "direct":
        assert sent_direct == stats["packets_sent"] and session.outbound.direct.declined is None
    assert errors == []


@PATHS
async def test_clear_drops_a_queued_reply_within_one_frame_on_either_path(transceiver, path, monkeypatch):
    decoder = OpusDecoder()
    async with call(transceiver, path, monkeypatch) as (caller, session, heard, errors):
        session.send_audio(PcmFrame(tone(REPLY_HZ, 40)))     # an 800 ms reply, generated audio
        start = len(heard.rtp)
        for _ in range(200):                                  # until the caller has heard 5 frames of it
            if len(heard.rtp) >= start + 8:
                break
            await asyncio.sleep(0.02)
        last_sent = sender_of(session)._RTCRtpSender__rtp_timestamp
        assert session.clear_audio() > 0.4
        for _ in range(200):                                  # and 10 frames after the clear
            if len(heard.rtp) >= start + 20:
                break
            await asyncio.sleep(0.02)
        got = list(heard.rtp)
    reply = []   # (frames after the last one sent before the clear, power of the reply's tone)
    for packet in got:
        pcm = decoder.decode(packet.payload)
        after = ((packet.timestamp - last_sent) & 0xFFFFFFFF) // FRAME_SAMPLES
        reply.append((after if after < 1 << 20 else -1, goertzel_power(struct.unpack(f"<{FRAME_SAMPLES}h", pcm),
                                                                       REPLY_HZ)))
    assert max(p for a, p in reply if a == 0) > 0.01          # the reply was playing when it was cleared
    assert max(p for a, p in reply if a >= 2) < 0.001         # one frame later (the codec's tail), it was gone
    assert errors == []


@pytest.mark.parametrize("mode", list(opus.OPUS_MODES))
async def test_the_caller_hears_celt_only_from_a_lowdelay_encoder_and_hybrid_speech_from_voip(transceiver, mode,
                                                                                                monkeypatch):
    monkeypatch.setenv(opus.OPUS_MODE_ENV, mode)
    async with call(transceiver, "direct", monkeypatch) as (caller, session, heard, errors):
        start = len(heard.rtp)
        session.send_audio(PcmFrame(speechlike(25)))       # 500 ms of a voiced sound, as TTS would send
        for _ in range(200):
            if len(heard.rtp) >= start + 25:
                break
            await asyncio.sleep(0.02)
        got = list(heard.rtp)[start:]
    configs = {p.payload[0] >> 3 for p in got if len(p.payload) > 10}   # RFC 6716 TOC: 16-31 are CELT only
    assert configs and (all(c >= 16 for c in configs) if mode == "lowdelay" else any(c < 16 for c in configs))
    assert errors == []


def speechlike(frames: int) -> bytes:
    """A vowel-like sound: a 140 Hz pulse train through three formants (what makes libopus pick SILK)."""
    out = []
    for n in range(frames * FRAME_SAMPLES):
        t = n / SAMPLE_RATE
        out.append(int(sum(a * math.sin(2 * math.pi * f * t) for f, a in ((140, 3000), (280, 2500), (700, 2000),
                                                                           (1200, 1200), (2600, 600)))))
    return struct.pack(f"<{len(out)}h", *out)


def test_the_opus_mode_given_to_a_supervisor_reaches_every_worker(tmp_path, monkeypatch):
    monkeypatch.delenv(opus.OPUS_MODE_ENV, raising=False)
    with serving(tmp_path, "--processes", "2", "--backend-id", "46", "--opus-mode", "lowdelay") as (proc, *_):
        workers = children(proc.pid)
        assert len(workers) == 2
        for pid in workers:   # in the environment each worker's serve reads (and passes on to opus.py)
            assert b"SPLITRELAY_OPUS_MODE=lowdelay" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


def test_a_bad_opus_mode_is_refused_with_the_choices(monkeypatch):
    monkeypatch.setenv(opus.OPUS_MODE_ENV, "opus")
    with pytest.raises(opus.OpusError, match=r"^SPLITRELAY_OPUS_MODE='opus': choose from voip, lowdelay$"):
        opus.outbound_application()


async def test_a_session_that_ends_between_frames_leaves_no_timer_callback_or_task(transceiver, monkeypatch):
    async with call(transceiver, "direct", monkeypatch) as (caller, session, heard, errors):
        direct = session.outbound.direct
        session.send_audio(PcmFrame(tone(REPLY_HZ, 40)))   # frames waiting for their slots: the timer is armed
        await asyncio.sleep(0.05)
        assert direct._timer is not None and direct.running
        sender = sender_of(session)
    await ended(transceiver, caller.session_id)
    assert not direct.running and direct._timer is None and direct._soon is None and not direct._tasks
    assert sender._RTCRtpSender__rtp_task.done() and session.outbound.readyState == "ended"
    loop = asyncio.get_running_loop()
    scheduled = getattr(loop, "_scheduled", [])                # asyncio's loop: none of its timers is ours
    assert not [h for h in scheduled if not h.cancelled() and getattr(h._callback, "__self__", None) is direct]
    assert errors == []


async def test_nack_pli_and_remb_floods_from_the_caller_change_nothing_on_the_direct_path(transceiver, monkeypatch,
                                                                                            caplog):
    """A peer's RTCP reaches aiortc's sender unchanged: a NACK for every packet finds no history to resend (audio
    negotiates no NACK), nothing grows, and nothing raises into the loop."""
    async with call(transceiver, "direct", monkeypatch) as (caller, session, heard, errors):
        sender = sender_of(session)
        dtls = caller.pc.getSenders()[0].transport
        first = heard.rtp[0].sequence_number
        for i in range(0, 2000, 100):
            lost = [(first + i + k) & 0xFFFF for k in range(100)]
            nack = RtcpRtpfbPacket(fmt=RTCP_RTPFB_NACK, ssrc=1, media_ssrc=sender._ssrc, lost=lost)
            await dtls._send_rtp(bytes(nack))
            for fmt, fci in ((1, b""), (15, b"REMB" + bytes([1, 0, 0, 1]) + struct.pack("!L", sender._ssrc))):
                await dtls._send_rtp(bytes(RtcpPsfbPacket(fmt=fmt, ssrc=1, media_ssrc=sender._ssrc, fci=fci)))
        received = len(heard.rtp)
        for _ in range(200):   # until 20 more frames came
            if len(heard.rtp) >= received + 20:
                break
            await asyncio.sleep(0.02)
        stats = await session.stats()
        assert stats["packets_sent"] == session.outbound.direct.packets   # no retransmission went out
        assert sender._RTCRtpSender__rtp_history == {}
        assert len(heard.rtp) > received and steps(heard.rtp) == ({1}, {FRAME_SAMPLES})
    assert errors == [] and "direct RTP send failed" not in caplog.text


async def test_a_caller_that_drops_its_dtls_mid_call_ends_the_direct_path_cleanly(transceiver, monkeypatch,
                                                                                   caplog):
    caplog.set_level(logging.DEBUG, logger=rtp_out.__name__)
    async with call(transceiver, "direct", monkeypatch) as (caller, session, heard, errors):
        direct = session.outbound.direct
        session.send_audio(PcmFrame(tone(REPLY_HZ, 40)))
        await caller.pc.close()                       # close_notify, no DELETE: the transceiver's send fails next
        caller.location = None
        assert (await ended(transceiver, caller.session_id))["end_reason"] == "client closed"
        assert not direct.running and direct._timer is None and direct._soon is None
    assert errors == [] and "direct RTP send failed" not in caplog.text


async def test_libdatachannel_hears_its_echo_in_sequence_960_ticks_apart_without_loss(transceiver, tmp_path):
    if reason := node_call.unavailable_reason("libdatachannel"):
        pytest.skip(reason)
    encoder, frames = OpusEncoder(), tmp_path / "tone.opus"
    pcm = tone(700.0, 50)
    packets = [encoder.encode(pcm[i:i + 2 * FRAME_SAMPLES]) for i in range(0, len(pcm), 2 * FRAME_SAMPLES)]
    frames.write_bytes(b"".join(len(p).to_bytes(2, "big") + p for p in packets))
    loop = asyncio.get_running_loop()
    caller = loop.run_in_executor(None, lambda: node_call.node_calls("libdatachannel", transceiver.whip_url,
                                                                      hold=3.0, send_opus=frames))
    sessions: list[Session] = []
    while not caller.done():   # bounded by node_calls' own timeout
        sessions += [s for s in transceiver.sessions.values() if s not in sessions]
        await asyncio.sleep(0.05)
    [report] = await caller
    [session] = sessions
    audio = report["audio"]
    assert report["error"] is None and session.outbound.direct.declined is None
    assert audio["seq_jumps"] == 0 and audio["ts_jumps"] == 0
    assert 0 <= session.outbound.direct.packets - audio["rtp_in"] <= 3
    assert audio["voiced_in"] >= 0.9 * audio["frames_sent"]


def test_the_header_is_the_one_aiortc_serializes_byte_for_byte():
    parameters = RTCRtpSendParameters(codecs=[RTCRtpCodecParameters("audio/opus", 48000, 2, payloadType=111)],
                                      headerExtensions=[RTCRtpHeaderExtensionParameters(
                                          id=4, uri="urn:ietf:params:rtp-hdrext:sdes:mid")], muxId="audio-7")
    extensions = HeaderExtensionsMap()
    extensions.configure(parameters)
    head, tail = rtp_out.header_template(parameters, 0xDEADBEEF)
    for seq, ts, payload in ((0, 0, b"\xfc"), (65535, 0xFFFFFFFF, bytes(80)), (1234, 96000, b"x" * 3)):
        packet = RtpPacket(payload_type=111, marker=1, sequence_number=seq, timestamp=ts, ssrc=0xDEADBEEF,
                           payload=payload)
        packet.extensions.mid = "audio-7"
        assert head + rtp_out._SEQ_TS.pack(seq, ts) + tail + payload == packet.serialize(extensions)
    parameters.headerExtensions.append(RTCRtpHeaderExtensionParameters(
        id=3, uri="http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"))
    assert rtp_out.header_template(parameters, 1) is None   # changes per packet: aiortc's task keeps it


def test_the_sender_report_s_ntp_time_is_aiortc_s_clock():
    from aiortc import clock
    before, now, after = clock.current_ntp_time(), rtp_out.ntp_now(), clock.current_ntp_time()
    assert before - (1 << 22) <= now <= after + (1 << 22)   # within a millisecond (2**32 is one second)


def test_the_aiortc_internals_the_direct_send_path_uses_are_there_and_a_bad_path_is_refused(monkeypatch):
    assert rtp_out.missing_internals() == []
    counters = "RTCRtpSender.__packet_count/__octet_count/__ntp_timestamp/__rtp_timestamp"
    for name in ("PACKET_COUNT", "OCTET_COUNT", "NTP_TIMESTAMP", "RTP_TIMESTAMP"):   # each one renamed
        with monkeypatch.context() as renamed:
            renamed.setattr(rtp_out, name, "_RTCRtpSender__renamed")
            assert rtp_out.missing_internals() == [counters]
    monkeypatch.setattr(RTCDtlsTransport, "_send_rtp", None)
    with pytest.raises(AudioPathError) as exc:
        check_aiortc()
    assert str(exc.value).split(" lacks ")[1] == ("RTCDtlsTransport._send_rtp; "
                                                  "the transceiver's voice path needs aiortc 1.9..1.16")
    monkeypatch.undo()
    check_aiortc()
    monkeypatch.setenv(rtp_out.SEND_PATH_ENV, "fast")
    with pytest.raises(AudioPathError) as exc:
        check_aiortc()
    assert str(exc.value) == "SPLITRELAY_SEND_PATH='fast': choose from direct, aiortc"
