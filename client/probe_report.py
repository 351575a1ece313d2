"""What a probe measured (``ProbeReport``, the JSON the lab and the bench read) and the figures it
takes from aiortc's RTCP statistics at the end of a call.  The fields are explained in
``probe.py``'s docstring, which measures them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from aiortc import RTCPeerConnection


@dataclass
class ProbeReport:
    whip_url: str
    ok: bool = False
    error: str | None = None
    location: str | None = None       # the session's resource: a capability, only its caller holds it
    session_id: str | None = None     # its public id (what the transceiver's logs and /sessions name)
    offer_to_answer_ms: float | None = None
    ice_connected_ms: float | None = None
    dtls_connected_ms: float | None = None
    ice_states: list[str] = field(default_factory=list)
    connection_states: list[str] = field(default_factory=list)
    beeps_sent: int = 0
    beeps_heard: int = 0
    beep_echoed: list[bool] = field(default_factory=list)  # per beep sent, in order
    audio_rtt_ms: list[float] = field(default_factory=list)
    datachannel_rtt_ms: list[float] = field(default_factory=list)
    frames_received: int = 0
    rtcp_rtt_ms: float | None = None
    packets_sent: int = 0
    packets_received: int = 0
    # peer connection created -> offer POSTed (createOffer + setLocalDescription, i.e. candidate gathering)
    offer_sent_ms: float | None = None
    # the talk phase (connected -> end of duration) in CLOCK_MONOTONIC seconds, shared by all processes
    talk_started_mono: float | None = None
    talk_ended_mono: float | None = None
    frames_sent: int = 0                      # audio frames handed to the encoder (20 ms each)
    carrier_frames_sent: int = 0              # with carrier: frames sent carrying it
    carrier_frames_echoed: int = 0            # with carrier: frames received carrying it (>= half amplitude)
    audio_loss: float | None = None           # with carrier: 1 - echoed / sent (clamped to 0..1)
    packets_lost_uplink: int | None = None    # RTP lost client -> peer, from the peer's RTCP receiver reports
    packets_lost_downlink: int | None = None  # RTP lost peer -> client (inbound-rtp packetsLost)
    # per beep heard: sent -> arrival of the echo packet whose frame showed it (the round trip without
    # this client's own receive buffering: the far end, the network, and the codec)
    echo_arrival_ms: list[float] = field(default_factory=list)
    client_buffer_ms: dict[str, float] | None = None  # packet arrival -> frame out here: p50, p99, n
    frames_concealed: int | None = None        # low_latency: frames this client concealed

    @staticmethod
    def _median(values: list[float]) -> float | None:
        if not values:
            return None
        ordered = sorted(values)
        return ordered[len(ordered) // 2]

    @property
    def audio_rtt_median_ms(self) -> float | None:
        return self._median(self.audio_rtt_ms)

    @property
    def datachannel_rtt_median_ms(self) -> float | None:
        return self._median(self.datachannel_rtt_ms)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["audio_rtt_median_ms"] = self.audio_rtt_median_ms
        data["datachannel_rtt_median_ms"] = self.datachannel_rtt_median_ms
        return data



async def collect_stats(pc: RTCPeerConnection, report: ProbeReport) -> None:
    """Packets sent and received, RTP loss each way and the RTCP round trip, into ``report``."""
    for sender in pc.getSenders():
        if sender.track is None:
            continue
        stats = await sender.getStats()
        for item in stats.values():
            if item.type == "outbound-rtp":
                report.packets_sent = item.packetsSent
            elif item.type == "remote-inbound-rtp":
                report.packets_lost_uplink = item.packetsLost
                if item.roundTripTime is not None:
                    report.rtcp_rtt_ms = item.roundTripTime * 1000.0
    for receiver in pc.getReceivers():
        stats = await receiver.getStats()
        for item in stats.values():
            if item.type == "inbound-rtp":
                report.packets_received = item.packetsReceived
                report.packets_lost_downlink = item.packetsLost
