"""Control API attacks in a lab with real transceivers, real XDP and a real aiortc call that must survive.

The lab's agents run with a master token; each transceiver holds only its backend's
token (lab/stack.py), as SECURITY.md prescribes.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from ipaddress import ip_address
from pathlib import Path

import pytest
from splitrelay.bpf.consts import MAX_BACKEND_ID
from splitrelay.wire.control_client import ControlClient, ControlError
from splitrelay.edge.credentials import pool_token
from splitrelay.lab.netns import LabError, in_netns
from splitrelay.lab.stack import (
    control,
    control_key_file,
    control_token,
    control_url,
    probe,
    probe_result,
    start_lab,
    start_transceiver,
    stop_lab,
    whip_url,
)
from splitrelay.lab.topology import Lab

from .conftest import needs_root
from .test_webrtc_lab import assert_clean_call
from .waiting import wait_for

pytestmark = needs_root


@pytest.fixture(scope="module")
def auth_lab():
    """Agents only; the tests start the transceivers (their processes are the tests' to stop)."""
    info = start_lab(transceivers=2, handler=None)
    lab = Lab.load(info["name"])
    try:
        procs = [start_transceiver(lab, t) for t in lab.transceivers]
        yield lab, procs
    finally:
        stop_lab(info["name"])


def as_backend(lab: Lab, backend_id: int, fn):
    """``fn(client)`` from the relay's namespace with backend ``backend_id``'s own token."""
    return in_netns(lab.relay(1).netns,
                    lambda: fn(ControlClient(control_url(lab), control_token(lab, backend_id))))


def test_backend_as_token_cannot_hang_up_backend_bs_call(auth_lab):
    lab, _ = auth_lab
    second = lab.transceivers[1]
    proc = probe(lab, [whip_url(second)], duration=4)
    flows = wait_for(lambda: [f for f in control(lab, lambda c: c.flows()) if f["backend"] == second.backend_id],
                     20, "the call's flow at the relay", proc)
    ufrag = flows[0]["ufrag"]
    first_id = lab.transceivers[0].backend_id
    refusals = []
    for attempt in (lambda c: c.delete_session(ufrag),
                    lambda c: c.put_session("takeOver1", second.backend_id),
                    lambda c: c.delete_backend(second.backend_id),
                    lambda c: c.sessions()):
        with pytest.raises(ControlError) as err:
            as_backend(lab, first_id, attempt)
        refusals.append(err.value.status)
    assert refusals == [403, 403, 403, 403]
    [report] = probe_result(proc, 60)
    assert_clean_call(report)                      # every beep echoed: the call never lost its relay entry


def test_a_second_transceiver_claiming_a_live_backend_id_gets_409(auth_lab):
    """What `--backend-id from-ip` gives two pods whose addresses share their low 18 bits: one id, two
    addresses.  Before, the second took the id and the first one's sessions were dropped."""
    lab, procs = auth_lab
    first, second = lab.transceivers
    procs[1].terminate()
    procs[1].wait(timeout=30)
    before = {s["ufrag"] for s in control(lab, lambda c: c.sessions()) if s["backend"] == first.backend_id}
    assert before                                  # the first transceiver's ready ufrags
    impostor = dataclasses.replace(second, backend_id=first.backend_id)
    with pytest.raises(LabError) as err:
        start_transceiver(lab, impostor)
    assert (f"PUT /v1/backends/{first.backend_id}: 409 backend {first.backend_id} is live at another "
            f"address ({first.ip4}:") in str(err.value)
    after = {s["ufrag"] for s in control(lab, lambda c: c.sessions()) if s["backend"] == first.backend_id}
    assert before <= after
    assert control(lab, lambda c: c.backends())[0]["ip"] == first.ip4
    proc = probe(lab, [whip_url(first)], duration=3)
    [report] = probe_result(proc, 60)
    assert_clean_call(report)


def test_the_transceivers_token_is_scoped_to_its_backend(auth_lab):
    lab, _ = auth_lab
    argv = Path(f"/proc/{auth_lab[1][0].pid}/cmdline").read_bytes().decode().split("\0")
    assert control_token(lab, lab.transceivers[0].backend_id) in argv and control_token(lab) not in argv


def test_a_from_ip_transceiver_with_the_pool_token_registers_itself_and_nothing_else(auth_lab):
    """The Kubernetes setup: `--backend-id from-ip` and the one pool token every pod holds."""
    lab, procs = auth_lab
    first, second = lab.transceivers
    if procs[1].poll() is None:
        procs[1].terminate()
        procs[1].wait(timeout=30)
    own_id = int(ip_address(second.ip4)) & MAX_BACKEND_ID
    pool = pool_token(control_key_file(lab).read_text().strip())
    start_transceiver(lab, second, extra_args=["--backend-id", "from-ip", "--token", pool])
    assert {b["id"]: b["ip"] for b in control(lab, lambda c: c.backends())}[own_id] == second.ip4
    theirs = next(s["ufrag"] for s in control(lab, lambda c: c.sessions()) if s["backend"] == first.backend_id)

    def delete_from_the_pod(c):
        with pytest.raises(ControlError) as err:
            c.delete_session(theirs)
        return err.value.status

    assert in_netns(second.netns, lambda: delete_from_the_pod(ControlClient(control_url(lab), pool))) == 403
    assert theirs in {s["ufrag"] for s in control(lab, lambda c: c.sessions())}
    proc = probe(lab, [whip_url(second)], duration=3)
    [report] = probe_result(proc, 60)
    assert_clean_call(report)


def test_the_cli_lists_a_backends_sessions_with_its_own_token_only(auth_lab):
    lab, _ = auth_lab
    first = lab.transceivers[0]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", lab.relay(1).netns, sys.executable, "-m",
                               "splitrelay.cli.main", "sessions", "list", "--json", "--control", control_url(lab),
                               "--token", control_token(lab, first.backend_id), *args],
                              capture_output=True, text=True, timeout=60)

    own = cli("--backend", str(first.backend_id))
    assert own.returncode == 0, own.stderr
    assert {s["backend"] for s in json.loads(own.stdout)} == {first.backend_id}
    every = cli()
    assert every.returncode != 0
    assert every.stderr == (f"splitrelay: error: GET /v1/sessions: 403 backend {first.backend_id}'s token "
                            "cannot do this: it needs the admin token\n")
