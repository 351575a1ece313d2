"""A relay's defaults, each written once: the agent, the CLI, the lab, the bench and the tests read them here.

Root of the package tree (every package may import ``splitrelay``), so the
transceiver and the lab, which may not import ``edge``, read the same numbers.
The deploy files cannot import: ``tests/test_defaults.py`` checks that they
name these.  Limits C shares (table sizes, the allowance, the flow-port range)
stay in ``bpf/splitrelay.h`` and are only named here.
"""

from __future__ import annotations

from splitrelay.bpf.consts import DEFAULT_SESSION_FLOWS, XLATE_PORT_MAX, XLATE_PORT_MIN, Policy

RELAY_PORT = 3478            # the one public UDP port: STUN's, which clients and firewalls expect
CONTROL_PORT = 8470          # the agent's control API and /metrics
CONTROL_HOST = "127.0.0.1"   # loopback: no token needed (edge/credentials.py), nothing reachable from outside
POLICY = Policy.STRICT       # only registered ufrags open flows
POLICY_NAMES = [p.value for p in Policy]   # what --policy takes, from bpf/splitrelay.h
INSTANCE = "default"         # names the pinned maps: /sys/fs/bpf/splitrelay/<instance>
PIN_ROOT = "/sys/fs/bpf/splitrelay"   # where every instance's maps are pinned (bpffs)
PLANE_KINDS = ("xdp", "userspace")   # the data planes an agent can run (edge/agent.py builds them)
PLANE = "xdp"
SESSION_FLOWS = DEFAULT_SESSION_FLOWS
TRANSLATE_PORTS = (XLATE_PORT_MIN, XLATE_PORT_MAX)
