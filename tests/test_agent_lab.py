"""The edge agent as a process (``splitrelay edge serve``) in a lab, driven over HTTP and by the CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from splitrelay.wire.control_client import ControlError
from splitrelay.lab.netns import in_netns
from splitrelay.lab.stack import control, control_token, control_url, start_lab, stop_lab
from splitrelay.lab.topology import Lab
from splitrelay.wire import stun

from .conftest import needs_root

pytestmark = needs_root


@pytest.fixture(scope="module")
def agent_lab():
    info = start_lab(transceivers=2, handler=None)
    try:
        yield Lab.load(info["name"]), info
    finally:
        stop_lab(info["name"])


def call(lab, fn):
    return control(lab, fn)


def lab_snapshot(lab):
    return call(lab, lambda c: (c.backends(), c.sessions()))


LAB_BAD_REQUESTS = [
    ("PUT", "/v1/sessions/abc", {"backend": 1}, 400),                 # ufrag too short
    ("PUT", "/v1/sessions/" + "a" * 33, {"backend": 1}, 400),        # too long
    ("PUT", "/v1/sessions/bad-char", {"backend": 1}, 400),           # not ice-chars
    ("PUT", "/v1/sessions/goodUfrag", {"backend": "1"}, 400),        # wrong type
    ("PUT", "/v1/sessions/goodUfrag", {"backend": 99}, 409),         # unknown backend
    ("PUT", "/v1/sessions/goodUfrag", [1], 400),                     # not an object
    ("PUT", "/v1/sessions/existing1", {"backend": 2}, 409),          # owned by another backend
    ("PUT", "/v1/backends/0", {"ip": "198.18.1.11", "port": 5000}, 400),
    ("PUT", "/v1/backends/3", {"ip": "198.18.1.11", "port": 70000}, 400),
    ("PUT", "/v1/backends/3", {"ip": "not-an-ip", "port": 5000}, 400),
    ("PUT", "/v1/backends/3", {"port": 5000}, 400),
    ("PUT", "/v1/backends/1", {"ip": "198.18.1.11", "port": 5000, "instance": 7}, 400),
    ("DELETE", "/v1/sessions/neverThere", None, 404),
    ("GET", "/v1/flows?limit=-1", None, 400),
]


@pytest.mark.parametrize("method,path,body,status", LAB_BAD_REQUESTS)
def test_bad_requests_are_refused_and_change_nothing(agent_lab, method, path, body, status):
    lab, _ = agent_lab
    call(lab, lambda c: c.put_session("existing1", 1))
    before = lab_snapshot(lab)
    with pytest.raises(ControlError) as err:
        call(lab, lambda c: c.call(method, path, body))
    assert err.value.status == status and str(err.value)
    after = lab_snapshot(lab)
    assert [s["ufrag"] for s in after[1]] == [s["ufrag"] for s in before[1]]
    assert after[0] == before[0]


def test_not_json_is_refused(agent_lab):
    lab, _ = agent_lab
    import urllib.error
    import urllib.request

    def raw_put() -> int:
        req = urllib.request.Request(control_url(lab) + "/v1/sessions/someUfrag", data=b"{nope",
                                     method="PUT", headers={"Authorization": f"Bearer {control_token(lab)}"})
        try:
            urllib.request.urlopen(req, timeout=3)
        except urllib.error.HTTPError as exc:
            return exc.code
        return 200

    assert in_netns(lab.relay_public.netns, raw_put) == 400


def test_ufrags_with_slash_and_plus_round_trip_via_the_sync_client(agent_lab):
    lab, _ = agent_lab
    for ufrag in ("BAAB+/xY0123+/ab", "a/b+", "////"):
        assert call(lab, lambda c, u=ufrag: c.put_session(u, 1))["ufrag"] == ufrag
        assert ufrag in [s["ufrag"] for s in call(lab, lambda c: c.sessions())]
        call(lab, lambda c, u=ufrag: c.delete_session(u))
        assert ufrag not in [s["ufrag"] for s in call(lab, lambda c: c.sessions())]


def test_session_lifecycle_with_real_packets(agent_lab):
    lab, _ = agent_lab
    t1 = lab.transceivers[0]
    server = in_netns(t1.netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    server.bind((t1.ip4, 5000))
    server.settimeout(2)
    client = in_netns(lab.client.netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    try:
        assert call(lab, lambda c: c.put_session("lifecycle1", t1.backend_id))["backend"] == 1
        assert call(lab, lambda c: c.put_session("lifecycle1", t1.backend_id))  # idempotent
        client.sendto(stun.build_binding_request("lifecycle1:cli"), (lab.relay_public.ip4, 3478))
        _, peer = server.recvfrom(2048)
        assert peer[0] == lab.client.ip4
        flows = call(lab, lambda c: c.flows())
        assert [f["ufrag"] for f in flows] == ["lifecycle1"]
        assert [s["flows"] for s in call(lab, lambda c: c.sessions()) if s["ufrag"] == "lifecycle1"] == [1]
        call(lab, lambda c: c.delete_session("lifecycle1"))
        assert call(lab, lambda c: c.flows()) == []        # its flows went with it
        client.sendto(b"\x80" * 50, (lab.relay_public.ip4, 3478))
        with pytest.raises(TimeoutError):
            server.recvfrom(2048)
        stats = {c["name"]: c["packets"] for c in call(lab, lambda c: c.stats())["counters"]}
        assert stats["IN_FWD_STUN_UFRAG"] >= 1 and stats["IN_DROP_NO_FLOW"] >= 1
    finally:
        server.close()
        client.close()


def test_metrics_are_prometheus_text_with_the_counters(agent_lab):
    lab, _ = agent_lab
    text = call(lab, lambda c: c.metrics())
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("splitrelay_edge_packets", "splitrelay_edge_bytes", "splitrelay_edge_flows",
                 "splitrelay_edge_map_entries", "splitrelay_edge_xdp_info",
                 "splitrelay_edge_control_request_duration_seconds"):
        assert name in families, name
    reasons = {s.labels["reason"] for s in families["splitrelay_edge_packets"].samples}
    assert {"stun_ufrag", "no_flow", "unknown_ufrag"} <= reasons
    routes = {s.labels["route"] for s in families["splitrelay_edge_control_request_duration_seconds"].samples}
    assert "/v1/sessions/{ufrag}" in routes  # templates, never raw ufrags



def test_cli_reads_the_agent_with_json(agent_lab):
    lab, info = agent_lab
    out = subprocess.run(["ip", "netns", "exec", lab.relay_public.netns, sys.executable, "-m",
                          "splitrelay.cli.main", "backends", "list", "--json", "--control", info["control_url"]],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "SPLITRELAY_TOKEN": control_token(lab)}).stdout
    assert [b["id"] for b in json.loads(out)] == [1, 2]


def test_cli_errors_are_one_line(agent_lab):
    lab, info = agent_lab
    proc = subprocess.run([sys.executable, "-m", "splitrelay.cli.main", "stats", "--control",
                           "http://127.0.0.1:9"], capture_output=True, text=True)
    assert proc.returncode == 5
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("splitrelay: error: ")
    proc = subprocess.run([sys.executable, "-m", "splitrelay.cli.main", "edge", "attach", "eth0",
                           "--internal", "eth0", "--public-ip", "10.9.9.9", "--gateway-mac",
                           "02:00:00:00:00:01", "--instance", "clitest"], capture_output=True, text=True)
    assert proc.returncode == 1 and "refusing to attach XDP to eth0" in proc.stderr
    assert proc.stderr.count("\n") == 1
    proc = subprocess.run([sys.executable, "-m", "splitrelay.cli.main", "edge", "attach", "nosuch0",
                           "--internal", "nosuch1", "--public-ip", "10.9.9.9", "--gateway-mac",
                           "02:00:00:00:00:01", "--instance", "clitest"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr == "splitrelay: error: no interface named 'nosuch0' in this network namespace\n"
    assert not Path("/sys/fs/bpf/splitrelay/clitest").exists()   # nothing pinned on the way to the error


def test_demo_runs_a_webrtc_session_through_xdp_and_cleans_up():
    proc = subprocess.run([sys.executable, "-m", "splitrelay.cli.main", "demo", "--seconds", "3", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and report["dtls_connected_ms"] > report["ice_connected_ms"] > 0
    assert report["beeps_heard"] >= 1 and report["audio_rtt_ms"] > 0
    assert report["counters"]["ingress/forwarded/flow"] > 100
    [turn] = report["voice"]["turns"]  # and one turn with the voice agent, through the same relay
    assert turn["transcript"] == "what time is it" and turn["voice_to_voice_ms"] > turn["silence_ms"]
    # barge-in as both clients hear it: the stock aiortc receive path and the low-latency one
    assert [report[k]["low_latency"] for k in ("voice", "voice_low_latency")] == [False, True]
    assert all(report[k]["summary"]["barge_in_p50_ms"] > 0 for k in ("voice", "voice_low_latency"))
    assert report["lab"] not in Lab.names()


def test_shipped_prometheus_config_and_dashboard_parse(tmp_path):
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "deploy"
    if shutil.which("promtool"):
        # promtool also opens the files a config names: the admin token lives on the Prometheus host
        shipped = (root / "prometheus.yml").read_text()
        assert "/etc/prometheus/splitrelay-admin.token" in shipped
        (tmp_path / "admin.token").write_text("t" * 43)
        (tmp_path / "prometheus.yml").write_text(
            shipped.replace("/etc/prometheus/splitrelay-admin.token", str(tmp_path / "admin.token")))
        check = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    dashboard = json.loads((root / "grafana" / "splitrelay.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in ("splitrelay_edge_packets_total", "splitrelay_transceiver_session_setup_seconds_bucket"):
        assert metric in exprs
