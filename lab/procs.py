"""Processes a lab starts: started in their own group, stopped by PID checked against start time.

A PID can be reused once its process is reaped, so every stop compares the
process's start time with the one recorded when it was started; a lab stopped
from another process (``splitrelay lab down``) finds them in the state file.
"""

from __future__ import annotations

import os
import select
import subprocess
from pathlib import Path
from typing import Any

from splitrelay.lab.netns import LabError

_POPENS: dict[int, subprocess.Popen] = {}  # processes this Python process started, by PID


def track(proc: subprocess.Popen) -> None:
    """Remember ``proc`` so that reap() polls it instead of racing its Popen for the exit status."""
    _POPENS[proc.pid] = proc


def run(argv: list[str], check: bool = True, timeout: float = 60.0, **kwargs: Any) -> subprocess.CompletedProcess:
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    try:
        proc = subprocess.run(argv, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(argv)}: no answer after {timeout} s") from None
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]}: {exc.strerror}") from None
    if check and proc.returncode != 0:
        err = proc.stderr.strip() if isinstance(proc.stderr, str) else ""
        raise LabError(f"{' '.join(argv)}: {err or f'exit {proc.returncode}'}")
    return proc


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (PID-reuse guard), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def reap(pid: int) -> bool:
    """Reap ``pid`` if it is our exited child; True when it is gone (or not ours and exited)."""
    popen = _POPENS.get(pid)
    if popen is not None:
        if popen.poll() is None:
            return False
        _POPENS.pop(pid, None)
        return True
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    except ChildProcessError:
        return start_time(pid) is None or is_zombie(pid)


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait (on a pidfd, no polling) until ``pid`` exits; reap it when it is our child."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        reap(pid)
        return True
    try:
        select.select([fd], [], [], max(timeout, 0.0))
    finally:
        os.close(fd)
    return reap(pid)


def signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    except PermissionError:
        pass
