"""Flow-table scale: forwarding rate and per-packet XDP cost with 1k, 100k and 1M flows in the map.

The benchmark loads the relay itself (an ``EdgeAgent`` attached, no daemon), so
nothing but the measured traffic runs: a 1M-entry table walked by the agent's
ageing pass every two seconds would otherwise compete with the data plane for
the same two cores.  That walk is measured separately instead (``walk_s``): it
is the agent's cost of holding a million flows.

The flows are written with BPF_MAP_UPDATE_BATCH, exactly as the XDP program
would have learned them (client address and port, backend, client MAC, now as
created/last-seen).  Each size is measured twice: the sender visits *all* the
flows in a fixed shuffled order (every packet a different flow, the worst case:
the working set is the whole table, so lookups miss the CPU caches and TLB),
and then only the first 1,000 of them (the table is as big, the working set
fits in cache): the difference separates what table *size* costs from what a
large *working set* costs.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from splitrelay.bench import forwarding
from splitrelay.edge.agent import AgentConfig, EdgeAgent
from splitrelay.edge.records import Backend
from splitrelay.lab.topology import Lab

PORTS_PER_IP = 50000
BASE_PORT = 10000
FIRST_HOST = 100           # public-network hosts no lab host uses: flows i // 50000 -> .100, .101, ...
BATCH = 65536
ACTIVE_FLOWS = 1000        # the second run at each size: the map holds N flows, traffic touches this many


def first_ip(lab: Lab) -> str:
    """The first synthetic client address: host FIRST_HOST on the lab's public network."""
    return str(ipaddress.ip_network(lab.networks["public"][0])[FIRST_HOST])


def flow_endpoint(i: int, first: str) -> tuple[str, int]:
    """The client address of synthetic flow ``i``: the same formula as udpgen's packet mode."""
    return (str(ipaddress.IPv4Address(first) + i // PORTS_PER_IP), BASE_PORT + i % PORTS_PER_IP)


def map_memlock_bytes(map_fd: int) -> int:
    """Kernel memory charged to a map (``memlock`` in its fdinfo)."""
    for line in Path(f"/proc/self/fdinfo/{map_fd}").read_text().splitlines():
        if line.startswith("memlock:"):
            return int(line.split()[1])
    raise OSError(f"no memlock in fdinfo of map fd {map_fd}")


def fill_flows(table, start: int, end: int, backend_id: int, client_mac: bytes, first: str) -> None:
    """Write flows ``start..end`` into the pinned flow map in batches."""
    key_size = ct.sizeof(table.Key)
    now = time.monotonic_ns()  # bpf_ktime_get_ns() is CLOCK_MONOTONIC
    proto = table.Leaf()
    proto.backend_id = backend_id
    proto.client_mac[:] = list(client_mac)
    proto.created_ns = proto.last_seen_ns = now
    leaf = bytes(proto)
    for lo in range(start, end, BATCH):
        hi = min(end, lo + BATCH)
        n = hi - lo
        keys = bytearray(key_size * n)
        for j in range(n):
            ip, port = flow_endpoint(lo + j, first)
            # struct sr_addr_key: __be32 addr[4] (v4 in addr[0]), __be16 port, __u8 family, pad
            struct.pack_into("=4s12x2sBx", keys, j * key_size, ipaddress.IPv4Address(ip).packed,
                             port.to_bytes(2, "big"), 4)
        ct_keys = (table.Key * n).from_buffer(keys)
        ct_leaves = (table.Leaf * n).from_buffer(bytearray(leaf * n))
        table.items_update_batch(ct_keys, ct_leaves)


@dataclass(frozen=True)
class ScaleRun:
    """One table size: the rate over every flow in the map, and over the first ``ACTIVE_FLOWS`` of them."""

    all_flows: forwarding.RateRun
    active: forwarding.RateRun
    flows_in_map: int
    aged: int            # flows the ageing pass removed (none: it only reads them here)
    fill_s: float
    walk_s: float        # the agent's ageing pass over the whole table

    def to_json(self) -> dict:
        a = self.active
        return {**self.all_flows.to_json(), "flows_in_map": self.flows_in_map, "aged": self.aged,
                "fill_s": self.fill_s, "walk_s": self.walk_s, "active_subset": {
                    "flows": a.flows, "delivered_pps": a.delivered_pps, "loss": a.loss,
                    "trials_pps": list(a.trials_pps), "xdp_ns_per_packet": a.xdp_ns_per_packet,
                    "relay_cpu_ns_per_packet": a.relay_cpu_ns_per_packet}}


@dataclass(frozen=True)
class ScaleFigures:
    """The scale part: a run per table size, and what the flow map costs in kernel memory."""

    runs: list[ScaleRun]
    flow_map_entries: int
    flow_map_memlock_bytes: int
    flow_key_bytes: int
    flow_value_bytes: int
    cpus: int | None

    @property
    def bytes_per_flow(self) -> float:
        return round(self.flow_map_memlock_bytes / self.flow_map_entries, 1)

    def to_json(self) -> dict:
        return {"runs": [r.to_json() for r in self.runs], "flow_map_entries": self.flow_map_entries,
                "flow_map_memlock_bytes": self.flow_map_memlock_bytes, "bytes_per_flow": self.bytes_per_flow,
                "flow_key_bytes": self.flow_key_bytes, "flow_value_bytes": self.flow_value_bytes,
                "cpus": self.cpus}


def scale(lab: Lab, sizes: list[int], duration: float, pinned: bool = True,
          progress: Callable[[str], None] = lambda _: None, trials: int = 1) -> ScaleFigures:
    """Rate and XDP ns/packet at each table size (filled cumulatively), memory per flow, ageing walk time."""
    relay, t = lab.relay_public, lab.transceivers[0]
    config = AgentConfig(public_iface=relay.ifname, internal_iface=lab.relay_internal.ifname,
                         public_ip4=relay.ip4, relay_port=lab.relay_port, gateway_ip=lab.client.ip4,
                         instance=f"{lab.name}-scale", max_session_flows=0, detach_on_exit=True)
    agent = EdgeAgent(config)
    runs = []
    try:
        lab.in_netns(relay.netns, agent.attach)
        dp = agent.plane.maps
        backend_mac = lab.in_netns(relay.netns, lambda: agent.resolve_backend_mac(t.ip4))
        relay_mac = lab.mac(relay.netns, lab.relay_internal.ifname)
        dp.set_backend(Backend(1, forwarding.SINK_PORT, backend_mac, relay_mac, ip4=t.ip4))
        table = dp.bpf[b"flows"]
        client_mac = bytes.fromhex(lab.mac(lab.client.netns, lab.client.ifname).replace(":", ""))
        memlock = map_memlock_bytes(table.map_fd)
        filled = 0
        for size in sorted(sizes):
            if size > table.max_entries:
                raise ValueError(f"{size} flows do not fit the flow map ({table.max_entries} entries)")
            progress(f"scale: filling the flow map to {size:,} flows")
            t0 = time.perf_counter()
            fill_flows(table, filled, size, 1, client_mac, first_ip(lab))
            fill_s = time.perf_counter() - t0
            filled = size
            progress(f"scale: {size:,} flows, sending for {duration:g} s over all of them")
            rate = forwarding.median_of(trials, lambda size=size: forwarding.forwarding_rate(
                lab, forwarding.relay_path(lab, "xdp"), flows=size, duration=duration, usernames=None,
                pinned=pinned, src_ip=first_ip(lab), src_port=BASE_PORT, shuffle=True))
            active = min(size, ACTIVE_FLOWS)
            progress(f"scale: {size:,} flows, sending for {duration:g} s over {active:,} of them")
            hot = forwarding.median_of(trials, lambda active=active: forwarding.forwarding_rate(
                lab, forwarding.relay_path(lab, "xdp"), flows=active, duration=duration, usernames=None,
                pinned=pinned, src_ip=first_ip(lab), src_port=BASE_PORT, shuffle=True))
            t0 = time.perf_counter()
            aged = dp.age_flows(idle_s=86400.0)  # the agent's ageing pass: reads every flow, removes none here
            walk_s = time.perf_counter() - t0
            runs.append(ScaleRun(rate, hot, len(table), aged, round(fill_s, 2), round(walk_s, 2)))
        return ScaleFigures(runs, table.max_entries, memlock, ct.sizeof(table.Key), ct.sizeof(table.Leaf),
                            os.cpu_count())
    finally:
        lab.in_netns(relay.netns, lambda: agent.plane.maps.destroy([relay.ifname, lab.relay_internal.ifname]))
