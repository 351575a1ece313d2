"""A private, anonymous network namespace for the calling thread (root only).

The XDP unit tests need real ifindexes in the tx_ports devmap (bpf_redirect_map
only answers XDP_REDIRECT for a populated slot), and distinct from the loopback
device that BPF_PROG_TEST_RUN uses as the ingress (else the program answers
XDP_TX).  Creating a veth pair inside an unnamed namespace gives them without
touching any interface of the host; the namespace and its links vanish when
the thread switches back.
"""

from __future__ import annotations

import ctypes as ct
import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
_libc = ct.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ct.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


@contextmanager
def private_netns(veth: tuple[str, str] | None = None) -> Iterator[dict[str, int]]:
    """Run the body in a fresh network namespace; yields {ifname: ifindex} of the veth pair made there."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        try:
            links: dict[str, int] = {}
            if veth:
                subprocess.run(["ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1]],
                               check=True, capture_output=True)
                links = {name: socket.if_nametoindex(name) for name in veth}
            yield links
        finally:
            _check(_libc.setns(home, CLONE_NEWNET), "setns(home)")
    finally:
        os.close(home)
