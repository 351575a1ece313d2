"""Session registration through the control API, as a transceiver does it: timed, in bulk.

A transceiver registers every session's ufrag before its answer leaves, so the
control API's request rate bounds how fast new calls can start on one relay.
The same client code registers the sessions the packet benchmarks route by.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from splitrelay.wire.control_client import AsyncControlClient
from splitrelay.lab.stack import control_token
from splitrelay.lab.topology import Lab
from splitrelay.lab.netns import in_netns


def ufrags(prefix: str, count: int) -> list[str]:
    """``count`` distinct ufrags (ice-chars, 4..32 long) starting with ``prefix``."""
    return [f"{prefix}{i:07d}" for i in range(count)]


async def _register(url: str, token: str, names: list[str], backend_id: int, concurrency: int,
                    delete: bool) -> float:
    queue = list(reversed(names))
    async with AsyncControlClient(url, token, timeout=10.0) as client:
        async def worker() -> None:
            while queue:
                ufrag = queue.pop()
                if delete:
                    await client.delete_session(ufrag)
                else:
                    await client.put_session(ufrag, backend_id)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start


def register(lab: Lab, url: str, names: list[str], backend_id: int = 1, concurrency: int = 8) -> float:
    """PUT each session (``concurrency`` requests in flight); returns the seconds it took."""
    return in_netns(lab.relay_public.netns,
                    lambda: asyncio.run(_register(url, control_token(lab), names, backend_id, concurrency,
                                                  delete=False)))


def unregister(lab: Lab, url: str, names: list[str], concurrency: int = 8) -> float:
    return in_netns(lab.relay_public.netns,
                    lambda: asyncio.run(_register(url, control_token(lab), names, 0, concurrency, delete=True)))


@dataclass(frozen=True)
class RegistrationRate:
    """Sessions registered and removed through one agent's control API, per second each way."""

    sessions: int
    concurrency: int
    register_per_s: int
    unregister_per_s: int


def registration_rate(lab: Lab, url: str, count: int, prefix: str, concurrency: int = 8) -> RegistrationRate:
    """Register then remove ``count`` sessions; sessions per second both ways."""
    names = ufrags(prefix, count)
    put_s = register(lab, url, names, concurrency=concurrency)
    del_s = unregister(lab, url, names, concurrency=concurrency)
    return RegistrationRate(count, concurrency, round(count / put_s), round(count / del_s))
