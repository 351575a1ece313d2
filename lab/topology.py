"""A relay network on one machine: client, relay and transceiver hosts as network namespaces.

(This docstring is the topology's one description.  The lab's hosts are lab/host.py, building
it in the kernel is lab/build.py, netlink steps inside a namespace are lab/links.py.)

One module serves the tests, ``splitrelay lab`` and the demo, so all three
exercise the same topology (``P`` is the lab's random prefix, e.g. ``sr3fa9c1``)::

    P-cli            P-rly                     P-sw                          P-tN (N = 1, 2, ...)
    c0 --- veth --- pub0
                    int0 ----- veth ----- rint --+-- bridge br0 -- tNm --- veth --- eth1
    s0 ----------------- veth ----------- scli --+-- bridge sig -- tNs --- veth --- sig0

    with relays=K, relay k >= 2 (P-rk):        with an impaired link (lab/impair.py):
    c(k-1) --- veth --- pub0                   c0 --- ia [P-imp: forwarder] ib --- pub0
                        int0 --- rkint (br0)   (relay k's link: P-ik)

Relays.  Each relay has its own namespace, public network (the client has one
link and one address on each; relay 1 stays its default route), agent and
internal address.  The internal addresses share the transceivers' segment
(br0), or, in a routed lab, the router's (the agent's next hop is then the
router: edge/neighbours.py resolve_next_hop).  Each
transceiver routes relay k's public network via relay k's internal address, so
with DNAT-only XDP an answer to a client that came in by relay k leaves by relay k.

Addresses (lab/addresses.py): IPv4 from 198.18.0.0/15 (benchmarking, routed
nowhere), IPv6 from a random ULA /48 per lab, never a range the host uses::

    public     B.0.0/24  P::/64    client c0 .2 ::2, relay pub0 .1 ::1
    internal   B.1.0/24  P:1::/64  relay int0 .1 ::1, transceiver N eth1 .(10+N) ::(10+N, hex)
    signaling  B.2.0/24  P:2::/64  client s0 .2 ::2, transceiver N sig0 .(10+N) ::(10+N, hex)

A routed lab (``routed=True``, lab/router.py) puts the transceivers' media links on a
network of their own, ``transceivers`` B.3.0/24 P:3::/64, behind a router namespace
``-rtr`` on the internal segment.

Nothing routes these on the host: commands reach a lab by entering its
namespaces (``splitrelay stats --lab NAME``), never through the host's default route.

Media.  The client routes everything (default, v4 and v6) via the relay's
public address; transceivers route the public network via the relay's internal
address.  The relay forwards nothing in its kernel (``ip_forward=0``, IPv6
``forwarding=0``), so media crosses the relay only through XDP.  Each
transceiver's backend addresses are policy-routed (``from <backend addr> lookup
100``, table 100 = internal net on eth1, public net via the relay, *unreachable*
for the rest; so is everything from the backend UDP port, for a transceiver
whose one socket is bound to ``[::]`` to serve IPv4 and IPv6 clients), so a packet
sourced from a backend address can never leave by another path (e.g. towards
the client's signaling address), whatever ICE candidates the transceiver learns.

Signaling.  WHIP (HTTP) runs over its own network: the client's ``s0`` and each
transceiver's ``sig0`` on the bridge ``sig`` in the switch namespace, with
addresses of their own, as a load balancer would give it in production.  The
relay is not on it and nothing routes between it and the media networks, so it
cannot carry media around the relay (media to a backend address from the client
goes via its default route, i.e. to the relay).  The edge agent's control API
listens on the relay's internal address, which transceivers reach directly on
the internal network (local delivery in the relay, no forwarding).  The relay
drops packets that arrive on ``pub0`` for its internal addresses (a
``prohibit`` rule ahead of the local table; silently, as the relay sends no
ICMP errors for what it does not forward), as a host firewall would: the
control API is not reachable from the public side.  Packets from the client to
a transceiver's address reach the relay (default route) and die there
(counted as ``InAddrErrors``), as they would on a real relay host.

Known veth facts built in: a frame XDP-redirected into a veth is silently
dropped unless the receiving peer has GRO on (or an XDP program), so GRO is on
at ``c0`` and ``rint`` (the peers of ``pub0`` and ``int0``); veth senders emit
partial UDP checksums, so tx checksum offload is off on every lab veth.  The
switch namespace has IPv6 disabled, so the bridges forward frames but never
talk themselves.

Everything is created inside the lab's namespaces (veths are created with both
ends already in their namespaces), so nothing is ever made in, attached to or
changed on the host's own namespace or its interfaces.  Deleting the
namespaces removes every veth.  Names are unique per lab: ``<stem><6 hex>``
with the stem ``sr`` (or ``$SPLITRELAY_LAB_STEM``; the tests use a per-session
stem to find their own leftovers), namespace names ``<prefix>-cli``,
``-rly``, ``-sw``, ``-tN`` (at most 15 characters); interface names are fixed and
short inside each namespace.  The lab is recorded in
``/run/splitrelay/labs/<name>.json`` (``$SPLITRELAY_LAB_DIR``) before anything is
built, so ``splitrelay lab down``/``status`` from another process, or a
half-built lab, can always be found and torn down.

Running code inside a namespace: ``lab.popen``/``lab.run``/``lab.exec_py`` start
processes (``nsenter --net``, so the process keeps the host's /sys and
/sys/fs/bpf); ``in_netns(ns, fn)`` runs a Python callable in a worker thread that
has entered the namespace (sockets it creates stay in that namespace; for
asyncio: ``in_netns(ns, lambda: asyncio.run(main()))`` or ``await
in_netns_async(ns, fn)``); ``netns_socket(ns, ...)`` makes one socket there.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import netns as pnetns

from splitrelay import defaults
from splitrelay.lab import addresses, impair, procs, router as routing, state
from splitrelay.lab.build import build
from splitrelay.lab.host import Host, Relay, Transceiver
from splitrelay.lab.impair import Impairment, start_forwarder
from splitrelay.lab.router import ROUTED_NEEDS_TRANSLATE, Router
from splitrelay.lab.state import STATE_DIR
from splitrelay.lab import links
from splitrelay.lab.netns import (AF_INET, NETNS_DIR, LabError, in_netns, list_namespaces, netns_socket,
                                  nsenter_argv)

log = logging.getLogger(__name__)

DEFAULT_STEM = "sr"
STEM_ENV = "SPLITRELAY_LAB_STEM"
# per lab, made by lab/stack.py: signs offer tokens, opens admin listeners, the agents' master control token
SECRETS = ("whip.key", "admin.token", "control.key")
MAX_TRANSCEIVERS = 50

T = TypeVar("T")


# -- the lab ---------------------------------------------------------------------------------

@dataclass
class Lab:
    name: str
    prefix: str
    client: Host
    relay_public: Host
    relay_internal: Host
    switch_netns: str
    transceivers: list[Transceiver] = field(default_factory=list)
    client_signal: Host | None = None
    pids: list[int] = field(default_factory=list)
    pid_starts: dict[str, int] = field(default_factory=dict)
    relay_port: int = defaults.RELAY_PORT
    networks: dict[str, list[str]] = field(default_factory=dict)
    created_at: float = 0.0
    impaired: dict[str, dict] = field(default_factory=dict)   # link -> {"netns", "pid"} (lab/impair.py)
    extra_relays: list[Relay] = field(default_factory=list)    # relays 2..N (relay 1: the fields above)
    translate: bool = False   # relays translate both sides: transceivers get no route to the public networks
    router: Router | None = None   # a routed lab's: the transceivers sit in their own network behind it

    # -- building ------------------------------------------------------------------------

    @classmethod
    def create(cls, transceivers: int = 2, name: str | None = None, relay_port: int = defaults.RELAY_PORT,
               stem: str | None = None, impair: Impairment | None = None, relays: int = 1,
               far: Impairment | None = None, translate: bool = False, routed: bool = False) -> Lab:
        """Build a lab with ``transceivers`` transceiver hosts and ``relays`` relays in front of them;
        on any failure nothing is left behind.

        ``impair`` puts the client's link to relay 1 (link "relay1") through an impairment forwarder
        (lab/impair.py): delay, jitter, loss on UDP; ``far`` does the same to the last relay's link,
        making it the far one (needs ``relays`` >= 2).  ``translate``: the relays will translate both
        sides (edge serve --translate), so transceivers get no route to any public network at all:
        their replies can only reach a client through a relay's translation.  ``routed`` (needs
        ``translate``): the transceivers sit in a network of their own behind a router (lab/router.py).
        """
        if os.geteuid() != 0:
            raise LabError("a lab needs root (network namespaces, veth, XDP)")
        if not 1 <= transceivers <= MAX_TRANSCEIVERS:
            raise LabError(f"transceivers must be 1..{MAX_TRANSCEIVERS}, got {transceivers}")
        if not 1 <= relay_port <= 65535:
            raise LabError(f"relay_port must be 1..65535, got {relay_port}")
        if not 1 <= relays <= addresses.MAX_RELAYS:
            raise LabError(f"relays must be 1..{addresses.MAX_RELAYS}, got {relays}")
        if far is not None and relays < 2:
            raise LabError("a far relay needs at least 2 relays")
        if routed and not translate:
            raise LabError(ROUTED_NEEDS_TRANSLATE)
        impaired = {"relay1": impair} if impair else {}
        if far:
            impaired[f"relay{relays}"] = far
        stem = stem if stem is not None else os.environ.get(STEM_ENV) or DEFAULT_STEM
        if not re.fullmatch(r"[a-z][a-z0-9]{0,4}", stem):
            raise LabError(f"lab stem must be 1..5 lowercase letters/digits starting with a letter, got {stem!r}")
        if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}", name):
            raise LabError(f"lab name must be 1..32 of A-Z a-z 0-9 _ . - (not starting with . or -), got {name!r}")
        lab = cls._claim(stem, name, transceivers, relay_port, relays, impaired, routed)
        lab.translate = translate
        try:
            build(lab)
            for link, impairment in impaired.items():
                start_forwarder(lab, link, impairment)
        except BaseException as exc:
            lab.destroy()
            if isinstance(exc, Exception) and not isinstance(exc, LabError):
                raise LabError(f"building lab {lab.name} failed: {exc}") from exc
            raise
        lab.save()
        return lab

    @classmethod
    def _claim(cls, stem: str, name: str | None, transceivers: int, relay_port: int, relays: int,
               impaired: dict[str, Impairment], routed: bool = False) -> Lab:
        """Pick a free prefix and claim the name with an exclusive state file (runs may overlap)."""
        plan = addresses.choose()
        for _ in range(32):
            prefix = stem + secrets.token_hex(3)
            if any(ns.startswith(prefix + "-") for ns in list_namespaces()):
                continue
            lab = cls._plan(prefix, name or prefix, transceivers, relay_port, plan, relays, routed)
            lab.impaired = {link: {"netns": f"{prefix}-imp" if link == "relay1" else f"{prefix}-i{link[5:]}",
                                   "pid": 0} for link in impaired}
            if state.claim(lab.name, lab.to_json()):
                return lab
            if name is not None:
                raise LabError(f"a lab named {name!r} is already up (splitrelay lab down --name {name})")
        raise LabError("could not find a free lab prefix")

    @classmethod
    def _plan(cls, prefix: str, name: str, transceivers: int, relay_port: int,
              plan: addresses.AddressPlan, relays: int = 1, routed: bool = False) -> Lab:
        rly = f"{prefix}-rly"
        lab = cls(
            name=name, prefix=prefix,
            client=Host(f"{prefix}-cli", "c0", *plan.host("public", 2)),
            relay_public=Host(rly, "pub0", *plan.host("public", 1)),
            relay_internal=Host(rly, "int0", *plan.host("internal", 1)),
            switch_netns=f"{prefix}-sw",
            client_signal=Host(f"{prefix}-cli", "s0", *plan.host("signaling", 2)),
            relay_port=relay_port, networks=plan.networks(relays, routed), created_at=time.time(),
            router=routing.plan(prefix, plan) if routed else None,
        )
        for k in range(2, relays + 1):
            ns = f"{prefix}-r{k}"
            lab.extra_relays.append(Relay(k, Host(ns, "pub0", *plan.host("public", 1, k)),
                                          Host(ns, "int0", *plan.host("internal", k)),
                                          Host(lab.client.netns, f"c{k - 1}", *plan.host("public", 2, k))))
        for i in range(1, transceivers + 1):
            ip4, ip6 = plan.host("transceivers" if routed else "internal", 10 + i)
            signal_ip4, signal_ip6 = plan.host("signaling", 10 + i)
            lab.transceivers.append(Transceiver(f"{prefix}-t{i}", "eth1", ip4, ip6, index=i, backend_id=i,
                                                signal_ip4=signal_ip4, signal_ip6=signal_ip6))
        return lab

    @property
    def relays(self) -> list[Relay]:
        """Every relay, relay 1 first (its hosts are the lab's relay_public, relay_internal and client)."""
        return [Relay(1, self.relay_public, self.relay_internal, self.client), *self.extra_relays]

    def relay(self, index: int) -> Relay:
        if not 1 <= index <= len(self.relays):
            raise LabError(f"lab {self.name} has relays 1..{len(self.relays)}, not {index}")
        return self.relays[index - 1]

    def public_network(self, relay: int = 1) -> list[str]:
        """[IPv4, IPv6] prefixes of relay ``relay``'s public network (the client is on each)."""
        return self.networks["public" if relay == 1 else f"public{relay}"]

    def namespaces(self) -> list[str]:
        return [self.client.netns, self.relay_public.netns, self.switch_netns] + [
            t.netns for t in self.transceivers
        ] + [r.netns for r in self.extra_relays] + [link["netns"] for link in self.impaired.values()] + (
            [self.router.netns] if self.router else [])

    @property
    def client_signal_ip4(self) -> str:
        return self.signal_host.ip4

    @property
    def signal_host(self) -> Host:
        return self.client_signal or Host(self.client.netns, "s0", "", "")

    def veths(self) -> list[tuple[str, str]]:
        """Every (namespace, ifname) veth end the lab made."""
        sw = self.switch_netns
        ends = [(self.client.netns, "s0"), (sw, "scli")]
        for r in self.relays:
            ends += [(self.client.netns, r.client.ifname), (r.netns, r.public.ifname),
                     (r.netns, r.internal.ifname), (sw, r.switch_port)]
        for link in self.impaired.values():
            ends += [(link["netns"], "ia"), (link["netns"], "ib")]
        for t in self.transceivers:
            ends += [(t.netns, t.ifname), (sw, f"t{t.index}m"), (t.netns, t.signal_ifname), (sw, f"t{t.index}s")]
        return ends + (self.router.veths(sw) if self.router else [])

    def mac(self, netns: str, ifname: str) -> str:
        return links.netlink(netns, lambda ipr: links.mac(ipr, ifname))

    # -- processes -----------------------------------------------------------------------

    def _check_ns(self, netns: str) -> None:
        if netns not in self.namespaces():
            raise LabError(f"{netns} is not a namespace of lab {self.name}")

    def popen(self, netns: str, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """Start a process (its own session/process group) in one of the lab's namespaces.

        destroy() stops it (SIGTERM to its group, SIGKILL after a grace period), by PID,
        checked against its start time, also from another process via the state file.
        """
        self._check_ns(netns)
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(nsenter_argv(netns, argv), **kwargs)
        procs.track(proc)
        self.pids.append(proc.pid)
        start = procs.start_time(proc.pid)
        if start is not None:
            self.pid_starts[str(proc.pid)] = start
        self.save()
        return proc

    def run(self, netns: str, argv: list[str], check: bool = True, timeout: float = 60.0,
            **kwargs: Any) -> subprocess.CompletedProcess:
        """Run a command to completion in a lab namespace (output captured as text unless overridden)."""
        self._check_ns(netns)
        return procs.run(nsenter_argv(netns, argv), check=check, timeout=timeout, **kwargs)

    def exec_py(self, netns: str, code: str, *args: str, check: bool = True, timeout: float = 60.0,
                **kwargs: Any) -> subprocess.CompletedProcess:
        """Run a Python snippet (this interpreter, so the venv's packages) in a lab namespace."""
        return self.run(netns, [sys.executable, "-c", code, *args], check=check, timeout=timeout, **kwargs)

    def in_netns(self, netns: str, fn: Callable[[], T], timeout: float | None = None) -> T:
        self._check_ns(netns)
        return in_netns(netns, fn, timeout)

    def socket_in(self, netns: str, family: int = AF_INET,
                  type: int = socket.SOCK_DGRAM) -> socket.socket:  # noqa: A002
        """A socket living in one of the lab's namespaces."""
        self._check_ns(netns)
        return netns_socket(netns, family, type)

    # -- state ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self) -> None:
        state.write(self.name, self.to_json())

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Lab:
        data = dict(data)
        legacy_signal = data.pop("client_signal_ip4", None)  # state files of older versions
        for key in ("client", "relay_public", "relay_internal"):
            data[key] = Host(**data[key])
        if data.get("client_signal"):
            data["client_signal"] = Host(**data["client_signal"])
        elif legacy_signal:
            data["client_signal"] = Host(data["client"].netns, "s0", legacy_signal, "")
        data["transceivers"] = [Transceiver(**t) for t in data.get("transceivers", [])]
        data["extra_relays"] = [Relay(r["index"], Host(**r["public"]), Host(**r["internal"]), Host(**r["client"]))
                                for r in data.get("extra_relays", [])]
        if data.get("router"):
            data["router"] = routing.from_json(data["router"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def load(cls, name: str) -> Lab:
        return cls.from_json(state.read(name))

    @staticmethod
    def names() -> list[str]:
        return state.names()

    # -- teardown ------------------------------------------------------------------------

    def stop_processes(self, grace: float = 5.0) -> None:
        """SIGTERM each process the lab started (its group), SIGKILL what is left after ``grace``."""
        live = []
        for pid in self.pids:
            recorded = self.pid_starts.get(str(pid))
            start = procs.start_time(pid)
            if start is None or (recorded is not None and start != recorded):
                procs.reap(pid)
                continue  # gone, or the PID now belongs to someone else
            procs.signal_group(pid, signal.SIGTERM)
            live.append(pid)
        deadline = time.monotonic() + grace
        for pid in live:
            if not procs.wait_exit(pid, deadline - time.monotonic()):
                procs.signal_group(pid, signal.SIGKILL)
                procs.wait_exit(pid, 2.0)
        self.pids.clear()
        self.pid_starts.clear()

    def secret_file(self, what: str) -> Path:
        """Where the lab keeps its ``what`` secret (one of SECRETS, made by lab/stack.py; gone with the lab)."""
        return STATE_DIR / f"{self.name}-{what}"

    def destroy(self) -> None:
        """Stop the lab's processes, delete its namespaces (and so its veths) and its state; idempotent."""
        self.stop_processes()
        ours = set(self.namespaces()) | {ns for ns in list_namespaces() if ns.startswith(self.prefix + "-")}
        errors = []
        for ns in sorted(ours):
            if not (NETNS_DIR / ns).exists():
                continue
            try:
                pnetns.remove(ns)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    errors.append(f"{ns}: {exc}")
        state.record(self.name).unlink(missing_ok=True)
        for what in SECRETS:
            self.secret_file(what).unlink(missing_ok=True)
        for link in self.impaired:
            for path in (impair.config_path(self, link), impair.stats_path(self, link)):
                path.unlink(missing_ok=True)
        if errors:
            raise LabError(f"tearing down lab {self.name}: {'; '.join(errors)}")

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def destroy(name: str) -> bool:
    """Tear down the lab recorded under ``name`` (from any process); False if no such lab is up."""
    try:
        lab = Lab.load(name)
    except LabError:
        return False
    lab.destroy()
    return True
