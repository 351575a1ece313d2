"""Every data-plane attack of lab/attacks.py against a real lab: real XDP, a real aiortc call, real packets.

Each attack runs during (or, for lockout-before, just before) a live echo call through relay 1,
sent from the lab's client namespace, and must leave the call's audio intact and the relay
carrying nothing for the attacker.  Checked against the data path without the defences (main's
bpf/relay.c over this branch's headers): lockout-before-4/64 and takeover lose the call's audio,
hint-flood opens 100 flows, reflector-offer reflects 8-9x, backend-spoof reflects every byte
(RELIABILITY.md "Attacks tried").
"""

from __future__ import annotations

import os

import pytest
from splitrelay.bpf import consts
from splitrelay.lab.attacks import ATTACKS, run_attacks
from splitrelay.lab.stack import start_lab, stop_lab
from splitrelay.lab.topology import Lab

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a lab needs root")


@pytest.fixture(scope="module")
def attacked_lab():
    info = start_lab(transceivers=2, handler="echo", policy="hint")   # hint-flood needs it; the rest hold too
    try:
        yield Lab.load(info["name"])
    finally:
        stop_lab(info["name"])


@pytest.mark.parametrize("name", list(ATTACKS))
def test_each_data_plane_attack_leaves_the_call_its_audio_and_the_attacker_nothing(attacked_lab, name):
    [report] = run_attacks(attacked_lab, [name])
    assert report.skipped is None
    assert report.call_kept_audio, report.to_dict()
    assert report.amplification <= 1.0, report.to_dict()
    assert report.flows_created <= consts.DEFAULT_SESSION_FLOWS * 4, report.to_dict()   # 4 ready ufrags at most
    assert report.defended, report.to_dict()


def test_an_unknown_attack_is_refused_in_one_line(attacked_lab):
    with pytest.raises(Exception, match="^no such attack: nope"):
        run_attacks(attacked_lab, ["nope"])
