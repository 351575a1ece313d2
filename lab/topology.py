"""A relay network on one machine: client, relay and transceiver hosts as network namespaces.

(Over 400 lines on purpose: this docstring is the topology's one description, and the Lab
dataclass's build, process and teardown steps share its state; netlink steps are lab/links.py.)

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
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute, netns as pnetns

from splitrelay import defaults
from splitrelay.lab import addresses, impair, procs, router as routing
from splitrelay.lab.impair import Impairment
from splitrelay.lab.router import ROUTED_NEEDS_TRANSLATE, Router
from splitrelay.lab import links
from splitrelay.lab.links import set_sysctls
from splitrelay.lab.netns import (AF_INET, AF_INET6, NETNS_DIR, LabError, in_netns, list_namespaces, netns_path,
                                  netns_socket, nsenter_argv)

log = logging.getLogger(__name__)

STATE_DIR = Path(os.environ.get("SPLITRELAY_LAB_DIR", "/run/splitrelay/labs"))
DEFAULT_STEM = "sr"
STEM_ENV = "SPLITRELAY_LAB_STEM"
# per lab, made by lab/stack.py: signs offer tokens, opens admin listeners, the agents' master control token
SECRETS = ("whip.key", "admin.token", "control.key")
BACKEND_TABLE = 100
BACKEND_PORT = 5000     # every transceiver's one UDP socket (lab/stack.py starts them on it)
MAX_TRANSCEIVERS = 50

IFF_LOWER_UP = 1 << 16

T = TypeVar("T")


# -- the lab ---------------------------------------------------------------------------------

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
    signal_ip6: str = ""
    signal_ifname: str = "sig0"
    signal_mac: str = ""


@dataclass
class Relay:
    """One relay host: its public side, its internal side, and the client's end of its public link."""

    index: int
    public: Host
    internal: Host
    client: Host

    @property
    def netns(self) -> str:
        return self.public.netns

    @property
    def switch_port(self) -> str:
        """Its internal veth's end in the switch namespace (on the bridge br0)."""
        return "rint" if self.index == 1 else f"r{self.index}int"

    @property
    def link(self) -> str:
        """The name of the client's link to it, as impairments name it."""
        return f"relay{self.index}"


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
            lab._build()
            for link, impairment in impaired.items():
                lab._start_impairment(link, impairment)
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
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        plan = addresses.choose()
        for _ in range(32):
            prefix = stem + secrets.token_hex(3)
            if any(ns.startswith(prefix + "-") for ns in list_namespaces()):
                continue
            lab = cls._plan(prefix, name or prefix, transceivers, relay_port, plan, relays, routed)
            lab.impaired = {link: {"netns": f"{prefix}-imp" if link == "relay1" else f"{prefix}-i{link[5:]}",
                                   "pid": 0} for link in impaired}
            try:
                fd = os.open(STATE_DIR / f"{lab.name}.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if name is not None:
                    raise LabError(f"a lab named {name!r} is already up (splitrelay lab down --name {name})") \
                        from None
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(lab.to_json(), f, indent=2)
            return lab
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

    def _build(self) -> None:
        for ns in self.namespaces():
            try:
                pnetns.create(ns)
            except FileExistsError:
                raise LabError(f"namespace {ns} already exists") from None
        cli, sw = self.client.netns, self.switch_netns
        no_ipv6 = {"net/ipv6/conf/all/disable_ipv6": "1", "net/ipv6/conf/default/disable_ipv6": "1"}

        # kernel settings before any interface exists, so per-interface defaults follow them
        for ns in [sw, *(link["netns"] for link in self.impaired.values())]:
            set_sysctls(ns, no_ipv6)
        if self.router:
            set_sysctls(self.router.netns, routing.FORWARDING)
        for r in self.relays:
            set_sysctls(r.netns, {"net/ipv4/ip_forward": "0", "net/ipv6/conf/all/forwarding": "0",
                                  "net/ipv6/conf/default/forwarding": "0"})

        def switch_bridges(ipr: IPRoute) -> None:
            links.up(ipr, "lo")
            for bridge in ("br0", "sig", *([routing.BRIDGE] if self.router else [])):
                ipr.link("add", ifname=bridge, kind="bridge", br_forward_delay=0, br_stp_state=0,
                         br_mcast_snooping=0)  # a plain switch: flood, learn unicast MACs

        links.netlink(sw, switch_bridges)
        # every veth is created with both ends already in their namespaces
        for r in self.relays:
            imp = self.impaired.get(r.link, {}).get("netns")
            if imp:   # client -- ia [impairment forwarder] ib -- relay: a transparent L2 wire
                self._veth(cli, r.client.ifname, imp, "ia")
                self._veth(imp, "ib", r.netns, r.public.ifname)
                links.netlink(imp, lambda ipr: (links.up(ipr, "ia"), links.up(ipr, "ib")))
            else:
                self._veth(cli, r.client.ifname, r.netns, r.public.ifname)
            self._veth(r.netns, r.internal.ifname, sw, r.switch_port)
        self._veth(cli, "s0", sw, "scli")
        for own, (port, _) in routing.SWITCH_PORTS.items() if self.router else ():
            self._veth(self.router.netns, own, sw, port)
        for t in self.transceivers:
            self._veth(t.netns, t.ifname, sw, f"t{t.index}m")
            self._veth(t.netns, t.signal_ifname, sw, f"t{t.index}s")

        def switch_ports(ipr: IPRoute) -> None:
            ports = {r.switch_port: "br0" for r in self.relays}
            ports["scli"] = "sig"
            media = routing.BRIDGE if self.router else "br0"   # a routed lab's transceivers: behind the router
            if self.router:
                ports.update(dict(routing.SWITCH_PORTS.values()))
            for t in self.transceivers:
                ports[f"t{t.index}m"] = media
                ports[f"t{t.index}s"] = "sig"
            for port, bridge in ports.items():
                ipr.link("set", index=links.index(ipr, port), master=links.index(ipr, bridge))
            for dev in (*dict.fromkeys(ports.values()), *ports):
                links.up(ipr, dev)

        links.netlink(sw, switch_ports)
        if self.router:
            routing.configure(self.router)
        # the transceivers' own network: on-link on their media link
        int4, int6 = self.networks["transceivers" if self.router else "internal"]

        def client(ipr: IPRoute) -> None:
            links.up(ipr, "lo")
            for r in self.relays:   # one link per relay, each on that relay's public network
                links.addresses(ipr, r.client, 24, 64)
                r.client.mac = links.mac(ipr, r.client.ifname)
            links.addresses(ipr, self.signal_host, 24, 64)
            ipr.route("add", dst="0.0.0.0/0", gateway=self.relay_public.ip4)      # relay 1 is the default
            ipr.route("add", family=AF_INET6, dst="::/0", gateway=self.relay_public.ip6)
            self.signal_host.mac = links.mac(ipr, "s0")

        links.netlink(cli, client)

        def relay(ipr: IPRoute, r: Relay) -> None:
            links.up(ipr, "lo")
            links.addresses(ipr, r.public, 24, 64)
            links.addresses(ipr, r.internal, 24, 64)
            # host firewall: the internal side (control API) is not reachable from the public side
            for family, own, bits in ((AF_INET, r.internal.ip4, 32), (AF_INET6, r.internal.ip6, 128)):
                ipr.rule("add", family=family, priority=10, iifname=r.public.ifname, dst=own,
                         dst_len=bits, action="FR_ACT_PROHIBIT")
                ipr.rule("add", family=family, priority=20, table=255)   # local, after the firewall rule
                ipr.rule("del", family=family, priority=0, table=255)
            r.public.mac = links.mac(ipr, r.public.ifname)
            r.internal.mac = links.mac(ipr, r.internal.ifname)
            if self.router:   # the transceivers' network is one hop away
                routing.route_via(ipr, self.networks["transceivers"], self.router.internal)

        for r in self.relays:
            links.netlink(r.netns, lambda ipr, r=r: relay(ipr, r))
        # each relay's public network is reached through that relay (replies leave the way they came)
        routed_via = [] if self.translate else [(self.public_network(r.index), r.internal) for r in self.relays]
        if self.router:   # the relays' internal network (their agents, their translated sources): the only route
            routed_via.append((self.networks["internal"], self.router.transceivers))

        def transceiver(ipr: IPRoute, t: Transceiver) -> None:
            links.up(ipr, "lo")
            links.addresses(ipr, t, 24, 64)
            links.addresses(ipr, Host(t.netns, t.signal_ifname, t.signal_ip4, t.signal_ip6), 24, 64)
            eth = links.index(ipr, t.ifname)
            for (pub4, pub6), via in routed_via:
                ipr.route("add", dst=pub4, gateway=via.ip4)
                ipr.route("add", family=AF_INET6, dst=pub6, gateway=via.ip6)
            # a backend address leaves only through a relay (or to the internal net), never otherwise
            for family, own, bits, net, default in ((AF_INET, t.ip4, 32, int4, "0.0.0.0/0"),
                                                    (AF_INET6, t.ip6, 128, int6, "::/0")):
                ipr.rule("add", family=family, priority=BACKEND_TABLE, src=own, src_len=bits,
                         table=BACKEND_TABLE)
                ipr.route("add", family=family, dst=net, oif=eth, table=BACKEND_TABLE)
                for nets, via in routed_via:
                    v6 = family == AF_INET6
                    ipr.route("add", family=family, dst=nets[v6], gateway=via.ip6 if v6 else via.ip4,
                              table=BACKEND_TABLE)
                ipr.route("add", family=family, dst=default, type="unreachable", table=BACKEND_TABLE)
            t.mac = links.mac(ipr, t.ifname)
            t.signal_mac = links.mac(ipr, t.signal_ifname)

        for t in self.transceivers:
            links.netlink(t.netns, lambda ipr, t=t: transceiver(ipr, t))
            for family in ("-4", "-6"):   # the backend port too: a socket bound to [::] picks no source
                procs.run(nsenter_argv(t.netns, ["ip", family, "rule", "add", "priority", str(BACKEND_TABLE),
                                                 "ipproto", "udp", "sport", str(BACKEND_PORT),
                                                 "lookup", str(BACKEND_TABLE)]))

        # offloads (ethtool has no netlink equivalent in pyroute2 that we rely on)
        gro = {(cli, r.client.ifname) for r in self.relays} | {(sw, r.switch_port) for r in self.relays}
        gro |= {(link["netns"], "ib") for link in self.impaired.values()}
        for ns, dev in self.veths():
            argv = ["ethtool", "-K", dev, "tx", "off"]
            if (ns, dev) in gro:
                argv += ["gro", "on"]  # frames XDP redirects into pub0/int0 arrive here
            procs.run(nsenter_argv(ns, argv))
        self._check_carrier()

    def _start_impairment(self, link: str, impairment: Impairment) -> None:
        """The forwarder of an impaired link, running once its stats file appears."""
        config, stats = impair.config_path(self, link), impair.stats_path(self, link)
        config.write_text(json.dumps(impairment.to_json()))
        proc = self.popen(self.impaired[link]["netns"], impair.argv(config, stats),
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.impaired[link]["pid"] = proc.pid
        self.save()
        deadline = time.monotonic() + 10.0
        while not stats.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                why = proc.stderr.read().strip() if proc.poll() is not None else "no stats after 10 s"
                raise LabError(f"impairment forwarder of link {link} did not start: {why}")
            time.sleep(0.02)

    def _veth(self, a_ns: str, a: str, b_ns: str, b: str) -> None:
        peer_ns = os.open(netns_path(b_ns), os.O_RDONLY | os.O_CLOEXEC)
        try:
            links.netlink(a_ns, lambda ipr: ipr.link("add", ifname=a, kind="veth",
                                                peer={"ifname": b, "net_ns_fd": peer_ns}))
        finally:
            os.close(peer_ns)

    def _check_carrier(self) -> None:
        """Every lab veth has carrier (veth raises it synchronously when both ends are up)."""
        missing = []
        for ns in dict.fromkeys(ns for ns, _ in self.veths()):
            up = links.netlink(ns, lambda ipr: {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()
                                           if link["flags"] & IFF_LOWER_UP})
            missing += [(n, dev) for n, dev in self.veths() if n == ns and dev not in up]
        if missing:
            raise LabError(f"no carrier on {missing}")

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
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = STATE_DIR / f".{self.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        tmp.replace(STATE_DIR / f"{self.name}.json")

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
        path = STATE_DIR / f"{name}.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise LabError(f"no lab named {name!r} is up") from None
        except json.JSONDecodeError as exc:
            raise LabError(f"lab state {path} is unreadable: {exc}") from None
        return cls.from_json(data)

    @staticmethod
    def names() -> list[str]:
        if not STATE_DIR.exists():
            return []
        return sorted(p.stem for p in STATE_DIR.glob("*.json"))

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
        (STATE_DIR / f"{self.name}.json").unlink(missing_ok=True)
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
