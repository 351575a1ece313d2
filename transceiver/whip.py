"""WHIP signaling (RFC 9725) on aiohttp.

* ``POST <path>`` with an ``application/sdp`` offer answers ``201 Created``, the
  session resource in ``Location`` and the complete SDP answer (no trickle: the
  candidates are known before the answer is written);
* ``DELETE <path>/sessions/<secret>`` ends the session (``200``);
* ``OPTIONS`` on both answers CORS pre-flights (and ``Accept-Post``), so a web page
  on an allowed origin (``cors_origins``: the matching ``Origin`` is echoed, with
  ``Vary: Origin``; ``*`` only when configured) can call the endpoint;
* ``PATCH <path>/sessions/<secret>`` with an ``application/trickle-ice-sdpfrag`` body
  carrying new ICE credentials is an ICE restart (RFC 9725 4.3.2): ``200`` with our
  new credentials and candidates and a new ``ETag``.  ``If-Match`` must be ``*`` or
  the session's current ETag (``428`` when absent, ``412`` when stale); a fragment
  without credentials or with malformed ones is ``400``; one with the current ufrag
  is trickle ICE, which we do not take (``422``, as RFC 9725 asks of a session that
  supports only restarts).  A refused PATCH leaves the call as it was;
* a POST must carry ``Authorization: Bearer <token>`` when the endpoint has a static
  token or signing keys: the static token, or a signed offer token (splitrelay/tokens.py)
  for this endpoint's audience, whose ``max_call_s`` bounds the call (``401`` with a
  one-line reason and ``WWW-Authenticate: Bearer`` otherwise).

The session resource is a capability: ``<secret>`` is 128 random bits, distinct from
the session's public id (logs, metrics, the admin listener), and the resource exists
only under it.  So only the caller that got the ``Location`` can PATCH or DELETE its
call; anyone else, offer token or not, gets the ``404`` of a resource that is not
there, whether the session exists or not.

A bad offer is refused with a 4xx and a one-line reason before anything is
created: wrong content type (415), too large (413), too slow to arrive (408),
not SDP, no audio m-line, no ICE credentials, no DTLS fingerprint, not BUNDLEd, or rejected by aiortc
(400).  An offer past the host's limits (``SessionHost.admit``: per-source rate, live and unconnected
sessions) gets 429 or 503 with ``Retry-After`` before its body is read; a PATCH past its source's
rate, 429.  What to do with a good offer is the ``SessionHost``'s business.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

from splitrelay import tokens
from splitrelay.errors import SplitrelayError
from splitrelay.transceiver.relays import SignalingFacts
from splitrelay.wire.sdpfrag import MEDIA_TYPE as SDPFRAG, IceFragment
from splitrelay.wire.whip import SESSION_ID

MAX_OFFER = 64 * 1024
SECRET_BYTES = 16   # 128 bits: a session resource cannot be guessed
CORS = {   # with Access-Control-Allow-Origin only for an allowed Origin (WhipEndpoint.cors)
    "Access-Control-Allow-Methods": "POST, PATCH, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
    "Access-Control-Expose-Headers": f"Location, Accept-Post, ETag, {SESSION_ID}",
    "Access-Control-Max-Age": "600",
}
_ICE_UFRAG = re.compile(r"^a=ice-ufrag:\S+", re.M)
_ICE_PWD = re.compile(r"^a=ice-pwd:\S+", re.M)
_FINGERPRINT = re.compile(r"^a=fingerprint:\S+ \S+", re.M)


def cors_headers(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    """The CORS headers for this request's Origin: allowed ones are echoed, others get none."""
    origin = request.headers.get("Origin")
    if origin is None or not allowed:
        return dict(CORS)
    if origin in allowed:
        return {**CORS, "Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    if "*" in allowed:
        return {**CORS, "Access-Control-Allow-Origin": "*"}
    return {**CORS, "Vary": "Origin"}


class OfferRejected(SplitrelayError):
    """A request the endpoint refuses: an HTTP status, a one-line reason and, for 429/503, the whole
    seconds after which a retry may succeed (``Retry-After``)."""

    def __init__(self, status: int, reason: str, retry_after: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = " ".join(reason.split())
        self.retry_after = retry_after


def check_offer(sdp: str) -> None:
    """The checks every offer passes before aiortc sees it (raises OfferRejected 400)."""
    text = sdp.replace("\r\n", "\n")
    if not text.startswith("v=0\n"):
        raise OfferRejected(400, "the body is not an SDP offer (no v=0)")
    if "\nm=audio " not in text:
        raise OfferRejected(400, "the offer has no audio m-line")
    if not _ICE_UFRAG.search(text) or not _ICE_PWD.search(text):
        raise OfferRejected(400, "the offer has no ICE credentials (a=ice-ufrag / a=ice-pwd)")
    if not _FINGERPRINT.search(text):
        raise OfferRejected(400, "the offer has no DTLS fingerprint (a=fingerprint)")


class SessionHost(Protocol):
    """What the endpoint drives (the Transceiver)."""

    draining: bool

    def admit(self, remote: str | None, new_session: bool = True) -> None:
        """Refuse an offer (or, not ``new_session``, an ICE restart) from ``remote`` (the peer address)
        before its body is read, with OfferRejected 429 or 503 and Retry-After, when its source or
        (for an offer) the host is at a limit."""

    async def open_session(self, sdp: str, offer_at: float, facts: SignalingFacts,
                           max_call_s: float | None = None) -> tuple[str, str]:
        """Create a session; returns (session id, SDP answer); raises OfferRejected.  ``facts``: the
        request's source address and headers, which choose the client's preferred relay;
        ``max_call_s``: the offer token's longest call, after which the session is ended."""

    async def close_session(self, session_id: str) -> bool:
        """End a session on the client's request; False if there is no such session."""

    def etag(self, session_id: str) -> str | None:
        """The session's current ETag (its ICE generation); None if there is no such session."""

    async def restart_session_ice(self, session_id: str, if_match: str, fragment: IceFragment) -> tuple[str, str]:
        """ICE restart; returns (SDP fragment answer, new ETag); raises OfferRejected."""


@dataclass
class WhipConfig:
    path: str = "/whip"
    token: str | None = None                 # the static bearer token (simple mode)
    max_offer: int = MAX_OFFER
    body_timeout: float = 5.0      # a client must send its whole offer within this
    keys: list[bytes] = field(default_factory=list)   # offer-token signing keys (several while rotating)
    audience: str = tokens.DEFAULT_AUDIENCE  # the pool an offer token must name
    cors_origins: tuple[str, ...] = ()       # origins whose pages may call; "*": any

    @property
    def open(self) -> bool:
        """Whether anyone may offer (neither a static token nor a signing key)."""
        return not self.token and not self.keys


class WhipEndpoint:
    def __init__(self, host: SessionHost, config: WhipConfig | None = None,
                 on_rejected: Callable[[int], None] | None = None) -> None:
        self.host = host
        self.config = config or WhipConfig()
        self.on_rejected = on_rejected
        self._by_secret: dict[str, str] = {}   # resource secret -> session id
        self._secret_of: dict[str, str] = {}   # session id -> resource secret

    @property
    def path(self) -> str:
        return self.config.path.rstrip("/")

    def resource(self, session_id: str) -> str:
        """A new capability for the session: its resource path under a fresh secret."""
        secret = secrets.token_urlsafe(SECRET_BYTES)
        self._by_secret[secret] = session_id
        self._secret_of[session_id] = secret
        return f"{self.path}/sessions/{secret}"

    def forget(self, session_id: str) -> None:
        """The session ended: its resource goes with it."""
        self._by_secret.pop(self._secret_of.pop(session_id, ""), None)

    def _session_of(self, request: web.Request) -> str:
        """The session a resource secret names, else the 404 a stranger gets for any resource."""
        session_id = self._by_secret.get(request.match_info["id"])
        if session_id is None:
            raise OfferRejected(404, "no such session")
        return session_id

    def cors(self, request: web.Request) -> dict[str, str]:
        return cors_headers(request, self.config.cors_origins)

    def routes(self) -> list[web.RouteDef]:
        resource = self.path + "/sessions/{id}"
        return [
            web.post(self.path, self._guarded(self.post_offer)),
            web.options(self.path, self.options),
            web.delete(resource, self._guarded(self.delete_session)),
            web.options(resource, self.options),
            web.patch(resource, self._guarded(self.patch)),
        ]

    def _guarded(self, handler: Callable[[web.Request], Awaitable[web.Response]]):  # noqa: ANN202
        async def run(request: web.Request) -> web.Response:
            try:
                response = await handler(request)
                response.headers.update(self.cors(request))
                return response
            except OfferRejected as exc:
                if self.on_rejected and request.method == "POST":
                    self.on_rejected(exc.status)
                response = web.Response(status=exc.status, text=exc.reason + "\n", headers=self.cors(request))
                if exc.status == 401:
                    response.headers["WWW-Authenticate"] = "Bearer"
                if exc.retry_after is not None:
                    response.headers["Retry-After"] = str(exc.retry_after)
                if exc.status == 408:
                    response.force_close()  # the rest of its body is not worth waiting for
                return response
        return run

    def authorize(self, request: web.Request) -> tokens.Grant | None:
        """The offer's grant (None: no limit); raises OfferRejected 401 with the reason."""
        c = self.config
        if c.open:
            return None
        scheme, _, offered = request.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not offered.strip():
            raise OfferRejected(401, "missing bearer token")
        offered = offered.strip()
        if c.token and hmac.compare_digest(offered.encode("utf-8", "replace"), c.token.encode()):
            return None
        if not c.keys:
            raise OfferRejected(401, "wrong bearer token")
        try:
            return tokens.verify(offered, c.keys, c.audience)
        except tokens.TokenError as exc:
            raise OfferRejected(401, str(exc)) from None

    async def options(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers={**self.cors(request), "Accept-Post": "application/sdp"})

    async def patch(self, request: web.Request) -> web.Response:
        """ICE restart (RFC 9725 4.3.2); the checks run in the order a client can fix them."""
        self.host.admit(request.remote, new_session=False)  # a restart checks new candidates: same rate
        session_id = self._session_of(request)
        if request.content_type != SDPFRAG:
            raise OfferRejected(415, f"a PATCH must be Content-Type: {SDPFRAG}")
        if_match = request.headers.get("If-Match")
        if if_match is None:
            raise OfferRejected(428, "a PATCH needs If-Match: the session's ETag, or * for an ICE restart")
        if request.content_length and request.content_length > self.config.max_offer:
            raise OfferRejected(413, f"fragment larger than {self.config.max_offer} bytes")
        body = await request.content.read(self.config.max_offer + 1)
        if len(body) > self.config.max_offer:
            raise OfferRejected(413, f"fragment larger than {self.config.max_offer} bytes")
        fragment = IceFragment.parse(body.decode("utf-8", "replace"))
        text, etag = await self.host.restart_session_ice(session_id, if_match, fragment)
        return web.Response(status=200, text=text, content_type=SDPFRAG, headers={"ETag": f'"{etag}"'})

    async def _read_offer(self, request: web.Request) -> str:
        c = self.config
        if request.content_type != "application/sdp":
            raise OfferRejected(415, "the offer must be Content-Type: application/sdp")
        if request.content_length and request.content_length > c.max_offer:
            raise OfferRejected(413, f"offer larger than {c.max_offer} bytes")
        async def body() -> bytes:
            raw = bytearray()
            while len(raw) <= c.max_offer:
                chunk = await request.content.read(c.max_offer + 1 - len(raw))
                if not chunk:
                    break
                raw += chunk
            return bytes(raw)

        try:
            raw = await asyncio.wait_for(body(), c.body_timeout)
        except TimeoutError:
            raise OfferRejected(408, f"the offer did not arrive within {c.body_timeout:g} s") from None
        if len(raw) > c.max_offer:
            raise OfferRejected(413, f"offer larger than {c.max_offer} bytes")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise OfferRejected(400, "the offer is not UTF-8 text") from None

    async def post_offer(self, request: web.Request) -> web.Response:
        offer_at = time.monotonic()
        grant = self.authorize(request)
        if self.host.draining:
            raise OfferRejected(503, "this transceiver is draining; try another")
        self.host.admit(request.remote)  # rate and capacity, before the body costs anything
        sdp = await self._read_offer(request)
        check_offer(sdp)
        facts = SignalingFacts(remote=request.remote, headers=dict(request.headers))
        session_id, answer = await self.host.open_session(sdp, offer_at, facts,
                                                          grant.max_call_s if grant else None)
        headers = {"Location": self.resource(session_id), SESSION_ID: session_id}
        etag = self.host.etag(session_id)
        if etag:
            headers["ETag"] = f'"{etag}"'
        return web.Response(status=201, text=answer, content_type="application/sdp", headers=headers)

    async def delete_session(self, request: web.Request) -> web.Response:
        if not await self.host.close_session(self._session_of(request)):
            raise OfferRejected(404, "no such session")
        return web.Response(status=200)
