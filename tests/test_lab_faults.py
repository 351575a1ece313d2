"""Lab faults as objects: each one applies and undoes itself, and heal() undoes whatever is applied.

No agents and no calls here (tests/test_floating.py and tests/test_browser.py time the faults
under live calls): what a fault changes is read back from the lab's switch and its state.
"""

from __future__ import annotations

import json

from splitrelay.lab.faults import AddressFloats, RelayDies, heal
from splitrelay.lab.floating import floated
from splitrelay.lab.topology import Lab

from .conftest import needs_root

pytestmark = needs_root


def _port_state(lab: Lab, relay: int) -> str:
    port = lab.relay(relay).switch_port
    [link] = json.loads(lab.run(lab.switch_netns, ["bridge", "-j", "link", "show", "dev", port]).stdout)
    return link["state"]


def test_heal_undoes_exactly_the_faults_applied_relays_first(lab):
    net = lab(transceivers=1, relays=2)
    assert heal(net) == []
    floats, dies = AddressFloats(net, relay=1, standby=2), RelayDies(net, relay=1)
    floats.apply()   # applied first, healed last: the address comes home over a path that forwards again
    dies.apply()
    assert _port_state(net, 1) == "disabled" and _port_state(net, 2) == "forwarding"
    assert floated(net) == floats.move
    assert [f.name for f in heal(net)] == ["relay 1 dies", "relay 1's address floats to relay 2"]
    assert _port_state(net, 1) == "forwarding" and floated(net) is None
    assert heal(net) == []


def test_a_fault_undone_by_itself_leaves_nothing_for_heal(lab):
    net = lab(transceivers=1, relays=2)
    dies = RelayDies(net, relay=2)
    dies.apply()
    assert _port_state(net, 2) == "disabled" and _port_state(net, 1) == "forwarding"
    dies.undo()
    assert _port_state(net, 2) == "forwarding"
    assert heal(net) == []
