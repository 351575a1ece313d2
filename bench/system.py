"""What the benchmarks read off the host: the machine, CPU time, and the XDP program's own run time.

Every figure in BENCHMARKS.md is only meaningful next to the machine it was
measured on, and a packet rate means little without the CPU it cost, so these
readings are taken around every measurement.  The XDP cost per packet comes
from the kernel's BPF run-time statistics (``BPF_ENABLE_STATS``): the kernel
times every run of every program while the returned fd is open, so nothing is
switched on host-wide for longer than the benchmark holds it.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import datetime
import json
import os
import platform
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_NR_BPF = {"x86_64": 321, "aarch64": 280}[os.uname().machine]
_BPF_PROG_GET_FD_BY_ID = 13
_BPF_OBJ_GET_INFO_BY_FD = 15
_BPF_ENABLE_STATS = 32
_BPF_STATS_RUN_TIME = 0
_libc = ct.CDLL(None, use_errno=True)
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchSystemError(OSError):
    """A reading the benchmark needs could not be taken (one-line reason)."""


def _bpf(cmd: int, attr: ct.Structure) -> int:
    rc = _libc.syscall(_NR_BPF, cmd, ct.byref(attr), ct.sizeof(attr))
    if rc < 0:
        err = ct.get_errno()
        raise BenchSystemError(err, f"bpf({cmd}) failed: {os.strerror(err)}")
    return rc


class _StatsAttr(ct.Structure):
    _fields_ = [("type", ct.c_uint32)]


class _GetFdAttr(ct.Structure):
    _fields_ = [("prog_id", ct.c_uint32), ("next_id", ct.c_uint32), ("open_flags", ct.c_uint32)]


class _InfoAttr(ct.Structure):
    _fields_ = [("bpf_fd", ct.c_uint32), ("info_len", ct.c_uint32), ("info", ct.c_uint64)]


class _ProgInfo(ct.Structure):
    """The head of linux/bpf.h ``struct bpf_prog_info`` up to ``run_cnt`` (the kernel fills what we size)."""

    _fields_ = [
        ("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
        ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
        ("jited_prog_insns", ct.c_uint64), ("xlated_prog_insns", ct.c_uint64),
        ("load_time", ct.c_uint64), ("created_by_uid", ct.c_uint32), ("nr_map_ids", ct.c_uint32),
        ("map_ids", ct.c_uint64), ("name", ct.c_char * 16), ("ifindex", ct.c_uint32),
        ("gpl_compatible", ct.c_uint32), ("netns_dev", ct.c_uint64), ("netns_ino", ct.c_uint64),
        ("nr_jited_ksyms", ct.c_uint32), ("nr_jited_func_lens", ct.c_uint32),
        ("jited_ksyms", ct.c_uint64), ("jited_func_lens", ct.c_uint64),
        ("btf_id", ct.c_uint32), ("func_info_rec_size", ct.c_uint32), ("func_info", ct.c_uint64),
        ("nr_func_info", ct.c_uint32), ("nr_line_info", ct.c_uint32), ("line_info", ct.c_uint64),
        ("jited_line_info", ct.c_uint64), ("nr_jited_line_info", ct.c_uint32),
        ("line_info_rec_size", ct.c_uint32), ("jited_line_info_rec_size", ct.c_uint32),
        ("nr_prog_tags", ct.c_uint32), ("prog_tags", ct.c_uint64),
        ("run_time_ns", ct.c_uint64), ("run_cnt", ct.c_uint64),
    ]


@contextlib.contextmanager
def bpf_run_time_stats() -> Iterator[None]:
    """Have the kernel time every BPF program run while the block runs (BPF_ENABLE_STATS)."""
    fd = _bpf(_BPF_ENABLE_STATS, _StatsAttr(type=_BPF_STATS_RUN_TIME))
    try:
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ProgRunStats:
    run_time_ns: int
    run_cnt: int

    def __sub__(self, other: ProgRunStats) -> ProgRunStats:
        return ProgRunStats(self.run_time_ns - other.run_time_ns, self.run_cnt - other.run_cnt)

    @property
    def ns_per_run(self) -> float | None:
        return self.run_time_ns / self.run_cnt if self.run_cnt else None


def prog_run_stats(prog_id: int) -> ProgRunStats:
    """Cumulative run time and run count of the loaded BPF program ``prog_id``."""
    fd = _bpf(_BPF_PROG_GET_FD_BY_ID, _GetFdAttr(prog_id=prog_id))
    try:
        info = _ProgInfo()
        _bpf(_BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ct.sizeof(info), info=ct.addressof(info)))
        return ProgRunStats(info.run_time_ns, info.run_cnt)
    finally:
        os.close(fd)


def xdp_prog_id(nsenter_prefix: list[str], ifname: str) -> int:
    """The id of the XDP program attached to ``ifname`` (read with ``ip -j -d link`` in its namespace)."""
    out = subprocess.run([*nsenter_prefix, "ip", "-j", "-d", "link", "show", "dev", ifname],
                         capture_output=True, text=True, check=True, timeout=10).stdout
    link = json.loads(out)[0]
    try:
        return int(link["xdp"]["prog"]["id"])
    except (KeyError, TypeError):
        raise BenchSystemError(0, f"no XDP program attached to {ifname}") from None


def process_cpu_ticks(pid: int) -> int | None:
    """utime + stime of a process (all its threads) in clock ticks; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process so far (all its threads)."""
    ticks = process_cpu_ticks(pid)
    if ticks is None:
        raise BenchSystemError(0, f"process {pid} is gone")
    return ticks / CLK_TCK


def softirq_cpu_s() -> float:
    """Host-wide softirq CPU seconds so far: where XDP on veth, and the kernel's forwarding, run."""
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()
    return int(cpu[7]) / CLK_TCK


def machine() -> dict:
    """The machine every figure was measured on."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "nic": "veth pairs between network namespaces (the lab; no physical NIC)",
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
    }


def _kthreads(prefix: str) -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().startswith(prefix):
                    pids.add(int(entry.name))
            except OSError:
                continue
    return pids


def _write_sysfs(nsenter_prefix: list[str], path: str, value: str) -> None:
    # /sys/class/net shows the namespace that mounted sysfs: mount a private one inside the netns
    script = f"mount -t sysfs sysfs /sys && echo {value} > {path}"
    subprocess.run([*nsenter_prefix, "unshare", "-m", "sh", "-c", script], check=True, capture_output=True,
                   timeout=10)


@contextlib.contextmanager
def threaded_napi(nsenter_prefix: list[str], ifname: str, cpu: int) -> Iterator[int]:
    """Run ``ifname``'s NAPI poll (where veth runs XDP) in its own kthread, pinned to ``cpu``; yields its PID.

    On veth, XDP otherwise runs in the softirq of whichever CPU transmitted into
    the pair, i.e. on the load generator's core.  A pinned NAPI thread gives the
    relay a core of its own, as the userspace relay gets one, and its CPU time
    is the XDP path's whole cost per packet (program, redirect, veth transmit).
    """
    before = _kthreads(f"napi/{ifname}-")
    _write_sysfs(nsenter_prefix, f"/sys/class/net/{ifname}/threaded", "1")
    try:
        new = _kthreads(f"napi/{ifname}-") - before
        if len(new) != 1:
            raise BenchSystemError(0, f"expected one new NAPI thread for {ifname}, found {sorted(new)}")
        pid = new.pop()
        os.sched_setaffinity(pid, {cpu})
        yield pid
    finally:
        _write_sysfs(nsenter_prefix, f"/sys/class/net/{ifname}/threaded", "0")


@contextlib.contextmanager
def pinned(pid: int, cpu: int) -> Iterator[None]:
    """Pin every thread of a process to ``cpu`` for the block, then give it its CPUs back."""
    tids = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    saved = {tid: os.sched_getaffinity(tid) for tid in tids}
    for tid in tids:
        os.sched_setaffinity(tid, {cpu})
    try:
        yield
    finally:
        for tid, cpus in saved.items():
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(tid, cpus)
