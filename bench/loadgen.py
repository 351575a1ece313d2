"""Drive ``bench/udpgen`` (the C load generator) from Python: build it, start it in a namespace, read its JSON.

Python cannot send, count or time a million datagrams a second, so the benchmark's
traffic comes from a small C program; this module is the only place that knows how
to turn keyword options into its command line, how to run it inside a lab network
namespace, how to await its readiness without sleeping, and how to read its one-line
JSON result.  Every failure is a ``LoadgenError`` carrying the last words udpgen
wrote on stderr, so a broken benchmark says why instead of hanging or returning
garbage.

Typical use::

    with serve("sink", netns="sr1234ab-t1", bind="198.18.1.11:5000", answer_stun=True) as sink:
        sent = run("send", netns="sr1234ab-cli", dst="198.18.0.1:3478", flows=64, duration=2)
    print(sent["pps"], sink.result["packets"])
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitrelay.errors import SplitrelayError

BENCH_DIR = Path(__file__).resolve().parent
NETNS_DIR = Path("/run/netns")
MODES = ("sink", "echo", "send", "ping")
DEFAULT_DURATION = 10.0      # udpgen's own --duration default
DEFAULT_OPEN_TIMEOUT = 3.0   # udpgen's own --open-timeout default
EXIT_GRACE = 5.0             # beyond its own time bounds, how long udpgen may take to print and exit

_IN_CREATE, _IN_CLOSE_WRITE, _IN_MOVED_TO = 0x100, 0x8, 0x80
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC


class LoadgenError(SplitrelayError, RuntimeError):
    """udpgen could not be built, started, or did not finish with a JSON result (one-line reason)."""


def udpgen_path(bench_dir: Path | None = None) -> Path:
    """The udpgen binary, built first when it is missing or older than its source or Makefile.

    Building on demand keeps a fresh clone (or an edited udpgen*.c/h) from silently
    benchmarking a stale binary.  ``bench_dir`` is for tests; it defaults to this package.
    """
    here = Path(bench_dir) if bench_dir is not None else BENCH_DIR
    binary, source, makefile = here / "udpgen", here / "udpgen.c", here / "Makefile"
    sources = [*here.glob("udpgen*.[ch]"), makefile]   # udpgen.c (its command line) and its parts
    inputs = [p.stat().st_mtime for p in sources if p.exists()]
    if binary.exists() and (not inputs or binary.stat().st_mtime >= max(inputs)):
        return binary
    if not source.exists():
        raise LoadgenError(f"no udpgen binary and no source to build it from in {here}")
    missing = [tool for tool in ("make", "gcc") if shutil.which(tool) is None]
    if missing:
        raise LoadgenError(f"cannot build {binary}: {' and '.join(missing)} not installed "
                           "(apt-get install gcc make libc6-dev, or run scripts/setup.sh)")
    try:
        proc = subprocess.run(["make", "-s", "-C", str(here)], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise LoadgenError(f"building {binary}: make did not finish in 120 s") from None
    if proc.returncode != 0 or not binary.exists():
        raise LoadgenError(f"building {binary} failed: {_tail(proc.stderr or proc.stdout)}")
    return binary


def argv(mode: str, **options: Any) -> list[str]:
    """The full command line (binary first) for ``udpgen <mode>`` with ``options`` as flags.

    ``flows=64`` becomes ``--flows 64``, ``answer_stun=True`` becomes ``--answer-stun``,
    underscores become dashes, and None or False leave the flag out, so callers can
    pass optional settings straight through without building lists by hand.
    """
    if mode not in MODES:
        raise LoadgenError(f"unknown udpgen mode {mode!r} (one of {', '.join(MODES)})")
    out = [str(udpgen_path()), mode]
    for name, value in options.items():
        if value is None or value is False:
            continue
        if not name.replace("_", "").isalnum() or not name.islower():
            raise LoadgenError(f"bad option name {name!r}")
        flag = "--" + name.replace("_", "-")
        if value is True:
            out.append(flag)
        elif isinstance(value, (str, int, float, os.PathLike)):
            out += [flag, os.fspath(value) if isinstance(value, os.PathLike) else str(value)]
        else:
            raise LoadgenError(f"option {name}: cannot pass a {type(value).__name__} as a flag value")
    return out


def start(mode: str, netns: str | None = None, cpu: int | None = None, **options: Any) -> subprocess.Popen:
    """Start udpgen (in network namespace ``netns``, else here) with pipes on stdout and stderr.

    ``nsenter --net`` changes only the network namespace (the process keeps the host's
    /sys), and execs udpgen, so the returned Popen's PID is udpgen's own: signals
    (``stop``) reach it directly.  It runs in its own session, so a terminal's Ctrl-C
    reaches the harness, which then stops what it started.
    """
    cmd = argv(mode, cpu=cpu, **options)
    if netns is not None:
        if not netns or "/" in netns:
            raise LoadgenError(f"bad namespace name {netns!r}")
        path = NETNS_DIR / netns
        if not path.exists():
            raise LoadgenError(f"no network namespace {netns!r} ({path} is missing)")
        cmd = ["nsenter", f"--net={path}", "--", *cmd]
    try:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    except FileNotFoundError as exc:
        raise LoadgenError(f"cannot start {cmd[0]}: {exc.strerror}") from None


def wait_ready(proc: subprocess.Popen, ready_file: str | os.PathLike[str], timeout: float = 5.0) -> str:
    """Block until udpgen wrote ``ready_file`` (its sockets are bound) and return the address in it.

    Event-driven (inotify on the file's directory plus a pidfd on the process), so the
    caller neither sleeps nor polls: a sink is usable the moment it is bound, and a
    udpgen that dies first (port in use, bad interface) fails at once with its stderr.
    """
    path = Path(ready_file)
    deadline = time.monotonic() + timeout
    with _DirWatch(path.parent) as watch:
        try:
            pidfd = os.pidfd_open(proc.pid)
        except ProcessLookupError:
            pidfd = None
        try:
            while True:
                # the file is renamed into place whole, so existing means complete
                if path.exists():
                    return path.read_text().strip()
                if proc.poll() is not None:
                    raise LoadgenError(f"{_name(proc)} exited {proc.returncode} before it was ready: "
                                       f"{_tail(_drain(proc.stderr))}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LoadgenError(f"{_name(proc)} not ready after {timeout} s ({path} never appeared)")
                select.select([watch.fd] + ([pidfd] if pidfd is not None else []), [], [], left)
                watch.drain()
        finally:
            if pidfd is not None:
                os.close(pidfd)


def finish(proc: subprocess.Popen, timeout: float | None = None) -> dict[str, Any]:
    """Wait for udpgen to exit and return its JSON result.

    A udpgen still running after ``timeout`` seconds is killed (it is our child, by
    PID) so no traffic loop outlives a failed benchmark; a non-zero exit or output
    that is not one JSON object raises LoadgenError with the stderr tail.
    """
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise LoadgenError(f"{_name(proc)} still running after {timeout} s (killed): {_tail(err)}") from None
    if proc.returncode != 0:
        raise LoadgenError(f"{_name(proc)} exited {proc.returncode}: {_tail(err)}")
    lines = (out or "").strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except ValueError:
        result = None
    if not isinstance(result, dict):
        raise LoadgenError(f"{_name(proc)} printed no JSON object (stdout {_tail(out)!r}; stderr {_tail(err)})")
    return result


def stop(proc: subprocess.Popen, timeout: float = EXIT_GRACE) -> dict[str, Any]:
    """SIGTERM a running udpgen (sink, echo) and return its JSON: it prints its counts on the way out."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    return finish(proc, timeout)


def run(mode: str, netns: str | None = None, timeout: float | None = None, **options: Any) -> dict[str, Any]:
    """Run a one-shot mode (send, ping) to completion and return its JSON result.

    Without ``timeout`` the bound is udpgen's own (``--duration``, plus the STUN
    opening time) plus a grace period, so a wedged run fails instead of hanging.
    """
    if timeout is None:
        duration = float(options.get("duration") or DEFAULT_DURATION)
        timeout = duration + float(options.get("open_timeout") or DEFAULT_OPEN_TIMEOUT) + EXIT_GRACE
    proc = start(mode, netns=netns, **options)
    try:
        return finish(proc, timeout)
    finally:
        _kill(proc)


@dataclass
class Server:
    """A running sink or echo: its process, the address it bound, and its JSON once stopped."""

    proc: subprocess.Popen
    address: str
    result: dict[str, Any] = field(default_factory=dict)


@contextmanager
def serve(mode: str, netns: str | None = None, ready_timeout: float = 5.0, stop_timeout: float = EXIT_GRACE,
          **options: Any) -> Iterator[Server]:
    """Run a sink or echo for the body: started, awaited until bound, stopped (SIGTERM) afterwards.

    The result lands in ``server.result`` after the block.  The process is stopped
    (killed if it will not stop) also when the body fails, so no server outlives its test.
    """
    with tempfile.TemporaryDirectory(prefix="udpgen-") as tmp:
        ready = Path(tmp) / "ready"
        proc = start(mode, netns=netns, ready_file=str(ready), **options)
        try:
            server = Server(proc, wait_ready(proc, ready, ready_timeout))
            yield server
            server.result = stop(proc, stop_timeout)
        finally:
            _kill(proc)


# -- internals -------------------------------------------------------------------------------

def _name(proc: subprocess.Popen) -> str:
    args = [str(a) for a in proc.args] if isinstance(proc.args, (list, tuple)) else str(proc.args).split()
    mode = next((a for a in args if a in MODES), "?")
    return f"udpgen {mode} (pid {proc.pid})"


def _tail(text: str | None, lines: int = 5, chars: int = 800) -> str:
    kept = " | ".join(line for line in (text or "").strip().splitlines()[-lines:] if line.strip())
    return (kept[-chars:] if kept else "no output")


def _drain(stream: Any) -> str:
    try:
        return stream.read() if stream is not None else ""
    except (OSError, ValueError):
        return ""


def _kill(proc: subprocess.Popen) -> None:
    """Kill our child by PID if it still runs, and reap it (no zombies, no stray traffic)."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.communicate(timeout=EXIT_GRACE)
    except (subprocess.TimeoutExpired, ValueError, OSError):
        pass


class _DirWatch:
    """inotify on one directory: a readable fd whenever a file there is created, written or renamed in."""

    _libc: Any = None

    def __init__(self, directory: Path) -> None:
        if _DirWatch._libc is None:
            _DirWatch._libc = ctypes.CDLL(None, use_errno=True)
        libc = _DirWatch._libc
        self.fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self.fd < 0:
            raise LoadgenError(f"inotify_init1: {os.strerror(ctypes.get_errno())}")
        mask = _IN_CREATE | _IN_CLOSE_WRITE | _IN_MOVED_TO
        if libc.inotify_add_watch(self.fd, os.fsencode(directory), mask) < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise LoadgenError(f"cannot watch {directory} for the ready file: {os.strerror(err)}")

    def drain(self) -> None:
        try:
            while os.read(self.fd, 65536):
                pass
        except BlockingIOError:
            pass

    def __enter__(self) -> _DirWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
