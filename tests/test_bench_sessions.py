"""The session benchmarks (setup time relay vs direct, transceiver capacity) run end to end in a lab.

Smoke tests: they check that both figures are measured, sane and cleaned up after, not how fast
anything is (the machine may be busy with other work).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from splitrelay.bench import capacity, session_setup, sessions
from splitrelay.lab.stack import control, start_lab, stop_lab
from splitrelay.lab.topology import Lab
from splitrelay.lab.netns import NETNS_DIR, in_netns

from .conftest import needs_root

pytestmark = needs_root


@pytest.fixture(scope="module")
def session_lab():
    info = start_lab(transceivers=1, handler="echo")
    try:
        yield Lab.load(info["name"]), info
    finally:
        stop_lab(info["name"])


def processes_in(lab: Lab) -> set[int]:
    """Every process whose network namespace is one of the lab's."""
    inodes = {os.stat(NETNS_DIR / ns).st_ino for ns in lab.namespaces()}
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.stat(entry / "ns" / "net").st_ino in inodes:
                    found.add(int(entry.name))
            except (FileNotFoundError, PermissionError, ProcessLookupError):
                pass
    return found


def ip_forward(lab: Lab) -> str:
    return in_netns(lab.relay_public.netns, lambda: Path("/proc/sys/net/ipv4/ip_forward").read_text().strip())


def counters(lab: Lab) -> dict[str, int]:
    return {c["name"]: c["packets"] for c in control(lab, lambda c: c.stats())["counters"]}


def test_setup_time_relay_and_direct(session_lab):
    lab, info = session_lab
    before = processes_in(lab)
    assert ip_forward(lab) == "0"
    result = session_setup.measure_setup(lab.name, runs=2)
    json.dumps(result.to_json())
    assert ip_forward(lab) == "0" and result.relay_ip_forward_restored
    assert processes_in(lab) == before                        # the direct transceiver and the probe are gone
    assert Lab.load(lab.name).pids == lab.pids
    t = lab.transceivers[0]
    relay, direct = result.paths["relay"], result.paths["direct"]
    assert relay.candidate == info["relay_public"]
    assert direct.candidate == f"{t.ip4}:{session_setup.DIRECT_BACKEND_PORT}"
    for path in (relay, direct):
        assert path.ok == 2 and path.failed == 0 and path.errors == [], path
        for metric in session_setup.SETUP_METRICS:
            s = path.summary(metric)
            assert s["n"] == 2 and 0 < s["min"] <= s["median"] <= s["p90"] <= s["max"], (metric, s)
        ice, dtls = path.samples["ice_connected_ms"], path.samples["dtls_connected_ms"]
        assert all(d >= i > 0 for i, d in zip(ice, dtls, strict=True))
        assert all(a < i for a, i in zip(path.samples["offer_to_answer_ms"], ice, strict=True))
    assert all(r > 0 for r in result.ratio_relay_to_direct.values())
    assert result.relay_kernel_forwarded_packets > 0          # the direct sessions crossed the relay's kernel
    assert "POST" in result.method


def test_setup_failure_restores_forwarding_and_stops_the_direct_transceiver(session_lab, monkeypatch):
    lab, _ = session_lab
    before = processes_in(lab)

    class Failing:
        def __init__(self, *args, **kwargs):
            assert ip_forward(lab) == "1"                       # forwarding is on while the probe would run
            raise sessions.SessionBenchError("probe refused to start")

    monkeypatch.setattr(sessions, "Probe", Failing)
    with pytest.raises(sessions.SessionBenchError, match="probe refused"):
        session_setup.measure_setup(lab.name, runs=1)
    assert ip_forward(lab) == "0"
    assert processes_in(lab) == before


def test_capacity_steps(session_lab):
    lab, _ = session_lab
    before = processes_in(lab)
    backends = control(lab, lambda c: c.backends())
    fwd = counters(lab)["IN_FWD_FLOW"]
    result = capacity.measure_capacity(lab.name, steps=[1, 2], duration=3)
    json.dumps(result.to_json())
    assert processes_in(lab) == before                        # its transceiver and the probes are gone
    assert control(lab, lambda c: c.backends()) == backends   # its backend is unregistered
    assert counters(lab)["IN_FWD_FLOW"] - fwd > 100           # the sessions' media went through XDP
    steps = result.steps
    assert [s.sessions for s in steps] in ([1], [1, 2])   # the ramp stops at the first step above 1%
    for step in steps:
        assert step.connected == step.sessions, step
        assert 0.0 <= step.audio_loss <= 1.0 and 0.0 <= step.worst_session_audio_loss <= 1.0
        assert step.frames_sent >= step.sessions * 100  # 3 s of 20 ms frames, give or take the start
        assert 0 <= step.frames_echoed <= step.frames_sent
        assert step.window_s > 2.0
        assert step.transceiver_cpu_pct > 0 and step.probe_cpu_pct > 0
        assert set(step.cpu_busy_pct) == {f"cpu{c}" for c in range(os.cpu_count())}
    assert result.limited_by in (None, "client", "transceiver")
    assert result.capacity in (0, 1, 2)
    assert result.capacity == max([s.sessions for s in steps if s.audio_loss <= 0.01], default=0)
    assert result.cpu == 0 and result.sessions_per_core == result.capacity
    assert result.notes and "carrier" in result.method
