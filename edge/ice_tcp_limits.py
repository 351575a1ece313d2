"""The ICE-TCP listener's limits: RFC 4571 frame size, queues, timeouts, and why a connection closed.

Every bound edge/ice_tcp.py puts on what a client can make the relay hold lives
here, with the reason labels its close counter uses; ``IceTcpConfig`` is what the
operator sets (``edge serve --tcp-*``).
"""

from __future__ import annotations

from dataclasses import dataclass

from splitrelay.edge.counters import counter_specs
from splitrelay.edge.records import DataPlaneError

DEFAULT_PORT = 443
BROWSER_LOW_PORTS = (80, 443)   # measured in the lab: Chromium connected to 80, 443, 3478, and not to 1000
MAX_FRAME = 2048           # bytes: a DTLS flight fragment, SRTP or STUN is < 1500; anything longer is refused
MAX_PENDING = 256 << 10    # reply bytes queued toward a client that reads slowly; beyond: replies dropped
BATCH = 64                 # datagrams read from a transceiver per wakeup
PORT_TRIES = 8             # ephemeral ports drawn before a connection is refused (all inside the flow pool)
SWEEP_S = 1.0              # how often timeouts are checked (their resolution)
SESSION_CHECK_SWEEPS = 5   # every 5th sweep, connections routed by a session check that it still exists

CLOSE_REASONS = {          # reason label -> what happened (each closes the connection)
    "limit_relay": "the relay already holds max_connections TCP connections",
    "limit_source": "the source address already holds max_per_source connections",
    "first_frame_timeout": "no complete first frame within first_frame_s (slowloris)",
    "not_stun": "the first frame is not STUN",
    "oversized": "a frame longer than MAX_FRAME (or empty)",
    "truncated": "the client closed in the middle of a frame",
    "idle": "no frame for idle_s (consent has expired at the client by then)",
    "no_port": "no UDP socket toward the transceiver could be opened",
    "session_gone": "its session was deleted (a hang-up): as the UDP path removes the session's flows",
    "closed": "the client closed between frames (the normal end)",
}

# a first frame the routing decision refuses closes its connection under that counter's reason
ROUTING_REASON = {spec.name: spec.reason for spec in counter_specs()}


@dataclass
class IceTcpConfig:
    """The listener's limits (``edge serve --tcp-*``)."""

    port: int = DEFAULT_PORT            # 0: no listener
    max_connections: int = 20000
    max_per_source: int = 256           # a NAT or a proxy puts many clients behind one address
    first_frame_s: float = 5.0          # browsers send their first check at once
    idle_s: float = 30.0                # RFC 7675: a client's consent expires after 30 s without a response

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise DataPlaneError(f"TCP port must be 0..65535 (0: no ICE-TCP), got {self.port}")
        if self.max_connections < 1 or self.max_per_source < 1:
            raise DataPlaneError("TCP connection limits must be >= 1")
        if self.first_frame_s <= 0 or self.idle_s < self.first_frame_s:
            raise DataPlaneError("TCP timeouts must be > 0, the idle one >= the first-frame one")
