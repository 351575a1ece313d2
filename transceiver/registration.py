"""The transceiver's side of the edge control API: register its backend and sessions, and keep them.

Sessions are registered before the SDP answer leaves, so the relay knows the
ufrag before the client's first STUN request can arrive.  The agent's
``boot_id`` is watched: when the agent restarts with empty maps, the backend
and every live session are registered again.  Registration is optional: a
transceiver without a relay (direct mode) has no ``Registrar``.

Routes and bodies are those of docs/DESIGN.md ("Edge control API").
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any
from urllib.parse import quote

import aiohttp

from splitrelay.errors import SplitrelayError

log = logging.getLogger(__name__)


class RegistrationError(SplitrelayError):
    """The edge agent refused or could not be reached (one-line reason)."""


class AgentUnreachable(RegistrationError):
    """No answer from the agent (connection refused, timeout, not JSON where JSON was due)."""


class AgentRefused(RegistrationError):
    """The agent answered 4xx/5xx; ``status`` and the agent's one-line ``reason``."""

    def __init__(self, method: str, path: str, status: int, reason: str) -> None:
        super().__init__(f"{method} {path}: {status} {reason}")
        self.status = status
        self.reason = reason


class Unauthorized(AgentRefused):
    """401: the control token is missing or wrong."""


class SessionConflict(AgentRefused):
    """409: the ufrag is owned by another backend, or the agent does not know this backend."""


def _refused(method: str, path: str, status: int, reason: str) -> AgentRefused:
    cls = {401: Unauthorized, 409: SessionConflict}.get(status, AgentRefused)
    return cls(method, path, status, reason)


class Registrar:
    """Registers one backend (this transceiver's mux address) and its sessions with one edge agent."""

    def __init__(self, control_url: str, backend_id: int, backend_ip: str | None, backend_port: int,
                 token: str | None = None, backend_ip6: str | None = None, watch_interval: float = 1.0,
                 timeout: float = 3.0) -> None:
        self.base = control_url.rstrip("/")
        # "instance" tells the agent when a new process took over this backend id (a restart
        # after a crash): the old process's sessions are gone, so the agent drops them
        self.backend: dict[str, Any] = {"ip": backend_ip, "ip6": backend_ip6, "port": backend_port,
                                        "instance": secrets.token_hex(8)}
        self.backend_id = backend_id
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.sessions: set[str] = set()
        self.boot_id: str | None = None
        self.reregistrations = 0
        self.watch_interval = watch_interval
        self.timeout = timeout
        self.boot_changed = asyncio.Event()  # set after each re-registration (tests, metrics)
        self._http: aiohttp.ClientSession | None = None
        self._watch: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # a re-registration and a new session do not interleave

    async def _call(self, method: str, path: str, body: dict | None = None) -> Any:  # noqa: ANN401
        if self._http is None:
            raise AgentUnreachable("registrar is not started")
        try:
            async with self._http.request(method, self.base + path, json=body, headers=self.headers) as resp:
                try:
                    data = await resp.json(content_type=None) if resp.status != 204 else None
                except ValueError:
                    data = None
                if resp.status >= 400:
                    reason = data.get("error") if isinstance(data, dict) else resp.reason
                    raise _refused(method, path, resp.status, str(reason))
                return data
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            detail = str(exc) or type(exc).__name__
            raise AgentUnreachable(f"edge agent at {self.base} unreachable: {detail}") from None

    async def health(self) -> dict[str, Any]:
        health = await self._call("GET", "/v1/health")
        if not isinstance(health, dict) or not isinstance(health.get("boot_id"), str):
            raise AgentUnreachable(f"{self.base}/v1/health did not answer with a boot_id")
        return health

    async def start(self) -> None:
        """Check the agent and register the backend; raises RegistrationError if it cannot."""
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            self.boot_id = (await self.health())["boot_id"]
            await self._put_backend()
        except RegistrationError:
            await self._http.close()
            self._http = None
            raise
        self._watch = asyncio.create_task(self._watch_agent())

    async def _put_backend(self) -> None:
        body = {k: v for k, v in self.backend.items() if v is not None}
        await self._call("PUT", f"/v1/backends/{self.backend_id}", body)

    @staticmethod
    def _session_path(ufrag: str) -> str:
        return f"/v1/sessions/{quote(ufrag, safe='')}"  # ufrags may hold '/' and '+'

    async def register(self, ufrag: str) -> None:
        async with self._lock:
            await self._call("PUT", self._session_path(ufrag), {"backend": self.backend_id})
            self.sessions.add(ufrag)

    async def unregister(self, ufrag: str) -> None:
        """Best effort: the agent may already have dropped it (restart, its own ageing).

        Under the lock, like re-registration: a hang-up that raced a re-registration pass
        after an agent restart had its DELETE land before the pass's PUT, and the dead
        session stayed registered (seen in the lab suite on a loaded machine)."""
        async with self._lock:
            self.sessions.discard(ufrag)
            try:
                await self._call("DELETE", self._session_path(ufrag))
            except AgentRefused as exc:
                if exc.status != 404:
                    log.warning("unregistering %s: %s", ufrag, exc)
            except RegistrationError as exc:
                log.warning("unregistering %s: %s", ufrag, exc)

    async def check(self) -> bool:
        """One look at the agent's boot_id; re-register everything if it changed.  True if it did."""
        health = await self.health()
        if health["boot_id"] == self.boot_id:
            return False
        async with self._lock:
            await self._put_backend()
            for ufrag in list(self.sessions):
                try:
                    await self._call("PUT", self._session_path(ufrag), {"backend": self.backend_id})
                except SessionConflict as exc:  # another backend took it meanwhile: not ours anymore
                    log.warning("re-registering %s: %s", ufrag, exc)
                    self.sessions.discard(ufrag)
            await self._drop_stale_sessions()
            self.boot_id = health["boot_id"]
            self.reregistrations += 1
        log.info("edge agent restarted: re-registered backend %d and %d sessions",
                 self.backend_id, len(self.sessions))
        self.boot_changed.set()
        return True

    async def _drop_stale_sessions(self) -> None:
        """Delete the agent's sessions of this backend that no longer live here.

        A restarted agent adopts its pinned maps, so a session that ended while the
        agent was down (its DELETE refused) comes back with it and would stay
        registered forever (seen in the lab: a call hung up during an agent restart)."""
        listed = await self._call("GET", "/v1/sessions")
        for entry in listed if isinstance(listed, list) else []:
            ufrag = entry.get("ufrag") if isinstance(entry, dict) else None
            if entry.get("backend") == self.backend_id and isinstance(ufrag, str) and ufrag not in self.sessions:
                try:
                    await self._call("DELETE", self._session_path(ufrag))
                except AgentRefused as exc:
                    if exc.status != 404:
                        log.warning("dropping stale session %s: %s", ufrag, exc)

    async def _watch_agent(self) -> None:
        while True:
            await asyncio.sleep(self.watch_interval)
            try:
                await self.check()
            except RegistrationError as exc:  # the agent is down: keep looking, its restart is the fix
                log.warning("%s", exc)

    async def stop(self, unregister_backend: bool = False) -> None:
        """Unregister every session (and optionally the backend), stop watching."""
        if self._watch:
            self._watch.cancel()
            self._watch = None
        if self._http is None:
            return
        for ufrag in list(self.sessions):
            await self.unregister(ufrag)
        if unregister_backend:
            try:
                await self._call("DELETE", f"/v1/backends/{self.backend_id}")
            except RegistrationError as exc:
                log.warning("unregistering backend %d: %s", self.backend_id, exc)
        await self._http.close()
        self._http = None
