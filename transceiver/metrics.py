"""Prometheus metrics of a transceiver: sessions, setup time by phase, media quality, handler health.

No per-session labels (cardinality stays flat however many calls there are):
quality figures are summaries over the live sessions, sampled at scrape time
from aiortc's stats.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary

SETUP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# a frame is 20 ms: a loop late by more than that delays every call's audio by a frame or more
LOOP_LAG_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
RELEASE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25)
IN_TO_OUT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)


class TransceiverMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.sessions = Gauge("splitrelay_transceiver_sessions", "Live WebRTC sessions", registry=r)
        self.sessions_started = Counter("splitrelay_transceiver_sessions_started", "Sessions answered",
                                        registry=r)
        self.max_call_ended = Counter("splitrelay_transceiver_sessions_max_call",
                                      "Sessions ended because their offer token's max_call_s ran out",
                                      registry=r)
        self.offers_rejected = Counter("splitrelay_transceiver_offers_rejected", "WHIP offers refused",
                                       ["code"], registry=r)
        self.offers_refused = Counter("splitrelay_transceiver_offers_refused",
                                      "WHIP offers refused before anything was created, by reason: rate (429, "
                                      "per source), sessions or pending (503, the transceiver's limits)",
                                      ["reason"], registry=r)
        self.setup = Histogram("splitrelay_transceiver_session_setup_seconds",
                               "Time from the offer to each setup phase", ["phase"], buckets=SETUP_BUCKETS,
                               registry=r)
        self.rtt = Summary("splitrelay_transceiver_rtt_seconds", "RTCP round-trip time of live sessions",
                           registry=r)
        self.jitter = Summary("splitrelay_transceiver_jitter_seconds", "Inbound audio jitter of live sessions",
                              registry=r)
        self.lost = Gauge("splitrelay_transceiver_packets_lost", "Inbound RTP packets lost, live sessions",
                          registry=r)
        self.frames_in = Counter("splitrelay_transceiver_audio_frames_in", "Decoded audio frames to handlers",
                                 registry=r)
        self.frames_out = Counter("splitrelay_transceiver_audio_frames_out", "Audio frames sent to clients",
                                  registry=r)
        self.frames_concealed = Counter("splitrelay_transceiver_audio_frames_concealed",
                                        "Inbound audio frames concealed (FEC or PLC) in place of lost packets",
                                        registry=r)
        self.frames_silent = Counter("splitrelay_transceiver_audio_frames_silent",
                                     "Silence sent because the handler's audio was late", registry=r)
        self.handler_errors = Counter("splitrelay_transceiver_handler_errors", "Exceptions raised by handlers",
                                      registry=r)
        self.mux_dropped = Gauge("splitrelay_transceiver_mux_unrouted_datagrams",
                                 "Datagrams the UDP mux could not match to a session", registry=r)
        self.mux_drops = Counter("splitrelay_transceiver_mux_drops",
                                 "Datagrams the UDP mux routed to no session, by reason (mux.py)", ["reason"],
                                 registry=r)
        self.mux_addresses_expired = Counter("splitrelay_transceiver_mux_addresses_expired",
                                             "Client addresses unbound from their session after their silence",
                                             registry=r)
        self.candidates_ignored = Counter("splitrelay_transceiver_remote_candidates_ignored",
                                          "Signalled client candidates never checked, by reason (candidates.py)",
                                          ["reason"], registry=r)
        self._followed: dict[tuple[int, str], float] = {}

        self.path_changes = Counter("splitrelay_transceiver_path_changes",
                                    "Media moved to another client address (nominated, latched, restarted)",
                                    ["reason"], registry=r)
        self.registrations_missed = Counter(
            "splitrelay_transceiver_relay_registrations_missed",
            "Sessions a relay missed (retried each watch tick) or refused while another relay took them",
            ["relay"], registry=r)
        self.ufrag_pool_ready = Gauge("splitrelay_transceiver_ufrag_pool_ready",
                                      "Ufrags registered with the relays ahead of offers (ufrag_pool.py)",
                                      registry=r)
        self.ufrag_pool_empty = Counter("splitrelay_transceiver_ufrag_pool_empty",
                                        "Offers and ICE restarts that found the ufrag pool empty and "
                                        "registered on the answer's path", registry=r)
        self.loop_lag = Histogram("splitrelay_transceiver_event_loop_lag_seconds",
                                  "How late the event loop ran a timer that was due (every call waits as long)",
                                  buckets=LOOP_LAG_BUCKETS, registry=r)
        self.media_in_to_out = Histogram(
            "splitrelay_transceiver_media_in_to_out_seconds",
            "Live audio sent back (an echo, a forward), per frame: its packet at the mux to its packet leaving, "
            "the transceiver's share of the caller's round trip", buckets=IN_TO_OUT_BUCKETS, registry=r)
        self.gc_pause = Histogram("splitrelay_transceiver_gc_pause_seconds",
                                  "Garbage collections by generation: how long each held the event loop",
                                  ["generation"], buckets=LOOP_LAG_BUCKETS, registry=r)
        self.session_release = Histogram(
            "splitrelay_transceiver_session_release_seconds",
            "Ended sessions let go of (garbage.py): how long each pass held the event loop (their release, and "
            "a full collection if one was still held)", buckets=RELEASE_BUCKETS, registry=r)
        self.sessions_unfreed = Gauge("splitrelay_transceiver_sessions_unfreed",
                                      "Ended sessions whose objects are still in memory (garbage.py)", registry=r)
        self.ice_restart = Histogram("splitrelay_transceiver_ice_restart_seconds",
                                     "WHIP PATCH until the new ICE generation's pair is nominated",
                                     buckets=SETUP_BUCKETS, registry=r)

    def watch_process(self) -> Callable[[], None]:
        """Observe the running event loop's lateness and the garbage collector's pauses from now on;
        returns the function that stops both."""
        from splitrelay.transceiver.loop import GcPauses, LoopLag

        lag = LoopLag(self.loop_lag.observe)
        pauses = GcPauses(lambda generation, seconds: self.gc_pause.labels(str(generation)).observe(seconds))
        lag.start()
        pauses.start()

        def stop() -> None:
            lag.stop()
            pauses.stop()

        return stop

    def follow(self, counter: Counter, totals: Mapping[str, int]) -> None:
        """Bring a labelled counter up to running totals kept elsewhere (label -> total so far)."""
        for label, total in totals.items():
            key = (id(counter), label)
            counter.labels(label).inc(total - self._followed.get(key, 0))
            self._followed[key] = total

    def phase(self, name: str, milliseconds: float | None) -> None:
        if milliseconds is not None:
            self.setup.labels(name).observe(milliseconds / 1000.0)
