"""The edge agent's control API: how transceivers and operators change the relay's maps.

Every request is validated completely before anything is written, so a bad
request answers 4xx ``{"error": "<one line>"}`` and never alters a registered
backend or session.  Routes are listed in docs/DESIGN.md.

The handlers run on the event loop and touch the maps without awaiting between
the check and the write (the only await, next-hop resolution, comes before the
checks that depend on the maps), so two requests never interleave halfway.
What reads the whole flow table (listing, and finding a deleted session's flows)
runs in the agent's table-walker thread instead (``off_loop``), so a large table
never holds up a registration; a PUT of a ufrag whose DELETE is in progress
answers 409.

Authorization (edge/credentials.py, SECURITY.md): the master token opens
everything; a backend token opens only its own backend and that backend's
sessions (a pool token: the backend its caller's own address gives, registered
at that address).  The middleware finds who is asking (``request[PRINCIPAL]``); each
route says what it needs (``_admin``, ``_owner``).  Backend addresses must lie
in the configured networks and port range (``BackendLimits``), so a transceiver's
token cannot turn the relay into a forwarder toward any address it likes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor

from aiohttp import web
from splitrelay.bpf.consts import MAX_BACKEND_ID
from splitrelay.edge.control_requests import BACKEND_FIELDS, DIGITS_RE, MAX_BODY, SESSION_FIELDS, ApiError
from splitrelay.edge.control_requests import BackendLimits, checked_backend_id, checked_ufrag
from splitrelay.edge.control_requests import instance_field, int_field, ip_field, json_object
from splitrelay.edge.credentials import ADMIN, BackendRange, Credentials, Pool, covers
from splitrelay.edge.null_plane import NullPlane
from splitrelay.edge.plane import DataPlane
from splitrelay.edge.records import Backend, DataPlaneError, TableFullError
from splitrelay.edge.session_deletions import SessionDeletions, off_loop

log = logging.getLogger(__name__)

OPEN_PATHS = {"/metrics", "/v1/health"}
DEFAULT_FLOW_LIMIT = 1000
MAX_FLOW_LIMIT = 1_000_000
PRINCIPAL = web.RequestKey("principal", object)  # ADMIN, a backend id or range: who the middleware found asking
POOL_ADDRESS = web.RequestKey("pool_address", str)  # a pool token's caller: its backend must be at this address


def _ipv4_of(remote: str) -> ipaddress.IPv4Address | None:
    try:
        addr = ipaddress.ip_address(remote)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        return addr.ipv4_mapped
    return addr


def _id_of_address(remote: str) -> int | None:
    """The backend id ``--backend-id from-ip`` gives this IPv4 address (None: it gives none)."""
    addr = _ipv4_of(remote)
    return (int(addr) & MAX_BACKEND_ID or None) if addr is not None else None
BACKEND_LIVE_S = 30.0  # a backend refreshed this recently is live: another instance cannot take its id


def _age_s(now_ns: int, then_ns: int) -> float:
    return round(max(0, now_ns - then_ns) / 1e9, 3)


class ControlAPI:
    """Routes of the control API over one ``DataPlane`` (edge/plane.py; none given: ``NullPlane``).

    ``resolve_mac(ip)`` returns the next-hop MAC of a backend (blocking; it runs in
    an executor and may raise with a one-line reason), ``relay_mac`` is the relay's
    own MAC on the internal side, ``health()`` the agent's identity for /v1/health and
    ``observe(method, route, code, seconds)`` records each request's latency.
    """

    def __init__(
        self,
        plane: DataPlane | None = None,
        resolve_mac: Callable[[str], str] | None = None,
        relay_mac: str = "00:00:00:00:00:00",
        token: str | None = None,
        health: Callable[[], dict] | None = None,
        observe: Callable[[str, str, int, float], None] | None = None,
        walker: Executor | None = None,
        limits: BackendLimits | None = None,
        backend_live_s: float = BACKEND_LIVE_S,
    ) -> None:
        self.plane = plane if plane is not None else NullPlane()
        self.walker = walker
        self.resolve_mac = resolve_mac or self.plane.next_hop_mac
        self.relay_mac = relay_mac
        self.credentials = Credentials(token) if token else None
        self.limits = limits or BackendLimits()
        self.backend_live_s = backend_live_s
        self.refreshed: dict[int, float] = {}  # backend id -> monotonic time of its last PUT
        self.health_info = health or dict
        self.observe = observe
        self.instances: dict[int, str] = {}  # backend id -> the process that registered it last
        self.deletions = SessionDeletions(self.plane, walker)

    def app(self, extra_routes: list[web.RouteDef] | None = None) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=MAX_BODY)
        app.add_routes([
            web.get("/v1/health", self.health),
            web.get("/v1/backends", self.list_backends),
            web.put("/v1/backends/{id}", self.put_backend),
            web.delete("/v1/backends/{id}", self.delete_backend),
            web.get("/v1/sessions", self.list_sessions),
            # ufrags may hold '/': the client percent-encodes it, aiohttp matches on the decoded path
            web.put("/v1/sessions/{ufrag:.+}", self.put_session),
            web.delete("/v1/sessions/{ufrag:.+}", self.delete_session),
            web.get("/v1/flows", self.list_flows),
            web.get("/v1/stats", self.stats),
        ] + (extra_routes or []))
        return app

    def _principal(self, request: web.Request) -> str | int | BackendRange | None:
        """ADMIN, the backend id or range whose token was offered (a pool token: the id or ids of the
        caller's own address), or None (no or wrong token)."""
        if self.credentials is None:
            return ADMIN  # no token configured: loopback only (credentials.check_master)
        scheme, _, offered = request.headers.get("Authorization", "").strip().partition(" ")
        # the scheme is case-insensitive (RFC 7235); tokens are compared in constant time
        principal = self.credentials.principal(offered.strip()) if scheme.lower() == "bearer" else None
        if isinstance(principal, Pool):
            request[POOL_ADDRESS] = request.remote or ""
            address_id = _id_of_address(request[POOL_ADDRESS])
            return principal.backends_at(address_id) if address_id is not None else None
        return principal

    @staticmethod
    def _admin(request: web.Request) -> None:
        if request[PRINCIPAL] != ADMIN:
            raise ApiError(403, f"backend {request[PRINCIPAL]}'s token cannot do this: it needs the admin token")

    def _owner(self, request: web.Request, backend_id: int, where_registered: bool = True) -> None:
        """The caller must be the admin, backend ``backend_id`` itself or a range token covering it (with
        a pool token: at the address that backend is registered at; two pods whose addresses give one
        id are two callers)."""
        principal = request[PRINCIPAL]
        if principal != ADMIN and not covers(principal, backend_id):
            raise ApiError(403, f"backend {principal}'s token cannot change backend {backend_id}")
        registered = self.plane.backend(backend_id) if where_registered and POOL_ADDRESS in request else None
        if registered is not None and registered.ip4 != str(_ipv4_of(request[POOL_ADDRESS])):
            raise ApiError(403, f"backend {backend_id} is registered at {registered.ip4}, "
                                f"not at the caller's address {request[POOL_ADDRESS]}")

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[..., Awaitable[web.StreamResponse]]):
        start = time.perf_counter()
        status = 500
        try:
            if request.path not in OPEN_PATHS:
                request[PRINCIPAL] = self._principal(request)
                if request[PRINCIPAL] is None:
                    raise ApiError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
            response = await handler(request)
            status = response.status
            return response
        except ApiError as exc:
            status = exc.status
            raise
        except web.HTTPException as exc:  # aiohttp's own 404/405/413...: same JSON shape as ours
            status = exc.status
            if exc.status < 400:
                raise
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            raise ApiError(exc.status, exc.reason, headers) from None
        except DataPlaneError as exc:
            status = 422
            raise ApiError(422, str(exc)) from None
        except Exception as exc:  # a map operation failed: one line to the caller, the trace to the log
            log.exception("control API %s %s failed", request.method, request.path)
            raise ApiError(500, f"internal error: {type(exc).__name__}: {exc}") from None
        finally:
            if self.observe:
                resource = request.match_info.route.resource
                route = resource.canonical if resource is not None else "unmatched"
                self.observe(request.method, route, status, time.perf_counter() - start)

    # -- routes ----------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", **self.health_info()})

    @staticmethod
    def _backend_json(b: Backend) -> dict:
        return {"id": b.backend_id, "ip": b.ip4, "ip6": b.ip6, "port": b.port, "mac": b.dmac}

    async def list_backends(self, request: web.Request) -> web.Response:
        self._admin(request)
        return web.json_response([self._backend_json(b) for b in self.plane.backends()])

    async def put_backend(self, request: web.Request) -> web.Response:
        backend_id = checked_backend_id(request.match_info["id"])
        self._owner(request, backend_id, where_registered=False)  # a pool caller: its own address, below
        body = await json_object(request, BACKEND_FIELDS)
        ip4 = ip_field(body, "ip", 4)
        ip6 = ip_field(body, "ip6", 6)
        if not ip4 and not ip6:
            raise ApiError(400, "a backend needs 'ip' (IPv4) or 'ip6'")
        port = int_field(body, "port", 1, 65535)
        instance = instance_field(body)
        refusal = self.limits.refusal(ip4, ip6, port)
        if refusal:
            raise ApiError(403, refusal)
        if POOL_ADDRESS in request and ip4 != str(_ipv4_of(request[POOL_ADDRESS])):
            raise ApiError(403, f"a pool token registers only its caller's own address "
                                f"({request[POOL_ADDRESS]}), not {ip4 or ip6}")
        next_hop = ip4 or ip6
        try:
            # neighbour resolution blocks (and pyroute2 runs its own loop): keep it off ours
            mac = await asyncio.get_running_loop().run_in_executor(None, self.resolve_mac, next_hop)
        except Exception as exc:  # noqa: BLE001 - NeighbourError and friends, one line to the caller
            raise ApiError(422, f"cannot reach backend {next_hop}: {exc}") from None
        backend = Backend(backend_id, port, mac, self.relay_mac, ip4=ip4, ip6=ip6)
        # from here on no await: nothing else runs between these checks and the writes
        current = self.plane.backend(backend_id)
        existed = current is not None
        previous = self.instances.get(backend_id)
        if existed and instance and previous and previous != instance and self._live(backend_id) \
                and (current.ip4, current.ip6, current.port) != (ip4, ip6, port):
            # another process elsewhere claims a live id (--backend-id from-ip on two hosts whose
            # addresses share their low 18 bits): taking it would drop the first one's calls
            raise ApiError(409, f"backend {backend_id} is live at another address "
                                f"({current.ip4 or current.ip6}:{current.port}, instance {previous})")
        try:
            self.plane.set_backend(backend)
        except TableFullError as exc:
            raise ApiError(503, f"cannot store backend {backend_id}: {exc}") from None
        except DataPlaneError:
            raise
        except Exception as exc:  # backends map full (E2BIG)
            raise ApiError(503, f"cannot store backend {backend_id}: {exc}") from None
        if existed and instance and previous and previous != instance:
            # a new process behind the same backend: the old one died with its sessions
            dropped = self._drop_sessions_of(backend_id)
            log.info("backend %d restarted (instance %s -> %s): dropped its %d sessions",
                     backend_id, previous, instance, dropped)
        if instance:
            self.instances[backend_id] = instance
            self.refreshed[backend_id] = time.monotonic()
        return web.json_response(self._backend_json(backend), status=200 if existed else 201)

    def live_backends(self) -> set[int]:
        """The backends refreshed within ``backend_live_s`` (any thread may ask)."""
        now = time.monotonic()
        return {b for b, t in self.refreshed.copy().items() if now - t <= self.backend_live_s}

    def _live(self, backend_id: int) -> bool:
        """Refreshed by its transceiver (a PUT naming an instance) within ``backend_live_s``."""
        return time.monotonic() - self.refreshed.get(backend_id, float("-inf")) <= self.backend_live_s

    def _drop_sessions_of(self, backend_id: int) -> int:
        doomed = [s.ufrag for s in self.plane.sessions() if s.backend_id == backend_id]
        dropped = sum(self.plane.del_sessions(doomed).values()) if doomed else 0  # their flows go too
        for flow in self.plane.flows():  # flows opened by a routing hint have no session
            if flow.backend_id == backend_id:
                self.plane.del_flow((flow.client_ip, flow.client_port))
        return dropped

    async def delete_backend(self, request: web.Request) -> web.Response:
        backend_id = checked_backend_id(request.match_info["id"])
        self._owner(request, backend_id)
        if not self.plane.del_backend(backend_id):  # its sessions and flows go too
            raise ApiError(404, f"no backend {backend_id}")
        self.instances.pop(backend_id, None)
        self.refreshed.pop(backend_id, None)
        return web.Response(status=204)

    async def list_sessions(self, request: web.Request) -> web.Response:
        """Every session (admin), or with ``?backend=N`` one backend's (its own token suffices)."""
        raw = request.query.get("backend")
        only = checked_backend_id(raw) if raw is not None else None
        if only is None:
            self._admin(request)
        else:
            self._owner(request, only)

        def read() -> tuple[dict[str, int], list]:
            flows: dict[str, int] = {}
            for f in self.plane.flows():
                flows[f.ufrag] = flows.get(f.ufrag, 0) + 1
            return flows, [s for s in self.plane.sessions() if only is None or s.backend_id == only]

        flows, sessions = await off_loop(self.walker, read)
        now = time.monotonic_ns()
        return web.json_response([
            {"ufrag": s.ufrag, "backend": s.backend_id, "age_s": _age_s(now, s.created_ns),
             "flows": flows.get(s.ufrag, 0), "flows_opened": s.flows}
            for s in sessions
        ])

    async def put_session(self, request: web.Request) -> web.Response:
        ufrag = checked_ufrag(request.match_info["ufrag"])
        body = await json_object(request, SESSION_FIELDS)
        backend_id = int_field(body, "backend", 1, MAX_BACKEND_ID)
        self._owner(request, backend_id)
        if self.plane.backend(backend_id) is None:
            raise ApiError(409, f"backend {backend_id} is not registered")
        if self.deletions.pending(ufrag):
            raise ApiError(409, "session is being deleted")
        existing = self.plane.session(ufrag)
        if existing is not None:
            if existing.backend_id != backend_id:
                raise ApiError(409, f"ufrag is owned by backend {existing.backend_id}")
            return web.json_response({"ufrag": ufrag, "backend": backend_id}, status=200)
        try:
            self.plane.set_session(ufrag, backend_id)
        except TableFullError as exc:
            raise ApiError(503, f"cannot store session: {exc}") from None
        except DataPlaneError:
            raise
        except Exception as exc:  # sessions map full (E2BIG)
            raise ApiError(503, f"cannot store session: {exc}") from None
        return web.json_response({"ufrag": ufrag, "backend": backend_id}, status=201)

    async def delete_session(self, request: web.Request) -> web.Response:
        ufrag = checked_ufrag(request.match_info["ufrag"])
        principal = request[PRINCIPAL]
        if principal != ADMIN:
            existing = self.plane.session(ufrag)
            if existing is None and not self.deletions.pending(ufrag):
                raise ApiError(404, "no such session")
            if existing is not None and not covers(principal, existing.backend_id):
                raise ApiError(403, f"backend {principal}'s token cannot delete a session of another backend")
            if existing is not None:
                self._owner(request, existing.backend_id)
        if not await self.deletions.delete(ufrag):  # its flows go too
            raise ApiError(404, "no such session")
        return web.Response(status=204)

    async def list_flows(self, request: web.Request) -> web.Response:
        self._admin(request)
        raw = request.query.get("limit", str(DEFAULT_FLOW_LIMIT))
        if not DIGITS_RE.fullmatch(raw) or not 1 <= int(raw) <= MAX_FLOW_LIMIT:
            raise ApiError(400, f"limit must be an integer 1..{MAX_FLOW_LIMIT}")
        flows = await off_loop(self.walker, self.plane.flows, int(raw))
        now = time.monotonic_ns()
        return web.json_response([
            {"client": f.client, "backend": f.backend_id, "ufrag": f.ufrag,
             "age_s": _age_s(now, f.created_ns), "idle_s": _age_s(now, f.last_seen_ns),
             "packets": f.packets, "bytes": f.bytes, "rx_packets": f.rx_packets, "rx_bytes": f.rx_bytes,
             "pending": f.pending,
             **({"internal_port": f.internal_port, "internal_set": f.internal_set}   # translating: the backend's
                if f.internal_port else {})}                                            # view
            for f in flows
        ])

    async def stats(self, request: web.Request) -> web.Response:
        self._admin(request)
        return web.json_response({"counters": [
            {"name": name, "direction": c.spec.direction, "verdict": c.spec.verdict,
             "reason": c.spec.reason, "packets": c.packets, "bytes": c.bytes}
            for name, c in self.plane.counters().items()
        ]})
