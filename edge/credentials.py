"""Who may change an edge agent: the admin (master) token and per-backend tokens derived from it.

One secret, the master token, is given to the agent (``--token-file``) and to
operators.  Each transceiver gets only its own backend's token, which the agent
recomputes on demand, so it stores no list of them and rotating the master
rotates every backend token at once (SECURITY.md):

    backend token = "<id>." + hex(HMAC-SHA256(master, "splitrelay-backend:<id>"))

The id in front names the backend the token claims (the agent needs it to know
which HMAC to recompute, like the ``sub`` of a signed token); the 64 lowercase
hex digits are what proves it.  Every comparison is constant-time.

A host running ``transceiver serve --processes K`` is K backends (ids first..first+K-1, one per
worker) that share one token, a *range* token covering exactly those ids:

    range token = "<first>+<count>." + hex(HMAC-SHA256(master, "splitrelay-backend:<first>+<count>"))

The count is inside the HMAC, so a holder cannot widen its range; the label differs from every
single id's, so no range token is another backend's token.

Where ids are known only at run time (``transceiver serve --backend-id from-ip``
in a Deployment), every pod holds the one *pool* token instead,
``"pool." + hex(HMAC-SHA256(master, "splitrelay-pool"))``: it opens only the
backend whose id the request's own source address gives (its low 18 bits, as
from-ip computes it), registered at that address, so a pod acts only as itself.
Hosts that run K workers with from-ip hold ``"pool+<K>." + hex(HMAC(master,
"splitrelay-pool+<K>"))``, which opens the K ids ``from_ip_backends`` packs for the
caller's address, and nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from splitrelay.bpf.consts import MAX_BACKEND_ID
from splitrelay.errors import SplitrelayError

MIN_TOKEN_BYTES = 32  # 256 bits, the HMAC-SHA256 key size; a shorter master is refused on a network listener
BACKEND_LABEL = b"splitrelay-backend:"
POOL_LABEL = b"splitrelay-pool"
ADMIN = "admin"
POOL = "pool"   # a pool token's label: the backend is the one the caller's address gives


@dataclass(frozen=True)
class BackendRange:
    """What a range token opens: backends ``first``..``first + count - 1``."""

    first: int
    count: int

    def __contains__(self, backend_id: object) -> bool:
        return isinstance(backend_id, int) and self.first <= backend_id < self.first + self.count

    def __str__(self) -> str:   # as the agent's refusals name the caller: "backend 3..6's token ..."
        return f"{self.first}..{self.first + self.count - 1}"


@dataclass(frozen=True)
class Pool:
    """What a pool token opens: the ``count`` backends that ``from_ip_backends`` gives its caller's
    address (1: the single id of ``--backend-id from-ip``)."""

    count: int = 1

    def backends_at(self, address_id: int) -> int | BackendRange | None:
        """The backend id (count 1) or ids the address whose low 18 bits are ``address_id`` owns."""
        if self.count == 1:
            return address_id or None
        return from_ip_backends(address_id, self.count)


def from_ip_backends(address_id: int, count: int) -> BackendRange | None:
    """The ids of the ``count`` workers of a ``--backend-id from-ip`` host whose address's low 18 bits
    are ``address_id``: ``(host << b) | i`` for i < count, with b bits for ``count`` workers and host
    the address's low 18 - b bits, so hosts that differ in those bits never collide (None: they are 0).
    The one definition the transceiver's CLI packs ids with and the agent checks pool tokens by."""
    bits = (count - 1).bit_length()
    host = address_id & (MAX_BACKEND_ID >> bits)
    return BackendRange(host << bits, count) if host else None


def covers(principal: object, backend_id: int) -> bool:
    """Whether a backend principal (an id, or a BackendRange) may act as backend ``backend_id``."""
    return principal == backend_id or (isinstance(principal, BackendRange) and backend_id in principal)


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


def backend_hmac(master: str, claim: int | str) -> str:
    """The 64 hex digits of the token of ``claim``: a backend id, or ``"<first>+<count>"``."""
    return hmac.new(master.encode(), BACKEND_LABEL + str(claim).encode(), hashlib.sha256).hexdigest()


def backend_token(master: str, backend_id: int, count: int = 1) -> str:
    """What transceiver ``backend_id`` presents: ``"<id>.<hex HMAC>"``; with ``count`` > 1, what the
    ``count`` workers of ``transceiver serve --processes`` (ids ``backend_id``..) all present."""
    if not 1 <= backend_id <= MAX_BACKEND_ID:
        raise CredentialError(f"backend id must be 1..{MAX_BACKEND_ID}, got {backend_id}")
    if count < 1 or backend_id + count - 1 > MAX_BACKEND_ID:
        raise CredentialError(f"backends {backend_id}..{backend_id + count - 1} are not all within "
                              f"1..{MAX_BACKEND_ID}")
    claim = str(backend_id) if count == 1 else f"{backend_id}+{count}"
    return f"{claim}.{backend_hmac(master, claim)}"


def claim_of(token: str) -> tuple[str, int | BackendRange, str] | None:
    """What a backend or range token claims, unverified: (the label its HMAC is over, the backend id
    or BackendRange, the proof), or None when it has neither form."""
    claimed, dot, proof = token.partition(".")
    first, plus, count = claimed.partition("+")
    if not dot or not all(part.isascii() and part.isdigit() and len(part) <= 7
                          for part in ((first, count) if plus else (first,))):
        return None
    backend_id, count = int(first), int(count) if plus else 1
    if not 1 <= backend_id <= MAX_BACKEND_ID or count < 1 or backend_id + count - 1 > MAX_BACKEND_ID:
        return None
    if not plus:
        return str(backend_id), backend_id, proof
    return f"{backend_id}+{count}", BackendRange(backend_id, count), proof


def pool_label(count: int) -> str:
    """What a pool token of ``count`` workers per host claims: "pool", or "pool+<count>"."""
    return POOL if count == 1 else f"{POOL}+{count}"


def pool_token(master: str, count: int = 1) -> str:
    """What every from-ip transceiver presents: ``"pool.<hex HMAC>"``; one run with ``--processes
    count`` > 1: ``"pool+<count>.<hex HMAC>"``."""
    if not 1 <= count <= MAX_BACKEND_ID:
        raise CredentialError(f"a pool token covers 1..{MAX_BACKEND_ID} workers per host, not {count}")
    label = pool_label(count)
    return f"{label}." + hmac.new(master.encode(), b"splitrelay-" + label.encode(), hashlib.sha256).hexdigest()


def pool_claim(token: str) -> int | None:
    """How many workers per host a pool token claims, unverified (None: not a pool token's form)."""
    claimed, dot, _ = token.partition(".")
    if not dot or not claimed.startswith(POOL):
        return None
    if claimed == POOL:
        return 1
    plus, count = claimed[len(POOL):len(POOL) + 1], claimed[len(POOL) + 1:]
    if plus != "+" or not (count.isascii() and count.isdigit() and len(count) <= 7 and count[0] != "0"):
        return None
    return int(count) if 2 <= int(count) <= MAX_BACKEND_ID else None


class Credentials:
    """The agent's check of a bearer token: ``principal(token)`` is ADMIN, a Pool, a backend id, a
    BackendRange, or None."""

    def __init__(self, master: str) -> None:
        self.master = master
        self._master_bytes = master.encode()

    def principal(self, offered: str) -> str | int | BackendRange | Pool | None:
        raw = offered.encode("utf-8", "replace")
        if hmac.compare_digest(raw, self._master_bytes):
            return ADMIN
        pool_count = pool_claim(offered)
        if pool_count is not None:
            expected = pool_token(self.master, pool_count).encode()
            return Pool(pool_count) if hmac.compare_digest(raw, expected) else None
        claim = claim_of(offered)
        if claim is None:
            return None
        label, claimed, proof = claim
        expected = backend_hmac(self.master, label).encode()
        return claimed if hmac.compare_digest(proof.encode("utf-8", "replace"), expected) else None
