"""Run an XDP program on one crafted packet through BPF_PROG_TEST_RUN.

The kernel executes the loaded program on a buffer we hand it and returns the
verdict and the (possibly rewritten) bytes, with no network at all: this is
how the data plane's decisions are unit-tested.  bcc has no wrapper for it, so
this calls bpf(2) directly through ctypes.

What the kernel does (no BPF_F_TEST_XDP_LIVE_FRAMES): the program runs on a
copy of the frame with the loopback device as its ingress (ctx->ingress_ifindex
is lo's, 1), and the verdict is only reported, never acted on: XDP_REDIRECT and
XDP_TX send nothing.  bpf_redirect_map() still looks up its devmap, so it
returns XDP_REDIRECT only for a populated slot and XDP_ABORTED (the default
flags) for an empty one.  Tests therefore fill tx_ports with real ifindexes.
"""

from __future__ import annotations

import ctypes as ct
import os
from dataclasses import dataclass

_NR_BPF = {"x86_64": 321, "aarch64": 280}[os.uname().machine]
_BPF_PROG_TEST_RUN = 10

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
VERDICTS = {0: "aborted", 1: "drop", 2: "pass", 3: "tx", 4: "redirect"}


class _TestAttr(ct.Structure):
    _fields_ = [
        ("prog_fd", ct.c_uint32),
        ("retval", ct.c_uint32),
        ("data_size_in", ct.c_uint32),
        ("data_size_out", ct.c_uint32),
        ("data_in", ct.c_uint64),
        ("data_out", ct.c_uint64),
        ("repeat", ct.c_uint32),
        ("duration", ct.c_uint32),
        ("ctx_size_in", ct.c_uint32),
        ("ctx_size_out", ct.c_uint32),
        ("ctx_in", ct.c_uint64),
        ("ctx_out", ct.c_uint64),
        ("flags", ct.c_uint32),
        ("cpu", ct.c_uint32),
        ("batch_size", ct.c_uint32),
        ("_pad", ct.c_uint32),
    ]


class TestRunError(OSError):
    """bpf(BPF_PROG_TEST_RUN) failed."""


@dataclass
class RunResult:
    verdict: int
    data: bytes
    duration_ns: int

    @property
    def name(self) -> str:
        return VERDICTS.get(self.verdict, str(self.verdict))

    def __iter__(self):
        """``verdict, data = run_xdp(fd, frame)``."""
        return iter((self.verdict, self.data))


_libc = ct.CDLL(None, use_errno=True)


def run_xdp(prog_fd: int, packet: bytes, repeat: int = 1) -> RunResult:
    """Run the XDP program ``prog_fd`` on ``packet``; ``repeat`` > 1 times it (duration is per run)."""
    data_in = ct.create_string_buffer(bytes(packet), len(packet))
    out_size = len(packet) + 256  # room for a head adjustment
    data_out = ct.create_string_buffer(out_size)
    attr = _TestAttr(
        prog_fd=prog_fd,
        data_size_in=len(packet),
        data_size_out=out_size,
        data_in=ct.addressof(data_in),
        data_out=ct.addressof(data_out),
        repeat=repeat,
    )
    rc = _libc.syscall(_NR_BPF, _BPF_PROG_TEST_RUN, ct.byref(attr), ct.sizeof(attr))
    if rc != 0:
        err = ct.get_errno()
        raise TestRunError(err, f"BPF_PROG_TEST_RUN failed: {os.strerror(err)}")
    return RunResult(attr.retval, data_out.raw[: attr.data_size_out], attr.duration)
