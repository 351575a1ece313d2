"""Bounded waiting on a condition the tests can only observe by reading (an API, a map)."""

from __future__ import annotations

import subprocess
import time
from typing import TypeVar
from collections.abc import Callable

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float, what: str, proc: subprocess.Popen | None = None,
             interval: float = 0.1, tolerate: tuple[type[BaseException], ...] = ()) -> T:
    """Return condition()'s first truthy value; fail after ``timeout`` seconds, with the last words
    of ``proc`` if that process (a probe) already exited."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = condition()
        except tolerate as exc:  # e.g. a server still starting
            last = exc
        else:
            if value:
                return value
            last = value
        time.sleep(interval)
    detail = f" (last: {last!r})"
    if proc is not None and proc.poll() is not None:
        out, err = proc.communicate()
        detail = f": probe exited {proc.returncode}: {(err or '').strip()[-500:] or (out or '')[-500:]}"
    raise AssertionError(f"timed out waiting for {what}{detail}")
