"""A small synchronous client of the edge control API (the CLI's and scripts' view of an agent)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from urllib.parse import quote
from typing import Any


class ControlError(Exception):
    """The agent refused a request (status >= 400) or could not be reached (status 0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ControlClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 3.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except (ValueError, AttributeError):
                message = str(exc.reason)
            raise ControlError(exc.code, f"{method} {path}: {exc.code} {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ControlError(0, f"edge agent at {self.base_url} is unreachable: {reason}") from None
        return json.loads(raw) if raw else None

    def health(self) -> dict:
        return self._call("GET", "/v1/health")

    def put_backend(self, backend_id: int, ip: str | None, port: int, ip6: str | None = None) -> dict:
        return self._call("PUT", f"/v1/backends/{backend_id}", {"ip": ip, "ip6": ip6, "port": port})

    def delete_backend(self, backend_id: int) -> None:
        self._call("DELETE", f"/v1/backends/{backend_id}")

    def backends(self) -> list[dict]:
        return self._call("GET", "/v1/backends")

    def put_session(self, ufrag: str, backend_id: int) -> dict:
        return self._call("PUT", f"/v1/sessions/{quote(ufrag, safe='')}", {"backend": backend_id})

    def delete_session(self, ufrag: str) -> None:
        self._call("DELETE", f"/v1/sessions/{quote(ufrag, safe='')}")

    def sessions(self) -> list[dict]:
        return self._call("GET", "/v1/sessions")

    def flows(self, limit: int = 1000) -> list[dict]:
        return self._call("GET", f"/v1/flows?limit={limit}")

    def stats(self) -> dict:
        return self._call("GET", "/v1/stats")

    def metrics(self) -> str:
        request = urllib.request.Request(self.base_url + "/metrics")
        with urllib.request.urlopen(request, timeout=self.timeout) as resp:
            return resp.read().decode()
