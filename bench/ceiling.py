"""The local ceiling: a bare XDP program on the relay's public veth that only rewrites MACs and redirects.

The relay's forwarding rate means little on a 2-core veth lab without the rate
of the cheapest XDP forwarder on the same links, measured by the same sender
and counter in the same run: ``ratios()`` reports the relay's delivered rate as
a fraction of it (target >= 80 %, issue 12).  See bench/ceiling.c.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import socket
from collections.abc import Iterator
from pathlib import Path

from splitrelay.bench.forwarding import SINK_PORT, Route
from splitrelay.lab.topology import Lab

SOURCE = Path(__file__).with_name("ceiling.c")


def _mac_bytes(mac: str) -> str:
    return "{" + ",".join(f"0x{b}" for b in mac.split(":")) + "}"


def route(lab: Lab) -> Route:
    """Frames addressed to the transceiver's sink port, handed to the relay's public MAC (as to a router)."""
    t = lab.transceivers[0]
    return Route("ceiling", t.ip4, SINK_PORT, SINK_PORT)


@contextlib.contextmanager
def attached(lab: Lab) -> Iterator[None]:
    """The bare program on relay 1's public veth for the block (nothing else may be attached there)."""
    from bcc import BPF

    relay, internal, t = lab.relay_public, lab.relay_internal, lab.transceivers[0]
    bpf = BPF(text=SOURCE.read_text(), cflags=[f"-DSRC_MAC={_mac_bytes(internal.mac)}",
                                                 f"-DDST_MAC={_mac_bytes(t.mac)}", "-w"])
    try:
        fn = bpf.load_func("xdp_ceiling", BPF.XDP)
        def fill_devmap() -> None:  # the kernel resolves a devmap's ifindex in the writer's namespace
            bpf[b"tx_port"][ct.c_int(0)] = ct.c_int(socket.if_nametoindex(internal.ifname))

        lab.in_netns(relay.netns, fill_devmap)
        lab.in_netns(relay.netns, lambda: BPF.attach_xdp(relay.ifname, fn, 0))
        try:
            yield
        finally:
            lab.in_netns(relay.netns, lambda: BPF.remove_xdp(relay.ifname, 0))
    finally:
        bpf.cleanup()
