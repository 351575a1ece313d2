"""What the data plane's guards (pending flows, no reflector, issue 22 §3) cost: ns per packet, old beside new.

Compiles this checkout's ``bpf/relay.c`` and an older build's (by default ``git show main:bpf/``) side
by side, each with maps pinned under a pin root of its own (removed at the end; nothing attached),
opens one client flow on each (the new one confirmed by its backend's answer, as a call's is) and
times an established flow's media packet through ``xdp_public`` and the backend's reply through
``xdp_internal`` with BPF_PROG_TEST_RUN, old and new trials interleaved, timed by the kernel's BPF
statistics as in ``translate_cost`` (whose frame builder and timer this reuses).

    sudo .venv/bin/python -m splitrelay.bench.guard_cost [--old DIR | --old-ref REF] [--runs N] [--trials N]
"""

from __future__ import annotations

import argparse
import ctypes as ct
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from splitrelay.bpf import SOURCE_DIR, syscall
from splitrelay.bpf.testrun import XDP_TX, run_xdp
from splitrelay.edge.xdp import codec
from splitrelay.edge.records import Backend, RelayConfig
from splitrelay.edge.xdp.loader import PROGRAMS, load_program
from splitrelay.wire import stun

from .translate_cost import BACKEND_IP, BACKEND_PORT, CLIENT_IP, CLIENT_PORT, LO, MAC, PUBLIC_IP, RELAY_PORT, RTP
from .translate_cost import _ns_per_run, frame


def _old_sources(ref: str) -> Path:
    """``bpf/*.c`` and ``*.h`` of git ref ``ref`` in a temporary directory."""
    out = Path(tempfile.mkdtemp(prefix="srbench-old-"))
    names = subprocess.run(["git", "ls-tree", "--name-only", ref, "bpf/"], cwd=SOURCE_DIR.parent, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in names:
        if name.endswith((".c", ".h")):
            text = subprocess.run(["git", "show", f"{ref}:{name}"], cwd=SOURCE_DIR.parent, check=True,
                                  capture_output=True, text=True).stdout
            (out / Path(name).name).write_text(text)
    return out


class Relay:
    """One build of relay.c, loaded with its own pinned maps, one backend, one session, one flow."""

    def __init__(self, source: Path, pin_dir: Path) -> None:
        from bcc import BPF

        pin_dir.mkdir(parents=True)
        self.bpf = BPF(src_file=str(source / "relay.c").encode(), cflags=[
            f"-I{source}", f'-DSR_PIN_DIR="{pin_dir}"', "-Wno-compare-distinct-pointer-types", "-Wno-pass-failed"])
        self.fds = {name: load_program(self.bpf, name).fd for name in PROGRAMS}
        config = self.bpf[b"config"]
        config[ct.c_uint32(0)] = codec.config_leaf(config.Leaf(), RelayConfig(
            relay_port=RELAY_PORT, public_mac=MAC, gateway_mac=MAC, public_ip4=PUBLIC_IP, max_session_flows=0))
        tx = self.bpf[b"tx_ports"]
        for slot in (0, 1):
            tx[tx.Key(slot)] = tx.Leaf(LO)
        backends = self.bpf[b"backends"]
        backends[ct.c_uint32(1)] = codec.backend_leaf(backends.Leaf(), Backend(1, BACKEND_PORT, MAC, MAC,
                                                                                  ip4=BACKEND_IP))
        addrs = self.bpf[b"backend_addrs"]
        addrs[codec.addr_key(addrs.Key(), BACKEND_IP, BACKEND_PORT)] = ct.c_uint32(1)
        sessions = self.bpf[b"sessions"]
        key, leaf = sessions.Key(), sessions.Leaf()
        key.ufrag = b"benchSess"
        leaf.backend_id, leaf.created_ns = 1, time.monotonic_ns()
        sessions[key] = leaf
        client = (CLIENT_IP, CLIENT_PORT)
        opened = run_xdp(self.fds["xdp_public"], frame(client, (PUBLIC_IP, RELAY_PORT),
                                                        stun.build_binding_request("benchSess:c")))
        assert opened.verdict == XDP_TX, opened.name
        answer = stun.build_message(stun.BINDING_SUCCESS)   # confirms the flow (the older build ignores it)
        confirmed = run_xdp(self.fds["xdp_internal"], frame((BACKEND_IP, BACKEND_PORT), client, answer))
        assert confirmed.verdict == XDP_TX, confirmed.name
        self.inbound = frame(client, (PUBLIC_IP, RELAY_PORT), RTP)
        self.reply = frame((BACKEND_IP, BACKEND_PORT), client, RTP)

    def close(self) -> None:
        self.bpf.cleanup()


def measure(old: Path, runs: int = 20_000, trials: int = 5) -> dict:
    pin_root = Path(f"/sys/fs/bpf/srbench-{uuid.uuid4().hex[:8]}")
    relays = {}
    try:
        relays = {"old": Relay(old, pin_root / "old"), "new": Relay(SOURCE_DIR, pin_root / "new")}
        ns: dict[str, dict[str, list[float]]] = {b: {"xdp_public": [], "xdp_internal": []} for b in relays}
        stats_fd = syscall.enable_run_time_stats()
        try:
            for _ in range(trials):
                for build, relay in relays.items():
                    for prog, pkt in (("xdp_public", relay.inbound), ("xdp_internal", relay.reply)):
                        ns[build][prog].append(_ns_per_run(relay.fds[prog], pkt, runs))
        finally:
            os.close(stats_fd)
    finally:
        for relay in relays.values():
            relay.close()
        shutil.rmtree(pin_root, ignore_errors=True)
    median = {b: {p: statistics.median(v) for p, v in per.items()} for b, per in ns.items()}
    return {"runs": runs, "trials": trials, "ns_per_packet": median, "trials_ns": ns,
            "ratio": {p: median["new"][p] / median["old"][p] for p in PROGRAMS},
            "load_average": os.getloadavg()}


def main() -> None:  # pragma: no cover - a benchmark, needs root
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, help="a directory with the older build's relay.c and headers")
    parser.add_argument("--old-ref", default="main", help="else: the git ref whose bpf/ to compare against")
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    old = args.old or _old_sources(args.old_ref)
    try:
        out = measure(old, args.runs, args.trials)
    finally:
        if args.old is None:
            shutil.rmtree(old, ignore_errors=True)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for prog in PROGRAMS:
        o, n = out["ns_per_packet"]["old"][prog], out["ns_per_packet"]["new"][prog]
        print(f"{prog}: old {o:.1f} ns/pkt, new {n:.1f} ns/pkt, ratio {n / o:.2f}")
    print("load average: " + " ".join(f"{x:.2f}" for x in out["load_average"]))


if __name__ == "__main__":  # pragma: no cover
    main()
