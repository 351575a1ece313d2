"""The transceiver's side of the edge control API: register its backend and sessions, and keep them.

Sessions are registered before the SDP answer leaves, so the relay knows the
ufrag before the client's first STUN request can arrive.  The agent's
``boot_id`` is watched: when the agent restarts with empty maps, every live
session is registered again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from urllib.parse import quote

import aiohttp

log = logging.getLogger(__name__)


class RegistrationError(Exception):
    """The edge agent refused or could not be reached (one-line reason)."""


class Registrar:
    def __init__(self, control_url: str, backend_id: int, backend_ip: str, backend_port: int,
                 token: str | None = None, backend_ip6: str | None = None, watch_interval: float = 1.0) -> None:
        self.base = control_url.rstrip("/")
        # "instance" tells the agent when a new process took over this backend id (a restart
        # after a crash): the old process's sessions are gone, so the agent drops them
        self.backend = {"ip": backend_ip, "ip6": backend_ip6, "port": backend_port,
                        "instance": secrets.token_hex(8)}
        self.backend_id = backend_id
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.sessions: set[str] = set()
        self.boot_id: str | None = None
        self.reregistrations = 0
        self.watch_interval = watch_interval
        self._http: aiohttp.ClientSession | None = None
        self._watch: asyncio.Task | None = None

    async def _call(self, method: str, path: str, body: dict | None = None) -> dict | None:
        assert self._http is not None
        try:
            async with self._http.request(method, self.base + path, json=body, headers=self.headers) as resp:
                data = await resp.json(content_type=None) if resp.status != 204 else None
                if resp.status >= 400:
                    reason = data.get("error") if isinstance(data, dict) else resp.reason
                    raise RegistrationError(f"{method} {path}: {resp.status} {reason}")
                return data
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise RegistrationError(f"edge agent at {self.base} unreachable: {exc}") from None

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3))
        health = await self._call("GET", "/v1/health")
        self.boot_id = health["boot_id"]
        await self._call("PUT", f"/v1/backends/{self.backend_id}", self.backend)
        self._watch = asyncio.create_task(self._watch_agent())

    @staticmethod
    def _session_path(ufrag: str) -> str:
        return f"/v1/sessions/{quote(ufrag, safe='')}"  # ufrags may hold '/' and '+'

    async def register(self, ufrag: str) -> None:
        await self._call("PUT", self._session_path(ufrag), {"backend": self.backend_id})
        self.sessions.add(ufrag)

    async def unregister(self, ufrag: str) -> None:
        self.sessions.discard(ufrag)
        try:
            await self._call("DELETE", self._session_path(ufrag))
        except RegistrationError as exc:
            log.info("unregistering %s: %s", ufrag, exc)

    async def _watch_agent(self) -> None:
        while True:
            await asyncio.sleep(self.watch_interval)
            try:
                health = await self._call("GET", "/v1/health")
                if health["boot_id"] != self.boot_id:
                    await self._call("PUT", f"/v1/backends/{self.backend_id}", self.backend)
                    for ufrag in list(self.sessions):
                        await self.register(ufrag)
                    self.boot_id = health["boot_id"]
                    self.reregistrations += 1
                    log.info("edge agent restarted: re-registered backend and %d sessions", len(self.sessions))
            except RegistrationError as exc:
                log.warning("%s", exc)

    async def stop(self) -> None:
        if self._watch:
            self._watch.cancel()
        for ufrag in list(self.sessions):
            await self.unregister(ufrag)
        if self._http:
            await self._http.close()
