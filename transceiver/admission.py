"""Whether a WHIP offer may become a session now: live sessions, unconnected ones, and each source's rate.

An offer needs no credential in open mode, and each one answered costs the
transceiver a peer connection, a ufrag registered with every relay and checks to
the candidates it names (candidates.py) until it connects or its connect timeout
ends it.  So, checked in this order, before the offer's body is even read:

* ``offer_rate``/``offer_burst``: a token bucket per source (an IPv4 address, an
  IPv6 /64, since one subscriber gets a whole /64), 429.  ICE restarts (PATCH)
  take from the same bucket: each one checks a new set of candidates.  The table keeps at
  most ``offer_sources`` sources, the least recently seen forgotten first: an
  attacker with more sources than that can refresh its buckets, which the two
  global bounds below still cap;
* ``max_sessions``: live sessions, 503;
* ``max_pending``: sessions answered (or being answered) but not yet connected,
  503.  This is what a flood of offers that never connect holds, for at most
  the connect timeout each.

Every refusal carries ``Retry-After`` and is counted by reason; nothing has
been created or registered by then.  Behind a proxy every offer comes from the
proxy's address: there, turn the rate off (``offer_rate=0``) and limit at the proxy.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from splitrelay.transceiver.limits import MAX_PENDING, OFFER_BURST, OFFER_RATE, OFFER_SOURCES
from splitrelay.transceiver.whip import OfferRejected

RATE = "rate"          # refusal reasons (the metric's label)
SESSIONS = "sessions"
PENDING = "pending"

# A full transceiver frees a slot when some call ends, which nobody can predict: 5 s keeps a
# client's retries to one every 5 s, and a load-balanced client is better off at another transceiver.
FULL_RETRY_AFTER_S = 5


@dataclass
class AdmissionConfig:
    max_sessions: int = 0                  # live sessions; 0 = no limit (the handler's cost decides)
    max_pending: int = MAX_PENDING         # answered but not connected; 0 = no limit
    offer_rate: float = OFFER_RATE         # offers per second per source; 0 = no limit
    offer_burst: int = OFFER_BURST         # offers a quiet source may send at once
    offer_sources: int = OFFER_SOURCES     # sources whose buckets are kept (about 200 bytes each)


class Refused(OfferRejected):
    """An offer refused for capacity (503) or rate (429); ``why`` is the metric's reason label."""

    def __init__(self, status: int, why: str, reason: str, retry_after: float) -> None:
        super().__init__(status, reason, retry_after=max(1, math.ceil(retry_after)))
        self.why = why


def source_of(remote: str | None) -> str:
    """The rate limit's key for a request's peer address: the IPv4 address, or the IPv6 /64."""
    try:
        addr = ipaddress.ip_address((remote or "").split("%")[0])
    except ValueError:
        return remote or "?"  # a unix socket or no peer: one shared bucket
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class TokenBuckets:
    """One token bucket per source, at most ``sources`` of them (least recently seen evicted)."""

    def __init__(self, rate: float, burst: int, sources: int) -> None:
        self.rate, self.burst, self.sources = rate, max(1, burst), max(1, sources)
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # source -> (tokens, at)
        self.evicted = 0

    def take(self, source: str, now: float) -> float:
        """Take a token for ``source``: 0.0 if it had one, else the seconds until it will."""
        tokens, at = self.buckets.pop(source, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self.buckets[source] = (tokens, now)
        while len(self.buckets) > self.sources:
            self.buckets.popitem(last=False)
            self.evicted += 1
        return wait


class Admission:
    """The transceiver's admission policy; ``on_refused(reason)`` counts each refusal."""

    def __init__(self, config: AdmissionConfig, connect_timeout: float | None,
                 on_refused: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.connect_timeout = connect_timeout
        self.on_refused = on_refused
        self.buckets = TokenBuckets(config.offer_rate, config.offer_burst, config.offer_sources)

    def _refuse(self, status: int, why: str, reason: str, retry_after: float) -> Refused:
        if self.on_refused:
            self.on_refused(why)
        return Refused(status, why, reason, retry_after)

    def check_rate(self, remote: str | None) -> None:
        """Take one of the source's tokens, or raise 429."""
        if self.config.offer_rate <= 0:
            return
        source = source_of(remote)
        wait = self.buckets.take(source, asyncio.get_running_loop().time())
        if wait:
            limit = f"at most {self.config.offer_rate:g}/s after a burst of {self.buckets.burst}"
            raise self._refuse(429, RATE, f"too many offers or ICE restarts from {source}: {limit}", wait)

    def check_capacity(self, live: int, pending_ages: list[float]) -> None:
        """Raise 503 if ``live`` sessions, or the unconnected ones (their ages in seconds), are at a limit."""
        c = self.config
        if c.max_sessions and live >= c.max_sessions:
            raise self._refuse(503, SESSIONS, f"this transceiver is full ({c.max_sessions} sessions)",
                               FULL_RETRY_AFTER_S)
        if c.max_pending and len(pending_ages) >= c.max_pending:
            # the oldest unconnected session connects or times out by then
            oldest = max(pending_ages, default=0.0)
            retry = (self.connect_timeout - oldest) if self.connect_timeout else FULL_RETRY_AFTER_S
            raise self._refuse(503, PENDING, f"{c.max_pending} sessions are still connecting; try again "
                                             "shortly", retry)
