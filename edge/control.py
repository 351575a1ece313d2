"""The edge agent's control API: how transceivers and operators change the relay's maps.

Every request is validated completely before anything is written, so a bad
request answers 4xx with one line and never alters a registered backend or
session.  Routes are listed in docs/DESIGN.md.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from splitrelay.edge.datapath import Backend, Datapath, DatapathError
from splitrelay.edge.hint import MAX_BACKEND_ID

UFRAG_RE = re.compile(r"^[A-Za-z0-9+/]{4,32}$")
OPEN_PATHS = {"/metrics", "/v1/health"}
MAX_BODY = 16 * 1024


class BadRequest(web.HTTPException):
    def __init__(self, status: int, message: str) -> None:
        self.status_code = status
        super().__init__(text=json.dumps({"error": message}), content_type="application/json")


def _backend_id(raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_BACKEND_ID:
        raise BadRequest(400, f"backend id must be an integer 1..{MAX_BACKEND_ID}")
    return int(raw)


def _ufrag(raw: str) -> str:
    if not UFRAG_RE.match(raw):
        raise BadRequest(400, "ufrag must be 4..32 ice-chars (A-Z a-z 0-9 + /)")
    return raw


async def _json_object(request: web.Request) -> dict[str, Any]:
    if request.content_length and request.content_length > MAX_BODY:
        raise BadRequest(413, f"body larger than {MAX_BODY} bytes")
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest(400, "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest(400, "body must be a JSON object")
    return body


def _int_field(body: dict, name: str, low: int, high: int, required: bool = True) -> int | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if type(value) is not int or not low <= value <= high:
        raise BadRequest(400, f"'{name}' must be an integer {low}..{high}")
    return value


def _ip_field(body: dict, name: str, version: int, required: bool) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    try:
        addr = ipaddress.ip_address(value) if isinstance(value, str) else None
    except ValueError:
        addr = None
    if addr is None or addr.version != version:
        raise BadRequest(400, f"'{name}' must be an IPv{version} address")
    return str(addr)


class ControlAPI:
    """Routes of the control API over one Datapath; ``resolve_mac(ip)`` finds next hops."""

    def __init__(
        self,
        datapath: Datapath,
        resolve_mac: Callable[[str], str],
        relay_mac: str,
        token: str | None = None,
        health: Callable[[], dict] | None = None,
        observe: Callable[[str, str, int, float], None] | None = None,
    ) -> None:
        self.dp = datapath
        self.resolve_mac = resolve_mac
        self.relay_mac = relay_mac
        self.token = token
        self.health_info = health or (dict)
        self.observe = observe
        self.instances: dict[int, str] = {}  # backend id -> the process that registered it last

    def app(self, extra_routes: list[web.RouteDef] | None = None) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=MAX_BODY)
        app.add_routes([
            web.get("/v1/health", self.health),
            web.get("/v1/backends", self.list_backends),
            web.put("/v1/backends/{id}", self.put_backend),
            web.delete("/v1/backends/{id}", self.delete_backend),
            web.get("/v1/sessions", self.list_sessions),
            web.put("/v1/sessions/{ufrag:.+}", self.put_session),
            web.delete("/v1/sessions/{ufrag:.+}", self.delete_session),
            web.get("/v1/flows", self.list_flows),
            web.get("/v1/stats", self.stats),
        ] + (extra_routes or []))
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[..., Awaitable[web.StreamResponse]]):
        start = time.perf_counter()
        status = 500
        try:
            if self.token and request.path not in OPEN_PATHS:
                offered = request.headers.get("Authorization", "")
                if not hmac.compare_digest(offered.encode(), f"Bearer {self.token}".encode()):
                    raise BadRequest(401, "missing or wrong bearer token")
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            if not isinstance(exc, BadRequest) and exc.status >= 400:
                raise BadRequest(exc.status, exc.reason) from None
            raise
        except DatapathError as exc:
            status = 422
            raise BadRequest(422, str(exc)) from None
        finally:
            if self.observe:
                route = request.match_info.route.resource
                template = route.canonical if route is not None else "unmatched"
                self.observe(request.method, template, status, time.perf_counter() - start)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", **self.health_info()})

    @staticmethod
    def _backend_json(b: Backend) -> dict:
        return {"id": b.backend_id, "ip": b.ip4, "ip6": b.ip6, "port": b.port, "mac": b.dmac}

    async def list_backends(self, request: web.Request) -> web.Response:
        return web.json_response([self._backend_json(b) for b in self.dp.backends()])

    async def put_backend(self, request: web.Request) -> web.Response:
        backend_id = _backend_id(request.match_info["id"])
        body = await _json_object(request)
        ip4 = _ip_field(body, "ip", 4, required=False)
        ip6 = _ip_field(body, "ip6", 6, required=False)
        if not ip4 and not ip6:
            raise BadRequest(400, "a backend needs 'ip' (IPv4) or 'ip6'")
        port = _int_field(body, "port", 1, 65535)
        instance = body.get("instance")
        if instance is not None and (not isinstance(instance, str) or not 1 <= len(instance) <= 64):
            raise BadRequest(400, "'instance' must be a string of 1..64 characters")
        try:
            # neighbour resolution blocks (and pyroute2 runs its own loop): keep it off ours
            mac = await asyncio.get_running_loop().run_in_executor(None, self.resolve_mac, ip4 or ip6)
        except Exception as exc:  # noqa: BLE001 - NeighbourError and friends, one line to the caller
            raise BadRequest(422, f"cannot reach backend {ip4 or ip6}: {exc}") from None
        backend = Backend(backend_id, port, mac, self.relay_mac, ip4=ip4, ip6=ip6)
        existed = self.dp.backend(backend_id) is not None
        previous = self.instances.get(backend_id)
        if existed and instance and previous and previous != instance:
            # a new process behind the same backend: the old one died with its sessions
            self._drop_sessions_of(backend_id)
        if instance:
            self.instances[backend_id] = instance
        self.dp.set_backend(backend)
        return web.json_response(self._backend_json(backend), status=200 if existed else 201)

    def _drop_sessions_of(self, backend_id: int) -> None:
        for session in self.dp.sessions():
            if session.backend_id == backend_id:
                self.dp.del_session(session.ufrag)
        for flow in self.dp.flows():
            if flow.backend_id == backend_id:
                self.dp.del_flow((flow.client_ip, flow.client_port))

    async def delete_backend(self, request: web.Request) -> web.Response:
        if not self.dp.del_backend(_backend_id(request.match_info["id"])):
            raise BadRequest(404, "no such backend")
        return web.Response(status=204)

    async def list_sessions(self, request: web.Request) -> web.Response:
        now = time.monotonic_ns()
        flows: dict[str, int] = {}
        for f in self.dp.flows():
            flows[f.ufrag] = flows.get(f.ufrag, 0) + 1
        return web.json_response([
            {"ufrag": s.ufrag, "backend": s.backend_id, "age_s": round((now - s.created_ns) / 1e9, 3),
             "flows": flows.get(s.ufrag, 0), "flows_opened": s.flows}
            for s in self.dp.sessions()
        ])

    async def put_session(self, request: web.Request) -> web.Response:
        ufrag = _ufrag(request.match_info["ufrag"])
        body = await _json_object(request)
        backend_id = _int_field(body, "backend", 1, MAX_BACKEND_ID)
        if self.dp.backend(backend_id) is None:
            raise BadRequest(409, f"backend {backend_id} is not registered")
        existing = self.dp.session(ufrag)
        if existing is not None:
            if existing.backend_id != backend_id:
                raise BadRequest(409, f"ufrag is owned by backend {existing.backend_id}")
            return web.json_response({"ufrag": ufrag, "backend": backend_id}, status=200)
        self.dp.set_session(ufrag, backend_id)
        return web.json_response({"ufrag": ufrag, "backend": backend_id}, status=201)

    async def delete_session(self, request: web.Request) -> web.Response:
        if not self.dp.del_session(_ufrag(request.match_info["ufrag"])):
            raise BadRequest(404, "no such session")
        return web.Response(status=204)

    async def list_flows(self, request: web.Request) -> web.Response:
        raw = request.query.get("limit", "1000")
        if not raw.isdigit() or not 1 <= int(raw) <= 1_000_000:
            raise BadRequest(400, "limit must be an integer 1..1000000")
        now = time.monotonic_ns()
        return web.json_response([
            {"client": f.client, "backend": f.backend_id, "ufrag": f.ufrag,
             "age_s": round((now - f.created_ns) / 1e9, 3), "idle_s": round((now - f.last_seen_ns) / 1e9, 3),
             "packets": f.packets, "bytes": f.bytes, "rx_packets": f.rx_packets, "rx_bytes": f.rx_bytes}
            for f in self.dp.flows(limit=int(raw))
        ])

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"counters": [
            {"name": name, "direction": c.spec.direction, "verdict": c.spec.verdict,
             "reason": c.spec.reason, "packets": c.packets, "bytes": c.bytes}
            for name, c in self.dp.counters().items()
        ]})
