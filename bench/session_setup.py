"""Session setup time through the relay vs direct, with an aiortc client (BENCHMARKS.md section 5).

Setup (``measure_setup``).  One probe process opens sessions one at a time, alternating between two
transceivers in the same namespace, run by the same code with the same flags:

* *relay*: the lab's transceiver (backend port 5000).  Its answer's only candidate is the relay's
  public address; the session's ufrag is registered with the edge agent before the answer leaves
  (ahead of the offer, from the transceiver's ``--ufrag-pool``), and every packet crosses the relay
  through XDP.
* *direct*: a transceiver this function starts in direct mode (no ``--relay``, no ``--relay-control``:
  its answer carries its own backend address, nothing is registered) on ``direct_port`` (5001).  The
  client reaches it by kernel routing through the relay namespace: the client's default route already
  points at the relay and the transceivers' backend-address table already routes the public network
  via the relay, so the one change needed is ``net.ipv4.ip_forward=1`` in the relay namespace (the
  relay's ``prohibit`` rule covers only its own internal address).  It is restored afterwards, also on
  failure.  XDP leaves these packets alone: ``xdp_public`` handles only the relay port (and replies
  from registered backends), ``xdp_internal`` only sources in ``backend_addrs`` (ip, port) - the
  direct transceiver's port is not registered, which is also why it must not share port 5000 with the
  lab's transceiver.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from splitrelay.bench import forwarding, sessions
from splitrelay.bench.sessions import SessionBenchError, summary
from splitrelay.lab import stack
from splitrelay.lab.topology import Lab

DIRECT_BACKEND_PORT = 5001
DIRECT_WHIP_PORT = 8083   # 8080 and 8081 are the lab transceiver's WHIP and admin listeners (lab/stack.py)

SETUP_METRICS = ("offer_to_answer_ms", "ice_connected_ms", "dtls_connected_ms")

SETUP_METHOD = (
    "One aiortc WHIP client process (splitrelay.client.probe --sequential --setup-only) in the lab's "
    "client namespace opens sessions one at a time, alternating relay, direct, relay, direct, ...; each "
    "session carries one Opus audio track and one data channel (as a voice call does), is closed with WHIP "
    "DELETE as soon as the client's peer connection is 'connected', and the next one is offered. "
    "'relay': the lab's echo transceiver, whose answer carries only the relay's public address, the "
    "session's ufrag registered with the edge agent before the answer (ahead of the offer: the "
    "transceiver keeps a few registered, --ufrag-pool; policy as the lab's agent has it), "
    "every packet through XDP. 'direct': an identical transceiver process (same code, same flags, same "
    "namespace) started in direct mode on another port: its answer carries its own backend address, "
    "nothing is registered, and the packets cross the relay namespace by kernel IPv4 forwarding "
    "(ip_forward=1 there for the duration of both paths' runs, nothing else changed; the XDP path does not "
    "depend on it, and XDP passes the direct packets: they are neither for the relay port nor from a "
    "registered backend address). All times are the client's time.monotonic(), "
    "counted from the moment the offer is POSTed (after createOffer and candidate gathering, reported "
    "separately as offer_created_ms): offer_to_answer_ms = POST sent -> 201 answer received (HTTP on the "
    "signaling network + the transceiver building its answer, + the agent registration on the relay "
    "path only when the pool is empty); "
    "ice_connected_ms = POST sent -> the client's iceConnectionState 'connected'/'completed' (answer "
    "applied, ICE connectivity checks done, a pair nominated; aiortc paces its checks 20 ms apart); "
    "dtls_connected_ms = POST sent -> the client's "
    "connectionState 'connected' (ICE and the DTLS handshake done, SRTP keyed: media can flow). "
    "The first round (one session per path) warms the client up and is not counted."
)


ORDER = "relay, direct, relay, direct, ... (one session at a time)"
MAX_RATIO = 1.05   # the target: DTLS connected through the relay within 5 % of direct (medians)


@dataclass(frozen=True)
class SetupPath:
    """One path's measured sessions: how many connected, and each step's time per session (ms)."""

    whip_url: str
    candidate: str            # the address the client's media went to
    ok: int
    failed: int
    errors: list[str]
    samples: dict[str, list[float]]   # SETUP_METRICS and offer_created_ms -> ms per connected session

    def summary(self, metric: str) -> dict[str, float | int | None]:
        return summary(self.samples[metric])

    def to_json(self) -> dict[str, Any]:
        return {"whip_url": self.whip_url, "candidate": self.candidate, "ok": self.ok, "failed": self.failed,
                "errors": self.errors, **{metric: self.summary(metric) for metric in self.samples},
                "samples": {metric: [round(v, 3) for v in values] for metric, values in self.samples.items()}}


@dataclass(frozen=True)
class SessionSetup:
    """Setup time through the relay and direct, side by side in one probe run (``measure_setup``)."""

    runs: int
    warmup: int
    policy: str | None
    host: dict[str, Any]          # cpus, loadavg_before, cpu_busy_pct per CPU over the run
    paths: dict[str, SetupPath]   # "relay", "direct"
    relay_kernel_forwarded_packets: int   # the direct sessions' packets, routed by the relay's kernel
    relay_ip_forward_restored: bool
    method: str = SETUP_METHOD

    @property
    def ratio_relay_to_direct(self) -> dict[str, float | None]:
        """Relay median over direct median, per SETUP_METRICS."""
        def ratio(metric: str) -> float | None:
            a, b = (self.paths[p].summary(metric)["median"] for p in ("relay", "direct"))
            return round(a / b, 3) if a is not None and b else None
        return {metric: ratio(metric) for metric in SETUP_METRICS}

    def to_json(self) -> dict[str, Any]:
        """The results file's keys (as before the dataclass)."""
        dtls = self.ratio_relay_to_direct["dtls_connected_ms"]
        return {"method": self.method, "runs": self.runs, "warmup": self.warmup, "order": ORDER,
                "policy": self.policy, "host": self.host,
                "paths": {name: path.to_json() for name, path in self.paths.items()},
                "ratio_relay_to_direct": self.ratio_relay_to_direct,
                "target": {"metric": "dtls_connected_ms median", "max_ratio": MAX_RATIO,
                           "met": None if dtls is None else dtls <= MAX_RATIO},
                "relay_kernel_forwarded_packets": self.relay_kernel_forwarded_packets,
                "relay_ip_forward_restored": self.relay_ip_forward_restored}


def measure_setup(lab_name: str, runs: int = 20, transceiver: int = 1, warmup: int = 1,
                  direct_port: int = DIRECT_BACKEND_PORT, direct_whip_port: int = DIRECT_WHIP_PORT,
                  timeout: float | None = None) -> SessionSetup:
    """Session setup time with an aiortc client, through the relay and direct, ``runs`` sessions each.

    ``timeout`` bounds the probe run (default: generous, from ``runs``).
    """
    if runs < 1 or warmup < 0:
        raise SessionBenchError(f"runs must be >= 1 and warmup >= 0, got {runs}, {warmup}")
    lab = Lab.load(lab_name)
    if not 1 <= transceiver <= len(lab.transceivers):
        raise SessionBenchError(f"lab {lab_name} has no transceiver {transceiver}")
    t = lab.transceivers[transceiver - 1]
    relay_url = stack.whip_url(t)
    direct_url = sessions.whip_url(t.signal_ip4, direct_whip_port)
    rly = lab.relay_public.netns
    health = stack.control(lab, lambda c: c.health())
    rounds = runs + warmup
    host: dict[str, Any] = {"cpus": os.cpu_count(), "loadavg_before": [round(v, 2) for v in os.getloadavg()]}
    bound = timeout if timeout is not None else 60.0 + rounds * 2 * (sessions.CONNECT_TIMEOUT_S + 5.0)

    direct, log = sessions.start_transceiver(lab, t, "direct", t.backend_id, direct_port, direct_whip_port,
                                             relay=False)
    try:
        saved = sessions.read_sysctl(rly, forwarding.IP_FORWARD)
        with forwarding.kernel_forwarding(lab):
            forwarded = sessions.forwarded_datagrams(rly)
            cpu_before = sessions.cpu_times()
            probe = sessions.Probe(lab, [relay_url, direct_url, "--sequential", str(rounds), "--setup-only"])
            reports = probe.wait(bound)
            host["cpu_busy_pct"] = sessions.busy_pct(cpu_before, sessions.cpu_times())
            forwarded = sessions.forwarded_datagrams(rly) - forwarded
    except SessionBenchError as exc:
        raise SessionBenchError(f"{exc} (direct transceiver: {sessions.log_tail(log)})") from None
    finally:
        sessions.stop(lab, direct)
        log.unlink(missing_ok=True)
    restored = sessions.read_sysctl(rly, forwarding.IP_FORWARD) == saved
    if len(reports) != 2 * rounds:
        raise SessionBenchError(f"the probe reported {len(reports)} sessions, expected {2 * rounds}")

    paths: dict[str, SetupPath] = {}
    measured = reports[2 * warmup:]
    for name, url, candidate in (("relay", relay_url, f"{lab.relay_public.ip4}:{lab.relay_port}"),
                                 ("direct", direct_url, f"{t.ip4}:{direct_port}")):
        mine = [r for r in measured if r["whip_url"] == url]
        good = [r for r in mine if r["ok"] and r["dtls_connected_ms"] is not None
                and r["ice_connected_ms"] is not None and r["offer_sent_ms"] is not None]
        samples = {
            "offer_to_answer_ms": [r["offer_to_answer_ms"] for r in good],
            "ice_connected_ms": [r["ice_connected_ms"] - r["offer_sent_ms"] for r in good],
            "dtls_connected_ms": [r["dtls_connected_ms"] - r["offer_sent_ms"] for r in good],
            "offer_created_ms": [r["offer_sent_ms"] for r in good],
        }
        paths[name] = SetupPath(url, candidate, len(good), len(mine) - len(good),
                                sorted({r["error"] or "not connected" for r in mine if r not in good}), samples)
    return SessionSetup(runs, warmup, health.get("policy"), host, paths, forwarded, restored)
