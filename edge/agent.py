"""The edge agent daemon: owns one relay instance's data plane for its whole life.

It attaches (or re-attaches over) the XDP programs, adopts whatever the pinned
maps already hold, serves the control API and /metrics, and ages idle flows.
Stopping it leaves the programs attached and the maps pinned by default, so a
restart (or a crash) never interrupts a call; ``detach_on_exit`` is for labs
and tests that want the host clean.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from splitrelay.edge import neighbours
from splitrelay.edge.backend_sources import BackendFollower, BackendSpec, file_reader, kubernetes_reader
from splitrelay.edge.control import ControlAPI
from splitrelay.edge.datapath import FORBIDDEN_IFACES, Backend, Datapath, DatapathError, RelayConfig
from splitrelay.edge.metrics import EdgeMetrics

log = logging.getLogger(__name__)

MIN_IDLE_S = 15.0  # consent checks come every ~5 s (RFC 7675): never age a live flow


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
    listen_host: str = "127.0.0.1"
    listen_port: int = 8470
    token: str | None = None
    idle_timeout_s: float = 30.0
    ageing_interval_s: float = 2.0
    mode: str = "auto"
    detach_on_exit: bool = False
    max_session_flows: int = 4
    hint_key: bytes | None = None
    backends_file: str | None = None      # follow a JSON backend table
    k8s_service: str | None = None        # follow the endpoints of namespace/service
    k8s_api: str | None = None            # API URL when not in a pod (tests, out-of-cluster)
    k8s_token: str | None = None

    def __post_init__(self) -> None:
        if self.idle_timeout_s < MIN_IDLE_S:
            raise DatapathError(f"idle timeout must be >= {MIN_IDLE_S:.0f} s (consent checks every 5 s)")
        for iface in (self.public_iface, self.internal_iface):
            if iface in FORBIDDEN_IFACES:
                raise DatapathError(f"refusing to attach XDP to {iface}: it is this host's own link")
        if not (self.gateway_ip or self.gateway_mac):
            raise DatapathError("the public side needs a next hop: give a gateway IP or MAC")


def _iface_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


class EdgeAgent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.boot_id = secrets.token_hex(8)
        self.datapath = Datapath(instance=config.instance)
        self.metrics: EdgeMetrics | None = None
        self._runner: web.AppRunner | None = None
        self._ageing: asyncio.Task | None = None
        self.port: int | None = None

    def attach(self) -> str:
        c = self.config
        for iface in (c.public_iface, c.internal_iface):  # before anything is loaded or pinned
            if not _iface_exists(iface):
                raise DatapathError(f"no interface named {iface!r} in this network namespace")
        self.datapath.load()
        mode = self.datapath.attach(c.public_iface, c.internal_iface, mode=c.mode)
        gateway_mac = c.gateway_mac or neighbours.resolve(c.gateway_ip, c.public_iface)
        self.datapath.configure(RelayConfig(
            relay_port=c.relay_port, public_mac=neighbours.interface_mac(c.public_iface),
            gateway_mac=gateway_mac, public_ip4=c.public_ip4, public_ip6=c.public_ip6, policy=c.policy,
            max_session_flows=c.max_session_flows, hint_key=c.hint_key,
        ))
        return mode

    def health(self) -> dict:
        c = self.config
        return {"boot_id": self.boot_id, "instance": c.instance, "relay_port": c.relay_port,
                "public_ip": c.public_ip4 or c.public_ip6, "policy": c.policy}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        mode = await loop.run_in_executor(None, self.attach)
        info = [(a.ifname, a.program, a.mode) for a in self.datapath.attachments]
        self.metrics = EdgeMetrics(self.datapath, info)
        internal_mac = await loop.run_in_executor(None, neighbours.interface_mac, self.config.internal_iface)
        api = ControlAPI(
            self.datapath,
            resolve_mac=lambda ip: neighbours.resolve(ip, self.config.internal_iface),
            relay_mac=internal_mac, token=self.config.token, health=self.health,
            observe=self.metrics.observe_request,
        )
        app = api.app([web.get("/metrics", self._metrics)])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.listen_host, self.config.listen_port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self._ageing = asyncio.create_task(self._age_forever())
        self._followers = [asyncio.create_task(f.run()) for f in await self._backend_followers(internal_mac)]
        log.info("edge agent %s: XDP %s on %s/%s, %d sessions and %d flows adopted, control on %s:%d",
                 self.config.instance, mode, self.config.public_iface, self.config.internal_iface,
                 len(self.datapath.sessions()), len(self.datapath.flows()),
                 self.config.listen_host, self.port)

    async def _backend_followers(self, internal_mac: str) -> list[BackendFollower]:
        c = self.config
        loop = asyncio.get_running_loop()

        async def apply(spec: BackendSpec) -> None:
            mac = await loop.run_in_executor(None, neighbours.resolve, spec.ip or spec.ip6, c.internal_iface)
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
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _age_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.ageing_interval_s)
            removed = self.datapath.age_flows(self.config.idle_timeout_s)
            self.metrics.ageing_runs.inc()
            self.metrics.aged_flows.inc(removed)
            if removed:
                log.info("aged out %d idle flows", removed)

    async def stop(self) -> None:
        if self._ageing:
            self._ageing.cancel()
        for task in getattr(self, "_followers", []):
            task.cancel()
        if self._runner:
            await self._runner.cleanup()
        if self.config.detach_on_exit:
            self.datapath.destroy([self.config.public_iface, self.config.internal_iface])
            log.info("detached XDP and removed pinned maps of %s", self.config.instance)
        else:
            log.info("left XDP attached and maps pinned (%s): a restarted agent adopts them",
                     self.datapath.pin_dir)
