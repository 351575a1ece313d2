"""The maps and the programs' life: pins, reloads, layouts, ageing, whole-table walks, counters."""

from __future__ import annotations

import ctypes as ct
import os
import time

import pytest
from splitrelay.bpf import SOURCE_DIR, syscall
from splitrelay.bpf.testrun import XDP_PASS
from splitrelay.edge.counters import counter_specs
from splitrelay.edge.xdp.maps import WALK_CHUNK, XdpMaps
from splitrelay.edge.records import DataPlaneError
from splitrelay.edge.xdp.loader import MAP_NAMES, PinnedMapMismatch

from .. import packets as P
from .harness import (
    confirm_flow,
    BACKEND_ID,
    VETH,
    V,
    assert_forwarded_to_backend,
    counts,
    instance_name,
    internal,
    public,
)


def test_unconfigured_relay_passes_everything(dp):
    dp.bpf[b"config"].clear()
    frame = P.udp_frame(V["2.1"])
    assert public(dp, frame).verdict == XDP_PASS


def test_unconfigured_relay_counts_what_it_passes(dp):
    dp.bpf[b"config"].clear()
    dp.reset_counters()
    frame = P.udp_frame(V["2.1"])
    assert public(dp, frame).verdict == XDP_PASS
    assert internal(dp, frame).verdict == XDP_PASS
    assert counts(dp) == {"IN_PASS_DISABLED": 1, "OUT_PASS_DISABLED": 1}


def test_maps_survive_a_reload_through_pins(relay):
    public(relay, P.udp_frame(V["2.1"]))
    again = XdpMaps(instance=relay.instance, pin_root=relay.pin_root)
    again.load()
    assert [s.ufrag for s in again.sessions()] == ["evtj"]
    assert again.flow((P.CLIENT_IP4, P.CLIENT_PORT)).backend_id == BACKEND_ID


def test_reload_keeps_maps_and_the_new_program_uses_them(relay):
    public(relay, P.udp_frame(V["2.1"]))
    confirm_flow(relay)
    old_fd = relay.program_fd("xdp_public")
    relay.reload()  # nothing attached: compiles and loads again over the same pinned maps
    assert relay.program_fd("xdp_public") != old_fd
    assert_forwarded_to_backend(public(relay, P.udp_frame(b"\x80" * 40)))  # the learned flow routes
    assert counts(relay) == {"IN_FWD_STUN_UFRAG": 1, "OUT_FWD_CONFIRM": 1, "IN_FWD_FLOW": 1}
    assert {p.name for p in (relay.pin_dir).iterdir()} == set(MAP_NAMES)


def test_pinned_map_of_another_layout_is_refused(dp):
    """bcc adopts pinned maps blindly; a stale layout must be an error, not garbage."""
    other = XdpMaps(instance=instance_name(), pin_root=dp.pin_root)
    try:
        other.pin_dir.mkdir(parents=True)
        fd = syscall.map_create(map_type=6, key_size=4, value_size=8, max_entries=4)   # an 'older build'
        try:
            syscall.obj_pin(fd, str(other.pin_dir / "stats"))
        finally:
            os.close(fd)
        with pytest.raises(PinnedMapMismatch, match="stats"):
            other.load()
    finally:
        other.destroy()
    assert not other.pin_dir.exists()


def test_refuses_hosts_own_interfaces(dp):
    with pytest.raises(DataPlaneError, match="eth0"):
        dp.attach("eth0")


def test_internal_interface_slot_must_exist(dp):
    with pytest.raises(DataPlaneError, match="no interface"):
        dp.attach("srA-does-not-exist")
    with pytest.raises(DataPlaneError, match="lo"):
        dp.attach(VETH[0], "lo")


def test_ageing_removes_only_idle_flows(relay):
    public(relay, P.udp_frame(V["2.1"], sport=40001))
    assert relay.age_flows(idle_s=60) == 0
    assert relay.age_flows(idle_s=0) == 1
    assert relay.flows() == []
    assert [s.ufrag for s in relay.sessions()] == ["evtj"]  # ageing never touches sessions


def test_counters_are_parsed_from_the_x_macro_in_order():
    specs = counter_specs()
    header = (SOURCE_DIR / "splitrelay.h").read_text()
    assert [s.index for s in specs] == list(range(len(specs)))
    assert len(specs) == header.split("#define SR_STATS(X)")[1].split("#define SR_STAT_ENUM")[0].count("X(")
    assert specs[0].name == "IN_FWD_STUN_UFRAG"
    assert all(s.direction in ("ingress", "egress") for s in specs)
    assert all(s.verdict in ("forwarded", "dropped", "passed") for s in specs)


def _filler_flows(dp, count: int, ufrag: bytes, last_seen_ns: int) -> None:
    """``count`` flows of session ``ufrag`` written straight into the map (clients 10.200.x.y:1000+)."""
    table = dp.bpf[b"flows"]
    keys, leaves = (table.Key * count)(), (table.Leaf * count)()
    for i in range(count):
        key = dp.addr_key("flows", f"10.200.{i // 250}.{i % 250 + 1}", 1000 + i % 50000)
        ct.memmove(ct.byref(keys, i * ct.sizeof(table.Key)), ct.byref(key), ct.sizeof(table.Key))
        leaves[i].backend_id = BACKEND_ID
        leaves[i].ufrag.ufrag = ufrag
        leaves[i].created_ns = leaves[i].last_seen_ns = last_seen_ns
    table.items_update_batch(keys, leaves)


def test_the_agents_table_walks_see_every_flow_across_batches(relay):
    """The agent reads the flow map in batches of WALK_CHUNK: deleting, ageing and counting must miss none."""
    now = time.monotonic_ns()
    relay.set_session("othr", BACKEND_ID)
    _filler_flows(relay, WALK_CHUNK * 2 + 100, b"othr", now)                  # three batches and a bit
    for port in (40000, 40001):                                               # two flows XDP learns itself
        assert_forwarded_to_backend(public(relay, P.udp_frame(V["2.1"], sport=port)), sport=port)
    total = WALK_CHUNK * 2 + 102
    assert len(relay.flows()) == total and relay.map_fill()["flows"][0] == total
    assert len(relay.flows(limit=WALK_CHUNK + 1)) == WALK_CHUNK + 1

    assert relay.del_session("evtj")                                          # exactly its two flows go
    assert len(relay.flows()) == total - 2 and not any(f.ufrag == "evtj" for f in relay.flows())

    stale = relay.flows()[:WALK_CHUNK]                                        # make one batch' worth idle
    table = relay.bpf[b"flows"]
    for f in stale:
        key = relay.addr_key("flows", f.client_ip, f.client_port)
        leaf = table[key]
        leaf.last_seen_ns = 0   # as old as the clock: `now - 3600 s` wrapped on a machine up < 1 h
        table[key] = leaf
    idle_s = min(60.0, now / 2e9)   # older than half the uptime is stale, the fresh ones are not
    assert relay.age_flows(idle_s) == WALK_CHUNK
    assert len(relay.flows()) == total - 2 - WALK_CHUNK
    assert relay.session("othr").flows == total - 2 - WALK_CHUNK             # the allowance recounted
