"""WHIP signaling (RFC 9725) on aiohttp.

* ``POST <path>`` with an ``application/sdp`` offer answers ``201 Created``, the
  session resource in ``Location`` and the complete SDP answer (no trickle: the
  candidates are known before the answer is written);
* ``DELETE <path>/sessions/<id>`` ends the session (``200``);
* ``OPTIONS`` on both answers CORS pre-flights (and ``Accept-Post``), so a web page
  on another origin can call the endpoint;
* ``PATCH <path>/sessions/<id>`` with an ``application/trickle-ice-sdpfrag`` body
  carrying new ICE credentials is an ICE restart (RFC 9725 4.3.2): ``200`` with our
  new credentials and candidates and a new ``ETag``.  ``If-Match`` must be ``*`` or
  the session's current ETag (``428`` when absent, ``412`` when stale); a fragment
  without credentials or with malformed ones is ``400``; one with the current ufrag
  is trickle ICE, which we do not take (``422``, as RFC 9725 asks of a session that
  supports only restarts).  A refused PATCH leaves the call as it was;
* with a token configured every POST and DELETE must carry ``Authorization:
  Bearer <token>`` (``401`` otherwise).

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
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from splitrelay.errors import SplitrelayError
from splitrelay.transceiver.relays import SignalingFacts
from splitrelay.wire.sdpfrag import MEDIA_TYPE as SDPFRAG, IceFragment

MAX_OFFER = 64 * 1024
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, PATCH, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
    "Access-Control-Expose-Headers": "Location, Accept-Post, ETag",
    "Access-Control-Max-Age": "600",
}
_ICE_UFRAG = re.compile(r"^a=ice-ufrag:\S+", re.M)
_ICE_PWD = re.compile(r"^a=ice-pwd:\S+", re.M)
_FINGERPRINT = re.compile(r"^a=fingerprint:\S+ \S+", re.M)


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

    async def open_session(self, sdp: str, offer_at: float, facts: SignalingFacts) -> tuple[str, str]:
        """Create a session; returns (session id, SDP answer); raises OfferRejected.  ``facts``: the
        request's source address and headers, which choose the client's preferred relay."""

    async def close_session(self, session_id: str) -> bool:
        """End a session on the client's request; False if there is no such session."""

    def etag(self, session_id: str) -> str | None:
        """The session's current ETag (its ICE generation); None if there is no such session."""

    async def restart_session_ice(self, session_id: str, if_match: str, fragment: IceFragment) -> tuple[str, str]:
        """ICE restart; returns (SDP fragment answer, new ETag); raises OfferRejected."""


@dataclass
class WhipConfig:
    path: str = "/whip"
    token: str | None = None
    max_offer: int = MAX_OFFER
    body_timeout: float = 5.0      # a client must send its whole offer within this


class WhipEndpoint:
    def __init__(self, host: SessionHost, config: WhipConfig | None = None,
                 on_rejected: Callable[[int], None] | None = None) -> None:
        self.host = host
        self.config = config or WhipConfig()
        self.on_rejected = on_rejected

    @property
    def path(self) -> str:
        return self.config.path.rstrip("/")

    def resource(self, session_id: str) -> str:
        return f"{self.path}/sessions/{session_id}"

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
                if not self._authorized(request):
                    raise OfferRejected(401, "missing or wrong bearer token")
                return await handler(request)
            except OfferRejected as exc:
                if self.on_rejected and request.method == "POST":
                    self.on_rejected(exc.status)
                response = web.Response(status=exc.status, text=exc.reason + "\n", headers=CORS)
                if exc.status == 401:
                    response.headers["WWW-Authenticate"] = "Bearer"
                if exc.retry_after is not None:
                    response.headers["Retry-After"] = str(exc.retry_after)
                if exc.status == 408:
                    response.force_close()  # the rest of its body is not worth waiting for
                return response
        return run

    def _authorized(self, request: web.Request) -> bool:
        if not self.config.token:
            return True
        offered = request.headers.get("Authorization", "").encode("utf-8", "replace")
        return hmac.compare_digest(offered, f"Bearer {self.config.token}".encode())

    async def options(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers={**CORS, "Accept-Post": "application/sdp"})

    async def patch(self, request: web.Request) -> web.Response:
        """ICE restart (RFC 9725 4.3.2); the checks run in the order a client can fix them."""
        self.host.admit(request.remote, new_session=False)  # a restart checks new candidates: same rate
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
        text, etag = await self.host.restart_session_ice(request.match_info["id"], if_match, fragment)
        return web.Response(status=200, text=text, content_type=SDPFRAG, headers={**CORS, "ETag": f'"{etag}"'})

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
        if self.host.draining:
            raise OfferRejected(503, "this transceiver is draining; try another")
        self.host.admit(request.remote)  # rate and capacity, before the body costs anything
        sdp = await self._read_offer(request)
        check_offer(sdp)
        facts = SignalingFacts(remote=request.remote, headers=dict(request.headers))
        session_id, answer = await self.host.open_session(sdp, offer_at, facts)
        headers = {"Location": self.resource(session_id), **CORS}
        etag = self.host.etag(session_id)
        if etag:
            headers["ETag"] = f'"{etag}"'
        return web.Response(status=201, text=answer, content_type="application/sdp", headers=headers)

    async def delete_session(self, request: web.Request) -> web.Response:
        if not await self.host.close_session(request.match_info["id"]):
            raise OfferRejected(404, "no such session")
        return web.Response(status=200, headers=CORS)
