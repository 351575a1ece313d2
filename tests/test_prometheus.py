"""A real Prometheus scrapes the edge agent and the transceivers during a session in the lab."""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from splitrelay.lab.stack import control, probe, probe_result, start_lab, stop_lab
from splitrelay.lab.topology import Lab
from splitrelay.lab.netns import in_netns

from .conftest import needs_root
from .waiting import wait_for

pytestmark = [needs_root, pytest.mark.skipif(shutil.which("prometheus") is None,
                                             reason="Debian's prometheus is installed by make setup")]
PROM = "http://127.0.0.1:9090"


def query(lab: Lab, netns: str, expr: str) -> list[dict]:
    url = f"{PROM}/api/v1/query?query={urllib.parse.quote(expr)}"
    body = in_netns(netns, lambda: urllib.request.urlopen(url, timeout=3).read())
    return json.loads(body)["data"]["result"]


def value(lab: Lab, netns: str, expr: str) -> float | None:
    result = query(lab, netns, expr)
    return float(result[0]["value"][1]) if result else None


@pytest.fixture(scope="module")
def prom_lab():
    info = start_lab(transceivers=2, handler="echo")
    lab = Lab.load(info["name"])
    workdir = Path(tempfile.mkdtemp(prefix="splitrelay-prom-"))
    try:
        # Prometheus runs in transceiver 1's namespace: it reaches the agent's internal
        # address and every transceiver's admin listener (on its signaling address) from there;
        # the transceivers' want the lab's admin token
        targets = [u.split("//")[1].split("/")[0] for u in info["metrics_urls"]]
        edge, transceivers = targets[:1], targets[1:]
        (workdir / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: splitrelay-edge\n    static_configs:\n"
            f"      - targets: {json.dumps(edge)}\n"
            "  - job_name: splitrelay-transceiver\n"
            f"    authorization:\n      credentials_file: {info['admin_token_file']}\n"
            f"    static_configs:\n      - targets: {json.dumps(transceivers)}\n"
        )
        netns = lab.transceivers[0].netns
        with (workdir / "prometheus.log").open("w") as log:
            lab.popen(netns, ["prometheus", f"--config.file={workdir / 'prometheus.yml'}",
                              f"--storage.tsdb.path={workdir / 'data'}", "--web.listen-address=127.0.0.1:9090"],
                      stdout=log, stderr=log)
        wait_for(lambda: value(lab, netns, "count(up == 1)") == len(targets), 30, "every target up",
                 tolerate=(OSError,))  # Prometheus is still starting
        yield lab, info, netns
    finally:
        stop_lab(info["name"])
        shutil.rmtree(workdir, ignore_errors=True)


def test_prometheus_sees_what_the_data_plane_counted(prom_lab):
    lab, info, netns = prom_lab
    proc = probe(lab, [info["whip_urls"][1]], duration=3)
    # mid-call, the transceiver's scrape (which samples live sessions' stats) still succeeds
    wait_for(lambda: value(lab, netns, "sum(splitrelay_transceiver_sessions)") == 1, 15, "a live session")
    assert value(lab, netns, "min(up)") == 1
    [report] = probe_result(proc, 60)
    assert report["ok"], report["error"]
    counted = {c["name"]: c["packets"] for c in control(lab, lambda c: c.stats())["counters"]}
    assert counted["IN_FWD_FLOW"] > 100
    # the session is over, so the counter no longer moves: Prometheus must converge to it exactly
    for name, reason, direction in (("IN_FWD_FLOW", "flow", "ingress"), ("OUT_FWD", "backend", "egress")):
        expr = f'splitrelay_edge_packets_total{{direction="{direction}",reason="{reason}"}}'
        wait_for(lambda e=expr, n=name: value(lab, netns, e) == counted[n], 15, f"{expr} == {counted[name]}")
    started = wait_for(lambda: value(lab, netns, "sum(splitrelay_transceiver_sessions_started_total)"),
                         15, "a started session")
    assert started == 1
    phases = wait_for(lambda: {r["metric"]["phase"]: float(r["value"][1]) for r in query(
        lab, netns, "sum by (phase) (splitrelay_transceiver_session_setup_seconds_count)")} or None,
        15, "setup phases")
    assert phases == {"answer": 1.0, "ice_connected": 1.0, "dtls_connected": 1.0}
    frames = value(lab, netns, "sum(splitrelay_transceiver_audio_frames_in_total)")
    assert frames and frames >= 100   # 3 s of 20 ms frames reached the handler
    wait_for(lambda: value(lab, netns, "sum(splitrelay_transceiver_sessions)") == 0, 15, "no live session")
