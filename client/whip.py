"""The one WHIP client (RFC 9725) of the aiortc callers here: offer, ICE-restart PATCH, DELETE.

The probe, the voice caller, the echo-gap tool and the ICE-restart helper each need the same three
requests, the same bearer token (an offer token or the static one, ``tokens.TOKEN_ENV`` on the
command line) and the same reading of the answer: the session resource in ``Location`` (a secret
capability, made absolute against the URL that answered), the public id in ``X-Splitrelay-Session``
(``wire/whip.py``) and the ETag of the ICE generation.  A refusal is ``WhipRefused`` with the
endpoint's status and one-line reason, a request that got no answer is ``WhipUnreachable``, and a
refused ICE restart is ``RestartRefused``; all are ``WhipError`` (status 0: nothing answered).
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from yarl import URL

from splitrelay.errors import SplitrelayError
from splitrelay.wire.sdpfrag import MEDIA_TYPE as SDPFRAG
from splitrelay.wire.whip import SESSION_ID

RESOURCE = "the session's resource"   # named so in errors: its URL is a secret (a capability)


class WhipError(SplitrelayError):
    """A WHIP request that failed: ``status`` is the HTTP status of a refusal, 0 when nothing answered."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class WhipUnreachable(WhipError):
    """The request got no answer (refused connection, timeout, reset)."""


class WhipRefused(WhipError):
    """The endpoint answered the offer with an error; ``reason`` is its one-line body."""

    def __init__(self, url: str, status: int, reason: str) -> None:
        super().__init__(f"WHIP {url} answered {status}: {reason[:200]}", status)
        self.reason = reason


class RestartRefused(WhipError):
    """The session answered an ICE restart's PATCH with an error."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"ICE restart refused: {status} {reason}", status)
        self.reason = reason


@dataclass(frozen=True)
class WhipAnswer:
    """What a ``201 Created`` gave: the SDP answer and the session's resource, id and ETag."""

    sdp: str
    location: str | None     # the session's resource (absolute): a capability, only its caller holds it
    session_id: str | None   # its public id (what the transceiver's logs and admin listener name)
    etag: str | None         # its ICE generation (quoted, as sent), for If-Match


@dataclass(frozen=True)
class RestartAnswer:
    """What a ``200`` to an ICE restart gave: the server's fragment (new credentials, candidates)."""

    fragment: str
    etag: str | None         # the new generation's ETag (quoted, as sent)


class WhipClient:
    """The three requests of a WHIP caller on one aiohttp session; ``token`` goes with each of them."""

    def __init__(self, http: aiohttp.ClientSession, token: str | None = None) -> None:
        self.http = http
        self.token = token

    def _headers(self, **extra: str) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        headers.update(extra)
        return headers

    async def offer(self, url: str, sdp: str) -> WhipAnswer:
        """POST the offer; the answer, or WhipRefused (not 201) / WhipUnreachable."""
        headers = self._headers(**{"Content-Type": "application/sdp"})
        try:
            async with self.http.post(url, data=sdp, headers=headers) as resp:
                body = await resp.text()
                if resp.status != 201:
                    raise WhipRefused(url, resp.status, body.strip())
                location = resp.headers.get("Location")
                return WhipAnswer(body, str(resp.url.join(URL(location))) if location else None,
                                  resp.headers.get(SESSION_ID), resp.headers.get("ETag"))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _unreachable(url, exc) from None

    async def restart(self, location: str, fragment: str, if_match: str = "*") -> RestartAnswer:
        """PATCH an ICE restart (RFC 9725 4.3.2); the server's fragment, or RestartRefused (not 200)."""
        headers = self._headers(**{"Content-Type": SDPFRAG, "If-Match": if_match})
        try:
            async with self.http.patch(location, data=fragment, headers=headers) as resp:
                body = await resp.text()
                if resp.status != 200:
                    raise RestartRefused(resp.status, body.strip())
                return RestartAnswer(body, resp.headers.get("ETag"))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _unreachable(RESOURCE, exc) from None

    async def delete(self, location: str) -> int:
        """DELETE the session: the status (200; 404 once it is gone), or WhipUnreachable."""
        try:
            async with self.http.delete(location, headers=self._headers()) as resp:
                await resp.read()
                return resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _unreachable(RESOURCE, exc) from None


def _unreachable(url: str, exc: BaseException) -> WhipUnreachable:
    return WhipUnreachable(f"WHIP request to {url} failed: {type(exc).__name__}: {exc}".rstrip(": "))
