"""Clients of the edge control API (docs/DESIGN.md): one async, one synchronous, same methods.

``AsyncControlClient`` (aiohttp) is for code on an event loop (the transceiver's ``Registrar``,
the bench, tests); ``ControlClient`` (urllib, no loop) is what the CLI and the lab helpers call.
Both raise ``ControlError(status, message)``: status is the HTTP code of a refusal (>= 400, with
the agent's one-line ``reason``) or 0 when no agent answered; message is one line.  They live
in ``wire`` because the edge tooling and the transceiver both speak this API and the transceiver
may not import ``edge``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from http import HTTPStatus
from typing import Any
from urllib.parse import quote

from splitrelay.errors import SplitrelayError

DEFAULT_TIMEOUT = 2.0


class ControlError(SplitrelayError):
    """The agent refused a request (status >= 400) or could not be reached (status 0); ``reason`` is
    the agent's own one-line reason for a refusal."""

    def __init__(self, status: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = message if reason is None else reason


def _refused(method: str, path: str, status: int, raw: bytes) -> ControlError:
    reason = _error_message(raw, _phrase(status))
    return ControlError(status, f"{method} {path}: {status} {reason}", reason)


def _answer(raw: bytes, url: str) -> Any:
    """A success's JSON body (None when empty); status 0 when it is not JSON: no agent answered."""
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        raise ControlError(0, f"{url} answered with something that is not JSON: not an edge agent") from None


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"


def backend_path(backend_id: int) -> str:
    return f"/v1/backends/{backend_id}"


def session_path(ufrag: str) -> str:
    return f"/v1/sessions/{quote(ufrag, safe='')}"  # ufrags may hold '/' and '+'


def sessions_path(backend: int | None) -> str:
    """All sessions (the admin token), or one backend's (its own token suffices)."""
    return "/v1/sessions" if backend is None else f"/v1/sessions?backend={int(backend)}"


def _flows_path(limit: int | None) -> str:
    return "/v1/flows" if limit is None else f"/v1/flows?limit={int(limit)}"


def backend_body(ip: str | None, port: int, ip6: str | None, instance: str | None) -> dict:
    body: dict[str, Any] = {"ip": ip, "port": port}
    if ip6 is not None:
        body["ip6"] = ip6
    if instance is not None:
        body["instance"] = instance
    return body


def _error_message(raw: bytes, fallback: str) -> str:
    try:
        data = json.loads(raw)
        message = data.get("error") if isinstance(data, dict) else None
    except ValueError:
        message = None
    return " ".join(str(message or fallback).split())


class AsyncControlClient:
    """``async with AsyncControlClient(url, token) as c: await c.health()``; or call ``close()``."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._http = None

    async def __aenter__(self) -> AsyncControlClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            await http.close()

    def _session(self):
        import aiohttp

        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._http

    async def request(self, method: str, path: str, body: Any = None, *, data: bytes | None = None,
                      headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """One raw request: (status, body bytes), whatever the status. ``data`` sends bytes as they are."""
        import aiohttp

        sent = dict(headers or {})
        if self.token and "Authorization" not in sent:
            sent["Authorization"] = f"Bearer {self.token}"
        if data is None and body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        try:
            async with self._session().request(method, self.base_url + path, data=data, headers=sent) as resp:
                return resp.status, await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            raise ControlError(0, f"edge agent at {self.base_url} is unreachable: {reason}") from None

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        """Any request of the API: the decoded JSON answer, or ControlError."""
        status, raw = await self.request(method, path, body)
        if status >= 400:
            raise _refused(method, path, status, raw)
        return _answer(raw, self.base_url + path)

    async def health(self) -> dict:
        return await self.call("GET", "/v1/health")

    async def put_backend(self, backend_id: int, ip: str | None, port: int, ip6: str | None = None,
                          instance: str | None = None) -> dict:
        return await self.call("PUT", backend_path(backend_id), backend_body(ip, port, ip6, instance))

    async def delete_backend(self, backend_id: int) -> None:
        await self.call("DELETE", backend_path(backend_id))

    async def backends(self) -> list[dict]:
        return await self.call("GET", "/v1/backends")

    async def put_session(self, ufrag: str, backend_id: int) -> dict:
        return await self.call("PUT", session_path(ufrag), {"backend": backend_id})

    async def delete_session(self, ufrag: str) -> None:
        await self.call("DELETE", session_path(ufrag))

    async def sessions(self, backend: int | None = None) -> list[dict]:
        return await self.call("GET", sessions_path(backend))

    async def flows(self, limit: int | None = None) -> list[dict]:
        return await self.call("GET", _flows_path(limit))

    async def stats(self) -> dict:
        return await self.call("GET", "/v1/stats")

    async def metrics(self) -> str:
        status, raw = await self.request("GET", "/metrics")
        if status >= 400:
            raise ControlError(status, f"GET /metrics: {status}")
        return raw.decode()


class ControlClient:
    """The synchronous twin of ``AsyncControlClient`` (urllib; for the CLI and scripts)."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 3.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _request(self, method: str, path: str, body: Any = None) -> bytes:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            raise _refused(method, path, exc.code, exc.read()) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ControlError(0, f"edge agent at {self.base_url} is unreachable: {reason}") from None

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """Any request of the API: the decoded JSON answer, or ControlError."""
        return _answer(self._request(method, path, body), self.base_url + path)

    def health(self) -> dict:
        return self.call("GET", "/v1/health")

    def put_backend(self, backend_id: int, ip: str | None, port: int, ip6: str | None = None,
                    instance: str | None = None) -> dict:
        return self.call("PUT", backend_path(backend_id), backend_body(ip, port, ip6, instance))

    def delete_backend(self, backend_id: int) -> None:
        self.call("DELETE", backend_path(backend_id))

    def backends(self) -> list[dict]:
        return self.call("GET", "/v1/backends")

    def put_session(self, ufrag: str, backend_id: int) -> dict:
        return self.call("PUT", session_path(ufrag), {"backend": backend_id})

    def delete_session(self, ufrag: str) -> None:
        self.call("DELETE", session_path(ufrag))

    def sessions(self, backend: int | None = None) -> list[dict]:
        return self.call("GET", sessions_path(backend))

    def flows(self, limit: int | None = None) -> list[dict]:
        return self.call("GET", _flows_path(limit))

    def stats(self) -> dict:
        return self.call("GET", "/v1/stats")

    def metrics(self) -> str:
        return self._request("GET", "/metrics").decode()
