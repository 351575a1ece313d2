"""The transceiver daemon: WHIP signaling, the UDP mux, sessions and their registration.

A standard WebRTC client POSTs its offer and gets back an answer whose only
candidates are the relay's public address(es); the session is registered with
the edge agent before that answer leaves, and unregistered when it ends however
it ends (DELETE, ICE failure, consent expiry, client hang-up, connect timeout,
shutdown).  Without a relay (``relay_control`` unset) it runs in direct mode:
nothing is registered and, unless public candidates are given, the mux's own
address is the candidate.  With several relays (``relays``) the answer names all of
them, the one chosen for this client first (relays.py), and every relay's agent
gets every session (registration.py).

Two listeners: the public one serves WHIP, ``/healthz`` and ``/readyz``, what a
caller or a load balancer needs; the admin one (loopback unless told, optionally
behind a bearer token) serves what would let a stranger watch or map the calls:
``/sessions`` (``?ended=1``) and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


from splitrelay.tokens import DEFAULT_AUDIENCE
from splitrelay.transceiver.garbage import SessionCollector
from splitrelay.transceiver.handlers import handler_factory
from splitrelay.transceiver.ice_restart import IceRestartFailed
from splitrelay.transceiver.listeners import admin_auth, refuse_exposure, serve_app
from splitrelay.transceiver.paths import RESTARTED
from splitrelay.transceiver.metrics import TransceiverMetrics
from splitrelay.transceiver import admission, limits
from splitrelay.transceiver.mux import UdpMux
from splitrelay.transceiver.registration import Registrar, RegistrationError, RelayRegistrars
from splitrelay.transceiver.relays import Relay, RelayChooser, SignalingFacts, choose, ordered_candidates
from splitrelay.transceiver.audio import check_aiortc
from splitrelay.transceiver.dtls_role import DEFAULT_ROLE, check_dtls_role
from splitrelay.transceiver.ufrag_pool import UfragPool
from splitrelay.transceiver.session import DELETED, MAX_CALL, SHUTDOWN, IceRestart, OfferError, Session
from splitrelay.transceiver.whip import MAX_OFFER, OfferRejected, WhipConfig, WhipEndpoint
from splitrelay.wire import hint
from splitrelay.wire.sdpfrag import IceFragment

log = logging.getLogger(__name__)

ENDED_KEPT = 256  # finished sessions whose record stays readable (tests, /sessions?ended=1)


@dataclass
class TransceiverConfig:
    backend_id: int                                  # 1..262143, carried in every session's ufrag
    bind_host: str = "127.0.0.1"                     # the mux socket ("::" = dual stack)
    bind_port: int = 5000
    public_candidates: list[tuple[str, int]] = field(default_factory=list)  # the relay's ip:port(s)
    public_address: tuple[str, int] | None = None    # shorthand for one public candidate
    whip_host: str = "127.0.0.1"
    whip_port: int = 8080
    whip_path: str = "/whip"
    whip_token: str | None = None                    # static WHIP bearer token (simple mode)
    whip_keys: list[bytes] = field(default_factory=list)  # offer-token signing keys (splitrelay/tokens.py)
    whip_audience: str = DEFAULT_AUDIENCE            # the pool name offer tokens must carry as aud
    cors_origins: tuple[str, ...] = ()               # origins whose pages may call WHIP; "*": any
    admin_host: str = "127.0.0.1"                    # /sessions and /metrics: never on the public listener
    admin_port: int = 0                              # 0: an ephemeral port (the CLI's default is 8081)
    admin_token: str | None = None                   # bearer token of the admin listener
    insecure_open: bool = False                      # serve a non-loopback listener without auth anyway
    relay_control: str | None = None                 # edge agent URL; None = direct mode, no registration
    relay_token: str | None = None
    backend_ip: str | None = None                    # address the relay forwards to (default: bind_host)
    backend_ip6: str | None = None                   # its IPv6 twin, for IPv6 clients
    handler: str = "echo"                            # registered name, options after ':' ("tone:frequency=880")
    hint_key: bytes | None = None                    # keyed (v2) routing hints, shared with the relays
    body_timeout: float = 5.0                        # a client must send its whole offer within this
    connect_timeout: float = limits.CONNECT_TIMEOUT  # an answered session must connect within this
    max_sessions: int = 0                            # 0 = no limit; beyond it offers get 503
    max_pending: int = limits.MAX_PENDING            # answered, not yet connected; 0 = no limit (503)
    offer_rate: float = limits.OFFER_RATE            # offers/s per source address (IPv6: /64); 0 = no limit (429)
    offer_burst: int = limits.OFFER_BURST            # offers a quiet source may send at once
    offer_sources: int = limits.OFFER_SOURCES        # sources the rate limit remembers (LRU)
    address_timeout: float = limits.ADDRESS_TIMEOUT  # a bound client address silent this long is unbound
    watch_interval: float = 1.0                      # how often the agent's boot_id is checked
    relays: list[Relay] = field(default_factory=list)  # several relays (overrides the three fields above)
    choosers: list[RelayChooser] = field(default_factory=list)  # who picks a client's preferred relay
    ufrag_pool: int = 4                              # ufrags registered ahead of offers; 0 = on the answer's path
    dtls_role: str = DEFAULT_ROLE                    # our a=setup if the offer lets us choose (dtls_role.py)

    def candidates(self) -> list[tuple[str, int]]:
        """The public candidates, [] for direct mode."""
        found = list(self.public_candidates)
        if self.public_address and self.public_address not in found:
            found.insert(0, self.public_address)
        return found

    def all_relays(self) -> list[Relay]:
        """``relays``, or the one relay that public_address/public_candidates/relay_control describe."""
        if self.relays:
            return list(self.relays)
        if self.candidates() or self.relay_control:
            return [Relay("relay1", tuple(self.candidates()), self.relay_control)]
        return []


class Transceiver:
    def __init__(self, config: TransceiverConfig) -> None:
        self.config = config
        self.make_handler = handler_factory(config.handler)
        self.sessions: dict[str, Session] = {}
        self._ending: set[asyncio.Task] = set()  # end_session tasks of sessions that ended by themselves
        self.ended: deque[dict[str, Any]] = deque(maxlen=ENDED_KEPT)  # to_dict() of finished sessions
        self.collector = SessionCollector()  # frees each ended session's cycle soon (garbage.py)
        self.mux: UdpMux | None = None
        self.registrars: RelayRegistrars | None = None
        self.ufrags: UfragPool | None = None
        self.draining = False
        self._runner: web.AppRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self.whip_port, self.admin_port = None, None   # int once serving
        self.metrics = TransceiverMetrics()
        self.metrics.sessions_unfreed.set_function(lambda: self.collector.unfreed)
        self.collector.observe = self.metrics.session_release.observe
        self._unwatch: Callable[[], None] = lambda: None   # the loop's and the collector's watch (metrics)
        self._exported: dict[str, dict[str, float]] = {}  # per session: what metrics already counted
        self._answering = 0  # offers between admission and their answer: pending too
        self.admission = admission.Admission(
            admission.AdmissionConfig(config.max_sessions, config.max_pending, config.offer_rate,
                                      config.offer_burst, config.offer_sources),
            config.connect_timeout, on_refused=lambda why: self.metrics.offers_refused.labels(why).inc())
        self.whip = WhipEndpoint(self, WhipConfig(config.whip_path, config.whip_token, MAX_OFFER,
                                                  config.body_timeout, list(config.whip_keys),
                                                  config.whip_audience, tuple(config.cors_origins)),
                                 on_rejected=lambda status: self.metrics.offers_rejected.labels(str(status)).inc())

    def app(self) -> web.Application:
        """The public listener: WHIP and the probes a load balancer needs, nothing that names a call."""
        app = web.Application(client_max_size=MAX_OFFER)
        app.add_routes(self.whip.routes() + [
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
        ])
        return app

    def admin_app(self) -> web.Application:
        """The admin listener: every call's record and the metrics, for operators and Prometheus."""
        app = web.Application(middlewares=[admin_auth(self.config.admin_token)])
        app.add_routes([web.get("/sessions", self.list_sessions), web.get("/metrics", self.scrape),
                        web.get("/healthz", self.healthz)])
        return app

    @property
    def registrar(self) -> Registrar | None:
        """The first relay's registrar (None in direct mode)."""
        return self.registrars.registrars[0] if self.registrars else None

    async def start(self) -> None:
        """Bind the mux, register the backend (if relays are configured), then accept offers."""
        check_aiortc()  # the voice path's aiortc internals: fail at start, not in the first call
        check_dtls_role()
        c = self.config
        refuse_exposure(c)
        self._unwatch = self.metrics.watch_process()
        relays = c.all_relays()
        public = [a for r in relays for a in r.candidates]
        self.mux = await UdpMux.bind(c.bind_host, c.bind_port, public or None, c.address_timeout)
        self.mux.on_expire.append(lambda addr: self.metrics.mux_addresses_expired.inc())
        controlled = [r for r in relays if r.control_url]
        if controlled:
            host, port = self.mux.local_address
            backend_ip = c.backend_ip or (host if host not in ("0.0.0.0", "::") else None)
            if backend_ip is None and c.backend_ip6 is None:
                raise RegistrationError(f"bound to {host}: set backend_ip, the address the relay forwards to")
            self.registrars = RelayRegistrars.of_backend(
                [(r.name, r.control_url) for r in controlled], c.backend_id, backend_ip, port, c.relay_token,
                c.backend_ip6, c.watch_interval,
                on_missed=lambda relay: self.metrics.registrations_missed.labels(relay).inc())
            await self.registrars.start()
            if c.ufrag_pool:
                self.ufrags = UfragPool(c.ufrag_pool, self._new_ufrag, self.registrars,
                                        on_empty=self.metrics.ufrag_pool_empty.inc)
                self.ufrags.refill_after()
        self._runner, self.whip_port = await serve_app(self.app(), c.whip_host, c.whip_port, public=True)
        self._admin_runner, self.admin_port = await serve_app(self.admin_app(), c.admin_host, c.admin_port)

    @property
    def whip_url(self) -> str:
        return f"http://{self.config.whip_host}:{self.whip_port}{self.whip.path}"

    @property
    def admin_url(self) -> str:
        """The admin listener's base URL: ``/sessions`` and ``/metrics`` are under it."""
        host = self.config.admin_host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.admin_port}"

    # -- sessions (the WHIP endpoint's SessionHost) -----------------------------------

    def candidates_for(self, facts: SignalingFacts | None) -> list[tuple[tuple[str, int], int]] | None:
        """This client's candidates with their priorities: its preferred relay first (relays.py)."""
        relays = [r for r in self.config.all_relays() if r.candidates]
        if not relays:
            return None  # direct mode: the mux's own address
        preferred = choose(self.config.choosers, facts or SignalingFacts(), relays)
        return ordered_candidates(relays, preferred)

    def _check_capacity(self) -> None:
        """503 at the session limits (admission.py); the pending ages are seconds since each unconnected
        session's offer, 0 for offers still being answered."""
        now = time.monotonic()
        pending = [0.0] * self._answering + [now - s.timings.offer_at for s in self.sessions.values()
                                             if not s.connected.is_set() and not s.ended.is_set()]
        self.admission.check_capacity(len(self.sessions) + self._answering, pending)

    def admit(self, remote: str | None, new_session: bool = True) -> None:
        """The WHIP endpoint's first question about an offer or an ICE restart (admission.py): raises
        429 or 503.  Restarts share their source's offer rate: each one checks new candidates."""
        self.admission.check_rate(remote)
        if new_session:
            self._check_capacity()

    async def open_session(self, sdp: str, offer_at: float, facts: SignalingFacts | None = None,
                           max_call_s: float | None = None) -> tuple[str, str]:
        assert self.mux is not None
        self._check_capacity()  # again, now that the body is in: others may have been admitted meanwhile
        self._answering += 1
        try:
            return await self._answer(sdp, offer_at, facts, max_call_s)
        finally:
            self._answering -= 1

    async def _answer(self, sdp: str, offer_at: float, facts: SignalingFacts | None,
                      max_call_s: float | None = None) -> tuple[str, str]:
        assert self.mux is not None
        pooled = self.ufrags.take() if self.ufrags else None  # registered already: the answer waits for no agent
        registered: list[str] = []

        async def register(session: Session) -> None:
            await self.registrars.register(session.ufrag)  # type: ignore[union-attr]
            registered.append(session.ufrag)

        session = Session.for_offer(pooled or self._new_ufrag(), self.make_handler, offer_at, self._ended)
        session.stages.watch("in_to_out", self.metrics.media_in_to_out.observe)
        try:
            answer = await session.answer(sdp, self.mux, self.candidates_for(facts),
                                          register if self.registrars and not pooled else None,
                                          self.config.connect_timeout, self.config.dtls_role)
        except BaseException as exc:
            if pooled and self.ufrags:  # no answer named it: still as good as new
                self.ufrags.give_back(pooled)
            for ufrag in registered:  # registered, then failed before the answer: take it back
                await self.registrars.unregister(ufrag)  # type: ignore[union-attr]
            if isinstance(exc, RegistrationError):
                raise OfferRejected(503, f"the relay did not accept the session: {exc}") from None
            if isinstance(exc, OfferError):
                raise OfferRejected(400, f"bad offer: {exc}") from None
            raise
        self.sessions[session.session_id] = session
        if pooled and self.ufrags:  # after this session's setup, so the refill's PUTs do not slow it
            self.ufrags.refill_after(session.connected, session.ended)
        for connection in session.ice_connections:
            connection.paths.on_change = lambda reason, addr: self.metrics.path_changes.labels(reason).inc()
        if max_call_s is not None:
            session.keep(self._end_at_max_call(session, max_call_s))
        self.metrics.sessions_started.inc()
        self.metrics.sessions.set(len(self.sessions))
        self.metrics.phase("answer", session.timings.answer_ms)
        return session.session_id, answer

    async def _end_at_max_call(self, session: Session, max_call_s: float) -> None:
        """The offer token allowed a call this long: end it then, like any other end."""
        await asyncio.sleep(max_call_s)
        if session.end(MAX_CALL):
            self.metrics.max_call_ended.inc()
            self._ended(session)

    def _new_ufrag(self) -> str:
        return hint.encode(self.config.backend_id, key=self.config.hint_key)

    def etag(self, session_id: str) -> str | None:
        session = self.sessions.get(session_id)
        return session.etag if session else None

    async def restart_session_ice(self, session_id: str, if_match: str, fragment: IceFragment) -> tuple[str, str]:
        """ICE restart (RFC 9725 4.3.2): returns (our SDP fragment, the new ETag); raises OfferRejected
        (404, 412, 400, 409, 422, 503) and then the call goes on untouched on its current pair."""
        session = self.sessions.get(session_id)
        if session is None:
            raise OfferRejected(404, "no such session")
        assert self.mux is not None
        restart = await session.restart_ice(if_match, fragment, self.mux, self._restart_ufrag)
        session.keep(self._retire_after(session, restart))
        return restart.fragment, session.etag

    async def _restart_ufrag(self) -> str:
        """A new ICE generation's ufrag, registered with the relays (the pool's, when it has one)."""
        pooled = self.ufrags.take() if self.ufrags else None
        if pooled and self.ufrags:
            self.ufrags.refill_after()
            return pooled
        ufrag = self._new_ufrag()
        if self.registrars:
            try:
                await self.registrars.register(ufrag)
            except RegistrationError as exc:
                raise OfferRejected(503, f"the relay did not accept the new ufrag: {exc}") from None
        return ufrag

    async def _retire_after(self, session: Session, restart: IceRestart) -> None:
        """Once the new generation is nominated, the relays forget the old ufrag(s)."""
        try:
            pair = await restart.generation
        except IceRestartFailed as exc:
            log.warning("session %s: ICE restart failed: %s", session.session_id, exc)
            return
        took = (asyncio.get_running_loop().time() - restart.started) * 1000.0
        pair.protocol.receiver.paths.note(RESTARTED, pair.remote_addr)
        self.metrics.ice_restart.observe(took / 1000.0)
        log.info("session %s: ICE restarted in %.0f ms", session.session_id, took)
        if self.registrars:
            for ufrag in session.retired_ufrags:
                await self.registrars.unregister(ufrag)

    async def close_session(self, session_id: str) -> bool:
        return await self.end_session(session_id, DELETED)

    def _ended(self, session: Session) -> None:
        # tracked, and awaited by stop(): the task holds the session's unregistering at the relays
        task = asyncio.ensure_future(self.end_session(session.session_id, session.end_reason or DELETED))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def end_session(self, session_id: str, reason: str = DELETED) -> bool:
        """Close a session and unregister it from the mux and the relay; False if it is unknown."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            return False
        self.whip.forget(session_id)
        self._export(session)
        self._exported.pop(session_id, None)
        self.metrics.sessions.set(len(self.sessions))
        await session.close(reason)
        if self.mux:
            self.mux.unregister(session.ufrag)  # the peer connection's close already did; be sure
        if self.registrars:
            for ufrag in [*session.retired_ufrags, session.ufrag]:  # an ICE restart leaves one per generation
                await self.registrars.unregister(ufrag)
        self.ended.append(session.to_dict())
        self.collector.session_ended(session)
        log.info("session %s ended (%s)", session_id, session.end_reason)
        return True

    def find(self, session_id: str) -> dict[str, Any] | None:
        """A live or recently ended session's record (states, history, timings, end reason)."""
        if session_id in self.sessions:
            return self.sessions[session_id].to_dict()
        return next((d for d in reversed(self.ended) if d["id"] == session_id), None)

    async def stats(self) -> dict[str, dict[str, Any]]:
        """Every live session's record with its media figures, by session id."""
        return {sid: {**s.to_dict(), "stats": await s.stats()} for sid, s in list(self.sessions.items())}

    # -- other routes -----------------------------------------------------------------

    async def list_sessions(self, request: web.Request) -> web.Response:
        out = list((await self.stats()).values())
        if request.query.get("ended"):
            out += list(self.ended)
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
                                     ("errors", self.metrics.handler_errors, session.handler_errors),
                                     ("concealed", self.metrics.frames_concealed,
                                      session.voice.buffer.concealed if session.voice else 0),
                                     ("silent", self.metrics.frames_silent, session.outbound.silent_frames)):
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
        if self.mux:
            self.metrics.follow(self.metrics.mux_drops, self.mux.drops)
            self.metrics.follow(self.metrics.candidates_ignored, self.mux.candidates_ignored)
        self.metrics.ufrag_pool_ready.set(len(self.ufrags.ready) if self.ufrags else 0)
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "sessions": len(self.sessions)})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready for new offers: a draining transceiver drops out of its Service's endpoints."""
        if self.draining:
            return web.json_response({"status": "draining", "sessions": len(self.sessions)}, status=503)
        return web.json_response({"status": "ready", "sessions": len(self.sessions)})

    # -- shutdown ---------------------------------------------------------------------

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
                session = self.sessions.get(session_id)
                if session is not None:
                    await self.end_session(session_id, session.end_reason or DELETED)
        return len(self.sessions)

    async def stop(self) -> None:
        """Graceful: refuse offers, end every session (unregistering it), stop the registrar, the
        HTTP server and the mux."""
        self.draining = True
        self._unwatch()
        for session_id in list(self.sessions):
            await self.end_session(session_id, SHUTDOWN)
        if self._ending:  # sessions that ended by themselves finish unregistering before the registrars stop
            await asyncio.wait(list(self._ending))
        if self.ufrags:
            await self.ufrags.stop()
        if self.registrars:
            await self.registrars.stop()  # also deletes the pool's ready ufrags
        if self._runner:
            await self._runner.cleanup()
        if self._admin_runner:
            await self._admin_runner.cleanup()
        if self.mux:
            self.mux.close()
        self.collector.stop()
