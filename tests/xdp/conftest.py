"""Fixtures of the XDP tests: one namespace, one pin root and one loaded relay for the whole package.

Compiling relay.c takes seconds, so the package shares one ``XdpMaps``; the
``relay`` fixture gives each test fresh maps and counters on it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from pathlib import Path

import pytest
from splitrelay.edge.xdp.maps import XdpMaps
from splitrelay.edge.records import Backend, RelayConfig

from .. import packets as P
from ..netns import private_netns
from .harness import (BACKEND_ID, INTERNAL_IP4, INTERNAL_IP4_B, INTERNAL_IP6, INTERNAL_IP6_B, PORTS,
                      RELAY_OWN_IP4, RELAY_OWN_IP6, VETH, instance_name, set_slots)


HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    """Every test of this package loads BPF: skipped, not failed, without root (the hook sees all items)."""
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="BPF needs root")
        for item in items:
            if HERE in Path(str(item.fspath)).resolve().parents:
                item.add_marker(skip)


@pytest.fixture(scope="package")
def pin_root():
    """A pin root of this package's own: no other run's leak sweep of /sys/fs/bpf/splitrelay can unpin it."""
    root = Path(f"/sys/fs/bpf/srtest-{uuid.uuid4().hex[:8]}")
    try:
        yield str(root)
    finally:
        leaked = sorted(p.name for p in root.iterdir()) if root.exists() else []
        shutil.rmtree(root, ignore_errors=True)
        assert not leaked, f"pinned instances left behind: {leaked}"


@pytest.fixture(scope="package")
def links():
    with private_netns(VETH) as ifindexes:
        yield ifindexes


@pytest.fixture(scope="package")
def dp(links, pin_root):
    # sized for two internal address sets: the one-set tests run on it configured with one (the
    # default), the several-address tests (test_translation_addrs.py) with both
    datapath = XdpMaps(instance=instance_name(), pin_root=pin_root, xlate_addrs=2)
    try:
        datapath.load()
        yield datapath
    finally:
        datapath.destroy()


@pytest.fixture
def relay(dp, links):
    """A configured relay with one dual-stack backend and session 'evtj', fresh maps and counters;
    its own addresses are the internal ones (RELAY_OWN_IP4/6)."""
    for table in ("flows", "sessions", "backend_addrs", "backends", "pending", "local_addrs"):
        dp.bpf[table.encode()].clear()
    set_slots(dp, links)
    dp.reset_counters()
    dp.configure(RelayConfig(relay_port=P.RELAY_PORT, public_mac=P.RELAY_PUB_MAC, gateway_mac=P.GATEWAY_MAC,
                             public_ip4=P.PUBLIC_IP4, public_ip6=P.PUBLIC_IP6))
    dp.set_backend(Backend(BACKEND_ID, P.BACKEND_PORT, P.BACKEND_MAC, P.RELAY_INT_MAC,
                           ip4=P.BACKEND_IP4, ip6=P.BACKEND_IP6))
    dp.set_session("evtj", BACKEND_ID)
    dp.set_local_addrs([RELAY_OWN_IP4, RELAY_OWN_IP6])
    return dp


@pytest.fixture
def xlate(relay):
    """The ``relay`` fixture translating both sides, with a fresh pool of PORTS and no session allowance."""
    relay.configure(dataclasses.replace(relay.config(), translate=True, internal_ip4=INTERNAL_IP4,
                                        internal_ip6=INTERNAL_IP6, max_session_flows=0,
                                        translate_ports=PORTS))
    relay.ports.clear_slots()
    relay.ports.quarantined.clear()   # the package shares one XdpMaps: no port held back by another test
    relay.ports.refill()
    return relay


@pytest.fixture
def xlate2(relay):
    """``xlate`` with two internal address sets (A and B of each family): 2 x 4 pairs in the pool."""
    relay.configure(dataclasses.replace(relay.config(), translate=True, internal_ip4=INTERNAL_IP4,
                                        internal_ip6=INTERNAL_IP6, internal_more=(INTERNAL_IP4_B, INTERNAL_IP6_B),
                                        max_session_flows=0, translate_ports=PORTS))
    relay.ports.clear_slots()
    relay.ports.quarantined.clear()
    relay.ports.refill()
    return relay
