"""Shared fixtures: labs and data planes that are always torn down, even when a test fails."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from ipaddress import ip_address

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pnetns
from splitrelay.edge.xdp.maps import XdpMaps
from splitrelay.edge.records import Backend, RelayConfig
from splitrelay.edge.xdp.loader import pinned_instances, unpin
from splitrelay.lab.topology import STATE_DIR, STEM_ENV, Lab
from splitrelay.lab.netns import in_netns, list_namespaces

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def relay_ufrags(lab: Lab, relay: int = 1) -> set[str]:
    """The ufrags a lab relay routes: live sessions and the transceivers' ready ones (ufrag_pool.py)."""
    from splitrelay.lab.stack import control
    return {s["ufrag"] for s in control(lab, lambda c: c.sessions(), relay=relay)}


def _free_stem() -> str:
    """A lab-name stem no namespace or lab state on this machine uses yet: every lab of this test
    run (in this process or in the daemons and CLIs it starts, via the environment) is named
    ``<stem><6 hex>``, so the leak check below finds exactly this run's leftovers."""
    taken = set(list_namespaces()) | ({p.stem for p in STATE_DIR.glob("*.json")} if STATE_DIR.exists() else set())
    for _ in range(64):
        stem = "srt" + secrets.token_hex(1)
        if not any(n.startswith(stem) for n in taken):
            return stem
    raise RuntimeError("no free lab stem")


TEST_STEM = os.environ[STEM_ENV] = _free_stem()


@pytest.fixture
def lab():
    """Factory: ``lab(transceivers=N)`` builds a lab; every lab it built is destroyed, pass or fail."""
    labs: list[Lab] = []

    def make(transceivers: int = 1, **kwargs) -> Lab:
        created = Lab.create(transceivers=transceivers, **kwargs)
        labs.append(created)
        return created

    try:
        yield make
    finally:
        errors = []
        for created in labs:
            try:
                created.destroy()
            except Exception as exc:  # noqa: BLE001 - destroy the others, then report
                errors.append(exc)
        if errors:
            raise errors[0]


def attach_relay(lab: Lab, policy: str = "strict", instance: str | None = None,
                 translate: bool | int = False) -> XdpMaps:
    """Load and attach the data plane inside the lab's relay and register every transceiver;
    ``translate`` = N > 1: translating over N internal IPv4 addresses (the extra ones added to int0)."""
    sets = int(translate)
    more = tuple(str(ip_address(lab.relay_internal.ip4) + 100 + 10 * j) for j in range(sets - 1))
    dp = XdpMaps(instance=instance or lab.name, xlate_addrs=max(1, sets))

    def setup() -> None:
        for ip in more:
            subprocess.run(["ip", "addr", "add", f"{ip}/32", "dev", lab.relay_internal.ifname], check=True)
        dp.load()
        dp.attach(lab.relay_public.ifname, lab.relay_internal.ifname, mode="native")
        dp.configure(RelayConfig(relay_port=lab.relay_port, public_mac=lab.relay_public.mac,
                                 gateway_mac=lab.client.mac,
                                 public_ip4=lab.relay_public.ip4, public_ip6=lab.relay_public.ip6,
                                 policy=policy, translate=bool(translate), internal_ip4=lab.relay_internal.ip4,
                                 internal_ip6=None if more else lab.relay_internal.ip6, internal_more=more))
        if translate:
            dp.ports.refill()
        for t in lab.transceivers:
            dp.set_backend(Backend(t.backend_id, 5000, t.mac, lab.relay_internal.mac,
                                   ip4=t.ip4, ip6=t.ip6))

    in_netns(lab.relay_public.netns, setup)
    return dp


@pytest.fixture
def relay_lab(lab, request):
    """A lab with the XDP relay attached; DNAT, or translation when parametrized indirectly with True."""
    created = lab(transceivers=2)
    dp = attach_relay(created, translate=getattr(request, "param", False))
    try:
        yield created, dp
    finally:
        in_netns(created.relay_public.netns, dp.destroy)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    """Fail the run loudly if a namespace, host link, lab state file or pinned map it made outlives it.

    Only what this run created counts (other runs and helpers may share the machine):
    every lab this process makes and every data-plane instance it loads is recorded,
    and every lab made anywhere under this run (daemons, CLIs) carries its stem.
    Leftovers are removed, then reported as a failure.
    """
    labs: list[Lab] = []
    instances: set[str] = set()
    original_create = Lab.create.__func__
    original_load = XdpMaps.load

    def create(cls, *args, **kwargs):
        lab = original_create(cls, *args, **kwargs)
        labs.append(lab)
        instances.add(lab.name)
        return lab

    def load(self):
        instances.add(self.instance)
        return original_load(self)

    Lab.create = classmethod(create)
    XdpMaps.load = load
    try:
        yield
    finally:
        Lab.create = classmethod(original_create)
        XdpMaps.load = original_load
    if os.geteuid() != 0:
        return
    leaked = leftovers(TEST_STEM, labs)
    leaked_pins = instances & set(pinned_instances())
    for lab in labs:
        lab.destroy()
    for state in leaked["state files"]:
        try:
            Lab.from_json(json.loads((STATE_DIR / f"{state}.json").read_text())).destroy()
        except (OSError, ValueError, KeyError, TypeError):
            (STATE_DIR / f"{state}.json").unlink(missing_ok=True)
    for stray in leftovers(TEST_STEM, [])["namespaces"]:
        pnetns.remove(stray)
    for file_name in leaked["daemon logs"] + leaked["other lab files"]:
        (STATE_DIR / file_name).unlink(missing_ok=True)
    for name in leaked_pins:
        unpin(name)
    found = {k: v for k, v in leaked.items() if v}
    if leaked_pins:
        found["pinned maps"] = sorted(leaked_pins)
    assert not found, f"this test run left behind: {found}"


def leftovers(stem: str, labs: list[Lab]) -> dict[str, list[str]]:
    """Namespaces, host links, lab state files, daemon logs and other lab files (secrets) named with this
    run's stem (or of its labs)."""
    names = set(list_namespaces())
    with IPRoute() as ipr:
        links = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    prefixes = (stem, *(lab.prefix for lab in labs))
    states = []
    for path in STATE_DIR.glob("*.json") if STATE_DIR.exists() else []:
        try:
            prefix = json.loads(path.read_text()).get("prefix", "")
        except (OSError, ValueError):
            continue  # another run's file, being replaced
        if prefix.startswith(prefixes):
            states.append(path.stem)
    files = sorted(p.name for p in STATE_DIR.iterdir() if p.name.startswith(prefixes)) \
        if STATE_DIR.exists() else []
    logs = [f for f in files if f.endswith(".log")]
    return {
        "namespaces": sorted(n for n in names if n.startswith(prefixes)),
        "host links": sorted(n for n in links if n.startswith(prefixes)),
        "state files": sorted(states),
        "daemon logs": logs,
        # keys, tokens, a floated address's state: whatever else a lab keeps beside its .json
        "other lab files": [f for f in files if not f.endswith((".log", ".json"))],
    }
