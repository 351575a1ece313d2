"""Ufrags registered with the relays ahead of the offers that will use them.

Registering a session's ufrag with the relays' agents is an HTTP round trip, and its
client side costs CPU in this event loop; on the answer's path it made session setup
through 2 relays 1.09-1.14x direct in the lab (BENCHMARKS.md, "Session setup").  A new
session takes a ufrag whose registration already happened, so its answer waits for no
agent.  The pool tops itself up once the session that took a ufrag has connected (or
ended), so the refill's PUTs never compete with that session's ICE and DTLS.  A burst
larger than the pool falls back to registering on the answer's path, and is counted.

A ready ufrag is an ordinary registered session to every Registrar (re-registered after
an agent restart, deleted at stop); no packet can use it before an answer names it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from splitrelay.transceiver.registration import RegistrationError, RelayRegistrars

log = logging.getLogger(__name__)


class UfragPool:
    """Up to ``size`` ufrags at least one relay accepted, made by ``make_ufrag``.

    ``on_empty`` is called each time ``take`` finds the pool empty (the transceiver counts it)."""

    def __init__(self, size: int, make_ufrag: Callable[[], str], registrars: RelayRegistrars,
                 on_empty: Callable[[], None] | None = None) -> None:
        self.size = size
        self.make_ufrag = make_ufrag
        self.registrars = registrars
        self.on_empty = on_empty
        self.ready: deque[str] = deque()
        self._filling: asyncio.Task | None = None
        self._waiters: set[asyncio.Task] = set()

    def take(self) -> str | None:
        """The oldest ready ufrag, now the caller's to use or unregister; None if the pool is empty."""
        if self.ready:
            return self.ready.popleft()
        if self.on_empty is not None:
            self.on_empty()
        return None

    def give_back(self, ufrag: str) -> None:
        """Return a taken ufrag that no answer named (its offer failed): still registered, still unseen."""
        self.ready.appendleft(ufrag)

    async def fill(self) -> None:
        """Register new ufrags until the pool is full.  One pass at a time: a call while a pass runs
        waits for it.  A registration that no relay accepted ends the pass (logged); the next
        refill tries again, and meanwhile sessions register on the answer's path."""
        if self._filling is None or self._filling.done():
            self._filling = asyncio.ensure_future(self._fill())
        await asyncio.shield(self._filling)

    async def _fill(self) -> None:
        while len(self.ready) < self.size:
            ufrag = self.make_ufrag()
            try:
                await self.registrars.register(ufrag)
            except RegistrationError as exc:
                log.warning("ufrag pool: no relay accepted a ready ufrag: %s (%d ready)", exc, len(self.ready))
                return
            self.ready.append(ufrag)

    def refill_after(self, *events: asyncio.Event) -> None:
        """Top the pool up once any of ``events`` is set (at once if none is given)."""
        async def wait_then_fill() -> None:
            if events:
                waits = [asyncio.ensure_future(e.wait()) for e in events]
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
            await self.fill()
        task = asyncio.ensure_future(wait_then_fill())
        self._waiters.add(task)
        task.add_done_callback(self._waiters.discard)

    async def stop(self) -> None:
        """Stop refilling.  The ready ufrags stay registered: ``RelayRegistrars.stop`` deletes them
        with every other session."""
        tasks = [*self._waiters, *([self._filling] if self._filling else [])]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
