"""The control API's request checks: a path id, a ufrag, a JSON body and its fields, a backend's place.

Each check raises ``ApiError`` (a 4xx with one line) before a handler writes anything
(edge/control.py), so a bad request never alters a registered backend or session.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

from aiohttp import web
from splitrelay.bpf.consts import MAX_BACKEND_ID
from splitrelay.wire.stun import UFRAG_RULE, is_ufrag

DIGITS_RE = re.compile(r"[0-9]{1,7}")  # ASCII only: str.isdigit() also takes '١' and 5000-digit strings
MAX_BODY = 16 * 1024
MAX_INSTANCE_LEN = 64
BACKEND_FIELDS = {"ip", "ip6", "port", "instance"}
SESSION_FIELDS = {"backend"}


class BackendLimits:
    """Where backends may be: addresses within ``networks`` (empty: anywhere) and ports within ``ports``."""

    def __init__(self, networks: list[str] | tuple[str, ...] = (), ports: tuple[int, int] = (1, 65535)) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]
        self.ports = ports

    def refusal(self, ip4: str | None, ip6: str | None, port: int) -> str | None:
        """Why a backend at these addresses and port is not allowed (one line), or None."""
        first, last = self.ports
        if not first <= port <= last:
            return f"backend port {port} is outside the allowed range {first}-{last}"
        for ip in (ip4, ip6):
            addr = ipaddress.ip_address(ip) if ip else None
            if addr is not None and self.networks and not any(addr in n for n in self.networks):
                allowed = ", ".join(str(n) for n in self.networks)
                return f"backend address {ip} is outside the allowed networks ({allowed})"
        return None


class ApiError(web.HTTPException):
    """An answer with a JSON body ``{"error": message}``; raised anywhere in a handler."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self.status_code = status
        message = " ".join(str(message).split()) or "error"  # one line, always
        super().__init__(text=json.dumps({"error": message}), content_type="application/json",
                         headers=headers)


def checked_backend_id(raw: str) -> int:
    if not DIGITS_RE.fullmatch(raw) or not 1 <= int(raw) <= MAX_BACKEND_ID:
        raise ApiError(400, f"backend id must be an integer 1..{MAX_BACKEND_ID}")
    return int(raw)


def checked_ufrag(raw: str) -> str:
    if not is_ufrag(raw):
        raise ApiError(400, UFRAG_RULE)
    return raw


async def json_object(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    if request.content_length and request.content_length > MAX_BODY:
        raise ApiError(413, f"body larger than {MAX_BODY} bytes")
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError, RecursionError):  # JSONDecodeError is a ValueError
        raise ApiError(400, "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    return body


def int_field(body: dict, name: str, low: int, high: int) -> int:
    value = body.get(name)
    if type(value) is not int or not low <= value <= high:  # bool is an int subclass: refused too
        raise ApiError(400, f"'{name}' must be an integer {low}..{high}")
    return value


def ip_field(body: dict, name: str, version: int) -> str | None:
    """An optional unicast address of one family (null or absent = not given)."""
    value = body.get(name)
    if value is None:
        return None
    try:
        addr = ipaddress.ip_address(value) if isinstance(value, str) else None
    except ValueError:
        addr = None
    if addr is None or addr.version != version or (version == 6 and addr.scope_id):
        raise ApiError(400, f"'{name}' must be an IPv{version} address")
    if addr.is_unspecified or addr.is_multicast or addr.is_loopback or (
            version == 4 and addr == ipaddress.IPv4Address("255.255.255.255")):
        raise ApiError(400, f"'{name}' must be a unicast address a relay can forward to, not {addr}")
    return str(addr)


def instance_field(body: dict) -> str | None:
    value = body.get("instance")
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_INSTANCE_LEN or not value.isprintable():
        raise ApiError(400, f"'instance' must be a printable string of 1..{MAX_INSTANCE_LEN} characters")
    return value

