"""What the WebRTC session benchmarks share: their processes, the probe, and CPU and socket counters.

Both session figures (``session_setup.measure_setup``: setup time through the relay vs direct;
``capacity.measure_capacity``: echo sessions per transceiver core) run in a lab the caller started
(``stack.start_lab(transceivers=1, handler="echo")``, or ``relays=2``: the edge agents attached with
XDP, policy strict, an echo transceiver per host advertising every relay) with the project's own
client, ``splitrelay.client.probe`` (a plain aiortc WHIP client), in the lab's client namespace.
This module starts and stops their transceivers and probes (by PID, bounded in time) and reads
the counters they are judged by.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from splitrelay.lab import stack
from splitrelay.lab.topology import Lab, Transceiver
from splitrelay.lab.netns import in_netns
from splitrelay.errors import SplitrelayError

CONNECT_TIMEOUT_S = 15.0        # the probe's per-session connect timeout
CLK_TCK = os.sysconf("SC_CLK_TCK")

class SessionBenchError(SplitrelayError):
    """A session benchmark could not run (one-line reason)."""


# -- small statistics ----------------------------------------------------------------------------

def _quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary(values: list[float]) -> dict[str, float | int | None]:
    """median, p90, min, max, n of ``values`` (ms, rounded to 0.01); None figures when empty."""
    if not values:
        return {"median": None, "p90": None, "min": None, "max": None, "n": 0}
    ordered = sorted(values)
    return {"median": round(_quantile(ordered, 0.5), 2), "p90": round(_quantile(ordered, 0.9), 2),
            "min": round(ordered[0], 2), "max": round(ordered[-1], 2), "n": len(ordered)}


# -- processes -------------------------------------------------------------------------------------

def whip_url(host: str, port: int) -> str:
    return f"http://{host}:{port}/whip"


def log_tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text().strip().splitlines()[-lines:]) or "no output"
    except OSError:
        return "no output"


def start_transceiver(lab: Lab, t: Transceiver, tag: str, backend_id: int, backend_port: int,
                       whip_port: int, relay: bool, cpu: int | None = None,
                       handler: str = "echo", extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, Path]:
    """A ``splitrelay transceiver serve`` (``handler``, echo by default) in ``t``'s namespace, as the lab
    stack starts the lab's (same flags, the lab's credentials; its admin listener on loopback), in relay
    mode (registered with the lab's agent) or direct mode; pinned to ``cpu``; ``extra``: more serve flags."""
    argv = [sys.executable, "-m", "splitrelay.cli.main", "-v", "transceiver", "serve",
            "--processes", "1", "--backend-id", str(backend_id), "--bind", f"{t.ip4}:{backend_port}",
            "--whip-listen", f"{t.signal_ip4}:{whip_port}", "--admin-listen", "127.0.0.1:0",
            *stack.auth_args(lab), "--handler", handler, *extra]
    if relay:
        argv += ["--relay", f"{lab.relay_public.ip4}:{lab.relay_port}",
                 "--relay-control", stack.control_url(lab), "--token", stack.control_token(lab, backend_id)]
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    path = stack.log_file(lab, f"bench-{tag}")
    with path.open("w") as log:
        proc = lab.popen(t.netns, argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        stack.wait_ready(proc, path, "transceiver ready", f"{tag} transceiver")
    except BaseException:
        stop(lab, proc)
        raise
    return proc, path


def stop_transceiver(lab: Lab, proc: subprocess.Popen, log: Path, backend_id: int) -> None:
    """Undo ``start_transceiver`` in relay mode: stop it, remove its log and its backend at the agent."""
    stop(lab, proc)
    log.unlink(missing_ok=True)
    try:
        stack.control(lab, lambda c: c.delete_backend(backend_id))
    except Exception:  # noqa: BLE001 - the agent may be gone; nothing else to undo
        pass


def stop(lab: Lab, proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group we started (by its PID), SIGKILL after ``grace``; forget the PID."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=5)
    if proc.pid in lab.pids:
        lab.pids.remove(proc.pid)
        lab.pid_starts.pop(str(proc.pid), None)
        lab.save()


class Probe:
    """One run of the probe in the client namespace: output in files (no pipe to fill), bounded."""

    def __init__(self, lab: Lab, args: list[str], cpus: set[int] | None = None) -> None:
        self.lab = lab
        self.out = tempfile.TemporaryFile(mode="w+")
        self.err = tempfile.TemporaryFile(mode="w+")
        argv = [sys.executable, "-m", "splitrelay.client.probe", *args, "--token", stack.whip_token(lab)]
        if cpus:
            argv = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *argv]
        self.proc = lab.popen(lab.client.netns, argv, stdout=self.out, stderr=self.err, stdin=subprocess.DEVNULL)

    def wait(self, timeout: float, tick: Callable[[], None] | None = None, interval: float = 0.2) -> list[dict]:
        """Wait for the probe (calling ``tick`` every ``interval`` while it runs); its reports."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                if tick:
                    tick()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SessionBenchError(f"the probe did not finish within {timeout:.0f} s")
                try:
                    self.proc.wait(timeout=min(interval, left) if tick else left)
                    break
                except subprocess.TimeoutExpired:
                    continue
            self.out.seek(0)
            self.err.seek(0)
            text, err = self.out.read(), self.err.read()
            try:
                reports = json.loads(text)
            except json.JSONDecodeError:
                last = err.strip().splitlines()[-1:] or [text[:200]]
                raise SessionBenchError(f"probe failed (exit {self.proc.returncode}): {last[0]}") from None
            return reports
        finally:
            self.close()

    def close(self) -> None:
        stop(self.lab, self.proc, grace=5.0)
        self.out.close()
        self.err.close()


# -- the relay namespace's kernel --------------------------------------------------------------------

def read_sysctl(netns: str, key: str) -> str:
    return in_netns(netns, lambda: Path("/proc/sys", key).read_text().strip())


def _snmp(netns: str, proto: str, field: str) -> int:
    """One /proc/net/snmp counter of ``netns`` (read through /proc/thread-self: /proc/self/net shows
    the main thread's namespace)."""
    def read() -> int:
        lines = [line.split() for line in Path("/proc/thread-self/net/snmp").read_text().splitlines()
                 if line.startswith(f"{proto}:")]
        return int(dict(zip(lines[0], lines[1], strict=True))[field])
    return in_netns(netns, read)


def forwarded_datagrams(netns: str) -> int:
    return _snmp(netns, "Ip", "ForwDatagrams")


def rcvbuf_errors(netns: str) -> int:
    """UDP datagrams dropped because a socket's receive buffer was full (its reader fell behind)."""
    return _snmp(netns, "Udp", "RcvbufErrors")


CpuTimes = tuple[float, dict[str, int]]


def cpu_times() -> CpuTimes:
    """(time.monotonic(), per CPU (``cpu0``, ...) idle + iowait clock ticks since boot from /proc/stat).

    Busy time is taken as wall time minus idle time: the idle time is measured exactly on a tickless
    kernel, whereas user/system time per CPU is sampled by the tick and misses short bursts.
    """
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            out[name] = int(values[3]) + int(values[4])
    return time.monotonic(), out


def busy_pct(a: CpuTimes, b: CpuTimes) -> dict[str, float]:
    """Each CPU's non-idle share between two ``cpu_times()`` readings (all work on the machine)."""
    wall = b[0] - a[0]
    if wall <= 0:
        return {}
    return {cpu: round(min(100.0, max(0.0, 100.0 * (1.0 - (b[1][cpu] - a[1][cpu]) / CLK_TCK / wall))), 1)
            for cpu in sorted(a[1]) if cpu in b[1]}


