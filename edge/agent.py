"""The edge agent daemon: owns one relay instance's data plane for its whole life.

It builds one ``DataPlane`` (edge/plane.py) from its config, sets it up (the
XDP plane attaches, or re-attaches over, its programs and adopts whatever the
pinned maps already hold; the userspace plane binds its sockets on the loop),
serves the control API and /metrics over it, and ages idle flows (and the
sessions nobody hung up: no flow for ``session_idle_s`` while their backend has
stopped refreshing itself).  Which plane
it runs is decided once, in ``AgentConfig.plane()``; nothing after asks.
What stays when it stops is the plane's promise (``DataPlane.shutdown``).

/metrics never walks a table itself.  With XDP the ager's pass leaves the table
sizes behind (``TableSnapshot``: the flow count from its own walk, the session
count from ``age_sessions``'), and a scrape answers with those of the first pass
that last finished (at most one ageing interval old), plus the counter array read
on a thread of its own; concurrent scrapes share one answer.
So a scrape flood neither walks the flow map nor waits on, or delays, the
table-walker thread that ages flows and serves DELETEs (before, each scrape
counted the whole flow map on that thread, one walk per scrape).  The userspace
plane's sizes are len()s: read live.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

from aiohttp import web
from splitrelay import defaults
from prometheus_client import CONTENT_TYPE_LATEST
from splitrelay.edge.backend_sources import BackendFollower, BackendSpec, file_reader, kubernetes_reader
from splitrelay.edge.control import BACKEND_LIVE_S, ControlAPI
from splitrelay.edge.control_requests import BackendLimits
from splitrelay.edge.credentials import check_master
from splitrelay.edge import ice_tcp
from splitrelay.edge.ice_tcp_limits import IceTcpConfig
from splitrelay.edge.metrics import EdgeMetrics
from splitrelay.edge.plane import DataPlane, PlaneConfig
from splitrelay.edge import interfaces
from splitrelay.edge.records import Backend, DataPlaneError, check_range
from splitrelay.edge.session_deletions import off_loop
from splitrelay.edge.userspace.plane import UserspacePlane
from splitrelay.edge.xdp.plane import XdpPlane

log = logging.getLogger(__name__)

MIN_IDLE_S = 15.0  # consent checks come every ~5 s (RFC 7675): never age a live flow
MIN_AGEING_INTERVAL_S = 0.05


PLANES = {plane.kind: plane for plane in (XdpPlane, UserspacePlane)}   # by kind: defaults.PLANE_KINDS


@dataclass
class AgentConfig(PlaneConfig):
    """Every flag of ``edge serve``, flat (one per CLI option): the plane's (``PlaneConfig``, which holds
    the relay's settings) and the agent's own, each declared once."""

    listen_host: str = defaults.CONTROL_HOST
    listen_port: int = defaults.CONTROL_PORT   # 0 = an ephemeral port (read EdgeAgent.port after start)
    token: str | None = None
    idle_timeout_s: float = 30.0
    ageing_interval_s: float = 2.0
    backends_file: str | None = None      # follow a JSON backend table
    k8s_service: str | None = None        # follow the endpoints of namespace/service
    k8s_api: str | None = None            # API URL when not in a pod (tests, out-of-cluster)
    k8s_token: str | None = None
    k8s_ca_file: str | None = None        # verify the API's certificate with this CA (default: the system's)
    k8s_insecure: bool = False            # skip that verification (only when asked)
    backend_cidrs: tuple[str, ...] = ()   # where backends may be; empty: the internal interface's networks
    backend_ports: tuple[int, int] = (1, 65535)
    session_idle_s: float = 600.0         # a session with no flow this long, of a backend gone quiet, goes
    backend_live_s: float = BACKEND_LIVE_S
    plane_kind: str = defaults.PLANE      # "xdp" | "userspace" (PLANES)
    tcp_port: int = 0                     # ICE-TCP (edge/ice_tcp.py); `edge serve --tcp-port` defaults to 443
    tcp_max_connections: int = IceTcpConfig.max_connections
    tcp_max_per_source: int = IceTcpConfig.max_per_source

    def ice_tcp_config(self) -> IceTcpConfig:
        return IceTcpConfig(port=self.tcp_port, max_connections=self.tcp_max_connections,
                                    max_per_source=self.tcp_max_per_source, idle_s=self.idle_timeout_s)

    def plane_config(self) -> PlaneConfig:
        """What the plane is built with, and nothing of the agent's: a freed translation port waits
        twice the idle timeout, so a late reply never reaches its next client."""
        given = {f.name: getattr(self, f.name) for f in fields(PlaneConfig)}
        return PlaneConfig(**{**given, "port_quarantine_s": 2 * self.idle_timeout_s})

    def plane(self) -> DataPlane:
        """The data plane this config asks for: the one place that knows the kinds."""
        return PLANES[self.plane_kind](self.plane_config())

    def __post_init__(self) -> None:
        super().__post_init__()   # the relay's settings and the plane's
        if self.plane_kind not in PLANES:
            raise DataPlaneError(f"plane must be one of {', '.join(PLANES)}, got {self.plane_kind!r}")
        if self.idle_timeout_s < MIN_IDLE_S:
            raise DataPlaneError(f"idle timeout must be >= {MIN_IDLE_S:.0f} s (consent checks every 5 s)")
        if not MIN_AGEING_INTERVAL_S <= self.ageing_interval_s <= self.idle_timeout_s / 2:
            raise DataPlaneError(f"ageing interval must be {MIN_AGEING_INTERVAL_S}..{self.idle_timeout_s / 2:g} s "
                                f"(half the idle timeout), got {self.ageing_interval_s}")
        PLANES[self.plane_kind].check(self)
        self.ice_tcp_config().check()
        check_master(self.token, self.listen_host)
        check_range("backend ports", self.backend_ports)
        for cidr in self.backend_cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise DataPlaneError(f"not a network: {cidr!r}") from None
        if not self.session_idle_s > 0:
            raise DataPlaneError(f"session idle time must be > 0 s, got {self.session_idle_s:g}")
        if not 0 <= self.listen_port <= 65535:
            raise DataPlaneError(f"listen port must be 0..65535, got {self.listen_port}")


class TableSnapshot:
    """Table sizes as the ager last read them, for /metrics: a scrape never walks a table.

    ``passes`` numbers the ageing passes that left them: scrapes of one pass share an exposition."""

    def __init__(self) -> None:
        self.fill: dict[str, tuple[int, int]] | None = None
        self.passes = 0

    def map_fill(self) -> dict[str, tuple[int, int]]:
        if self.fill is None:
            raise DataPlaneError("no ageing pass has read the tables yet")
        return self.fill


class EdgeAgent:
    """One relay instance: ``attach()`` alone (``edge attach``) or ``start()``/``stop()`` (``edge serve``)."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.boot_id = secrets.token_hex(8)  # new on every start: transceivers re-register when it changes
        self.plane: DataPlane = config.plane()
        self.metrics: EdgeMetrics | None = None
        self.api: ControlAPI | None = None
        self.port: int | None = None
        self.ice_tcp: ice_tcp.IceTcpListener | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []
        self._walker: ThreadPoolExecutor | None = None  # whole-table reads run here when they block
        self._scraper: ThreadPoolExecutor | None = None  # /metrics reads counters here, never on the walker
        self._scrape: tuple[int, asyncio.Future] | None = None  # (pass it shows, its exposition): shared
        self.tables = TableSnapshot()
        self.session_quiet_since: dict[str, int] = {}    # ufrag -> monotonic ns it was first seen flowless
        self.limits: BackendLimits | None = None

    # -- data plane --------------------------------------------------------------------

    def attach(self) -> str:
        """Set the data plane up (``DataPlane.setup``); returns the mode it runs in.

        Everything that can fail for a reason the operator can fix (a missing
        interface, an unresolvable gateway, a bad config) fails before anything is
        loaded, pinned, attached or bound.
        """
        c = self.config
        for iface in (c.public_iface, c.internal_iface):
            if not interfaces.exists(iface):
                raise DataPlaneError(f"no interface named {iface!r} in this network namespace")
        return self.plane.setup()

    def health(self) -> dict:
        c = self.config
        ice_tcp_status = {"ice_tcp": self.ice_tcp.status()} if self.ice_tcp else {}
        return {"boot_id": self.boot_id, "instance": c.instance, "relay_port": c.relay_port,
                "public_ip": c.public_ip4 or c.public_ip6, "policy": c.policy, "datapath": self.plane.kind,
                **ice_tcp_status}

    def resolve_backend_mac(self, ip: str) -> str:
        return self.plane.next_hop_mac(ip)

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
        await loop.run_in_executor(None, self.attach)
        where = self.plane.activate(loop)
        info = [(a.ifname, a.program, a.mode) for a in self.plane.attachments]
        self.metrics = EdgeMetrics(self.plane, info, kind=self.plane.kind,
                                   tables=self.tables if self.plane.reads_block else None)
        internal_mac = await loop.run_in_executor(None, self.plane.internal_mac)
        networks = list(c.backend_cidrs) or await loop.run_in_executor(None, interfaces.networks, c.internal_iface)
        if not networks:
            raise DataPlaneError(f"{c.internal_iface} has no global address to take the backends' networks from: "
                                "give --backend-cidr")
        self.limits = BackendLimits(networks, c.backend_ports)
        self.ice_tcp = await ice_tcp.serve(
            self.plane, c.ice_tcp_config(), c.public_iface, c.internal_iface,
            {socket.AF_INET: c.public_ip4, socket.AF_INET6: c.public_ip6},
            {socket.AF_INET: c.internal_ip4, socket.AF_INET6: c.internal_ip6},
            c.translate_ports if c.translate else None, self.metrics.registry)
        if self.plane.reads_block:
            self._walker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flow-table")
            self._scraper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics")
        await off_loop(self._walker, self._read_tables)
        self.api = ControlAPI(
            self.plane, resolve_mac=self.resolve_backend_mac, relay_mac=internal_mac, token=c.token,
            health=self.health, observe=self.metrics.observe_request, walker=self._walker,
            limits=self.limits, backend_live_s=c.backend_live_s,
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
        fill = self.tables.map_fill()
        log.info("edge agent %s (boot %s): %s; adopted %d backends, %d sessions, %d flows; "
                 "control on %s:%d; backends allowed in %s, ports %d-%d", c.instance, self.boot_id, where,
                 fill["backends"][0], fill["sessions"][0], fill["flows"][0], c.listen_host, self.port,
                 ", ".join(networks), *c.backend_ports)

    def _backend_followers(self, internal_mac: str) -> list[BackendFollower]:
        c = self.config
        loop = asyncio.get_running_loop()

        async def apply(spec: BackendSpec) -> None:
            refusal = self.limits.refusal(spec.ip, spec.ip6, spec.port)
            if refusal:   # skipped, not fatal: the source's other backends still apply
                log.warning("backend %d from the backend source refused: %s", spec.backend_id, refusal)
                return
            mac = await loop.run_in_executor(None, self.resolve_backend_mac, spec.ip or spec.ip6)
            self.plane.set_backend(Backend(spec.backend_id, spec.port, mac, internal_mac,
                                              ip4=spec.ip, ip6=spec.ip6))

        async def remove(backend_id: int) -> None:
            self.plane.del_backend(backend_id)

        followers = []
        if c.backends_file:
            followers.append(BackendFollower(file_reader(c.backends_file), apply, remove, name=c.backends_file))
        if c.k8s_service:
            reader = kubernetes_reader(c.k8s_service, api=c.k8s_api, token=c.k8s_token,
                                       ca_file=c.k8s_ca_file, insecure=c.k8s_insecure)
            followers.append(BackendFollower(reader, apply, remove, name=f"kubernetes {c.k8s_service}"))
        return followers

    async def _metrics(self, request: web.Request) -> web.Response:
        """The counters and the table sizes the last ageing pass left (XDP; see the module doc).  It never
        waits for a pass: a scrape that waited for the next one took up to an ageing interval (0.56 s on a
        quiet lab, over 1 s loaded), past Prometheus's timeout at a 1 s interval.  Concurrent scrapes of
        the same pass share one exposition, read on the scrape thread."""
        shown = self.tables.passes
        if self._scrape is None or self._scrape[0] < shown or self._scrape[1].done():
            self._scrape = (shown, asyncio.ensure_future(off_loop(self._scraper, self.metrics.exposition)))
        body = await asyncio.shield(self._scrape[1])
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _read_tables(self, sessions: int | None = None) -> None:
        """Note the table sizes: the flows and sessions as this pass counted them, the small maps read."""
        if not self.plane.reads_block:   # the userspace plane: len()s, nothing to walk
            self.tables.fill = self.plane.map_fill()
            return
        known = {"flows": getattr(self.plane, "flows_after_ageing", None), "sessions": sessions}
        self.tables.fill = self.plane.map_fill({k: v for k, v in known.items() if v is not None})

    def age_once(self) -> int:
        """One ageing pass: remove flows idle longer than the idle timeout, then the sessions left behind
        (``age_sessions``), and note the table sizes for /metrics; returns how many flows went."""
        try:
            removed = self.plane.age_flows(self.config.idle_timeout_s)
            aged, sessions = self.age_sessions()
            self.metrics.aged_sessions.inc(aged)
            if self.plane.reads_block:
                self._read_tables(sessions)
        except Exception:
            self.metrics.ageing_errors.inc()
            raise
        self.metrics.ageing_runs.inc()
        self.metrics.aged_flows.inc(removed)
        return removed

    def age_sessions(self) -> tuple[int, int]:
        """Remove sessions with no flow for ``session_idle_s`` whose backend stopped refreshing itself;
        returns (how many went, how many stay).

        A live transceiver deletes its own sessions (its Registrar retries a failed DELETE); one
        that died, or a session registered by hand, leaves entries nobody removes: this is their
        end.  A live backend's flowless sessions stay (its ready ufrags wait for callers)."""
        now = time.monotonic_ns()
        limit = int(self.config.session_idle_s * 1e9)
        live = self.api.live_backends() if self.api else set()
        quiet, doomed = {}, []
        sessions = self.plane.sessions()
        for s in sessions:
            if s.flows:
                continue
            # first seen flowless by this pass (not its creation: a flow may have just aged out)
            since = quiet[s.ufrag] = self.session_quiet_since.get(s.ufrag, now)
            if now - since >= limit and s.backend_id not in live:
                doomed.append(s.ufrag)
        self.session_quiet_since = {u: t for u, t in quiet.items() if u not in doomed}
        if not doomed:
            return 0, len(sessions)
        gone = sum(self.plane.del_sessions(doomed).values())
        log.info("aged out %d sessions with no flow for %g s", gone, self.config.session_idle_s)
        return gone, len(sessions) - gone

    async def _age_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.ageing_interval_s)
            try:
                removed = await off_loop(self._walker, self.age_once)  # the table-walker thread, not the loop
            except Exception as exc:  # noqa: BLE001 - one bad pass must not end ageing for good
                log.warning("flow ageing failed: %s", exc)
                continue
            finally:
                self.tables.passes += 1
            if removed:
                log.info("aged out %d idle flows", removed)

    async def stop(self) -> None:
        """Stop serving and ageing; idempotent. What the plane keeps is its promise (``DataPlane.shutdown``)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.ice_tcp:
            listener, self.ice_tcp = self.ice_tcp, None
            await listener.stop()
        if self._runner:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        if self.api is not None:
            await self.api.deletions.close()
        if self._scrape is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._scrape[1]
        for name in ("_scraper", "_walker"):  # a read in progress finishes before the maps may go
            pool = getattr(self, name)
            setattr(self, name, None)
            if pool is not None:
                await asyncio.get_running_loop().run_in_executor(None, pool.shutdown)
        self.plane.shutdown()
