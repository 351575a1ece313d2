"""The XDP data plane of one relay instance, as Python sees it.

Loads ``bpf/relay.c`` through bcc, keeps every map pinned under
``/sys/fs/bpf/splitrelay/<instance>`` so an agent restart or a program reload
keeps all sessions and flows, attaches the two programs, and reads and writes
the maps with the ctypes types bcc derives from ``bpf/splitrelay.h`` (never a
second copy of the structs).  Policy (what to register, when to age) is the
caller's; this module only moves values in and out of the kernel.
"""

from __future__ import annotations

import ctypes as ct
import errno
import ipaddress
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from splitrelay.bpf import SOURCE_DIR
from splitrelay.edge import counters as counters_mod
from splitrelay.wire.hint import MAX_BACKEND_ID
from splitrelay.wire.byteorder import addr_from_words, be16, be32_words, from_be16, mac_bytes, mac_str

log = logging.getLogger(__name__)

PIN_ROOT = "/sys/fs/bpf/splitrelay"
FORBIDDEN_IFACES = {"eth0", "lo"}
POLICIES = {"strict": 0, "hint": 1}
PUBLIC_SLOT = 0
INTERNAL_SLOT = 1
UFRAG_MAX = 32
# every bcc table of relay.c, all pinned under pin_dir (their types come from the source, via bcc)
MAP_NAMES = ("config", "backends", "backend_addrs", "sessions", "flows", "stats", "tx_ports")
VERIFIER_LOG_SIZE = 1 << 24

# The counters' dataclass lives next to their single definition's parser; re-exported here.
Counter = counters_mod.Counter

# linux/if_link.h
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2


WALK_CHUNK = 4096  # map entries per BPF_MAP_LOOKUP_BATCH when the agent reads a whole table
_BPF_EXIST = 2    # bpf_map_update_elem flag: only replace an entry that is there
_ENOTSUPP = 524   # the kernel's "operation not supported" (no batch ops for this map), not in errno


class DatapathError(Exception):
    """The data plane could not do what was asked (one-line reason)."""


class VerifierError(DatapathError):
    """The kernel verifier rejected a program; the full log is saved at ``log_path``."""

    def __init__(self, program: str, log_path: str, reason: str = "") -> None:
        detail = f" ({reason})" if reason else ""
        super().__init__(f"the BPF verifier rejected {program}{detail}; log saved to {log_path}")
        self.program = program
        self.log_path = log_path


class PinnedMapMismatch(DatapathError):
    """A map pinned by an older build has another layout than the source being loaded."""


@dataclass
class RelayConfig:
    relay_port: int
    public_mac: str
    gateway_mac: str
    public_ip4: str | None = None
    public_ip6: str | None = None
    policy: str = "strict"
    max_session_flows: int = 4    # client 5-tuples one session may open; 0 = unlimited
    hint_key: bytes | None = None  # with a key only keyed (v2) routing hints route

    def __post_init__(self) -> None:
        if self.hint_key is not None and len(self.hint_key) != 16:
            raise DatapathError(f"hint key must be 16 bytes, got {len(self.hint_key)}")
        if not 0 <= self.max_session_flows <= 65535:
            raise DatapathError(f"max session flows must be 0..65535, got {self.max_session_flows}")
        if not 1 <= self.relay_port <= 65535:
            raise DatapathError(f"relay port must be 1..65535, got {self.relay_port}")
        if self.policy not in POLICIES:
            raise DatapathError(f"policy must be one of {sorted(POLICIES)}, got {self.policy!r}")
        if self.public_ip4 is None and self.public_ip6 is None:
            raise DatapathError("a relay needs a public IPv4 or IPv6 address")


@dataclass
class Backend:
    backend_id: int
    port: int
    dmac: str
    smac: str
    ip4: str | None = None
    ip6: str | None = None
    tx_slot: int = INTERNAL_SLOT

    def __post_init__(self) -> None:
        if not 1 <= self.backend_id <= MAX_BACKEND_ID:
            raise DatapathError(f"backend id must be 1..{MAX_BACKEND_ID}, got {self.backend_id}")
        if not 1 <= self.port <= 65535:
            raise DatapathError(f"backend port must be 1..65535, got {self.port}")
        if self.ip4 is None and self.ip6 is None:
            raise DatapathError("a backend needs an IPv4 or IPv6 address")


@dataclass
class Session:
    ufrag: str
    backend_id: int
    created_ns: int
    flows: int = 0


@dataclass
class Flow:
    client_ip: str
    client_port: int
    backend_id: int
    ufrag: str
    client_mac: str
    created_ns: int
    last_seen_ns: int
    packets: int
    bytes: int
    rx_packets: int
    rx_bytes: int

    @property
    def client(self) -> str:
        host = f"[{self.client_ip}]" if ":" in self.client_ip else self.client_ip
        return f"{host}:{self.client_port}"


@dataclass
class Attachment:
    ifname: str
    ifindex: int
    program: str
    mode: str


def _validate_ufrag(ufrag: str) -> bytes:
    raw = ufrag.encode("ascii", "replace")
    if not 4 <= len(raw) <= UFRAG_MAX:
        raise DatapathError(f"ufrag must be 4..{UFRAG_MAX} characters, got {len(raw)}")
    return raw


@dataclass
class Datapath:
    instance: str = "default"
    pin_root: str = PIN_ROOT
    attachments: list[Attachment] = field(default_factory=list)
    max_flows: int | None = None   # flow table size (default SR_MAX_FLOWS); fixed when first pinned

    def __post_init__(self) -> None:
        if not self.instance or "/" in self.instance or self.instance.startswith("."):
            raise DatapathError(f"bad instance name {self.instance!r}")
        self._bpf = None

    # -- lifecycle -----------------------------------------------------------------

    @property
    def pin_dir(self) -> Path:
        return Path(self.pin_root) / self.instance

    @property
    def bpf(self):
        if self._bpf is None:
            self.load()
        return self._bpf

    def _compile(self):
        try:
            from bcc import BPF
        except ImportError as exc:
            raise DatapathError("bcc is not importable: run `make setup`") from exc
        if not Path("/sys/fs/bpf").is_mount():
            raise DatapathError("bpffs is not mounted on /sys/fs/bpf: run `make setup`")
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        cflags = [
            f"-I{SOURCE_DIR}",
            f'-DSR_PIN_DIR="{self.pin_dir}"',
            "-Wno-compare-distinct-pointer-types",
            "-Wno-pass-failed",  # a `#pragma unroll` clang leaves rolled is a bounded loop the verifier takes
        ] + ([f"-DSR_MAX_FLOWS={int(self.max_flows)}"] if self.max_flows else [])
        try:
            bpf = BPF(src_file=str(SOURCE_DIR / "relay.c").encode(), cflags=cflags)
        except Exception as exc:  # bcc raises bare Exception for compile errors
            raise DatapathError(f"cannot compile {SOURCE_DIR / 'relay.c'}: {exc}") from exc
        self._check_pinned_layout(bpf)
        programs = {}
        for name in ("xdp_public", "xdp_internal"):
            programs[name] = self._load_program(bpf, name)
        return bpf, programs

    def _check_pinned_layout(self, bpf) -> None:
        """bcc adopts a pinned map by path without comparing it to the source: do it here.

        A key or value size that differs (an older build of splitrelay.h) would make the
        program and the agent read garbage, so refuse it; a different capacity only warns.
        """
        from bcc.libbcc import lib

        for name in MAP_NAMES:
            table = bpf[name.encode()]
            map_type = lib.bpf_table_type_id(bpf.module, table.map_id)  # as declared in relay.c
            leaf = getattr(table, "sLeaf", table.Leaf)  # per-CPU tables: one CPU's value
            info = map_info(table.map_fd)
            want = (map_type, ct.sizeof(table.Key), ct.sizeof(leaf))
            have = (info.type, info.key_size, info.value_size)
            if have != want:
                raise PinnedMapMismatch(
                    f"pinned map {self.pin_dir / name} has (type, key, value) = {have}, this build "
                    f"needs {want}: destroy instance {self.instance!r} or use another instance name")
            if info.max_entries != table.max_entries:
                log.warning("pinned map %s holds %d entries, this build declares %d; keeping the pinned one",
                            self.pin_dir / name, info.max_entries, table.max_entries)

    @staticmethod
    def _load_program(bpf, name: str):
        from bcc import BPF
        from bcc.libbcc import lib

        try:
            return bpf.load_func(name.encode(), BPF.XDP)
        except Exception as exc:
            # bcc only prints the verifier log to stderr: load again into our own buffer
            buf = ct.create_string_buffer(VERIFIER_LOG_SIZE)
            fn = name.encode()
            rc = lib.bcc_func_load(bpf.module, BPF.XDP, fn, lib.bpf_function_start(bpf.module, fn),
                                   lib.bpf_function_size(bpf.module, fn), lib.bpf_module_license(bpf.module),
                                   lib.bpf_module_kern_version(bpf.module), 1, buf, VERIFIER_LOG_SIZE,
                                   None, -1)
            if rc >= 0:  # accepted the second time (should not happen): use it
                os.close(rc)
            fd, path = tempfile.mkstemp(prefix=f"splitrelay-verifier-{name}-", suffix=".log")
            with os.fdopen(fd, "w") as out:
                out.write(f"# {exc}\n")
                out.write(buf.value.decode("utf-8", "replace"))
            lines = [ln for ln in buf.value.decode("utf-8", "replace").splitlines() if ln.strip()]
            tail = [ln for ln in lines if not ln.startswith(("processed ", "verification time"))][-2:]
            reason = "; ".join(tail) or str(exc)
            raise VerifierError(name, path, reason) from exc

    def load(self) -> None:
        """Compile and load the programs; adopt the pinned maps if they exist."""
        self._bpf, self._programs = self._compile()

    def _ifindex(self, ifname: str) -> int:
        try:
            return ct.CDLL(None).if_nametoindex(ifname.encode()) or self._no_iface(ifname)
        except OSError:
            return self._no_iface(ifname)

    @staticmethod
    def _no_iface(ifname: str) -> int:
        raise DatapathError(f"no interface named {ifname!r} in this network namespace")

    def _set_slot(self, slot: int, ifindex: int) -> None:
        table = self.bpf[b"tx_ports"]
        table[table.Key(slot)] = table.Leaf(ifindex)

    def attach(self, public: str, internal: str | None = None, mode: str = "auto") -> str:
        """Attach xdp_public (and xdp_internal) and fill the redirect ports; returns the mode used."""
        if mode not in ("auto", "native", "generic"):
            raise DatapathError(f"mode must be auto, native or generic, got {mode!r}")
        ifaces = [(public, "xdp_public", PUBLIC_SLOT)]
        if internal and internal != public:
            ifaces.append((internal, "xdp_internal", INTERNAL_SLOT))
        for ifname, _, _ in ifaces:
            if ifname in FORBIDDEN_IFACES:
                raise DatapathError(f"refusing to attach XDP to {ifname}: it is this host's own link")
        indexes = {ifname: self._ifindex(ifname) for ifname, _, _ in ifaces}
        self._set_slot(PUBLIC_SLOT, indexes[public])
        self._set_slot(INTERNAL_SLOT, indexes[internal] if internal else indexes[public])
        attached: list[Attachment] = []
        try:
            for ifname, program, _ in ifaces:
                used = self._attach_one(ifname, program, mode)
                attached.append(Attachment(ifname, indexes[ifname], program, used))
        except DatapathError:
            self.detach([a.ifname for a in attached])
            raise
        self.attachments = attached
        modes = {a.mode for a in attached}
        return modes.pop() if len(modes) == 1 else "mixed"

    def _attach_one(self, ifname: str, program: str, mode: str) -> str:
        from bcc import BPF

        fn = self._programs[program]
        if mode in ("auto", "native"):
            try:
                BPF.attach_xdp(ifname.encode(), fn, XDP_FLAGS_DRV_MODE)
                return "native"
            except Exception as exc:
                if mode == "native":
                    raise DatapathError(f"native XDP attach to {ifname} failed: {exc}") from exc
                log.warning("native XDP unavailable on %s (%s); using generic XDP", ifname, exc)
        try:
            BPF.attach_xdp(ifname.encode(), fn, XDP_FLAGS_SKB_MODE)
        except Exception as exc:
            raise DatapathError(f"generic XDP attach to {ifname} failed: {exc}") from exc
        return "generic"

    def reload(self) -> None:
        """Compile and load the programs again and attach each new fd over the old one.

        The kernel swaps an attached XDP program atomically when a new one is set
        in the same mode, so no packet meets a detached interface; every map,
        tx_ports included, is the pinned one.  Unattached, this only reloads.
        """
        old = list(self.attachments)
        self._bpf, self._programs = self._compile()
        if not old:
            return
        public = next(a for a in old if a.program == "xdp_public")
        internal = next((a for a in old if a.program == "xdp_internal"), None)
        self._set_slot(PUBLIC_SLOT, public.ifindex)
        self._set_slot(INTERNAL_SLOT, internal.ifindex if internal else public.ifindex)
        for a in old:
            self._attach_one(a.ifname, a.program, a.mode)

    def detach(self, ifnames: list[str] | None = None) -> None:
        """Remove the programs from the interfaces (maps stay pinned)."""
        from bcc import BPF

        names = ifnames or [a.ifname for a in self.attachments]
        for ifname in names:
            if ifname in FORBIDDEN_IFACES:
                continue
            for flags in (XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE):
                try:
                    BPF.remove_xdp(ifname.encode(), flags)
                except Exception:  # noqa: BLE001 - not attached in that mode
                    pass
        self.attachments = []

    def destroy(self, ifnames: list[str] | None = None) -> None:
        """Detach and remove every pinned map of this instance."""
        self.detach(ifnames)
        self._bpf = None
        unpin(self.instance, self.pin_root)

    # -- config and tables ---------------------------------------------------------

    def configure(self, cfg: RelayConfig) -> None:
        table = self.bpf[b"config"]
        leaf = table.Leaf()
        if cfg.public_ip4:
            leaf.public_ip4 = be32_words(ipaddress.IPv4Address(cfg.public_ip4))[0]
        if cfg.public_ip6:
            for i, word in enumerate(be32_words(ipaddress.IPv6Address(cfg.public_ip6))):
                leaf.public_ip6[i] = word
        leaf.relay_port = be16(cfg.relay_port)
        leaf.policy = POLICIES[cfg.policy]
        leaf.enabled = 1
        ct.memmove(leaf.public_mac, mac_bytes(cfg.public_mac), 6)
        ct.memmove(leaf.gateway_mac, mac_bytes(cfg.gateway_mac), 6)
        leaf.public_slot = PUBLIC_SLOT
        leaf.max_session_flows = cfg.max_session_flows
        if cfg.hint_key:
            leaf.hint_key_set = 1
            ct.memmove(leaf.hint_key, cfg.hint_key, 16)
        table[ct.c_uint32(0)] = leaf

    def config(self) -> RelayConfig | None:
        leaf = self.bpf[b"config"][ct.c_uint32(0)]
        if not leaf.enabled:
            return None
        ip6 = addr_from_words(list(leaf.public_ip6), 6)
        return RelayConfig(
            relay_port=from_be16(leaf.relay_port),
            public_mac=mac_str(leaf.public_mac),
            gateway_mac=mac_str(leaf.gateway_mac),
            public_ip4=str(addr_from_words([leaf.public_ip4], 4)) if leaf.public_ip4 else None,
            public_ip6=str(ip6) if int(ip6) else None,
            policy={v: k for k, v in POLICIES.items()}[leaf.policy],
            max_session_flows=leaf.max_session_flows,
            hint_key=bytes(leaf.hint_key) if leaf.hint_key_set else None,
        )

    def _addr_key(self, table_name: str, ip: str, port: int):
        addr = ipaddress.ip_address(ip)
        key = self.bpf[table_name.encode()].Key()
        for i, word in enumerate(be32_words(addr)):
            key.addr[i] = word
        key.port = be16(port)
        key.family = addr.version
        return key

    def set_backend(self, b: Backend) -> None:
        table = self.bpf[b"backends"]
        leaf = table.Leaf()
        old = self.backend(b.backend_id)
        if b.ip4:
            leaf.addr4 = be32_words(ipaddress.IPv4Address(b.ip4))[0]
            leaf.flags |= 1
        if b.ip6:
            for i, word in enumerate(be32_words(ipaddress.IPv6Address(b.ip6))):
                leaf.addr6[i] = word
            leaf.flags |= 2
        leaf.port = be16(b.port)
        ct.memmove(leaf.dmac, mac_bytes(b.dmac), 6)
        ct.memmove(leaf.smac, mac_bytes(b.smac), 6)
        leaf.tx_slot = b.tx_slot
        table[ct.c_uint32(b.backend_id)] = leaf
        addrs = self.bpf[b"backend_addrs"]
        if old:
            for ip in (old.ip4, old.ip6):
                if ip:
                    self._delete(addrs, self._addr_key("backend_addrs", ip, old.port))
        for ip in (b.ip4, b.ip6):
            if ip:
                addrs[self._addr_key("backend_addrs", ip, b.port)] = ct.c_uint32(b.backend_id)

    @staticmethod
    def _delete(table, key) -> bool:
        try:
            del table[key]
            return True
        except KeyError:
            return False

    def _backend_from_leaf(self, backend_id: int, leaf) -> Backend:
        return Backend(
            backend_id=backend_id,
            port=from_be16(leaf.port),
            dmac=mac_str(leaf.dmac),
            smac=mac_str(leaf.smac),
            ip4=str(addr_from_words([leaf.addr4], 4)) if leaf.flags & 1 else None,
            ip6=str(addr_from_words(list(leaf.addr6), 6)) if leaf.flags & 2 else None,
            tx_slot=leaf.tx_slot,
        )

    def backend(self, backend_id: int) -> Backend | None:
        try:
            leaf = self.bpf[b"backends"][ct.c_uint32(backend_id)]
        except KeyError:
            return None
        return self._backend_from_leaf(backend_id, leaf)

    def backends(self) -> list[Backend]:
        return sorted(
            (self._backend_from_leaf(k.value, v) for k, v in self.bpf[b"backends"].items()),
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
        doomed = [flows.Key.from_buffer_copy(k) for k, v in self._walk(flows) if v.backend_id == backend_id]
        for key in doomed:
            self._delete(flows, key)
        if doomed:
            self.recount_session_flows()
        addrs = self.bpf[b"backend_addrs"]
        for ip in (old.ip4, old.ip6):
            if ip:
                self._delete(addrs, self._addr_key("backend_addrs", ip, old.port))
        return self._delete(self.bpf[b"backends"], ct.c_uint32(backend_id))

    def _ufrag_key(self, ufrag: str):
        key = self.bpf[b"sessions"].Key()
        raw = _validate_ufrag(ufrag)
        key.ufrag = raw
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
            Session(bytes(k.ufrag).rstrip(b"\0").decode("ascii", "replace"), v.backend_id, v.created_ns, v.flows)
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
        doomed = [table.Key.from_buffer_copy(k) for k, leaf in self._walk(table)
                  if bytes(leaf.ufrag.ufrag) in raws]
        for k in doomed:
            self._delete(table, k)
        return removed

    def _walk(self, table, chunk: int = WALK_CHUNK):
        """Every (key, value) of a hash map, read ``chunk`` at a time with BPF_MAP_LOOKUP_BATCH.

        Two syscalls per entry (bcc's ``items()``) made the agent's walks take seconds at
        a million flows; a batch read takes one per ``chunk``.  The pairs yielded are
        views into buffers reused for the next chunk: copy what you keep
        (``Key.from_buffer_copy``).  Falls back to ``items()`` where the kernel has no
        batch operations.
        """
        from bcc import libbcc

        keys, values = (table.Key * chunk)(), (table.Leaf * chunk)()
        token, count = ct.c_uint32(0), ct.c_uint32(0)
        first = True
        while True:
            count.value = chunk
            rc = libbcc.lib.bpf_lookup_batch(table.map_fd, None if first else ct.byref(token), ct.byref(token),
                                             ct.byref(keys), ct.byref(values), ct.byref(count))
            err = ct.get_errno() if rc else 0
            if rc and err not in (errno.ENOENT,):
                if first and err in (errno.EINVAL, _ENOTSUPP):
                    yield from table.items()
                    return
                raise DatapathError(f"reading map {table.name!r} failed: {os.strerror(err)}")
            for i in range(count.value):
                yield keys[i], values[i]
            if rc or count.value == 0:  # ENOENT: that was the last chunk
                return
            first = False

    def _flow_from(self, key, leaf) -> Flow:
        return Flow(
            client_ip=str(addr_from_words(list(key.addr), key.family)),
            client_port=from_be16(key.port),
            backend_id=leaf.backend_id,
            ufrag=bytes(leaf.ufrag.ufrag).rstrip(b"\0").decode("ascii", "replace"),
            client_mac=mac_str(leaf.client_mac),
            created_ns=leaf.created_ns,
            last_seen_ns=leaf.last_seen_ns,
            packets=leaf.packets,
            bytes=leaf.bytes,
            rx_packets=leaf.rx_packets,
            rx_bytes=leaf.rx_bytes,
        )

    def flows(self, limit: int | None = None) -> list[Flow]:
        out = []
        for key, leaf in self._walk(self.bpf[b"flows"]):
            out.append(self._flow_from(key, leaf))
            if limit is not None and len(out) >= limit:
                break
        return out

    def flow(self, client: tuple[str, int]) -> Flow | None:
        key = self._addr_key("flows", *client)
        try:
            return self._flow_from(key, self.bpf[b"flows"][key])
        except KeyError:
            return None

    def del_flow(self, client: tuple[str, int]) -> bool:
        removed = self._delete(self.bpf[b"flows"], self._addr_key("flows", *client))
        if removed:
            self.recount_session_flows()
        return removed

    def age_flows(self, idle_s: float) -> int:
        """Remove flows idle for longer than idle_s; returns how many went.

        One batched pass: it finds the idle flows and counts each session's live ones,
        so the sessions' allowances are recounted without reading the table again.
        """
        cutoff = time.monotonic_ns() - int(idle_s * 1e9)
        table = self.bpf[b"flows"]
        stale = []
        live: dict[bytes, int] = {}
        for key, leaf in self._walk(table):
            if leaf.last_seen_ns < cutoff:
                stale.append(table.Key.from_buffer_copy(key))
            else:
                ufrag = bytes(leaf.ufrag.ufrag)
                live[ufrag] = live.get(ufrag, 0) + 1
        removed = sum(1 for key in stale if self._delete(table, key))
        if removed:
            self._set_session_flows(live)
        return removed

    def recount_session_flows(self) -> None:
        """Give each session back the allowance of the flows that went.

        XDP only counts up (it cannot see deletions); the flow map is the truth, so
        the agent recounts from it after removing flows.  A packet that opens a flow
        during the recount is seen at the next one.
        """
        live: dict[bytes, int] = {}
        for _, leaf in self._walk(self.bpf[b"flows"]):
            key = bytes(leaf.ufrag.ufrag)
            live[key] = live.get(key, 0) + 1
        self._set_session_flows(live)

    def _set_session_flows(self, live: dict[bytes, int]) -> None:
        """Write each session's live flow count (``live``: raw ufrag key -> flows) where it differs."""
        from bcc import libbcc

        table = self.bpf[b"sessions"]
        for key, leaf in table.items():
            count = live.get(bytes(key.ufrag), 0)
            if leaf.flows != count:
                leaf.flows = count
                # BPF_EXIST: a session deleted meanwhile (this may run in the table-walker thread
                # while the loop serves a DELETE) must stay deleted, not come back with a count
                libbcc.lib.bpf_update_elem(table.map_fd, ct.byref(key), ct.byref(leaf), _BPF_EXIST)

    def map_fill(self) -> dict[str, tuple[int, int]]:
        """Entries and capacity of each hash map."""
        out = {}
        for name in ("backends", "backend_addrs", "sessions", "flows"):
            table = self.bpf[name.encode()]
            out[name] = (sum(1 for _ in self._walk(table)), table.max_entries)
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


class _MapInfo(ct.Structure):  # the head of linux/bpf.h struct bpf_map_info
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32),
                ("name", ct.c_char * 16)]


class _InfoAttr(ct.Structure):
    _fields_ = [("bpf_fd", ct.c_uint32), ("info_len", ct.c_uint32), ("info", ct.c_uint64)]


_BPF_OBJ_GET_INFO_BY_FD = 15
_NR_BPF = {"x86_64": 321, "aarch64": 280}[os.uname().machine]


def map_info(fd: int) -> _MapInfo:
    """bpf(BPF_OBJ_GET_INFO_BY_FD) on a map: type, key/value size, max_entries."""
    info = _MapInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ct.sizeof(info), info=ct.addressof(info))
    libc = ct.CDLL(None, use_errno=True)
    if libc.syscall(_NR_BPF, _BPF_OBJ_GET_INFO_BY_FD, ct.byref(attr), ct.sizeof(attr)) != 0:
        err = ct.get_errno()
        raise DatapathError(f"cannot read map info: {os.strerror(err or errno.EINVAL)}")
    return info


def unpin(instance: str, pin_root: str = PIN_ROOT) -> bool:
    """Remove an instance's pinned maps; False if there was nothing."""
    path = Path(pin_root) / instance
    if not path.exists():
        return False
    shutil.rmtree(path)
    return True


def pinned_instances(pin_root: str = PIN_ROOT) -> list[str]:
    root = Path(pin_root)
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []
