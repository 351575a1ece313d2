"""Compiling, loading, pinning and attaching the XDP programs of ``bpf/relay.c`` (through bcc).

What can go wrong here is told in one line: a compile error, a verifier
rejection (the full log saved to a file), a pinned map an older build left
with another layout, an interface that is missing or is the host's own link.
The maps' contents are ``maps.py``'s business.
"""

from __future__ import annotations

import ctypes as ct
import logging
import os
import shutil
import tempfile
from pathlib import Path

from splitrelay import defaults
from splitrelay.bpf import SOURCE_DIR
from splitrelay.bpf.syscall import map_info
from splitrelay.edge.records import DataPlaneError

log = logging.getLogger(__name__)

PIN_ROOT = defaults.PIN_ROOT
FORBIDDEN_IFACES = {"eth0", "lo"}
PROGRAMS = ("xdp_public", "xdp_internal")
# every bcc table of relay.c, all pinned under pin_dir (their types come from the source, via bcc)
MAP_NAMES = ("config", "backends", "backend_addrs", "sessions", "flows", "stats", "tx_ports", "port_slots",
             "port_pool", "pending", "local_addrs")
VERIFIER_LOG_SIZE = 1 << 24
ATTACH_MODES = ("auto", "native", "generic")

# linux/if_link.h
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2


class VerifierError(DataPlaneError):
    """The kernel verifier rejected a program; the full log is saved at ``log_path``."""

    def __init__(self, program: str, log_path: str, reason: str = "") -> None:
        detail = f" ({reason})" if reason else ""
        super().__init__(f"the BPF verifier rejected {program}{detail}; log saved to {log_path}")
        self.program = program
        self.log_path = log_path


class PinnedMapMismatch(DataPlaneError):
    """A map pinned by an older build has another layout than the source being loaded."""


def compile_relay(pin_dir: Path, max_flows: int | None = None, xlate_addrs: int = 1):
    """(bcc BPF module, {program name: loaded function}) for relay.c with its maps pinned in ``pin_dir``;
    the translation pool and reverse array sized for ``xlate_addrs`` internal address sets."""
    try:
        from bcc import BPF
    except ImportError as exc:
        raise DataPlaneError("bcc is not importable: run `make setup`") from exc
    if not Path("/sys/fs/bpf").is_mount():
        raise DataPlaneError("bpffs is not mounted on /sys/fs/bpf: run `make setup`")
    pin_dir.mkdir(parents=True, exist_ok=True)
    cflags = [
        f"-I{SOURCE_DIR}",
        f'-DSR_PIN_DIR="{pin_dir}"',
        "-Wno-compare-distinct-pointer-types",
        "-Wno-pass-failed",  # a `#pragma unroll` clang leaves rolled is a bounded loop the verifier takes
        f"-DSR_XLATE_ADDRS={int(xlate_addrs)}",
    ] + ([f"-DSR_MAX_FLOWS={int(max_flows)}"] if max_flows else [])
    try:
        bpf = BPF(src_file=str(SOURCE_DIR / "relay.c").encode(), cflags=cflags)
    except Exception as exc:  # bcc raises bare Exception for compile errors
        raise DataPlaneError(f"cannot compile {SOURCE_DIR / 'relay.c'}: {exc}") from exc
    check_pinned_layout(bpf, pin_dir)
    return bpf, {name: load_program(bpf, name) for name in PROGRAMS}


def check_pinned_layout(bpf, pin_dir: Path) -> None:
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
        key_size = ct.sizeof(table.Key) if hasattr(table, "Key") else 0   # a queue has no key
        want = (map_type, key_size, ct.sizeof(leaf))
        have = (info.type, info.key_size, info.value_size)
        if have != want:
            raise PinnedMapMismatch(
                f"pinned map {pin_dir / name} has (type, key, value) = {have}, this build "
                f"needs {want}: destroy instance {pin_dir.name!r} or use another instance name")
        if info.max_entries != table.max_entries:
            log.warning("pinned map %s holds %d entries, this build declares %d; keeping the pinned one",
                        pin_dir / name, info.max_entries, table.max_entries)


def load_program(bpf, name: str):
    """Load one XDP function; on a verifier rejection save its full log and raise VerifierError."""
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


def ifindex(ifname: str) -> int:
    """The index of ``ifname`` in this network namespace, or DataPlaneError."""
    try:
        found = ct.CDLL(None).if_nametoindex(ifname.encode())
    except OSError:
        found = 0
    if not found:
        raise DataPlaneError(f"no interface named {ifname!r} in this network namespace")
    return found


def check_mode(mode: str) -> None:
    """One-line DataPlaneError unless ``mode`` is an XDP attach mode."""
    if mode not in ATTACH_MODES:
        raise DataPlaneError(f"mode must be auto, native or generic, got {mode!r}")


def refuse_host_links(*ifnames: str | None) -> None:
    for ifname in ifnames:
        if ifname in FORBIDDEN_IFACES:
            raise DataPlaneError(f"refusing to attach XDP to {ifname}: it is this host's own link")


def attach_one(fn, ifname: str, program: str, mode: str) -> str:
    """Attach a loaded program to ``ifname`` in ``mode`` (auto: native, else generic); the mode used."""
    from bcc import BPF

    if mode in ("auto", "native"):
        try:
            BPF.attach_xdp(ifname.encode(), fn, XDP_FLAGS_DRV_MODE)
            return "native"
        except Exception as exc:
            if mode == "native":
                raise DataPlaneError(f"native XDP attach to {ifname} failed: {exc}") from exc
            log.warning("native XDP unavailable on %s (%s); using generic XDP", ifname, exc)
    try:
        BPF.attach_xdp(ifname.encode(), fn, XDP_FLAGS_SKB_MODE)
    except Exception as exc:
        raise DataPlaneError(f"generic XDP attach to {ifname} failed: {exc}") from exc
    return "generic"


def detach_all(ifnames: list[str]) -> None:
    """Remove any XDP program from the interfaces (never the host's own links); absent ones are fine."""
    from bcc import BPF

    for ifname in ifnames:
        if ifname in FORBIDDEN_IFACES:
            continue
        for flags in (XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE):
            try:
                BPF.remove_xdp(ifname.encode(), flags)
            except Exception:  # noqa: BLE001 - not attached in that mode
                pass


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
