"""A relay network on one machine: client, relay and transceiver hosts as network namespaces.

One module serves the tests, ``splitrelay lab`` and the demo, so all three
exercise the same topology::

    client ns  c0 ──veth── pub0  relay ns  int0 ──veth── bridge (switch ns) ── t1 ns, t2 ns, ...
    172.31.0.2               172.31.0.1    172.31.1.1                          172.31.1.11, .12, ...
    fd00:31::2               fd00:31::1    fd00:32::1                          fd00:32::11, ...

    client ns  s0 ──veth── bridge "sig" (switch ns) ── t1 ns, ... (signaling only: 172.31.2.0/24)

Media: the client routes everything via the relay's public address; transceivers
route the client network via the relay's internal address.  The relay forwards
nothing in its kernel (ip_forward=0, IPv6 forwarding=0), so media crosses only
through XDP.  Signaling (WHIP over HTTP) has its own network with other
addresses, as a load balancer would give it in production, so it can never
carry media around the relay.  The edge agent's control API listens on the
relay's internal address, which transceivers reach directly.

Known veth facts built in: a frame XDP-redirected into a veth is silently
dropped unless the receiving peer has GRO on (or an XDP program), so GRO is
turned on at the peers of pub0 and int0; veth senders emit partial UDP
checksums, so tx checksum offload is off on every lab veth.  Nothing here ever
touches an interface the lab did not create.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import signal
import subprocess
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

STATE_DIR = Path(os.environ.get("SPLITRELAY_LAB_DIR", "/run/splitrelay/labs"))
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


class LabError(Exception):
    """The lab could not be built, found or torn down (one-line reason)."""


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run fn in a thread that has entered ``netns``; sockets it creates stay in that namespace."""
    box: dict[str, Any] = {}
    libc = ctypes.CDLL(None, use_errno=True)

    def worker() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise LabError(f"setns({netns}): {os.strerror(ctypes.get_errno())}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=worker, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


@dataclass
class Host:
    netns: str
    ifname: str
    ip4: str
    ip6: str
    mac: str = ""


@dataclass
class Transceiver(Host):
    index: int = 0
    backend_id: int = 0
    signal_ip4: str = ""


@dataclass
class Lab:
    name: str
    prefix: str
    client: Host
    relay_public: Host
    relay_internal: Host
    switch_netns: str
    transceivers: list[Transceiver] = field(default_factory=list)
    client_signal_ip4: str = "172.31.2.2"
    pids: list[int] = field(default_factory=list)
    relay_port: int = 3478

    # -- building ------------------------------------------------------------------

    @classmethod
    def create(cls, transceivers: int = 2, name: str | None = None, relay_port: int = 3478) -> Lab:
        if os.geteuid() != 0:
            raise LabError("a lab needs root (network namespaces, veth, XDP)")
        if not 1 <= transceivers <= 50:
            raise LabError(f"transceivers must be 1..50, got {transceivers}")
        prefix = "sr" + secrets.token_hex(3)
        name = name or prefix
        if (STATE_DIR / f"{name}.json").exists():
            raise LabError(f"a lab named {name!r} is already up (splitrelay lab down --name {name})")
        lab = cls(
            name=name,
            prefix=prefix,
            client=Host(f"{prefix}-cli", "c0", "172.31.0.2", "fd00:31::2"),
            relay_public=Host(f"{prefix}-rly", "pub0", "172.31.0.1", "fd00:31::1"),
            relay_internal=Host(f"{prefix}-rly", "int0", "172.31.1.1", "fd00:32::1"),
            switch_netns=f"{prefix}-sw",
            relay_port=relay_port,
        )
        for i in range(1, transceivers + 1):
            lab.transceivers.append(Transceiver(
                f"{prefix}-t{i}", "eth1", f"172.31.1.{10 + i}", f"fd00:32::{10 + i:x}",
                index=i, backend_id=i, signal_ip4=f"172.31.2.{10 + i}",
            ))
        lab.save()  # before building, so a half-built lab can still be torn down
        try:
            lab._build()
        except BaseException:
            lab.destroy()
            raise
        lab.save()
        return lab

    def namespaces(self) -> list[str]:
        return [self.client.netns, self.relay_public.netns, self.switch_netns] + [
            t.netns for t in self.transceivers
        ]

    def _ns(self, netns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(["ip", "netns", "exec", netns, *argv], check=check)

    def _veth(self, a_ns: str, a: str, b_ns: str, b: str) -> None:
        tmp_a, tmp_b = f"{self.prefix}a", f"{self.prefix}b"
        _run(["ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b])
        _run(["ip", "link", "set", tmp_a, "netns", a_ns, "name", a])
        _run(["ip", "link", "set", tmp_b, "netns", b_ns, "name", b])
        for ns, dev in ((a_ns, a), (b_ns, b)):
            self._ns(ns, "ethtool", "-K", dev, "tx", "off")
            self._ns(ns, "ip", "link", "set", dev, "up")

    def _addr(self, host: Host, prefix4: int = 24, prefix6: int = 64) -> None:
        self._ns(host.netns, "ip", "addr", "add", f"{host.ip4}/{prefix4}", "dev", host.ifname)
        self._ns(host.netns, "ip", "-6", "addr", "add", f"{host.ip6}/{prefix6}", "dev", host.ifname, "nodad")

    def _build(self) -> None:
        for ns in self.namespaces():
            _run(["ip", "netns", "add", ns])
            self._ns(ns, "ip", "link", "set", "lo", "up")
        rly, sw, cli = self.relay_public.netns, self.switch_netns, self.client.netns
        self._ns(rly, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        self._ns(rly, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=0")
        for bridge in ("br0", "sig"):
            self._ns(sw, "ip", "link", "add", bridge, "type", "bridge")
            self._ns(sw, "ip", "link", "set", bridge, "up")

        self._veth(cli, "c0", rly, "pub0")
        self._veth(rly, "int0", sw, "rint")
        self._ns(sw, "ip", "link", "set", "rint", "master", "br0")
        # frames XDP redirects into pub0/int0 arrive at these peers: GRO keeps them alive
        self._ns(cli, "ethtool", "-K", "c0", "gro", "on")
        self._ns(sw, "ethtool", "-K", "rint", "gro", "on")
        self._addr(Host(cli, "c0", self.client.ip4, self.client.ip6))
        self._addr(self.relay_public)
        self._addr(self.relay_internal)
        self._ns(cli, "ip", "route", "add", "default", "via", self.relay_public.ip4)
        self._ns(cli, "ip", "-6", "route", "add", "default", "via", self.relay_public.ip6)

        self._veth(cli, "s0", sw, "scli")
        self._ns(sw, "ip", "link", "set", "scli", "master", "sig")
        self._ns(cli, "ip", "addr", "add", f"{self.client_signal_ip4}/24", "dev", "s0")

        for t in self.transceivers:
            self._veth(t.netns, "eth1", sw, f"t{t.index}m")
            self._ns(sw, "ip", "link", "set", f"t{t.index}m", "master", "br0")
            self._addr(t)
            self._ns(t.netns, "ip", "route", "add", "172.31.0.0/24", "via", self.relay_internal.ip4)
            self._ns(t.netns, "ip", "-6", "route", "add", "fd00:31::/64", "via", self.relay_internal.ip6)
            # the backend address reaches clients only through the relay, never over signaling
            for family, own, net, relay in (("-4", t.ip4, "172.31.1.0/24", self.relay_internal.ip4),
                                            ("-6", t.ip6, "fd00:32::/64", self.relay_internal.ip6)):
                client_net = "172.31.0.0/24" if family == "-4" else "fd00:31::/64"
                self._ns(t.netns, "ip", family, "rule", "add", "from", own, "lookup", "100", "priority", "100")
                self._ns(t.netns, "ip", family, "route", "add", net, "dev", "eth1", "table", "100")
                self._ns(t.netns, "ip", family, "route", "add", client_net, "via", relay, "table", "100")
            self._veth(t.netns, "sig0", sw, f"t{t.index}s")
            self._ns(sw, "ip", "link", "set", f"t{t.index}s", "master", "sig")
            self._ns(t.netns, "ip", "addr", "add", f"{t.signal_ip4}/24", "dev", "sig0")
            t.mac = self.mac(t.netns, "eth1")
        self.client.mac = self.mac(cli, "c0")
        self.relay_public.mac = self.mac(rly, "pub0")
        self.relay_internal.mac = self.mac(rly, "int0")

    def mac(self, netns: str, ifname: str) -> str:
        out = self._ns(netns, "cat", f"/sys/class/net/{ifname}/address").stdout
        return out.strip()

    # -- processes -----------------------------------------------------------------

    def popen(self, netns: str, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """Start a process inside one of the lab's network namespaces; destroy() kills it by PID.

        nsenter switches only the network namespace: `ip netns exec` would also give the
        process a private /sys without /sys/fs/bpf, and pins made there die with it.
        """
        if netns not in self.namespaces():
            raise LabError(f"{netns} is not a namespace of lab {self.name}")
        proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{netns}", "--", *argv],
                                start_new_session=True, **kwargs)
        self.pids.append(proc.pid)
        self.save()
        return proc

    def run(self, netns: str, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        return self._ns(netns, *argv, check=check)

    def in_netns(self, netns: str, fn: Callable[[], T]) -> T:
        return in_netns(netns, fn)

    # -- state ---------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = STATE_DIR / f".{self.name}.json.tmp"
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        tmp.replace(STATE_DIR / f"{self.name}.json")

    @classmethod
    def load(cls, name: str) -> Lab:
        path = STATE_DIR / f"{name}.json"
        if not path.exists():
            raise LabError(f"no lab named {name!r} is up")
        data = json.loads(path.read_text())
        data["client"] = Host(**data["client"])
        data["relay_public"] = Host(**data["relay_public"])
        data["relay_internal"] = Host(**data["relay_internal"])
        data["transceivers"] = [Transceiver(**t) for t in data["transceivers"]]
        return cls(**data)

    @staticmethod
    def names() -> list[str]:
        if not STATE_DIR.exists():
            return []
        return sorted(p.stem for p in STATE_DIR.glob("*.json"))

    def destroy(self) -> None:
        """Kill the lab's processes and delete its namespaces (and so its veths); idempotent."""
        for pid in self.pids:
            try:
                os.killpg(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in self.pids:
            _wait_gone(pid)
        existing = set(_run(["ip", "netns", "list"]).stdout.split())
        for ns in self.namespaces():
            if ns in existing:
                _run(["ip", "netns", "pids", ns], check=False)
                _run(["ip", "netns", "delete", ns], check=False)
        (STATE_DIR / f"{self.name}.json").unlink(missing_ok=True)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def _wait_gone(pid: int, timeout: float = 5.0) -> None:
    """Reap our child or wait for a foreign PID to vanish; SIGKILL its group after the timeout."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:
            if not Path(f"/proc/{pid}").exists():
                return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError, PermissionError):
        pass
