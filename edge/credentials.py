"""Who may change an edge agent: the admin (master) token and per-backend tokens derived from it.

One secret, the master token, is given to the agent (``--token-file``) and to
operators.  Each transceiver gets only its own backend's token, which the agent
recomputes on demand, so it stores no list of them and rotating the master
rotates every backend token at once (SECURITY.md):

    backend token = "<id>." + hex(HMAC-SHA256(master, "splitrelay-backend:<id>"))

The id in front names the backend the token claims (the agent needs it to know
which HMAC to recompute, like the ``sub`` of a signed token); the 64 lowercase
hex digits are what proves it.  Every comparison is constant-time.

Where ids are known only at run time (``transceiver serve --backend-id from-ip``
in a Deployment), every pod holds the one *pool* token instead,
``"pool." + hex(HMAC-SHA256(master, "splitrelay-pool"))``: it opens only the
backend whose id the request's own source address gives (its low 18 bits, as
from-ip computes it), registered at that address, so a pod acts only as itself.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from pathlib import Path

from splitrelay.bpf.consts import MAX_BACKEND_ID
from splitrelay.errors import SplitrelayError

MIN_TOKEN_BYTES = 32  # 256 bits, the HMAC-SHA256 key size; a shorter master is refused on a network listener
BACKEND_LABEL = b"splitrelay-backend:"
POOL_LABEL = b"splitrelay-pool"
ADMIN = "admin"
POOL = "pool"   # a pool token: the backend is the one the caller's address gives


class CredentialError(SplitrelayError):
    """A token file or token that cannot be used (one-line reason)."""


def read_token_file(path: str | Path, what: str = "token file") -> str:
    """The token in ``path`` (surrounding whitespace removed); empty is an error, never "auth off"."""
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialError(f"cannot read {what} {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not token:
        raise CredentialError(f"{what} {path} is empty")
    return token


def check_master(token: str | None, listen_host: str) -> None:
    """Refuse a control API on a non-loopback address without a master token of >= 32 bytes."""
    try:
        loopback = ipaddress.ip_address(listen_host.strip("[]")).is_loopback
    except ValueError:
        loopback = listen_host == "localhost"
    if token is not None and not token.strip():
        raise CredentialError("the control token is empty")
    if loopback:
        return
    if token is None:
        raise CredentialError(f"the control API on {listen_host} (not loopback) needs a token "
                              f"(--token-file) of at least {MIN_TOKEN_BYTES} bytes")
    if len(token.encode()) < MIN_TOKEN_BYTES:
        raise CredentialError(f"the control token is {len(token.encode())} bytes; a control API on "
                              f"{listen_host} (not loopback) needs at least {MIN_TOKEN_BYTES}")


def backend_hmac(master: str, backend_id: int) -> str:
    """The 64 hex digits of backend ``backend_id``'s token."""
    return hmac.new(master.encode(), BACKEND_LABEL + str(backend_id).encode(), hashlib.sha256).hexdigest()


def backend_token(master: str, backend_id: int) -> str:
    """What transceiver ``backend_id`` presents: ``"<id>.<hex HMAC>"``."""
    if not 1 <= backend_id <= MAX_BACKEND_ID:
        raise CredentialError(f"backend id must be 1..{MAX_BACKEND_ID}, got {backend_id}")
    return f"{backend_id}.{backend_hmac(master, backend_id)}"


def pool_token(master: str) -> str:
    """What every from-ip transceiver presents: ``"pool.<hex HMAC>"``."""
    return "pool." + hmac.new(master.encode(), POOL_LABEL, hashlib.sha256).hexdigest()


class Credentials:
    """The agent's check of a bearer token: ``principal(token)`` is ADMIN, POOL, a backend id, or None."""

    def __init__(self, master: str) -> None:
        self.master = master
        self._master_bytes = master.encode()
        self._pool_bytes = pool_token(master).encode()

    def principal(self, offered: str) -> str | int | None:
        raw = offered.encode("utf-8", "replace")
        if hmac.compare_digest(raw, self._master_bytes):
            return ADMIN
        if hmac.compare_digest(raw, self._pool_bytes):
            return POOL
        claimed, dot, proof = offered.partition(".")
        if not dot or not claimed.isascii() or not claimed.isdigit() or len(claimed) > 7:
            return None
        backend_id = int(claimed)
        if not 1 <= backend_id <= MAX_BACKEND_ID:
            return None
        expected = backend_hmac(self.master, backend_id).encode()
        return backend_id if hmac.compare_digest(proof.encode("utf-8", "replace"), expected) else None
