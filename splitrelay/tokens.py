"""Short-lived WHIP offer tokens: compact HS256 JWTs (RFC 7519) that the app's backend mints.

A static bearer string shared by every caller can be neither scoped nor expired, and
whoever reads it once may call forever.  Like LiveKit's access tokens, a token here
says until when it is good (``exp``), for which transceiver pool (``aud``) and how
long the call it opens may last (``max_call_s``); the backend that knows the user
mints it with a key it shares with the transceivers.  HS256 needs only hmac,
hashlib and base64, so no JWT library is a dependency (PyJWT, when installed,
serves the tests as an independent oracle).  The signature is checked before any
claim is read, and in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path

from splitrelay.errors import SplitrelayError

DEFAULT_AUDIENCE = "splitrelay"   # the pool a transceiver serves unless told (--whip-audience)
TOKEN_ENV = "SPLITRELAY_WHIP_TOKEN"   # where clients (and `splitrelay call`) find a WHIP bearer token
MIN_KEY_BYTES = 32          # RFC 7518 3.2: an HS256 key at least as long as the hash
HEADER = {"alg": "HS256", "typ": "JWT"}

EXPIRED = "token expired"
WRONG_AUDIENCE = "token is for another audience"
BAD_SIGNATURE = "token signature does not verify"
MALFORMED = "malformed token"


class TokenError(SplitrelayError):
    """A token or key that is refused, with one of the reasons above (or the key file's)."""


@dataclass(frozen=True)
class Grant:
    """What a verified token allows."""

    audience: str
    expires_at: int                 # Unix seconds
    max_call_s: float | None        # the longest call it may open; None: no limit


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not text or "=" in text:
        raise TokenError(MALFORMED)
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise TokenError(MALFORMED) from None


def _sign(key: bytes, signing_input: str) -> bytes:
    return hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()


def load_key(path: str | Path) -> bytes:
    """A key file's bytes, surrounding whitespace stripped; an empty or short key is an error, never
    "auth off"."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise TokenError(f"cannot read the key file {path}: {exc.strerror or exc}") from None
    if not key:
        raise TokenError(f"the key file {path} is empty")
    if len(key) < MIN_KEY_BYTES:
        raise TokenError(f"the key in {path} has {len(key)} bytes; it needs at least {MIN_KEY_BYTES}")
    return key


def mint(key: bytes, audience: str, ttl_s: float, max_call_s: float | None = None,
         now: float | None = None) -> str:
    """A compact JWS (``header.claims.signature``) good for ``ttl_s`` from ``now``."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, object] = {"aud": audience, "iat": issued, "exp": issued + int(ttl_s)}
    if max_call_s is not None:
        claims["max_call_s"] = max_call_s
    signing_input = ".".join(_b64(json.dumps(part, separators=(",", ":")).encode())
                             for part in (HEADER, claims))
    return f"{signing_input}.{_b64(_sign(key, signing_input))}"


def verify(token: str, keys: list[bytes], audience: str, now: float | None = None) -> Grant:
    """The grant of a token signed by any of ``keys`` (several while a key is rotated) for
    ``audience``; raises TokenError with MALFORMED, BAD_SIGNATURE, EXPIRED or WRONG_AUDIENCE."""
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError(MALFORMED)
    header_b64, claims_b64, signature_b64 = parts
    try:
        header = json.loads(_unb64(header_b64))
    except ValueError:
        raise TokenError(MALFORMED) from None
    if not isinstance(header, dict) or header.get("alg") != "HS256":   # never "none", never another key type
        raise TokenError(MALFORMED)
    signature = _unb64(signature_b64)
    signing_input = f"{header_b64}.{claims_b64}"
    if not any(hmac.compare_digest(_sign(key, signing_input), signature) for key in keys):
        raise TokenError(BAD_SIGNATURE)
    try:
        claims = json.loads(_unb64(claims_b64))
    except ValueError:
        raise TokenError(MALFORMED) from None
    if not isinstance(claims, dict):
        raise TokenError(MALFORMED)
    exp, aud, max_call = claims.get("exp"), claims.get("aud"), claims.get("max_call_s")
    if not _number(exp) or (max_call is not None and not (_number(max_call) and max_call > 0)):
        raise TokenError(MALFORMED)
    if (time.time() if now is None else now) >= exp:
        raise TokenError(EXPIRED)
    if aud != audience and not (isinstance(aud, list) and audience in aud):
        raise TokenError(WRONG_AUDIENCE)
    return Grant(audience, int(exp), float(max_call) if max_call is not None else None)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
