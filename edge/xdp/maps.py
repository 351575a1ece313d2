"""The XDP data plane of one relay instance, as Python sees it: its tables in the kernel's maps.

(Just over 400 lines: every map's read and write lives beside the pinning that keeps them;
encoding is ``codec``, loading ``loader``, the port pool ``ports``.)

Loads ``bpf/relay.c`` (``loader``), keeps every map pinned under
``/sys/fs/bpf/splitrelay/<instance>`` so an agent restart or a program reload
keeps all sessions and flows, attaches the two programs, and reads and writes
the maps with the ctypes types bcc derives from ``bpf/splitrelay.h`` (never a
second copy of the structs; ``codec`` fills them).  Policy (what to
register, when to age) is the caller's; this module only moves values in and
out of the kernel.  ``plane.XdpPlane`` makes it a ``DataPlane``.
"""

from __future__ import annotations

import ctypes as ct
import errno
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from splitrelay import defaults
from splitrelay.bpf import consts, syscall
from splitrelay.edge import counters as counters_mod
from splitrelay.edge.xdp import codec
from splitrelay.edge.xdp import loader
from splitrelay.edge.plane import PENDING_TIMEOUT_S
from splitrelay.edge.xdp.ports import PortPool, flow_pair
from splitrelay.edge.records import (
    INTERNAL_SLOT,
    PUBLIC_SLOT,
    Attachment,
    Backend,
    DataPlaneError,
    Flow,
    RelayConfig,
    Session,
    check_ufrag,
)
from splitrelay.edge.xdp.loader import PIN_ROOT, unpin

log = logging.getLogger(__name__)

WALK_CHUNK = 4096  # map entries per BPF_MAP_LOOKUP_BATCH when the agent reads a whole table
Counter = counters_mod.Counter   # the counters' dataclass lives next to their single definition's parser


@dataclass
class XdpMaps:
    instance: str = defaults.INSTANCE
    pin_root: str = PIN_ROOT
    attachments: list[Attachment] = field(default_factory=list)
    max_flows: int | None = None   # flow table size (default SR_MAX_FLOWS); fixed when first pinned
    port_range: tuple[int, int] = defaults.TRANSLATE_PORTS   # configure() sets it
    port_quarantine_s: float = 60.0   # translate: > the agent's idle timeout (edge/xdp/ports.py)
    xlate_addrs: int = 1   # translate: internal address sets the pool and reverse array hold; fixed when pinned

    def __post_init__(self) -> None:
        if not self.instance or "/" in self.instance or self.instance.startswith("."):
            raise DataPlaneError(f"bad instance name {self.instance!r}")
        self._bpf = None
        self._ports: PortPool | None = None
        self.flows_after_ageing: int | None = None   # the flow count the last age_flows walk left

    @property
    def ports(self) -> PortPool:
        """The translation port pool (edge/xdp/ports.py) on this instance's maps."""
        if self._ports is None or self._ports.bpf is not self.bpf:
            held = self._ports.quarantined if self._ports else {}
            if self._ports is None:   # a restarted agent before configure(): the pinned config's range and sets
                self._adopt_pinned_port_config()
            self._ports = PortPool(self.bpf, *self.port_range, quarantine_s=self.port_quarantine_s,
                                   quarantined=held, sets=self._port_sets)
        return self._ports

    _port_sets = 1   # the address sets configure() last wrote (<= xlate_addrs)

    def _adopt_pinned_port_config(self) -> None:
        cfg = self.config()
        if cfg is not None and cfg.translate:
            self.port_range = cfg.translate_ports
            self._port_sets = max(1, len(cfg.internal_sets()))

    def _release_ports(self, ports) -> None:
        """The flows holding ``ports`` (pairs, flow_pair) are deleted: clear their slots, quarantine them."""
        ports = [p for p in ports if p]
        if ports:
            self.ports.release(ports)

    # -- lifecycle -----------------------------------------------------------------

    @property
    def pin_dir(self) -> Path:
        return Path(self.pin_root) / self.instance

    @property
    def bpf(self):
        if self._bpf is None:
            self.load()
        return self._bpf

    def load(self) -> None:
        """Compile and load the programs; adopt the pinned maps if they exist."""
        self._bpf, self._programs = loader.compile_relay(self.pin_dir, self.max_flows, self.xlate_addrs)

    def program_fd(self, name: str) -> int:
        """The fd of a loaded program (``xdp_public``, ``xdp_internal``): what BPF_PROG_TEST_RUN runs."""
        if self._bpf is None:
            self.load()
        return self._programs[name].fd

    def set_tx_slot(self, slot: int, ifindex: int | None) -> None:
        """Point devmap slot ``slot`` at ``ifindex`` (None empties it): where redirects of that slot go."""
        table = self.bpf[b"tx_ports"]
        if ifindex:
            table[table.Key(slot)] = table.Leaf(ifindex)
        else:
            self._delete(table, table.Key(slot))

    def attach(self, public: str, internal: str | None = None, mode: str = "auto") -> str:
        """Attach xdp_public (and xdp_internal) and fill the redirect ports; returns the mode used."""
        loader.check_mode(mode)
        ifaces = [(public, "xdp_public", PUBLIC_SLOT)]
        if internal and internal != public:
            ifaces.append((internal, "xdp_internal", INTERNAL_SLOT))
        loader.refuse_host_links(*(ifname for ifname, _, _ in ifaces))
        indexes = {ifname: loader.ifindex(ifname) for ifname, _, _ in ifaces}
        self.set_tx_slot(PUBLIC_SLOT, indexes[public])
        self.set_tx_slot(INTERNAL_SLOT, indexes[internal] if internal else indexes[public])
        attached: list[Attachment] = []
        try:
            for ifname, program, _ in ifaces:
                used = self._attach_one(ifname, program, mode)
                attached.append(Attachment(ifname, indexes[ifname], program, used))
        except DataPlaneError:
            self.detach([a.ifname for a in attached])
            raise
        self.attachments = attached
        modes = {a.mode for a in attached}
        return modes.pop() if len(modes) == 1 else "mixed"

    def _attach_one(self, ifname: str, program: str, mode: str) -> str:
        return loader.attach_one(self._programs[program], ifname, program, mode)

    def reload(self) -> None:
        """Compile and load the programs again and attach each new fd over the old one.

        The kernel swaps an attached XDP program atomically when a new one is set
        in the same mode, so no packet meets a detached interface; every map,
        tx_ports included, is the pinned one.  Unattached, this only reloads.
        """
        old = list(self.attachments)
        self._bpf, self._programs = loader.compile_relay(self.pin_dir, self.max_flows, self.xlate_addrs)
        if not old:
            return
        public = next(a for a in old if a.program == "xdp_public")
        internal = next((a for a in old if a.program == "xdp_internal"), None)
        self.set_tx_slot(PUBLIC_SLOT, public.ifindex)
        self.set_tx_slot(INTERNAL_SLOT, internal.ifindex if internal else public.ifindex)
        for a in old:
            self._attach_one(a.ifname, a.program, a.mode)

    def detach(self, ifnames: list[str] | None = None) -> None:
        """Remove the programs from the interfaces (maps stay pinned)."""
        loader.detach_all(ifnames or [a.ifname for a in self.attachments])
        self.attachments = []

    def destroy(self, ifnames: list[str] | None = None) -> None:
        """Detach and remove every pinned map of this instance."""
        self.detach(ifnames)
        self._bpf = None
        unpin(self.instance, self.pin_root)

    # -- config and tables ---------------------------------------------------------

    def configure(self, cfg: RelayConfig) -> None:
        sets = max(1, len(cfg.internal_sets())) if cfg.translate else 1
        capacity = syscall.map_info(self.bpf[b"port_slots"].map_fd).max_entries // consts.PORT_SLOTS
        if sets > capacity:
            raise DataPlaneError(f"{sets} internal address sets, but the pinned translation maps hold {capacity}: "
                                f"destroy instance {self.instance!r} or use another instance name")
        table = self.bpf[b"config"]
        table[ct.c_uint32(0)] = codec.config_leaf(table.Leaf(), cfg)
        self.port_range = cfg.translate_ports
        self._port_sets = sets
        if self._ports is not None:
            self._ports.first, self._ports.last = cfg.translate_ports
            self._ports.sets = self._port_sets

    def config(self) -> RelayConfig | None:
        return codec.config_from(self.bpf[b"config"][ct.c_uint32(0)])

    def addr_key(self, table_name: str, ip: str, port: int):
        """The ``sr_addr_key`` of (ip, port) for ``table_name`` (flows, backend_addrs)."""
        return codec.addr_key(self.bpf[table_name.encode()].Key(), ip, port)

    def set_backend(self, b: Backend) -> None:
        table = self.bpf[b"backends"]
        old = self.backend(b.backend_id)
        table[ct.c_uint32(b.backend_id)] = codec.backend_leaf(table.Leaf(), b)
        addrs = self.bpf[b"backend_addrs"]
        if old:
            for ip in (old.ip4, old.ip6):
                if ip:
                    self._delete(addrs, self.addr_key("backend_addrs", ip, old.port))
        for ip in (b.ip4, b.ip6):
            if ip:
                addrs[self.addr_key("backend_addrs", ip, b.port)] = ct.c_uint32(b.backend_id)

    @staticmethod
    def _delete(table, key) -> bool:
        try:
            del table[key]
            return True
        except KeyError:
            return False

    def backend(self, backend_id: int) -> Backend | None:
        try:
            leaf = self.bpf[b"backends"][ct.c_uint32(backend_id)]
        except KeyError:
            return None
        return codec.backend_from(backend_id, leaf)

    def backends(self) -> list[Backend]:
        return sorted(
            (codec.backend_from(k.value, v) for k, v in self.bpf[b"backends"].items()),
            key=lambda b: b.backend_id,
        )

    def del_backend(self, backend_id: int) -> bool:
        """Remove a backend with its sessions and flows; False if it was not there."""
        old = self.backend(backend_id)
        if old is None:
            return False
        sessions = self.bpf[b"sessions"]
        for key in [sessions.Key.from_buffer_copy(k) for k, v in sessions.items() if v.backend_id == backend_id]:
            self._delete(sessions, key)
        flows = self.bpf[b"flows"]  # its sessions' flows, and those a routing hint opened
        doomed = [(flows.Key.from_buffer_copy(k), flow_pair(v)) for k, v in self._walk(flows)
                  if v.backend_id == backend_id]
        for key, _ in doomed:
            self._delete(flows, key)
        self._release_ports(port for _, port in doomed)
        if doomed:
            self.recount_session_flows()
        addrs = self.bpf[b"backend_addrs"]
        for ip in (old.ip4, old.ip6):
            if ip:
                self._delete(addrs, self.addr_key("backend_addrs", ip, old.port))
        return self._delete(self.bpf[b"backends"], ct.c_uint32(backend_id))

    def _ufrag_key(self, ufrag: str):
        key = self.bpf[b"sessions"].Key()
        key.ufrag = check_ufrag(ufrag).encode("ascii")
        return key

    def set_session(self, ufrag: str, backend_id: int) -> None:
        table = self.bpf[b"sessions"]
        key = self._ufrag_key(ufrag)
        leaf = table.Leaf()
        leaf.backend_id = backend_id
        leaf.created_ns = time.monotonic_ns()
        table[key] = leaf

    def session(self, ufrag: str) -> Session | None:
        try:
            leaf = self.bpf[b"sessions"][self._ufrag_key(ufrag)]
        except KeyError:
            return None
        return Session(ufrag, leaf.backend_id, leaf.created_ns, leaf.flows)

    def sessions(self) -> list[Session]:
        return [
            Session(codec.ufrag_text(k.ufrag), v.backend_id, v.created_ns, v.flows)
            for k, v in self.bpf[b"sessions"].items()
        ]

    def del_session(self, ufrag: str) -> bool:
        """Remove a session and the flows it created; False if it was not there."""
        return self.del_sessions([ufrag])[ufrag]

    def del_sessions(self, ufrags: list[str]) -> dict[str, bool]:
        """Remove sessions and the flows they created; for each, whether it was there.

        The flows are found in one batched read of the flow table for all of them
        (comparing raw ufrag bytes, no Flow objects): the control API gathers the
        DELETEs that arrive together into one call, so the cost of the walk is shared.
        No recount is needed: the flows that went belonged to the sessions that went.
        """
        sessions = self.bpf[b"sessions"]
        keys = {ufrag: self._ufrag_key(ufrag) for ufrag in ufrags}
        removed = {ufrag: self._delete(sessions, key) for ufrag, key in keys.items()}
        raws = {bytes(key.ufrag) for key in keys.values()}
        table = self.bpf[b"flows"]
        doomed = [(table.Key.from_buffer_copy(k), flow_pair(leaf)) for k, leaf in self._walk(table)
                  if bytes(leaf.ufrag.ufrag) in raws]
        for k, _ in doomed:
            self._delete(table, k)
        self._release_ports(port for _, port in doomed)
        return removed

    def _walk(self, table, chunk: int = WALK_CHUNK):
        """Every (key, value) of a hash map, read ``chunk`` at a time (``syscall.map_lookup_batches``).

        Two syscalls per entry (bcc's ``items()``) made the agent's walks take seconds at
        a million flows; a batch read takes one per ``chunk``.  The pairs yielded are
        views into buffers reused for the next chunk: copy what you keep
        (``Key.from_buffer_copy``).  Falls back to ``items()`` where the kernel has no
        batch operations.
        """
        batches = syscall.map_lookup_batches(table.map_fd, table.Key, table.Leaf, chunk, f"fd {table.map_fd}")
        try:
            first = next(batches, None)
        except syscall.BpfError as exc:
            if exc.errno in (errno.EINVAL, syscall.ENOTSUPP):
                yield from table.items()
                return
            raise DataPlaneError(str(exc)) from None
        if first is None:
            return
        yield first
        try:
            yield from batches
        except syscall.BpfError as exc:
            raise DataPlaneError(str(exc)) from None

    def flows(self, limit: int | None = None) -> list[Flow]:
        out = []
        for key, leaf in self._walk(self.bpf[b"flows"]):
            out.append(codec.flow_from(key, leaf))
            if limit is not None and len(out) >= limit:
                break
        return out

    def flow(self, client: tuple[str, int]) -> Flow | None:
        key = self.addr_key("flows", *client)
        try:
            return codec.flow_from(key, self.bpf[b"flows"][key])
        except KeyError:
            return None

    def del_flow(self, client: tuple[str, int]) -> bool:
        table = self.bpf[b"flows"]
        key = self.addr_key("flows", *client)
        try:
            port = flow_pair(table[key])
        except KeyError:
            return False
        removed = self._delete(table, key)
        if removed:
            self._release_ports([port])
            self.recount_session_flows()
        return removed

    def age_flows(self, idle_s: float, pending_s: float = PENDING_TIMEOUT_S) -> int:
        """Remove flows idle for longer than idle_s, and pending ones opened longer than pending_s
        ago (their backend never answered: a spoofed or forged request); returns how many went.

        One batched pass: it finds the doomed flows and counts each ufrag's live confirmed ones,
        so the allowances are recounted without reading the table again.
        """
        now = time.monotonic_ns()
        cutoff, pending_cutoff = now - int(idle_s * 1e9), now - int(pending_s * 1e9)
        table = self.bpf[b"flows"]
        stale = []
        live: dict[bytes, int] = {}
        for key, leaf in self._walk(table):
            if leaf.last_seen_ns < cutoff or (leaf.pending and leaf.created_ns < pending_cutoff):
                stale.append((table.Key.from_buffer_copy(key), flow_pair(leaf)))
            elif not leaf.pending:
                ufrag = bytes(leaf.ufrag.ufrag)
                live[ufrag] = live.get(ufrag, 0) + 1
        gone = [port for key, port in stale if self._delete(table, key)]
        removed = len(gone)
        self.flows_after_ageing = sum(live.values()) + len(stale) - removed   # /metrics, without a walk
        self._release_ports(gone)
        if self._ports is not None:
            self._ports.return_due()
        if removed:
            self._set_session_flows(live)
        return removed

    def recount_session_flows(self) -> None:
        """Give each ufrag back the allowance of the confirmed flows that went.

        XDP only counts up (it cannot see deletions); the flow map is the truth, so
        the agent recounts from it after removing flows.  A flow confirmed during the
        recount is seen at the next one.
        """
        live: dict[bytes, int] = {}
        for _, leaf in self._walk(self.bpf[b"flows"]):
            if not leaf.pending:
                key = bytes(leaf.ufrag.ufrag)
                live[key] = live.get(key, 0) + 1
        self._set_session_flows(live)

    def _set_session_flows(self, live: dict[bytes, int]) -> None:
        """Write each ufrag's live confirmed count (``live``: raw ufrag key -> flows) where it differs:
        a session's in its entry, a routing hint's (no session) in its pending state."""
        for name, field_name in ((b"sessions", "flows"), (b"pending", "confirmed")):
            table = self.bpf[name]
            for key, leaf in table.items():
                count = live.get(bytes(key.ufrag), 0)
                if getattr(leaf, field_name) != count:
                    setattr(leaf, field_name, count)
                    # BPF_EXIST: a session deleted meanwhile (this may run in the table-walker thread
                    # while the loop serves a DELETE) must stay deleted, not come back with a count
                    syscall.map_update(table.map_fd, key, leaf, syscall.BPF_EXIST)

    def set_local_addrs(self, ips) -> None:
        """The relay's own addresses: a backend's packet to one goes to the kernel, never to the public side."""
        table = self.bpf[b"local_addrs"]
        table.clear()
        for ip in ips:
            table[self.addr_key("local_addrs", ip, 0)] = ct.c_uint32(1)

    def local_addrs(self) -> list[str]:
        return sorted(str(codec.addr_from_words(list(k.addr), k.family)) for k in self.bpf[b"local_addrs"].keys())

    def map_fill(self, known: dict[str, int] | None = None) -> dict[str, tuple[int, int]]:
        """Entries and capacity of each hash map; the maps counted in ``known`` are not walked again."""
        out = {}
        for name in ("backends", "backend_addrs", "sessions", "flows"):
            table = self.bpf[name.encode()]
            count = (known or {}).get(name)
            out[name] = (sum(1 for _ in self._walk(table)) if count is None else count, table.max_entries)
        return out

    def counters(self) -> dict[str, counters_mod.Counter]:
        """Every per-CPU counter summed over the CPUs, keyed by its enum name."""
        table = self.bpf[b"stats"]
        out = {}
        for spec in counters_mod.counter_specs():
            packets, bytes_ = counters_mod.sum_per_cpu(table.getvalue(ct.c_uint32(spec.index)))
            out[spec.name] = counters_mod.Counter(spec, packets, bytes_)
        return out

    def reset_counters(self) -> None:
        self.bpf[b"stats"].clear()
