"""The per-flow ports of translation (issue 12 §1): which port may go back into the XDP pool, and when.

``xdp_public`` pops a pair from the pinned queue ``port_pool`` when it opens a
flow and points the pair's reverse slot (``port_slots``) at the client and its
backend.  A pair is (internal address set << 16) | port: with several internal
addresses each port exists once per set, and the pair is the slot's index; with
one set (the default) a pair is just the port.  "Port" below means such a pair.

Only this agent ever pushes a port, and only where nothing can still use it: a
port is in the queue xor held by one flow, so it is never handed out in use, and
the pool is bounded by the range (an empty queue is refused and counted as
``port_pool_empty`` in XDP; no live flow is evicted).

* ``refill`` (at start, also over pinned state left by an agent that died):
  empty the queue, then push the range minus the ports live flows hold.  In that
  order, a port XDP pops while the queue is drained is in a slot when the slots
  are read, so it is never pushed twice.  Slots whose flow is gone or holds
  another port (a packet race, an agent killed between its two deletes) are
  cleared and quarantined.  Until the refill ends new flows are refused
  (counted); live flows are untouched.
* ``release`` (after the agent deleted flows): clear their slots, so a late
  reply to the port is dropped at once, and hold the port back for
  ``quarantine_s`` (longer than the idle timeout) before ``return_due`` pushes
  it: a reply that was still on its way cannot reach the port's next client.
"""

from __future__ import annotations

import ctypes as ct
import time
from dataclasses import dataclass, field

from splitrelay.bpf import syscall
from splitrelay.edge.records import RelayConfig
from splitrelay.wire.byteorder import from_be16


def flow_pair(leaf) -> int:
    """The (address set, port) pair an ``sr_flow`` holds; 0 for none (DNAT)."""
    port = from_be16(leaf.xlate_port)
    return (leaf.xlate_addr << 16) | port if port else 0


@dataclass
class PortPool:
    """The agent's side of the XDP port pool of one relay instance (its bcc module ``bpf``)."""

    bpf: object
    first: int = RelayConfig.translate_ports[0]   # the range (RelayConfig validated it)
    last: int = RelayConfig.translate_ports[1]
    quarantine_s: float = 60.0
    quarantined: dict[int, float] = field(default_factory=dict)   # pair -> monotonic time it may return
    sets: int = 1   # internal address sets in use (sr_config.xlate_addrs; the maps may hold more)

    @property
    def _queue(self):
        return self.bpf[b"port_pool"]

    @property
    def _slots(self):
        return self.bpf[b"port_slots"]

    def _drain(self) -> int:
        queue, n = self._queue, 0
        while True:
            try:
                queue.pop()
            except KeyError:
                return n
            n += 1

    def _push(self, port: int) -> None:
        queue = self._queue
        queue.push(queue.Leaf(port))

    def slots(self) -> dict[int, tuple]:
        """Every allocated reverse slot: pair -> (client key copy, backend id)."""
        table = self._slots
        out = {}
        for key, leaf in _walk_array(table):
            if leaf.client.family:
                port = int(getattr(key, "value", key))   # batched reads give ints, items() c_uint
                out[port] = (type(leaf.client).from_buffer_copy(leaf.client), leaf.backend_id)
        return out

    def held(self) -> set[int]:
        """The pairs live flows hold: an allocated slot whose client's flow names that pair."""
        flows = self.bpf[b"flows"]
        out = set()
        for port, (client, _) in self.slots().items():
            key = flows.Key.from_buffer_copy(client)
            try:
                if flow_pair(flows[key]) == port:
                    out.add(port)
            except KeyError:
                pass
        return out

    def refill(self) -> int:
        """Empty the queue, then push every pair (each set, each port of the range) that no live flow
        holds; how many went in.  Sets interleave (port p of every set, then p + 1), so flows spread
        over the internal addresses from the first one on."""
        self._drain()
        allocated = self.slots()
        held = self.held()
        orphans = [port for port in allocated if port not in held]
        self._clear(orphans)
        now = time.monotonic()
        for port in orphans:
            self.quarantined.setdefault(port, now + self.quarantine_s)
        pushed = 0
        for port in range(self.first, self.last + 1):
            for pair in range(port, (self.sets << 16) | port, 1 << 16):
                if pair in held or pair in self.quarantined:
                    continue
                self._push(pair)
                pushed += 1
        return pushed

    def clear_slots(self) -> int:
        """Mark every allocated slot free (a relay being emptied, tests); how many were.  One batched read
        of the array instead of bcc's clear(), which writes all 65,536 slots one syscall each."""
        allocated = list(self.slots())
        self._clear(allocated)
        return len(allocated)

    def _clear(self, ports) -> None:
        table = self._slots
        for port in ports:
            table[ct.c_uint32(port)] = table.Leaf()

    def release(self, ports, now: float | None = None) -> None:
        """Ports of flows the agent deleted: their slots cleared now, the ports back after the quarantine."""
        ports = [p for p in ports if p]
        if not ports:
            return
        self._clear(ports)
        due = (time.monotonic() if now is None else now) + self.quarantine_s
        for port in ports:
            self.quarantined[port] = due

    def return_due(self, now: float | None = None) -> int:
        """Push the ports whose quarantine is over; how many."""
        now = time.monotonic() if now is None else now
        due = [port for port, at in self.quarantined.items() if at <= now]
        for port in due:
            del self.quarantined[port]
            if self.first <= (port & 0xFFFF) <= self.last and port >> 16 < self.sets:
                self._push(port)
        return len(due)


def _walk_array(table):
    """(key, value) of every slot of an array map in batches (65536 lookups one by one take ~0.3 s)."""
    try:
        yield from syscall.map_lookup_batches(table.map_fd, table.Key, table.Leaf, 4096, "port_slots")
    except syscall.BpfError:
        yield from table.items()
