"""The edge agent follows a backend table from a file or from Kubernetes endpoints."""

from __future__ import annotations

import http.server
import os
import signal
import ipaddress
import json
import threading
import time

import pytest

from splitrelay.lab.stack import control, start_agent, start_lab, stop_lab
from splitrelay.edge.backend_sources import (
    BackendSourceError,
    BackendSpec,
    backend_id_from_ip,
    parse_backend_file,
    parse_endpoints,
)
from splitrelay.lab.topology import Lab
from splitrelay.lab.netns import in_netns

from .conftest import needs_root
from .waiting import wait_for


def test_backend_id_from_ip_matches_the_transceivers_rule():
    assert backend_id_from_ip("10.1.2.3") == int(ipaddress.ip_address("10.1.2.3")) & 0x3FFFF
    with pytest.raises(BackendSourceError):
        backend_id_from_ip("10.0.0.0")        # low 18 bits are zero
    with pytest.raises(BackendSourceError):
        backend_id_from_ip("fd00::1")


@pytest.mark.parametrize("text", ['{"id": 1}', '[{"id": 0, "ip": "10.0.0.1", "port": 5000}]',
                                  '[{"id": 1, "ip": "nope", "port": 5000}]', '[{"id": 1, "port": 5000}]',
                                  "not json", '[{"id": 1, "ip": "10.0.0.1", "port": 70000}]'])
def test_bad_backend_files_are_refused(text):
    with pytest.raises(BackendSourceError):
        parse_backend_file(text)


def test_endpoints_give_only_ready_addresses_on_the_media_port():
    doc = {"subsets": [{"addresses": [{"ip": "10.0.0.11"}], "notReadyAddresses": [{"ip": "10.0.0.12"}],
                        "ports": [{"name": "whip", "port": 8080}, {"name": "media", "port": 5000}]}]}
    assert parse_endpoints(doc, "media") == [BackendSpec(backend_id_from_ip("10.0.0.11"), "10.0.0.11", 5000)]


def backend_ids(lab):
    return sorted(b["id"] for b in control(lab, lambda c: c.backends()))


@needs_root
def test_agent_follows_a_backend_file(tmp_path):
    table = tmp_path / "backends.json"
    table.write_text("[]")
    info = start_lab(transceivers=2, handler=None, agent_args=["--backends-file", str(table)])
    lab = Lab.load(info["name"])
    try:
        t1, t2 = lab.transceivers
        table.write_text(json.dumps([{"id": 11, "ip": t1.ip4, "port": 5000}]))
        wait_for(lambda: backend_ids(lab) == [11], 15, "backend 11 from the file")
        table.write_text(json.dumps([{"id": 12, "ip": t2.ip4, "ip6": t2.ip6, "port": 5000}]))
        wait_for(lambda: backend_ids(lab) == [12], 15, "the file's change: 11 out, 12 in")
        table.write_text("{broken")                     # a bad edit keeps the last good table
        time.sleep(2.5)  # longer than one poll: nothing must change
        assert backend_ids(lab) == [12]
    finally:
        stop_lab(lab.name)


@needs_root
def test_agent_follows_kubernetes_endpoints(tmp_path):
    token = tmp_path / "token"
    token.write_text("k8s-test-token")
    info = start_lab(transceivers=1, handler=None, agent_args=[])
    lab = Lab.load(info["name"])
    t1 = lab.transceivers[0]
    requests: list[str] = []

    class FakeApiServer(http.server.BaseHTTPRequestHandler):
        """The one call the agent makes: GET the endpoints of a Service."""

        def do_GET(self):  # noqa: N802 - http.server naming
            requests.append(self.path)
            if self.headers.get("Authorization") != "Bearer k8s-test-token":
                self.send_error(401)
                return
            if self.path != "/api/v1/namespaces/splitrelay/endpoints/splitrelay-whip":
                self.send_error(404)
                return
            body = json.dumps({"subsets": [{"addresses": [{"ip": t1.ip4}],
                                            "ports": [{"name": "media", "port": 5000}]}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = in_netns(lab.relay_public.netns,
                      lambda: http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeApiServer))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # replace the lab's agent with one that follows Kubernetes instead of registrations
        stop_first = lab.pids[0]
        os.kill(stop_first, signal.SIGTERM)
        os.waitpid(stop_first, 0)
        lab.pids.remove(stop_first)
        api = f"http://127.0.0.1:{server.server_address[1]}"
        start_agent(lab, extra_args=["--k8s-service", "splitrelay/splitrelay-whip", "--k8s-api", api,
                                     "--k8s-token-file", str(token)])
        expected = backend_id_from_ip(t1.ip4)
        wait_for(lambda: backend_ids(lab) == [expected], 15, "the endpoint's backend")
        assert requests and all(r.endswith("/endpoints/splitrelay-whip") for r in requests)
    finally:
        server.shutdown()
        stop_lab(lab.name)
