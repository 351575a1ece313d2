"""Network namespaces from Python: run a callable, a socket or a command inside one.

The lab's hosts are namespaces; tests, the bench and the lab's own builder all
reach into them through these few primitives.  A thread that enters a namespace
is always a fresh worker thread, so an asyncio loop never follows it in.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from splitrelay.errors import SplitrelayError

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
AF_INET, AF_INET6 = socket.AF_INET, socket.AF_INET6

T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)


class LabError(SplitrelayError):
    """The lab could not be built, found or torn down (one-line reason)."""


def netns_path(netns: str) -> str:
    if not netns or "/" in netns:
        raise LabError(f"bad namespace name {netns!r}")
    return str(NETNS_DIR / netns)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise LabError(f"setns({what}): {os.strerror(ctypes.get_errno())}")


@contextmanager
def netns_context(netns: str) -> Iterator[None]:
    """Switch the *calling thread* into ``netns`` for the body, then back.

    Sockets and netlink handles made in the body stay in ``netns``.  Only for
    threads you own: an asyncio loop or a thread pool running on this thread
    would follow it into the namespace.  ``in_netns`` is the safer default.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise LabError(f"no network namespace {netns!r}") from None
        try:
            _setns(fd, netns)
        finally:
            os.close(fd)
        try:
            yield
        finally:
            _setns(home, "home")
    finally:
        os.close(home)


def in_netns(netns: str, fn: Callable[[], T], timeout: float | None = None) -> T:
    """Run ``fn()`` in a fresh thread that has entered ``netns``; return its value or raise its error.

    The caller's thread never changes namespace.  Sockets ``fn`` creates stay in
    ``netns`` and may be used from any thread afterwards.  With ``timeout``, a
    call still running after that many seconds raises LabError (the daemon
    thread is abandoned).
    """
    def entered() -> T:
        with netns_context(netns):
            return fn()

    return in_thread(entered, timeout, what=f"call in namespace {netns}")


def in_thread(fn: Callable[[], T], timeout: float | None = None, what: str = "call") -> T:
    """``fn()`` in a fresh thread of this namespace (for pyroute2 calls from asyncio code)."""
    box: dict[str, Any] = {}

    def worker() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=worker, name=f"lab {what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise LabError(f"{what} still running after {timeout} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


async def in_netns_async(netns: str, fn: Callable[[], T]) -> T:
    """``in_netns`` without blocking the running event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, in_netns, netns, fn)


def netns_socket(netns: str, family: int = AF_INET, type: int = socket.SOCK_DGRAM,  # noqa: A002
                 proto: int = 0) -> socket.socket:
    """A socket that lives in ``netns`` (usable from any thread, e.g. with asyncio's sock_* calls)."""
    return in_netns(netns, lambda: socket.socket(family, type, proto))


def nsenter_argv(netns: str, argv: list[str]) -> list[str]:
    """``argv`` run in ``netns``: only the network namespace changes, so /sys/fs/bpf stays the host's
    (``ip netns exec`` would mount a private /sys, and pins made there die with the process)."""
    return ["nsenter", f"--net={netns_path(netns)}", "--", *argv]


def list_namespaces() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []
