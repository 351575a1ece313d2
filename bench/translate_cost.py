"""What translation on both sides costs the XDP relay: ns per packet beside DNAT, and kernel memory per flow.

Loads ``bpf/relay.c`` once (maps pinned under a pin root of its own, removed at
the end; nothing is attached: no network, no lab) and runs both programs on
one media packet of a live flow through BPF_PROG_TEST_RUN, ``runs`` single runs
per trial (test_run's own ``repeat`` would run the program again on the frame it
already rewrote), DNAT and translating trials interleaved ``trials`` times.  The
kernel's BPF statistics (``BPF_ENABLE_STATS``: run_time_ns / run_cnt of each
program) time the program alone, not the syscall around it.  The devmap
slots hold the loopback device, test_run's ingress, so both programs end in
XDP_TX (the verdict is only reported).  Memory is each map's ``memlock``
(fdinfo) over its capacity.

    sudo .venv/bin/python -m splitrelay.bench.translate_cost [--runs N] [--trials N] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import shutil
import statistics
import uuid
from pathlib import Path

from splitrelay import defaults
from splitrelay.bpf import syscall
from splitrelay.bpf.testrun import XDP_TX, run_xdp
from splitrelay.edge.xdp.maps import Backend, XdpMaps, RelayConfig
from splitrelay.wire import stun
from splitrelay.wire.byteorder import mac_bytes
from splitrelay.wire.udp import ipv4_udp

PUBLIC_IP, INTERNAL_IP, CLIENT_IP, BACKEND_IP = "198.18.0.1", "198.18.1.1", "198.18.0.2", "198.18.1.11"
RELAY_PORT, BACKEND_PORT, CLIENT_PORT = defaults.RELAY_PORT, 5000, 40000
MAC = "02:00:00:00:00:01"
RTP = bytes([0x80, 0x6F]) + bytes(158)   # a 20 ms Opus frame's size, about
LO = 1


def frame(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> bytes:
    """An Ethernet/IPv4/UDP frame with valid checksums."""
    return mac_bytes(MAC) * 2 + b"\x08\x00" + ipv4_udp(src, dst, payload)


def memlock(map_fd: int) -> int:
    for line in Path(f"/proc/self/fdinfo/{map_fd}").read_text().splitlines():
        if line.startswith("memlock:"):
            return int(line.split()[1])
    raise OSError(f"no memlock in fdinfo of map fd {map_fd}")


def _prepare(dp: XdpMaps, cfg: RelayConfig) -> tuple[bytes, bytes]:
    """Configure, open the client's flow; (its media frame inbound, the backend's reply outbound)."""
    dp.bpf[b"flows"].clear()
    dp.ports.clear_slots()
    dp.configure(cfg)
    if cfg.translate:
        dp.ports.refill()
    client = (CLIENT_IP, CLIENT_PORT)
    opened = run_xdp(dp.program_fd("xdp_public"),
                     frame(client, (PUBLIC_IP, RELAY_PORT), stun.build_binding_request("benchSess:c")))
    assert opened.verdict == XDP_TX, opened.name
    port = dp.flow(client).internal_port
    reply_to = (INTERNAL_IP, port) if cfg.translate else client
    # the backend answers the check, as a transceiver does: the flow is confirmed and carries media
    answered = run_xdp(dp.program_fd("xdp_internal"),
                       frame((BACKEND_IP, BACKEND_PORT), reply_to, stun.build_message(stun.BINDING_SUCCESS)))
    assert answered.verdict == XDP_TX, answered.name
    return frame(client, (PUBLIC_IP, RELAY_PORT), RTP), frame((BACKEND_IP, BACKEND_PORT), reply_to, RTP)


def _ns_per_run(prog_fd: int, pkt: bytes, runs: int) -> float:
    before = syscall.prog_info(prog_fd)
    for _ in range(runs):
        result = run_xdp(prog_fd, pkt)
        assert result.verdict == XDP_TX, result.name
    after = syscall.prog_info(prog_fd)
    return (after.run_time_ns - before.run_time_ns) / (after.run_cnt - before.run_cnt)


def measure(runs: int = 20_000, trials: int = 5, addrs: int = 1) -> dict:
    """``addrs``: internal addresses the relay translates with (the maps sized for them, all configured)."""
    pin_root = f"/sys/fs/bpf/srbench-{uuid.uuid4().hex[:8]}"
    dp = XdpMaps(instance="xlate-cost", pin_root=pin_root, xlate_addrs=addrs)
    try:
        dp.load()
        dp.set_tx_slot(0, LO)
        dp.set_tx_slot(1, LO)
        base = RelayConfig(relay_port=RELAY_PORT, public_mac=MAC, gateway_mac=MAC, public_ip4=PUBLIC_IP,
                           max_session_flows=0)
        more = tuple(str(ipaddress.ip_address(INTERNAL_IP) + k) for k in range(1, addrs))
        modes = {"dnat": base, "translate": dataclasses.replace(base, translate=True, internal_ip4=INTERNAL_IP,
                                                                internal_more=more)}
        dp.set_backend(Backend(1, BACKEND_PORT, MAC, MAC, ip4=BACKEND_IP))
        dp.set_session("benchSess", 1)
        ns: dict[str, dict[str, list[float]]] = {m: {"xdp_public": [], "xdp_internal": []} for m in modes}
        stats_fd = syscall.enable_run_time_stats()
        try:
            for _ in range(trials):
                for mode, cfg in modes.items():
                    inbound, reply = _prepare(dp, cfg)
                    for prog, pkt in (("xdp_public", inbound), ("xdp_internal", reply)):
                        ns[mode][prog].append(_ns_per_run(dp.program_fd(prog), pkt, runs))
        finally:
            os.close(stats_fd)
        median = {m: {p: statistics.median(v) for p, v in per.items()} for m, per in ns.items()}
        maps = {name: (memlock(dp.bpf[name.encode()].map_fd), dp.bpf[name.encode()].max_entries)
                for name in ("flows", "port_slots", "port_pool")}
    finally:
        dp.destroy()
        shutil.rmtree(pin_root, ignore_errors=True)
    per_entry = {name: mem / entries for name, (mem, entries) in maps.items()}
    flows_entries = maps["flows"][1]
    per_address = (maps["port_slots"][0] + maps["port_pool"][0]) / addrs
    addresses_for_table = -(-flows_entries // (maps["port_slots"][1] // addrs))
    return {
        "runs": runs, "trials": trials, "internal_addresses": addrs, "ns_per_packet": median, "trials_ns": ns,
        "ratio": {p: median["translate"][p] / median["dnat"][p] for p in ("xdp_public", "xdp_internal")},
        "memlock_bytes": {n: m for n, (m, _) in maps.items()},
        "entries": {n: e for n, (_, e) in maps.items()},
        "bytes_per_flow": {"dnat": per_entry["flows"],
                           "translate": per_entry["flows"] + per_entry["port_slots"] + per_entry["port_pool"]},
        "worst_case": {"flows": flows_entries, "internal_addresses": addresses_for_table,
                       "dnat_bytes": maps["flows"][0],
                       "translate_bytes": maps["flows"][0] + addresses_for_table * per_address,
                       "measured": addrs >= addresses_for_table},   # else extrapolated per address
    }


def main() -> None:  # pragma: no cover - a benchmark, needs root
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--addrs", type=int, default=1, help="internal addresses translated with (1..16)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = measure(args.runs, args.trials, args.addrs)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for prog in ("xdp_public", "xdp_internal"):
        d, t = out["ns_per_packet"]["dnat"][prog], out["ns_per_packet"]["translate"][prog]
        print(f"{prog}: DNAT {d:.1f} ns/pkt, translate {t:.1f} ns/pkt, ratio {t / d:.2f}")
    b = out["bytes_per_flow"]
    print(f"bytes per flow: DNAT {b['dnat']:.1f}, translate {b['translate']:.1f} (both directions)")
    w = out["worst_case"]
    print(f"{w['flows']:,} flows: DNAT {w['dnat_bytes'] / 2**20:.1f} MiB, translate "
          f"{w['translate_bytes'] / 2**20:.1f} MiB ({w['internal_addresses']} internal addresses)")


if __name__ == "__main__":  # pragma: no cover
    main()
