"""The transceiver daemon: WHIP signaling (RFC 9725), the UDP mux, sessions and their registration.

A standard WebRTC client POSTs its offer and gets back an answer whose only
candidate is the relay's public address; the session is registered with the
edge agent before that answer leaves, and unregistered when it ends however
it ends (DELETE, ICE failure, consent expiry, shutdown).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from splitrelay.transceiver.handlers import handler_factory
from splitrelay.transceiver.metrics import TransceiverMetrics
from splitrelay.transceiver.mux import UdpMux
from splitrelay.transceiver.registration import Registrar, RegistrationError
from splitrelay.transceiver.session import Session, answer_offer

log = logging.getLogger(__name__)

MAX_OFFER = 64 * 1024
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Expose-Headers": "Location",
}


@dataclass
class TransceiverConfig:
    backend_id: int
    bind_host: str = "127.0.0.1"
    bind_port: int = 5000
    public_address: tuple[str, int] | None = None   # the relay's ip:port; None = direct mode
    whip_host: str = "127.0.0.1"
    whip_port: int = 8080
    relay_control: str | None = None                # edge agent URL; None = no relay
    relay_token: str | None = None
    whip_token: str | None = None
    handler: str = "echo"
    backend_ip6: str | None = None
    hint_key: bytes | None = None                   # keyed (v2) routing hints, shared with the relays
    body_timeout: float = 5.0                       # a client must send its whole offer within this


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n", headers=CORS)


class Transceiver:
    def __init__(self, config: TransceiverConfig) -> None:
        self.config = config
        self.make_handler = handler_factory(config.handler)
        self.sessions: dict[str, Session] = {}
        self.mux: UdpMux | None = None
        self.registrar: Registrar | None = None
        self.draining = False
        self._runner: web.AppRunner | None = None
        self.whip_port: int | None = None
        self.metrics = TransceiverMetrics()
        self._exported: dict[str, dict[str, float]] = {}  # per session: what metrics already counted

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_OFFER)
        app.add_routes([
            web.post("/whip", self.post_offer),
            web.options("/whip", self.options),
            web.delete("/whip/sessions/{id}", self.delete_session),
            web.options("/whip/sessions/{id}", self.options),
            web.get("/sessions", self.list_sessions),
            web.get("/metrics", self.scrape),
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
        ])
        return app

    async def start(self) -> None:
        c = self.config
        self.mux = await UdpMux.bind(c.bind_host, c.bind_port, c.public_address)
        if c.relay_control:
            host, port = self.mux.local_address
            self.registrar = Registrar(c.relay_control, c.backend_id, host, port, c.relay_token, c.backend_ip6)
            await self.registrar.start()
        # a client that stops sending must not hold a connection (or our shutdown) for long
        self._runner = web.AppRunner(self.app(), access_log=None, lingering_time=1.0, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, c.whip_host, c.whip_port)
        await site.start()
        self.whip_port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - ephemeral port

    @property
    def whip_url(self) -> str:
        return f"http://{self.config.whip_host}:{self.whip_port}/whip"

    def _authorized(self, request: web.Request) -> bool:
        if not self.config.whip_token:
            return True
        offered = request.headers.get("Authorization", "").encode()
        return hmac.compare_digest(offered, f"Bearer {self.config.whip_token}".encode())

    async def options(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers=CORS)

    async def post_offer(self, request: web.Request) -> web.Response:
        response = await self._answer(request)
        if response.status >= 400:
            self.metrics.offers_rejected.labels(str(response.status)).inc()
        return response

    async def _answer(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, "missing or wrong bearer token")
        if self.draining:
            return _error(503, "this transceiver is draining; try another")
        if request.content_type != "application/sdp":
            return _error(415, "the offer must be Content-Type: application/sdp")
        if request.content_length and request.content_length > MAX_OFFER:
            return _error(413, f"offer larger than {MAX_OFFER} bytes")
        try:
            sdp = await asyncio.wait_for(request.text(), self.config.body_timeout)
        except TimeoutError:
            response = _error(408, f"the offer did not arrive within {self.config.body_timeout:g} s")
            response.force_close()  # the rest of its body is not worth waiting for
            return response
        except (web.HTTPRequestEntityTooLarge, UnicodeDecodeError):
            return _error(413, f"offer larger than {MAX_OFFER} bytes or not text")
        if not sdp.startswith("v=0"):
            return _error(400, "the body is not an SDP offer (no v=0)")
        if "\nm=audio " not in sdp.replace("\r\n", "\n"):
            return _error(400, "the offer has no audio m-line")
        if "a=ice-ufrag:" not in sdp or "a=ice-pwd:" not in sdp:
            return _error(400, "the offer has no ICE credentials")

        async def register(session: Session) -> None:
            if self.registrar:
                await self.registrar.register(session.ufrag)

        try:
            session, answer = await answer_offer(
                sdp, self.mux, self.config.backend_id, self.make_handler,
                before_answer=register, on_end=self._ended, hint_key=self.config.hint_key,
            )
        except RegistrationError as exc:
            return _error(503, f"the relay did not accept the session: {exc}")
        except ValueError as exc:
            return _error(400, f"bad offer: {exc}")
        self.sessions[session.session_id] = session
        self.metrics.sessions_started.inc()
        self.metrics.sessions.set(len(self.sessions))
        self.metrics.phase("answer", session.timings.answer_ms)
        location = f"/whip/sessions/{session.session_id}"
        return web.Response(status=201, text=answer, content_type="application/sdp",
                            headers={"Location": location, **CORS})

    def _ended(self, session: Session) -> None:
        asyncio.ensure_future(self.end_session(session.session_id))

    async def end_session(self, session_id: str) -> bool:
        session = self.sessions.get(session_id)
        if session is None:
            return False
        self._export(session)
        del self.sessions[session_id]
        self._exported.pop(session_id, None)
        self.metrics.sessions.set(len(self.sessions))
        if self.registrar:
            await self.registrar.unregister(session.ufrag)
        await session.close()
        return True

    async def delete_session(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, "missing or wrong bearer token")
        if not await self.end_session(request.match_info["id"]):
            return _error(404, "no such session")
        return web.Response(status=200, headers=CORS)

    async def list_sessions(self, request: web.Request) -> web.Response:
        out = []
        for session in list(self.sessions.values()):
            out.append({**session.to_dict(), "stats": await session.stats()})
        return web.json_response(out)

    def _export(self, session: Session) -> None:
        """Move what a session did since the last scrape into the counters."""
        seen = self._exported.setdefault(session.session_id, {})
        t = session.timings
        for phase, value in (("ice_connected", t.ice_connected_ms), ("dtls_connected", t.dtls_connected_ms)):
            if value is not None and phase not in seen:
                self.metrics.phase(phase, value)
                seen[phase] = 1
        for name, counter, value in (("in", self.metrics.frames_in, session.frames_in),
                                     ("out", self.metrics.frames_out, session.outbound.frames_out),
                                     ("errors", self.metrics.handler_errors, session.handler_errors)):
            counter.inc(value - seen.get(name, 0))
            seen[name] = value

    async def scrape(self, request: web.Request) -> web.Response:
        lost = 0
        for session in list(self.sessions.values()):
            self._export(session)
            stats = await session.stats()
            if stats["rtt_ms"] is not None:
                self.metrics.rtt.observe(stats["rtt_ms"] / 1000.0)
            if stats["jitter_ms"] is not None:
                self.metrics.jitter.observe(stats["jitter_ms"] / 1000.0)
            lost += stats["packets_lost"]
        self.metrics.lost.set(lost)
        self.metrics.mux_dropped.set(self.mux.dropped if self.mux else 0)
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "sessions": len(self.sessions)})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready for new offers: a draining transceiver drops out of its Service's endpoints."""
        if self.draining:
            return web.json_response({"status": "draining", "sessions": len(self.sessions)}, status=503)
        return web.json_response({"status": "ready", "sessions": len(self.sessions)})

    async def drain(self, deadline_s: float) -> int:
        """Refuse new offers and wait for live sessions to end, at most deadline_s; returns how many remain."""
        self.draining = True
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        while self.sessions and loop.time() < end:
            waits = [asyncio.ensure_future(s.ended.wait()) for s in self.sessions.values()]
            await asyncio.wait(waits, timeout=max(0.0, end - loop.time()), return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            for session_id in [k for k, v in self.sessions.items() if v.ended.is_set()]:
                await self.end_session(session_id)
        return len(self.sessions)

    async def stop(self) -> None:
        self.draining = True
        for session_id in list(self.sessions):
            await self.end_session(session_id)
        if self.registrar:
            await self.registrar.stop()
        if self._runner:
            await self._runner.cleanup()
        if self.mux:
            self.mux.close()
