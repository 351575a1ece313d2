"""Where the forwarding-rate benchmark counts: an XDP counter at the far end of the relay's internal link.

See bench/egress.c for why the count is taken there and not by a UDP sink.
"""

from __future__ import annotations

from pathlib import Path

from splitrelay.lab.topology import Lab

SOURCE = Path(__file__).with_name("egress.c")
SWITCH_PORT = "rint"   # lab/topology.py: the switch's end of the relay's internal veth


class EgressCounter:
    """``with EgressCounter(lab, port) as c: ...; c.read()`` — data packets the relay sent to ``port``."""

    def __init__(self, lab: Lab, port: int) -> None:
        self.lab = lab
        self.port = port
        self._bpf = None

    def __enter__(self) -> EgressCounter:
        from bcc import BPF

        self._bpf = BPF(text=SOURCE.read_text(), cflags=[f"-DSINK_PORT={int(self.port)}", "-w"])
        fn = self._bpf.load_func("xdp_egress_count", BPF.XDP)
        self.lab.in_netns(self.lab.switch_netns, lambda: BPF.attach_xdp(SWITCH_PORT, fn, 0))
        return self

    def read(self) -> int:
        return 0 if self._bpf is None else int(self._bpf[b"delivered"].sum(0).value)  # BPF has __len__

    def __exit__(self, *exc: object) -> None:
        from bcc import BPF

        if self._bpf is not None:
            self.lab.in_netns(self.lab.switch_netns, lambda: BPF.remove_xdp(SWITCH_PORT, 0))
            self._bpf.cleanup()
            self._bpf = None
