"""Silent faults under a live call: a host or a path stops answering, and no link goes down.

A relay that dies, or a path that goes dark, is silence to a client: its ICE agent
notices only because consent checks stop being answered.  Disabling a port of the
lab's switch (bridge port state ``disabled``) drops every frame through it in both
directions without a carrier change anywhere, so neither the browser nor aioice sees a
network event, only silence.  The browser tests and a failover bench share these, and
``client.browser.BrowserCall.measure_gap(fault)`` times them.
"""

from __future__ import annotations

from splitrelay.lab.topology import Lab

BRIDGE_PORT_DISABLED, BRIDGE_PORT_FORWARDING = "0", "3"   # bridge(8) port states


def switch_port(lab: Lab, port: str, forwarding: bool) -> None:
    """Let a port of the lab's switch (e.g. ``lab.relay(1).switch_port``, ``t1m``) forward, or drop
    everything through it."""
    state = BRIDGE_PORT_FORWARDING if forwarding else BRIDGE_PORT_DISABLED
    lab.run(lab.switch_netns, ["bridge", "link", "set", "dev", port, "state", state])


def kill_relay(lab: Lab, relay: int) -> None:
    """Relay ``relay`` goes silent: what clients send it goes nowhere, nothing comes back, and its
    agent's control API is cut off from the transceivers, as when the host dies."""
    switch_port(lab, lab.relay(relay).switch_port, forwarding=False)


def revive_relay(lab: Lab, relay: int) -> None:
    switch_port(lab, lab.relay(relay).switch_port, forwarding=True)

