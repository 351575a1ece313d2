"""Prometheus metrics of the edge agent, read from the data plane at scrape time.

The per-CPU counters live in a pinned map and survive restarts, but a map that
is recreated (upgrade with a changed layout, `edge detach --purge`) starts at
zero again; exporting that as-is would look like a counter reset to Prometheus
and corrupt rate().  ``MonotonicCounters`` keeps an offset per counter so the
exported series never decreases.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from splitrelay.edge.datapath import Datapath


class MonotonicCounters:
    """Turns raw counter readings that may restart from zero into never-decreasing totals."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}
        self._offset: dict[str, int] = {}

    def update(self, key: str, raw: int) -> int:
        last = self._last.get(key)
        if last is not None and raw < last:
            self._offset[key] = self._offset.get(key, 0) + last
        self._last[key] = raw
        return raw + self._offset.get(key, 0)


class EdgeCollector:
    def __init__(self, datapath: Datapath, attach_info: list[tuple[str, str]]) -> None:
        self.dp = datapath
        self.attach_info = attach_info
        self.totals = MonotonicCounters()

    def collect(self):
        labels = ["direction", "verdict", "reason"]
        packets = CounterMetricFamily("splitrelay_edge_packets", "Packets the XDP programs decided on",
                                      labels=labels)
        bytes_ = CounterMetricFamily("splitrelay_edge_bytes", "Bytes the XDP programs decided on",
                                     labels=labels)
        for name, c in self.dp.counters().items():
            values = [c.spec.direction, c.spec.verdict, c.spec.reason]
            packets.add_metric(values, self.totals.update(name + ":p", c.packets))
            bytes_.add_metric(values, self.totals.update(name + ":b", c.bytes))
        yield packets
        yield bytes_
        fill = self.dp.map_fill()
        entries = GaugeMetricFamily("splitrelay_edge_map_entries", "Entries in each BPF map", labels=["map"])
        capacity = GaugeMetricFamily("splitrelay_edge_map_capacity_entries", "Capacity of each BPF map",
                                     labels=["map"])
        for name, (used, cap) in fill.items():
            entries.add_metric([name], used)
            capacity.add_metric([name], cap)
        yield entries
        yield capacity
        yield GaugeMetricFamily("splitrelay_edge_flows", "Client flows in the flow map", value=fill["flows"][0])
        yield GaugeMetricFamily("splitrelay_edge_sessions", "Registered sessions", value=fill["sessions"][0])
        yield GaugeMetricFamily("splitrelay_edge_backends", "Registered backends", value=fill["backends"][0])
        info = GaugeMetricFamily("splitrelay_edge_xdp_info", "XDP programs attached by this agent",
                                 labels=["iface", "program", "mode"])
        for iface, program, mode in self.attach_info:
            info.add_metric([iface, program, mode], 1)
        yield info


class EdgeMetrics:
    """The agent's registry: data-plane collector plus the agent's own instruments."""

    def __init__(self, datapath: Datapath, attach_info: list[tuple[str, str, str]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EdgeCollector(datapath, attach_info))
        self.requests = Histogram(
            "splitrelay_edge_control_request_duration_seconds", "Control API request latency",
            ["method", "route", "code"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.ageing_runs = Counter("splitrelay_edge_flow_ageing_runs", "Flow ageing passes",
                                   registry=self.registry)
        self.aged_flows = Counter("splitrelay_edge_flows_aged", "Idle flows removed by ageing",
                                  registry=self.registry)

    def observe_request(self, method: str, route: str, code: int, seconds: float) -> None:
        self.requests.labels(method, route, str(code)).observe(seconds)
