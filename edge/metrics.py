"""Prometheus metrics of the edge agent: counters read at scrape time, table sizes as last aged.

A scrape reads only the counter array; the table sizes come from ``tables``
(the agent's ``TableSnapshot``, refreshed by each ageing pass), because counting
a million-entry flow map on every scrape let a scrape flood hold the table-walker
thread that ages flows and serves DELETEs.  Without ``tables`` (tools, tests) the
plane's ``map_fill`` is read directly.

The data plane is any ``DataPlane`` (edge/plane.py: XDP or the userspace relay):
each answers ``counters()`` and ``map_fill()`` with the same names, so every
series below means the same for either, and ``splitrelay_edge_datapath_info{kind}``
says which one is running.

The per-CPU counters live in a pinned map and survive restarts, but a map that
is recreated (upgrade with a changed layout, `edge detach --purge`, a reload of
an unpinned build) starts at zero again; exporting that as-is would look like a
counter reset to Prometheus and corrupt rate().  ``MonotonicCounters`` keeps an
offset per counter so the exported series never decreases.

Every agent has its own ``CollectorRegistry`` (never the global one), so several
agents in one process — tests — do not collide.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from splitrelay.edge.plane import DataPlane

log = logging.getLogger(__name__)

COUNTER_LABELS = ["direction", "verdict", "reason"]
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5)


class MonotonicCounters:
    """Turns raw counter readings that may restart from zero into never-decreasing totals.

    A reading below the previous one means the source was reset: everything counted
    up to the previous reading is kept as an offset.  (Increments between the last
    reading and the reset are lost; nothing can recover them.)
    """

    def __init__(self) -> None:
        self._last: dict[str, int] = {}
        self._offset: dict[str, int] = {}
        self.resets = 0

    def update(self, key: str, raw: int) -> int:
        last = self._last.get(key)
        if last is not None and raw < last:
            self._offset[key] = self._offset.get(key, 0) + last
            self.resets += 1
        self._last[key] = raw
        return raw + self._offset.get(key, 0)


def _families() -> dict[str, GaugeMetricFamily | CounterMetricFamily]:
    return {
        "packets": CounterMetricFamily("splitrelay_edge_packets", "Packets the data plane decided on",
                                       labels=COUNTER_LABELS),
        "bytes": CounterMetricFamily("splitrelay_edge_bytes", "Bytes (Ethernet frames) the data plane decided on",
                                     labels=COUNTER_LABELS),
        "entries": GaugeMetricFamily("splitrelay_edge_map_entries",
                                     "Entries in each table (BPF hash map, or its userspace counterpart)",
                                     labels=["map"]),
        "capacity": GaugeMetricFamily("splitrelay_edge_map_capacity_entries", "Capacity of each table",
                                      labels=["map"]),
        "flows": GaugeMetricFamily("splitrelay_edge_flows", "Client flows in the flow map"),
        "sessions": GaugeMetricFamily(
            "splitrelay_edge_sessions", "Registered session ufrags, the transceivers' ready ones included "
                                        "(splitrelay_transceiver_ufrag_pool_ready; they have no flows yet)"),
        "backends": GaugeMetricFamily("splitrelay_edge_backends", "Registered backends"),
        "info": GaugeMetricFamily("splitrelay_edge_xdp_info", "XDP programs attached by this agent",
                                  labels=["iface", "program", "mode"]),
        "datapath": GaugeMetricFamily("splitrelay_edge_datapath_info",
                                      "The data plane this agent runs (kind: xdp or userspace)", labels=["kind"]),
        "up": GaugeMetricFamily("splitrelay_edge_datapath_up",
                                "1 if the last scrape could read the data plane's maps, else 0"),
    }


class TableSizes(Protocol):
    def map_fill(self) -> dict[str, tuple[int, int]]: ...


class EdgeCollector(Collector):
    """Reads the counters on every scrape (made monotonic), and the table sizes from ``tables``."""

    def __init__(self, plane: DataPlane, attach_info: Iterable[tuple[str, str, str]],
                 kind: str = "xdp", tables: TableSizes | None = None) -> None:
        self.plane = plane
        self.tables = tables if tables is not None else plane
        self.attach_info = list(attach_info)  # (iface, program, mode)
        self.kind = kind
        self.totals = MonotonicCounters()

    def describe(self):
        # names only: registering must not read (or lazily compile) the data plane
        return list(_families().values())

    def collect(self):
        f = _families()
        try:
            counters = self.plane.counters()
            fill = self.tables.map_fill()
        except Exception as exc:  # noqa: BLE001 - a scrape must still answer
            log.warning("cannot read the data plane for /metrics: %s", exc)
            f["up"].add_metric([], 0)
            yield f["up"]
            return
        for name, c in counters.items():
            labels = [c.spec.direction, c.spec.verdict, c.spec.reason]
            f["packets"].add_metric(labels, self.totals.update(name + ":packets", c.packets))
            f["bytes"].add_metric(labels, self.totals.update(name + ":bytes", c.bytes))
        for name, (used, cap) in fill.items():
            f["entries"].add_metric([name], used)
            f["capacity"].add_metric([name], cap)
        for key in ("flows", "sessions", "backends"):
            f[key].add_metric([], fill.get(key, (0, 0))[0])
        for iface, program, mode in self.attach_info:
            f["info"].add_metric([iface, program, mode], 1)
        f["datapath"].add_metric([self.kind], 1)
        f["up"].add_metric([], 1)
        yield from f.values()


class EdgeMetrics:
    """The agent's registry: the data-plane collector plus the agent's own instruments."""

    def __init__(self, plane: DataPlane, attach_info: Iterable[tuple[str, str, str]],
                 kind: str = "xdp", tables: TableSizes | None = None) -> None:
        self.registry = CollectorRegistry()
        self.collector = EdgeCollector(plane, attach_info, kind, tables)
        self.registry.register(self.collector)
        self.requests = Histogram(
            "splitrelay_edge_control_request_duration_seconds", "Control API request latency by route template",
            ["method", "route", "code"], registry=self.registry, buckets=REQUEST_BUCKETS,
        )
        self.ageing_runs = Counter("splitrelay_edge_flow_ageing_runs", "Flow ageing passes",
                                   registry=self.registry)
        self.aged_flows = Counter("splitrelay_edge_flows_aged", "Idle flows removed by ageing",
                                  registry=self.registry)
        self.aged_sessions = Counter("splitrelay_edge_sessions_aged",
                                     "Sessions removed: no flow for the session idle time, their backend quiet",
                                     registry=self.registry)
        self.ageing_errors = Counter("splitrelay_edge_flow_ageing_errors", "Flow ageing passes that failed",
                                     registry=self.registry)

    def observe_request(self, method: str, route: str, code: int, seconds: float) -> None:
        self.requests.labels(method, route, str(code)).observe(seconds)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
