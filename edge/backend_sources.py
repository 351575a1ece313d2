"""Where an edge agent can learn its backend table besides the control API.

A relay needs no shared session state (the ufrag hint routes first packets),
but it must know its transceivers.  They can register themselves over the
control API, or the agent can follow a source of truth:

* a JSON file (``[{"id": 1, "ip": "10.0.0.11", "port": 5000, "ip6": null}, ...]``),
  reloaded whenever it changes;
* the Kubernetes API: the endpoints of the transceivers' Service, each pod's
  backend id taken from its IP exactly as ``transceiver serve --backend-id from-ip``
  does, so both sides agree without coordination.

A source only ever removes backends it added itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Awaitable, Callable

import aiohttp

from splitrelay.wire.hint import MAX_BACKEND_ID
from splitrelay.errors import SplitrelayError

log = logging.getLogger(__name__)
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class BackendSourceError(SplitrelayError):
    """A backend source could not be read (one-line reason)."""


@dataclass(frozen=True)
class BackendSpec:
    backend_id: int
    ip: str | None
    port: int
    ip6: str | None = None


def backend_id_from_ip(ip: str) -> int:
    """The low 18 bits of an IPv4 address: the id `--backend-id from-ip` gives a transceiver."""
    addr = ipaddress.ip_address(ip)
    if addr.version != 4 or not int(addr) & MAX_BACKEND_ID:
        raise BackendSourceError(f"{ip} gives no backend id (needs IPv4 with low 18 bits != 0)")
    return int(addr) & MAX_BACKEND_ID


def parse_backend_file(text: str) -> list[BackendSpec]:
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BackendSourceError(f"backends file is not JSON: {exc}") from None
    if not isinstance(entries, list):
        raise BackendSourceError("backends file must hold a JSON list")
    specs = []
    for n, entry in enumerate(entries):
        try:
            spec = BackendSpec(int(entry["id"]), entry.get("ip"), int(entry["port"]), entry.get("ip6"))
            if not 1 <= spec.backend_id <= MAX_BACKEND_ID or not 1 <= spec.port <= 65535:
                raise ValueError("id or port out of range")
            for ip in (spec.ip, spec.ip6):
                if ip is not None:
                    ipaddress.ip_address(ip)
            if spec.ip is None and spec.ip6 is None:
                raise ValueError("no address")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BackendSourceError(f"backends file entry {n}: {exc}") from None
        specs.append(spec)
    return specs


def parse_endpoints(doc: dict, port_name: str) -> list[BackendSpec]:
    specs = []
    for subset in doc.get("subsets") or []:
        ports = [p["port"] for p in subset.get("ports", []) if p.get("name") == port_name]
        if not ports:
            continue
        for address in subset.get("addresses") or []:  # ready endpoints only
            specs.append(BackendSpec(backend_id_from_ip(address["ip"]), address["ip"], ports[0]))
    return specs


class BackendFollower:
    """Polls a source and reconciles the backend table through ``apply``/``remove``."""

    def __init__(self, read: Callable[[], Awaitable[list[BackendSpec]]],
                 apply: Callable[[BackendSpec], Awaitable[None]], remove: Callable[[int], Awaitable[None]],
                 interval: float = 2.0, name: str = "source") -> None:
        self.read, self.apply, self.remove = read, apply, remove
        self.interval = interval
        self.name = name
        self.managed: dict[int, BackendSpec] = {}
        self.synced = asyncio.Event()

    async def sync_once(self) -> None:
        desired = {spec.backend_id: spec for spec in await self.read()}
        for backend_id, spec in desired.items():
            if self.managed.get(backend_id) != spec:
                await self.apply(spec)
                log.info("%s: backend %d -> %s:%d", self.name, backend_id, spec.ip or spec.ip6, spec.port)
        for backend_id in set(self.managed) - set(desired):
            await self.remove(backend_id)
            log.info("%s: backend %d removed", self.name, backend_id)
        self.managed = desired
        self.synced.set()

    async def run(self) -> None:
        while True:
            try:
                await self.sync_once()
            except Exception as exc:  # noqa: BLE001 - a bad read keeps the last good table
                log.warning("%s: %s", self.name, exc)
            await asyncio.sleep(self.interval)


def file_reader(path: str) -> Callable[[], Awaitable[list[BackendSpec]]]:
    async def read() -> list[BackendSpec]:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise BackendSourceError(f"cannot read {path}: {exc.strerror}") from None
        return parse_backend_file(text)

    return read


def tls_context(ca_file: str | None, insecure: bool) -> ssl.SSLContext | bool:
    """How the follower checks the API server: against ``ca_file``, else the system's CAs; never
    unchecked unless ``insecure`` (it would let anyone on the path hand the relay its backends)."""
    if insecure:
        return False
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise BackendSourceError(f"cannot load the Kubernetes CA {ca_file}: {exc}") from None


def kubernetes_reader(service: str, port_name: str = "media", api: str | None = None,
                      token: str | None = None, ca_file: str | None = None,
                      insecure: bool = False) -> Callable[[], Awaitable[list[BackendSpec]]]:
    """Endpoints of ``namespace/name``; in a pod, the API, credentials and CA come from its service account."""
    namespace, _, name = service.partition("/")
    if not namespace or not name:
        raise BackendSourceError(f"Kubernetes service must be namespace/name, got {service!r}")
    if api is None:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise BackendSourceError("not in a Kubernetes pod (no KUBERNETES_SERVICE_HOST); give --k8s-api")
        api = f"https://{host}:{port}"
        token = (SERVICE_ACCOUNT / "token").read_text().strip()
        ca_file = ca_file or str(SERVICE_ACCOUNT / "ca.crt")
    context = tls_context(ca_file, insecure)
    url = f"{api.rstrip('/')}/api/v1/namespaces/{namespace}/endpoints/{name}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def read() -> list[BackendSpec]:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
                async with http.get(url, headers=headers, ssl=context) as resp:
                    if resp.status != 200:
                        raise BackendSourceError(f"GET {url}: {resp.status}")
                    return parse_endpoints(await resp.json(), port_name)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise BackendSourceError(f"Kubernetes API {api} unreachable: {exc}") from None

    return read
