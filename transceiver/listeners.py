"""The transceiver's two HTTP listeners: what guards them and how they are served.

The public listener (WHIP, health probes) and the admin listener (every call's record, the metrics)
are served by the single-process transceiver (service.py) and by the supervisor's front of a
``--processes K`` host (workers.py) alike, so the refusal to face a network unguarded, the admin
bearer check and the serving live here once.
"""

from __future__ import annotations

import hmac
from ipaddress import ip_address
from typing import TYPE_CHECKING

from aiohttp import web

from splitrelay.errors import SplitrelayError

if TYPE_CHECKING:
    from splitrelay.transceiver.service import TransceiverConfig


class ExposureError(SplitrelayError):
    """A listener that would face a network with nothing guarding it."""


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False   # a name or a wildcard: assume it reaches the network


def refuse_exposure(c: TransceiverConfig) -> None:
    """Raise ExposureError when a non-loopback listener would serve with no credential, unless
    ``insecure_open`` says the operator means it."""
    if c.insecure_open:
        return
    if not _loopback(c.whip_host) and not c.whip_token and not c.whip_keys:
        raise ExposureError(f"refusing to serve WHIP on {c.whip_host}:{c.whip_port} to anyone: give "
                            "--whip-key-file or --whip-token, or --insecure-open")
    if not _loopback(c.admin_host) and not c.admin_token:
        raise ExposureError(f"refusing to serve /sessions and /metrics on {c.admin_host}:{c.admin_port} "
                            "to anyone: give --admin-token-file, or --insecure-open")


def admin_auth(token: str | None):  # noqa: ANN201 - an aiohttp middleware
    """The admin listener's guard: with a token, a request without ``Authorization: Bearer <token>``
    gets 401 (compared in constant time); without one (loopback), everything passes."""
    @web.middleware
    async def guard(request: web.Request, handler):  # noqa: ANN001, ANN202
        if token:
            offered = request.headers.get("Authorization", "").encode("utf-8", "replace")
            if not hmac.compare_digest(offered, f"Bearer {token}".encode()):
                return web.Response(status=401, text="missing or wrong admin bearer token\n",
                                    headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)
    return guard


async def serve_app(app: web.Application, host: str, port: int, public: bool = False) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``host``:``port``: its runner and the port it got (``port`` 0: an ephemeral one).
    ``public``: a client that stops sending must not hold a connection (or our shutdown) for long."""
    lingering = {"lingering_time": 1.0} if public else {}
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0, **lingering)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - ephemeral port
