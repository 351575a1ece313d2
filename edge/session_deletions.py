"""Session deletions batched into one pass over the flow table, and the table-walker thread they run in."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from splitrelay.edge.plane import DataPlane

T = TypeVar("T")


async def off_loop(walker: Executor | None, fn: Callable[..., T], *args: Any) -> T:
    """Run a call that reads a whole map in the agent's table-walker thread (or here, when it has none).

    A read of a large flow table takes milliseconds to seconds; on the event loop it
    would hold up every registration (a new call's setup) behind it.  The XDP agent
    gives one single-thread executor, so walks never overlap each other; the
    userspace relay's tables live on the loop, so it gives none.
    """
    if walker is None:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(walker, fn, *args)


class SessionDeletions:
    """Session DELETEs that arrive together share one pass over the flow table.

    Finding a session's flows means reading the whole flow map (XDP learns flows
    without telling the agent); at tens of thousands of flows one read takes
    milliseconds, so deleting calls one by one would cap hang-ups per second.  A
    DELETE joins the pending set and waits; one sweep at a time removes the whole
    set with ``del_sessions`` (one read), and the requests that arrived while it
    ran form the next (no fixed window: at low rates a DELETE is not delayed, and
    under load the requests queued during one read make the next batch).  The
    answer still comes after the flows are gone.
    """

    def __init__(self, plane: DataPlane, walker: Executor | None = None) -> None:
        self.plane = plane
        self.walker = walker
        self._pending: dict[str, asyncio.Future[bool]] = {}
        self._sweeping: set[str] = set()
        self._sweeper: asyncio.Task | None = None

    def pending(self, ufrag: str) -> bool:
        return ufrag in self._pending or ufrag in self._sweeping

    async def delete(self, ufrag: str) -> bool:
        """Remove the session and its flows; False if there was no such session."""
        future = self._pending.get(ufrag)
        if future is None:
            future = self._pending[ufrag] = asyncio.get_running_loop().create_future()
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep(), name="session-deletions")
        return await asyncio.shield(future)  # a client that hangs up does not cancel the others' sweep

    async def close(self) -> None:
        """Let the sweep in progress finish (its DELETEs were accepted: their sessions must go)."""
        if self._sweeper is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._sweeper)

    async def _sweep(self) -> None:
        while self._pending:
            await asyncio.sleep(0)  # the DELETEs whose handlers are already running join this batch
            batch, self._pending = self._pending, {}
            self._sweeping = set(batch)
            try:
                removed = await off_loop(self.walker, self.plane.del_sessions, list(batch))
            except Exception as exc:  # noqa: BLE001 - every waiter gets the failure
                for future in batch.values():
                    if not future.done():
                        future.set_exception(exc)
                continue
            finally:
                self._sweeping = set()
            for ufrag, future in batch.items():
                if not future.done():
                    future.set_result(removed[ufrag])

