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

from dataclasses import dataclass

from splitrelay.bpf.syscall import BpfError, prog_test_run

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
VERDICTS = {0: "aborted", 1: "drop", 2: "pass", 3: "tx", 4: "redirect"}


class TestRunError(BpfError):
    """bpf(BPF_PROG_TEST_RUN) failed."""

    __test__ = False   # not a pytest class


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


def run_xdp(prog_fd: int, packet: bytes, repeat: int = 1) -> RunResult:
    """Run the XDP program ``prog_fd`` on ``packet``; ``repeat`` > 1 times it (duration is per run)."""
    try:
        verdict, data, duration = prog_test_run(prog_fd, packet, repeat)   # room for a head adjustment
    except BpfError as exc:
        raise TestRunError(exc.errno, str(exc)) from None
    return RunResult(verdict, data, duration)
