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
import datetime
import json
import os
import platform
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from splitrelay.bpf import syscall

from splitrelay.errors import SplitrelayError

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchSystemError(SplitrelayError, OSError):
    """A reading the benchmark needs could not be taken (one-line reason)."""


@contextlib.contextmanager
def bpf_run_time_stats() -> Iterator[None]:
    """Have the kernel time every BPF program run while the block runs (BPF_ENABLE_STATS)."""
    fd = _bench_bpf(syscall.enable_run_time_stats)
    try:
        yield
    finally:
        os.close(fd)


def _bench_bpf(call, *args):
    """A bpf(2) reading (bpf/syscall.py), its failure as this module's error."""
    try:
        return call(*args)
    except syscall.BpfError as exc:
        raise BenchSystemError(exc.errno, str(exc)) from None


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
    fd = _bench_bpf(syscall.prog_fd_by_id, prog_id)
    try:
        info = _bench_bpf(syscall.prog_info, fd)
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
