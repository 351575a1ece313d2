"""Faults in the middle of real calls, with what was lost measured (see RELIABILITY.md)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from splitrelay.lab.stack import control, probe, probe_result, start_agent, start_lab, stop_lab
from splitrelay.edge.xdp.maps import XdpMaps
from splitrelay.lab.topology import Lab
from splitrelay.lab.netns import in_netns

from .conftest import needs_root, relay_ufrags
from .waiting import wait_for

pytestmark = needs_root


@pytest.mark.parametrize("policy,keyed", [("hint", False), ("hint", True), ("strict", False)],
                         ids=["hint", "hint-keyed", "strict"])
def test_wiped_relay_recovers_on_the_next_consent_check(policy, keyed, tmp_path):
    """A fresh relay (maps gone) mid-call: the call recovers from the ufrag hint (hint policy, with
    or without a key) or the transceivers' re-registration (strict), at the next consent check."""
    key_file = None
    if keyed:
        key_file = tmp_path / "hint.key"
        key_file.write_text(os.urandom(16).hex())
    info = start_lab(transceivers=1, handler="echo", policy=policy,
                     hint_key_file=str(key_file) if key_file else None)
    lab = Lab.load(info["name"])
    try:
        # long enough to outlive media setup, the agent's restart (a bcc compile) and one consent
        # interval: with 14 s the caller sometimes hung up first and no check reopened the flow
        proc = probe(lab, info["whip_urls"], duration=24)
        wait_for(lambda: [f for f in control(lab, lambda c: c.flows()) if f["rx_packets"] > 100], 20,
                 "media both ways")
        agent = lab.pids[0]
        os.kill(agent, signal.SIGKILL)
        os.waitpid(agent, 0)
        lab.pids.remove(agent)
        in_netns(lab.relay_public.netns, lambda: XdpMaps(instance=lab.name).destroy(["pub0", "int0"]))
        wiped = time.monotonic()
        # a fresh relay: no backend, session or flow
        start_agent(lab, policy, ["--hint-key-file", str(key_file)] if key_file else None)
        up = time.monotonic()
        flow = wait_for(lambda: control(lab, lambda c: c.flows()), 15, "the call's flow to come back")
        recovered_s = time.monotonic() - up
        print(f"\nwiped relay, policy {policy}{' keyed' if keyed else ''}: relay up after {up - wiped:.2f} s, "
              f"call's flow back {recovered_s:.2f} s later")
        # one consent interval plus the transceiver noticing the new agent (1 s)
        assert recovered_s <= 7.5  # consent checks come every 5 s +-20% (RFC 7675)
        assert flow[0]["backend"] == lab.transceivers[0].backend_id
        [report] = probe_result(proc, 60)
        assert "failed" not in report["ice_states"] + report["connection_states"]
        assert all(report["beep_echoed"][-3:]), report["beep_echoed"]   # the voice is back
    finally:
        stop_lab(lab.name)


def test_client_nat_rebinding_moves_the_call_to_the_new_port():
    """The client's source port changes mid-call: the next consent check from the new port opens a
    new flow for the same session (within its allowance); the old flow goes idle and ages out."""
    import socket

    from splitrelay.wire import stun

    info = start_lab(transceivers=1, handler=None)
    lab = Lab.load(info["name"])
    t1 = lab.transceivers[0]
    server = in_netns(t1.netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    server.bind((t1.ip4, 5000))
    server.settimeout(1)
    relay = (lab.relay_public.ip4, lab.relay_port)
    old, new = (in_netns(lab.client.netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                for _ in range(2))
    # compile and adopt the maps before the clock starts: at load 12 a bcc compile took over 30 s, the
    # agent's idle timeout, and the agent aged both flows away before this test could
    datapath = XdpMaps(instance=lab.name)
    try:
        in_netns(lab.relay_public.netns, datapath.load)
        control(lab, lambda c: c.put_session("rebindMe", t1.backend_id))
        check = stun.build_binding_request("rebindMe:cli1")
        answer = stun.build_message(stun.BINDING_SUCCESS)   # the transceiver's answer confirms each flow
        old.sendto(check, relay)
        _, first = server.recvfrom(2048)
        server.sendto(answer, first)
        old.sendto(b"\x80" * 50, relay)
        server.recvfrom(2048)
        # the NAT rebinds: same client, new port; its next packet is a consent check
        new.sendto(check, relay)
        _, second = server.recvfrom(2048)
        assert second[1] == new.getsockname()[1] != first[1]
        server.sendto(answer, second)
        new.sendto(b"\x80" * 50, relay)
        server.recvfrom(2048)
        flows = {f["client"]: f for f in control(lab, lambda c: c.flows())}
        assert set(flows) == {f"{lab.client.ip4}:{first[1]}", f"{lab.client.ip4}:{second[1]}"}
        assert {f["ufrag"] for f in flows.values()} == {"rebindMe"}
        # only the old flow is idle: ageing takes it (the agent runs this with its idle timeout)
        time.sleep(0.3)
        new.sendto(b"\x80" * 50, relay)
        server.recvfrom(2048)
        removed = in_netns(lab.relay_public.netns, lambda: datapath.age_flows(0.2))
        assert removed == 1
        assert [f["client"] for f in control(lab, lambda c: c.flows())] == [f"{lab.client.ip4}:{second[1]}"]
    finally:
        server.close()
        old.close()
        new.close()
        stop_lab(lab.name)


def test_transceiver_crash_drops_its_sessions_and_spares_the_others():
    info = start_lab(transceivers=2, handler="echo")
    lab = Lab.load(info["name"])
    try:
        doomed = probe(lab, [info["whip_urls"][0]], duration=30)
        survivor = probe(lab, [info["whip_urls"][1]], duration=8)
        wait_for(lambda: len([f for f in control(lab, lambda c: c.flows()) if f["rx_packets"] > 50]) == 2, 20,
                 "both calls up")
        t1_pid = next(pid for pid in lab.pids[1:] if "--backend-id 1 " in
                      open(f"/proc/{pid}/cmdline").read().replace("\0", " "))
        os.kill(t1_pid, signal.SIGKILL)                 # a crash: nothing is unregistered
        os.waitpid(t1_pid, 0)
        lab.pids.remove(t1_pid)
        sessions = control(lab, lambda c: c.sessions())
        assert {s["backend"] for s in sessions} == {1, 2}
        dead = {s["ufrag"] for s in sessions if s["backend"] == 1}   # its call's ufrag and its ready ones
        from splitrelay.lab.stack import start_transceiver

        start_transceiver(lab, lab.transceivers[0])    # its replacement registers the backend again
        lab.save()
        wait_for(lambda: not dead & relay_ufrags(lab), 10, "the dead transceiver's ufrags to go")
        assert {f["backend"] for f in control(lab, lambda c: c.flows())} == {2}
        [report] = probe_result(survivor, 60)
        assert report["ok"] and report["beeps_heard"] == report["beeps_sent"]  # untouched
        doomed.kill()
        doomed.wait()
    finally:
        stop_lab(lab.name)
