"""The edge agent daemon: owns one relay instance's data plane for its whole life.

With the XDP data plane (``datapath="xdp"``, the default) it attaches (or
re-attaches over) the XDP programs, adopts whatever the pinned maps already
hold (backends, sessions, flows, counters: no other persistence), serves the
control API and /metrics, and ages idle flows.  Stopping it leaves the programs
attached and the maps pinned by default, so a restart (or a crash) never
interrupts a call; ``detach_on_exit`` is for labs and tests that want the host
clean.

With ``datapath="userspace"`` it runs the relay of ``edge/userspace.py`` on its
event loop instead: nothing is compiled, loaded or attached (bcc is never
imported), no MAC is resolved (the kernel routes both sides), and the relay's
state lives and dies with the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from splitrelay.edge import neighbours
from splitrelay.edge.backend_sources import BackendFollower, BackendSpec, file_reader, kubernetes_reader
from splitrelay.edge.control import ControlAPI, off_loop
from splitrelay.edge.datapath import (
    FORBIDDEN_IFACES,
    PIN_ROOT,
    POLICIES,
    Backend,
    Datapath,
    DatapathError,
    RelayConfig,
)
from splitrelay.edge.metrics import EdgeMetrics
from splitrelay.edge.userspace import KIND, NO_MAC, UserspaceDatapath, interface_addresses

log = logging.getLogger(__name__)

DATAPATHS = ("xdp", "userspace")
MIN_IDLE_S = 15.0  # consent checks come every ~5 s (RFC 7675): never age a live flow
MIN_AGEING_INTERVAL_S = 0.05


def next_hop_mac(ip: str, ifname: str, timeout: float) -> str:
    """MAC of the next hop ``ip`` on ``ifname``: the one place the agent asks for a neighbour.

    Raises with a one-line reason (``neighbours.NeighbourError``) when the host does
    not answer within ``timeout``.
    """
    return neighbours.resolve(ip, ifname, timeout=timeout)


@dataclass
class AgentConfig:
    public_iface: str
    internal_iface: str
    public_ip4: str | None = None
    public_ip6: str | None = None
    relay_port: int = 3478
    gateway_ip: str | None = None
    gateway_mac: str | None = None
    policy: str = "strict"
    instance: str = "default"
    pin_root: str = PIN_ROOT
    listen_host: str = "127.0.0.1"
    listen_port: int = 8470                 # 0 = an ephemeral port (read EdgeAgent.port after start)
    token: str | None = None
    idle_timeout_s: float = 30.0
    ageing_interval_s: float = 2.0
    neighbour_timeout_s: float = 1.5        # a backend PUT answers 422 before a 2 s client gives up
    gateway_timeout_s: float = 3.0
    mode: str = "auto"
    detach_on_exit: bool = False
    max_session_flows: int = 4
    hint_key: bytes | None = None
    backends_file: str | None = None      # follow a JSON backend table
    k8s_service: str | None = None        # follow the endpoints of namespace/service
    k8s_api: str | None = None            # API URL when not in a pod (tests, out-of-cluster)
    k8s_token: str | None = None
    datapath: str = "xdp"                 # "xdp" | "userspace" (edge/userspace.py)
    internal_ip4: str | None = None       # userspace: where flow sockets bind (default: from internal_iface)
    internal_ip6: str | None = None
    max_flows: int | None = None          # flow table size (default: SR_MAX_FLOWS; userspace: fd-bounded)

    @property
    def userspace(self) -> bool:
        return self.datapath == "userspace"

    def __post_init__(self) -> None:
        if self.datapath not in DATAPATHS:
            raise DatapathError(f"datapath must be one of {', '.join(DATAPATHS)}, got {self.datapath!r}")
        if self.max_flows is not None and self.max_flows < 1:
            raise DatapathError(f"flow table size must be >= 1, got {self.max_flows}")
        if self.idle_timeout_s < MIN_IDLE_S:
            raise DatapathError(f"idle timeout must be >= {MIN_IDLE_S:.0f} s (consent checks every 5 s)")
        if not MIN_AGEING_INTERVAL_S <= self.ageing_interval_s <= self.idle_timeout_s / 2:
            raise DatapathError(f"ageing interval must be {MIN_AGEING_INTERVAL_S}..{self.idle_timeout_s / 2:g} s "
                                f"(half the idle timeout), got {self.ageing_interval_s}")
        for iface in (self.public_iface, self.internal_iface):
            if iface in FORBIDDEN_IFACES and not self.userspace:  # userspace only binds sockets
                raise DatapathError(f"refusing to attach XDP to {iface}: it is this host's own link")
        if not (self.gateway_ip or self.gateway_mac or self.userspace):
            raise DatapathError("the public side needs a next hop: give a gateway IP or MAC")
        if self.policy not in POLICIES:
            raise DatapathError(f"policy must be one of {sorted(POLICIES)}, got {self.policy!r}")
        if not 1 <= self.relay_port <= 65535:
            raise DatapathError(f"relay port must be 1..65535, got {self.relay_port}")
        if not 0 <= self.listen_port <= 65535:
            raise DatapathError(f"listen port must be 0..65535, got {self.listen_port}")
        if not (self.public_ip4 or self.public_ip6):
            raise DatapathError("a relay needs a public IPv4 or IPv6 address")
        for value, version in ((self.public_ip4, 4), (self.public_ip6, 6), (self.gateway_ip, None),
                               (self.internal_ip4, 4), (self.internal_ip6, 6)):
            if value is None:
                continue
            try:
                addr = ipaddress.ip_address(value)
            except ValueError:
                raise DatapathError(f"not an IP address: {value!r}") from None
            if version and addr.version != version:
                raise DatapathError(f"{value} is not an IPv{version} address")


def _iface_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


class EdgeAgent:
    """One relay instance: ``attach()`` alone (``edge attach``) or ``start()``/``stop()`` (``edge serve``)."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.boot_id = secrets.token_hex(8)  # new on every start: transceivers re-register when it changes
        self.datapath: Datapath | UserspaceDatapath
        if config.userspace:
            self.datapath = UserspaceDatapath(instance=config.instance, max_flows=config.max_flows,
                                              internal_ip4=config.internal_ip4, internal_ip6=config.internal_ip6)
        else:
            self.datapath = Datapath(instance=config.instance, pin_root=config.pin_root,
                                     max_flows=config.max_flows)
        self.metrics: EdgeMetrics | None = None
        self.api: ControlAPI | None = None
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []
        self._walker: ThreadPoolExecutor | None = None  # XDP: whole-table reads run here, off the loop
        self._attached = False  # this agent attached the programs (so detach_on_exit may remove them)

    # -- data plane --------------------------------------------------------------------

    def relay_config(self) -> RelayConfig:
        """The relay's config from the interfaces and the neighbour table (blocking)."""
        c = self.config
        if c.userspace:  # no Ethernet headers to write: no MACs
            return RelayConfig(
                relay_port=c.relay_port, public_mac=NO_MAC, gateway_mac=NO_MAC, public_ip4=c.public_ip4,
                public_ip6=c.public_ip6, policy=c.policy, max_session_flows=c.max_session_flows,
                hint_key=c.hint_key,
            )
        gateway_mac = c.gateway_mac or next_hop_mac(c.gateway_ip, c.public_iface, c.gateway_timeout_s)
        return RelayConfig(
            relay_port=c.relay_port, public_mac=neighbours.interface_mac(c.public_iface),
            gateway_mac=gateway_mac, public_ip4=c.public_ip4, public_ip6=c.public_ip6, policy=c.policy,
            max_session_flows=c.max_session_flows, hint_key=c.hint_key,
        )

    def attach(self) -> str:
        """Load (adopting pinned maps), configure and attach; returns the XDP mode used
        (``"userspace"`` for the userspace relay, which is only configured here: ``start`` binds it).

        Everything that can fail for a reason the operator can fix (a missing
        interface, an unresolvable gateway, a bad config) fails before anything is
        loaded, pinned or attached; the config is written before the programs are
        attached, so they never run on a half-configured relay.
        """
        c = self.config
        for iface in (c.public_iface, c.internal_iface):
            if not _iface_exists(iface):
                raise DatapathError(f"no interface named {iface!r} in this network namespace")
        relay = self.relay_config()
        if c.userspace:
            self._prepare_userspace(relay)
            return KIND
        self.datapath.load()
        self.datapath.configure(relay)
        mode = self.datapath.attach(c.public_iface, c.internal_iface, mode=c.mode)
        self._attached = True
        return mode

    def _prepare_userspace(self, relay: RelayConfig) -> None:
        """Configure the userspace relay (blocking: reads the internal interface's addresses).

        Flow sockets bind to the internal address of their family, so backends see (and
        answer) the relay's internal address; without one the kernel picks the source.
        """
        c = self.config
        dp = self.datapath
        found = interface_addresses(c.internal_iface)
        dp.internal_ips[socket.AF_INET] = c.internal_ip4 or found.get(4)
        dp.internal_ips[socket.AF_INET6] = c.internal_ip6 or found.get(6)
        for family, public in ((socket.AF_INET, c.public_ip4), (socket.AF_INET6, c.public_ip6)):
            if public and not dp.internal_ips[family]:
                log.warning("%s has no IPv%d address: IPv%d flows leave from whatever source the kernel picks",
                            c.internal_iface, 4 if family == socket.AF_INET else 6,
                            4 if family == socket.AF_INET else 6)
        dp.configure(relay)

    def health(self) -> dict:
        c = self.config
        return {"boot_id": self.boot_id, "instance": c.instance, "relay_port": c.relay_port,
                "public_ip": c.public_ip4 or c.public_ip6, "policy": c.policy, "datapath": c.datapath}

    def resolve_backend_mac(self, ip: str) -> str:
        if self.config.userspace:  # the kernel routes: only check that it can
            return self.datapath.route_check(ip)
        return next_hop_mac(ip, self.config.internal_iface, self.config.neighbour_timeout_s)

    # -- daemon ------------------------------------------------------------------------

    async def start(self) -> None:
        """Attach, serve the control API and /metrics, start ageing. On failure nothing keeps running."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        c = self.config
        loop = asyncio.get_running_loop()
        mode = await loop.run_in_executor(None, self.attach)
        if c.userspace:
            bound = self.datapath.start(loop)
            self._attached = True
            where = ", ".join(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip, port in bound)
            internal = ", ".join(ip for ip in self.datapath.internal_ips.values() if ip) or "kernel-chosen"
            plane = f"userspace relay on {where}, flows from {internal}"
        else:
            plane = f"XDP {mode} on {c.public_iface}/{c.internal_iface}"
        info = [(a.ifname, a.program, a.mode) for a in self.datapath.attachments]
        self.metrics = EdgeMetrics(self.datapath, info, kind=c.datapath)
        if c.userspace:
            internal_mac = NO_MAC
        else:
            internal_mac = await loop.run_in_executor(None, neighbours.interface_mac, c.internal_iface)
        if not c.userspace:  # the userspace relay's tables live on the loop: they are read there
            self._walker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flow-table")
        self.api = ControlAPI(
            self.datapath, resolve_mac=self.resolve_backend_mac, relay_mac=internal_mac, token=c.token,
            health=self.health, observe=self.metrics.observe_request, walker=self._walker,
        )
        app = self.api.app([web.get("/metrics", self._metrics)])
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, c.listen_host, c.listen_port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._tasks.append(asyncio.create_task(self._age_forever(), name="flow-ageing"))
        for follower in self._backend_followers(internal_mac):
            self._tasks.append(asyncio.create_task(follower.run(), name=f"backends {follower.name}"))
        log.info("edge agent %s (boot %s): %s; adopted %d backends, %d sessions, %d flows; "
                 "control on %s:%d", c.instance, self.boot_id, plane,
                 len(self.datapath.backends()), len(self.datapath.sessions()), len(self.datapath.flows()),
                 c.listen_host, self.port)

    def _backend_followers(self, internal_mac: str) -> list[BackendFollower]:
        c = self.config
        loop = asyncio.get_running_loop()

        async def apply(spec: BackendSpec) -> None:
            mac = await loop.run_in_executor(None, self.resolve_backend_mac, spec.ip or spec.ip6)
            self.datapath.set_backend(Backend(spec.backend_id, spec.port, mac, internal_mac,
                                              ip4=spec.ip, ip6=spec.ip6))

        async def remove(backend_id: int) -> None:
            self.datapath.del_backend(backend_id)

        followers = []
        if c.backends_file:
            followers.append(BackendFollower(file_reader(c.backends_file), apply, remove, name=c.backends_file))
        if c.k8s_service:
            reader = kubernetes_reader(c.k8s_service, api=c.k8s_api, token=c.k8s_token)
            followers.append(BackendFollower(reader, apply, remove, name=f"kubernetes {c.k8s_service}"))
        return followers

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await off_loop(self._walker, self.metrics.exposition)  # it counts the flows: a table read
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def age_once(self) -> int:
        """One ageing pass: remove flows idle longer than the idle timeout; returns how many went."""
        try:
            removed = self.datapath.age_flows(self.config.idle_timeout_s)
        except Exception:
            self.metrics.ageing_errors.inc()
            raise
        self.metrics.ageing_runs.inc()
        self.metrics.aged_flows.inc(removed)
        return removed

    async def _age_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.ageing_interval_s)
            try:
                removed = await off_loop(self._walker, self.age_once)  # the table-walker thread, not the loop
            except Exception as exc:  # noqa: BLE001 - one bad pass must not end ageing for good
                log.warning("flow ageing failed: %s", exc)
                continue
            if removed:
                log.info("aged out %d idle flows", removed)

    async def stop(self) -> None:
        """Stop serving and ageing; idempotent. The data plane keeps running unless detach_on_exit."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._runner:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        if self._walker is not None:  # a walk in progress finishes before the maps may go
            walker, self._walker = self._walker, None
            await asyncio.get_running_loop().run_in_executor(None, walker.shutdown)
        if self.config.userspace:
            # the relay lives in this process: its sockets close with it, whatever detach_on_exit says
            if self._attached:
                self._attached = False
                self.datapath.close()
                log.info("userspace relay of %s stopped: its flows and sessions are gone", self.config.instance)
        elif self.config.detach_on_exit and self._attached:
            # only what this agent attached: a failed start (say, maps pinned by another build)
            # must not wipe a relay it never owned
            self._attached = False
            self.datapath.destroy([self.config.public_iface, self.config.internal_iface])
            log.info("detached XDP and removed pinned maps of %s", self.config.instance)
        elif self._attached:
            log.info("left XDP attached and maps pinned (%s): a restarted agent adopts them",
                     self.datapath.pin_dir)
