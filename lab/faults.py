"""Silent faults under a live call: a host or a path stops answering, and no link goes down.

A relay that dies, or a path that goes dark, is silence to a client: its ICE agent
notices only because consent checks stop being answered.  Disabling a port of the
lab's switch (bridge port state ``disabled``) drops every frame through it in both
directions without a carrier change anywhere, so neither the browser nor aioice sees a
network event, only silence.  The browser tests and a failover bench share these, and
``client.browser.BrowserCall.measure_gap(fault)`` times them.

Each fault is one object with a ``name``: ``apply()`` breaks the lab, ``undo()`` repairs
what it broke.  What is applied is read back from the lab, not remembered by a process
(a relay's switch port state, a floated address's record beside the lab's state), so
``heal(lab)`` undoes whatever is applied, also from another process than the one that
applied it (``splitrelay lab fault heal``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Protocol

from splitrelay.lab.floating import FloatedAddress, float_address, floated, return_address
from splitrelay.lab.topology import Lab

BRIDGE_PORT_DISABLED, BRIDGE_PORT_FORWARDING = "0", "3"   # bridge(8) port states


class Fault(Protocol):
    """One way to break a lab, and its undo."""

    @property
    def name(self) -> str: ...

    def apply(self) -> object: ...

    def undo(self) -> object: ...


def switch_port(lab: Lab, port: str, forwarding: bool) -> None:
    """Let a port of the lab's switch (e.g. ``lab.relay(1).switch_port``, ``t1m``) forward, or drop
    everything through it."""
    state = BRIDGE_PORT_FORWARDING if forwarding else BRIDGE_PORT_DISABLED
    lab.run(lab.switch_netns, ["bridge", "link", "set", "dev", port, "state", state])


def _port_states(lab: Lab) -> dict[str, str]:
    """Each port of the lab's switch: its bridge state ("forwarding", "disabled", ...)."""
    ports = json.loads(lab.run(lab.switch_netns, ["bridge", "-j", "link", "show"]).stdout or "[]")
    return {port["ifname"]: port.get("state", "") for port in ports}


@dataclass
class RelayDies:
    """Relay ``relay`` goes silent: what clients send it goes nowhere, nothing comes back, and its
    agent's control API is cut off from the transceivers, as when the host dies."""

    lab: Lab
    relay: int = 1

    @property
    def name(self) -> str:
        return f"relay {self.relay} dies"

    @property
    def port(self) -> str:
        return self.lab.relay(self.relay).switch_port

    def apply(self) -> None:
        switch_port(self.lab, self.port, forwarding=False)

    def undo(self) -> None:
        switch_port(self.lab, self.port, forwarding=True)

    @classmethod
    def applied(cls, lab: Lab) -> list[RelayDies]:
        states = _port_states(lab)
        return [cls(lab, r.index) for r in lab.relays if states.get(r.switch_port) == "disabled"]


@dataclass
class AddressFloats:
    """Relay ``relay``'s public address floats to relay ``standby`` (lab/floating.py): ``apply`` is
    ``float_address``, ``undo`` is ``return_address``; ``move`` is what moved."""

    lab: Lab
    relay: int = 1
    standby: int = 2
    gateway: bool = True
    move: FloatedAddress | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return f"relay {self.relay}'s address floats to relay {self.standby}"

    def apply(self) -> FloatedAddress:
        self.move = float_address(self.lab, self.relay, self.standby, self.gateway)
        return self.move

    def undo(self) -> FloatedAddress | None:
        return return_address(self.lab)

    @classmethod
    def applied(cls, lab: Lab) -> list[AddressFloats]:
        move = floated(lab)
        return [cls(lab, move.relay, move.standby, move.gateway, move)] if move else []


# heal's order: paths first, so a floated address comes home announced where it is heard
KINDS = (RelayDies, AddressFloats)


def kill_relay(lab: Lab, relay: int) -> None:
    RelayDies(lab, relay).apply()


def revive_relay(lab: Lab, relay: int) -> None:
    RelayDies(lab, relay).undo()


def relay_dies_and_its_address_floats(lab: Lab, relay: int = 1, standby: int = 2,
                                      gateway: bool = True) -> FloatedAddress:
    """Scenario 3b as it happens: relay ``relay`` goes silent and its address moves to ``standby`` in
    the same instant (failure detection, e.g. VRRP's ~1-3 s, is not counted)."""
    RelayDies(lab, relay).apply()
    return AddressFloats(lab, relay, standby, gateway).apply()


def heal(lab: Lab) -> list[Fault]:
    """Undo every fault applied to the lab (each relay forwarding, a floated address home); returns
    what it undid; idempotent."""
    undone: list[Fault] = []
    for kind in KINDS:
        for fault in kind.applied(lab):
            fault.undo()
            undone.append(fault)
    return undone
