"""Shared fixtures: labs and data planes that are always torn down, even when a test fails."""

from __future__ import annotations

import os
import subprocess

import pytest
from splitrelay.edge.datapath import Backend, Datapath, RelayConfig, pinned_instances, unpin
from splitrelay.edge.lab import Lab, in_netns

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture
def lab():
    labs: list[Lab] = []

    def make(transceivers: int = 1) -> Lab:
        created = Lab.create(transceivers=transceivers)
        labs.append(created)
        return created

    try:
        yield make
    finally:
        for created in labs:
            created.destroy()


def attach_relay(lab: Lab, policy: str = "strict", instance: str | None = None) -> Datapath:
    """Load and attach the data plane inside the lab's relay and register every transceiver."""
    dp = Datapath(instance=instance or lab.name)

    def setup() -> None:
        dp.load()
        dp.attach(lab.relay_public.ifname, lab.relay_internal.ifname, mode="native")
        dp.configure(RelayConfig(lab.relay_port, lab.relay_public.mac, lab.client.mac,
                                 public_ip4=lab.relay_public.ip4, public_ip6=lab.relay_public.ip6,
                                 policy=policy))
        for t in lab.transceivers:
            dp.set_backend(Backend(t.backend_id, 5000, t.mac, lab.relay_internal.mac,
                                   ip4=t.ip4, ip6=t.ip6))

    in_netns(lab.relay_public.netns, setup)
    return dp


@pytest.fixture
def relay_lab(lab):
    created = lab(transceivers=2)
    dp = attach_relay(created)
    try:
        yield created, dp
    finally:
        in_netns(created.relay_public.netns, dp.destroy)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    """Fail the run if a namespace or pinned map this test run created outlives it.

    Only what this process created counts (other runs may share the machine): every
    lab and data-plane instance is recorded as it is made.
    """
    labs: list[Lab] = []
    instances: set[str] = set()
    original_create = Lab.create.__func__
    original_load = Datapath.load

    def create(cls, *args, **kwargs):
        lab = original_create(cls, *args, **kwargs)
        labs.append(lab)
        instances.add(lab.name)
        return lab

    def load(self):
        instances.add(self.instance)
        return original_load(self)

    Lab.create = classmethod(create)
    Datapath.load = load
    try:
        yield
    finally:
        Lab.create = classmethod(original_create)
        Datapath.load = original_load
    if os.geteuid() != 0:
        return
    existing = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    leaked_ns = {ns for lab in labs for ns in lab.namespaces() if ns in existing}
    leaked_pins = instances & set(pinned_instances())
    for lab in labs:
        lab.destroy()
    for name in leaked_pins:
        unpin(name)
    assert not leaked_ns and not leaked_pins, f"left behind: namespaces {leaked_ns}, pins {leaked_pins}"
