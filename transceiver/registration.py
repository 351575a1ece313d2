"""The transceiver's side of the edge control API: register its backend and sessions, and keep them.

Sessions are registered before the SDP answer leaves, so the relay (with several,
the first to accept) knows the ufrag before the client's first STUN request can arrive.  The agent's
``boot_id`` is watched: when the agent restarts with empty maps, the backend
and every live session are registered again.  Registration is optional: a
transceiver without a relay (direct mode) has no ``Registrar``.

With several relays (``RelayRegistrars``) every session is registered with every
relay, concurrently: any relay may carry any session (a client moves to a backup
relay's candidate when its relay dies).  The answer leaves as soon as the *first*
relay accepted; the others finish behind it (a slow or distant relay's agent no longer
delays every answer, by up to its 3 s timeout when it stalls).  The offer is refused
only when *no* relay accepted it.  A relay that missed a registration (unreachable,
5xx, at the offer or behind the answer) is retried on the next watch tick
(``watch_interval``, 1 s) until it takes the session, so every relay routes every
session eventually; meanwhile, under ``strict`` policy it drops that client's checks
(``unknown_ufrag``) and ICE uses another relay's pair, while under ``hint`` policy
the routing hint in the ufrag alone routes the session there, registration or not.
A relay unreachable at start is watched the same way and gets the backend and every
live session when it answers.

The token given (``--token``) is normally this backend's own (``splitrelay edge
token``): it opens this backend and its sessions at the agent, nothing else.  The
backend is refreshed every ``refresh_interval`` so the agent knows it is live (a
second process claiming the same id elsewhere gets 409, and the agent does not age
this backend's idle sessions).  A DELETE that fails is not forgotten: the ufrag
stays in ``leftover`` and is retried on the watch ticks with a doubling delay
(capped at ``MAX_RETRY_S``) until the agent has removed it or says it never had it.

Routes and bodies are those of docs/DESIGN.md ("Edge control API").
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Any

from splitrelay.errors import SplitrelayError
from splitrelay.wire.control_client import (
    AsyncControlClient, ControlError, backend_body, backend_path, session_path, sessions_path,
)

log = logging.getLogger(__name__)
REFRESH_S = 10.0    # well inside the agent's 30 s liveness window (edge/control.py BACKEND_LIVE_S)
MAX_RETRY_S = 30.0  # the longest wait between two tries of a failed DELETE


class RegistrationError(SplitrelayError):
    """The edge agent refused or could not be reached (one-line reason)."""


class AgentUnreachable(RegistrationError):
    """No answer from the agent (connection refused, timeout, not JSON where JSON was due)."""


class AgentRefused(RegistrationError):
    """The agent answered 4xx/5xx; ``status`` and the agent's one-line ``reason``."""

    def __init__(self, message: str, status: int, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class Unauthorized(AgentRefused):
    """401: the control token is missing or wrong."""


class Forbidden(AgentRefused):
    """403: the token is valid but not for this (the token of another backend, or a non-admin one)."""


class SessionConflict(AgentRefused):
    """409: the ufrag is owned by another backend, or the agent does not know this backend."""


def _typed(exc: ControlError) -> RegistrationError:
    """The control client's error as the registration's own type (the transceiver acts on these)."""
    if exc.status == 0:
        return AgentUnreachable(exc.message)
    cls = {401: Unauthorized, 403: Forbidden, 409: SessionConflict}.get(exc.status, AgentRefused)
    return cls(exc.message, exc.status, exc.reason)


class Registrar:
    """Registers one backend (this transceiver's mux address) and its sessions with one edge agent."""

    def __init__(self, control_url: str, backend_id: int, backend_ip: str | None, backend_port: int,
                 token: str | None = None, backend_ip6: str | None = None, watch_interval: float = 1.0,
                 timeout: float = 3.0, name: str = "relay", refresh_interval: float = REFRESH_S,
                 instance: str | None = None) -> None:
        self.base = control_url.rstrip("/")
        self.name = name
        # "instance" tells the agent when a new process took over this backend id (a restart
        # after a crash): the old process's sessions are gone, so the agent drops them.  One per
        # transceiver, shared by its registrars: with one each, an agent that heard from two of them
        # (a relay's control address reached through another) took the second for a restart and
        # dropped every live session of the backend, so a failover found none at relay 2
        self.backend: dict[str, Any] = {"ip": backend_ip, "ip6": backend_ip6, "port": backend_port,
                                        "instance": instance or secrets.token_hex(8)}
        self.backend_id = backend_id
        self.token = token
        self.sessions: set[str] = set()
        self.missed: set[str] = set()   # sessions this agent has not accepted yet (retried each tick)
        self.sending: set[str] = set()  # sessions whose PUT is on its way (sent, not answered yet)
        self.leftover: dict[str, tuple[float, float]] = {}  # failed DELETEs: ufrag -> (next try, delay)
        self.refresh_interval = refresh_interval
        self._refreshed = 0.0  # loop time of the last backend PUT
        self.boot_id: str | None = None
        self.reregistrations = 0
        self.watch_interval = watch_interval
        self.timeout = timeout
        self.boot_changed = asyncio.Event()  # set after each re-registration (tests, metrics)
        self.control: AsyncControlClient | None = None   # while started
        self._watch: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # a re-registration and a new session do not interleave

    async def _call(self, method: str, path: str, body: dict | None = None) -> Any:  # noqa: ANN401
        """One request of the control API through ``control``; its errors as RegistrationError."""
        if self.control is None:
            raise AgentUnreachable("registrar is not started")
        try:
            return await self.control.call(method, path, body)
        except ControlError as exc:
            raise _typed(exc) from None

    async def health(self) -> dict[str, Any]:
        health = await self._call("GET", "/v1/health")
        if not isinstance(health, dict) or not isinstance(health.get("boot_id"), str):
            raise AgentUnreachable(f"{self.base}/v1/health did not answer with a boot_id")
        return health

    async def start(self, required: bool = True) -> None:
        """Check the agent and register the backend; raises RegistrationError if it cannot.  With
        ``required=False`` an unreachable agent is only logged and watched: the backend and the
        sessions are registered when it answers (the error is still raised, after the watch starts)."""
        self.control = AsyncControlClient(self.base, self.token, self.timeout)
        try:
            boot_id = (await self.health())["boot_id"]
            await self._put_backend()
            self.boot_id = boot_id
        except RegistrationError:
            if required:
                await self.control.close()
                self.control = None
                raise
            self._watch = asyncio.create_task(self._watch_agent())
            raise
        self._watch = asyncio.create_task(self._watch_agent())

    async def _put_backend(self) -> None:
        await self._call("PUT", backend_path(self.backend_id), backend_body(**self.backend))
        self._refreshed = asyncio.get_running_loop().time()

    async def register(self, ufrag: str) -> None:
        async with self._lock:
            self.sending.add(ufrag)
            try:
                await self._call("PUT", session_path(ufrag), {"backend": self.backend_id})
            finally:
                self.sending.discard(ufrag)
            self.sessions.add(ufrag)
            self.missed.discard(ufrag)

    async def unregister(self, ufrag: str) -> None:
        """Best effort: the agent may already have dropped it (restart, its own ageing).

        Under the lock, like re-registration: a hang-up that raced a re-registration pass
        after an agent restart had its DELETE land before the pass's PUT, and the dead
        session stayed registered (seen in the lab suite on a loaded machine)."""
        async with self._lock:
            self.sessions.discard(ufrag)
            if ufrag in self.missed:  # never accepted: nothing to delete
                self.missed.discard(ufrag)
                return
            await self._delete(ufrag)

    async def _delete(self, ufrag: str) -> bool:
        """One DELETE of a session; a failure leaves it in ``leftover`` for the watch ticks.  True if gone."""
        try:
            await self._call("DELETE", session_path(ufrag))
        except RegistrationError as exc:
            if not (isinstance(exc, AgentRefused) and exc.status == 404):
                _, delay = self.leftover.get(ufrag, (0.0, self.watch_interval / 2))
                delay = min(2 * delay, MAX_RETRY_S)
                self.leftover[ufrag] = (asyncio.get_running_loop().time() + delay, delay)
                log.warning("unregistering %s: %s (retrying in %.0f s)", ufrag, exc, delay)
                return False
        self.leftover.pop(ufrag, None)
        return True

    async def _retry_leftover(self) -> None:
        now = asyncio.get_running_loop().time()
        for ufrag, (due, _) in list(self.leftover.items()):
            if due <= now and ufrag not in self.sessions:
                async with self._lock:
                    await self._delete(ufrag)

    async def check(self) -> bool:
        """One look at the agent's boot_id; re-register everything if it changed.  True if it did."""
        health = await self.health()
        if health["boot_id"] == self.boot_id:
            if asyncio.get_running_loop().time() - self._refreshed >= self.refresh_interval:
                await self._put_backend()  # the agent counts this backend live (edge/control.py _live)
            await self._retry_missed()
            await self._retry_leftover()
            return False
        async with self._lock:
            await self._put_backend()
            self.sessions |= self.missed
            self.missed.clear()
            for ufrag in list(self.sessions):
                try:
                    await self._call("PUT", session_path(ufrag), {"backend": self.backend_id})
                except SessionConflict as exc:  # another backend took it meanwhile: not ours anymore
                    log.warning("re-registering %s: %s", ufrag, exc)
                    self.sessions.discard(ufrag)
            await self._drop_stale_sessions()
            self.boot_id = health["boot_id"]
            self.reregistrations += 1
        log.info("edge agent restarted: re-registered backend %d and %d sessions",
                 self.backend_id, len(self.sessions))
        self.boot_changed.set()
        return True

    async def _retry_missed(self) -> None:
        for ufrag in list(self.missed):
            try:
                await self.register(ufrag)
            except SessionConflict as exc:  # another backend owns it at this relay: give up there
                log.warning("registering %s with %s: %s", ufrag, self.name, exc)
                self.missed.discard(ufrag)

    async def _drop_stale_sessions(self) -> None:
        """Delete the agent's sessions of this backend that no longer live here.

        A restarted agent adopts its pinned maps, so a session that ended while the
        agent was down (its DELETE refused) comes back with it and would stay
        registered forever (seen in the lab: a call hung up during an agent restart)."""
        listed = await self._call("GET", sessions_path(self.backend_id))
        for entry in listed if isinstance(listed, list) else []:
            ufrag = entry.get("ufrag") if isinstance(entry, dict) else None
            if entry.get("backend") == self.backend_id and isinstance(ufrag, str) and ufrag not in self.sessions:
                await self._delete(ufrag)

    async def _watch_agent(self) -> None:
        while True:
            await asyncio.sleep(self.watch_interval)
            try:
                await self.check()
            except RegistrationError as exc:  # the agent is down: keep looking, its restart is the fix
                log.warning("%s", exc)

    async def stop(self, unregister_backend: bool = False) -> None:
        """Unregister every session (and optionally the backend), stop watching."""
        if self._watch:
            self._watch.cancel()
            self._watch = None
        if self.control is None:
            return
        for ufrag in list(self.sessions):
            await self.unregister(ufrag)
        for ufrag in list(self.leftover):  # a last try each; what still fails the agent ages (session_idle_s)
            await self._delete(ufrag)
        if self.leftover:
            log.warning("%s: %d sessions could not be unregistered; the agent will age them",
                        self.name, len(self.leftover))
        if unregister_backend:
            try:
                await self._call("DELETE", backend_path(self.backend_id))
            except RegistrationError as exc:
                log.warning("unregistering backend %d: %s", self.backend_id, exc)
        await self.control.close()
        self.control = None


class RelayRegistrars:
    """One Registrar per relay; a session is registered with all of them (see the module doc).

    ``pending`` holds the registrations still running after the answer left (ufrag -> registrar ->
    the task that records their outcome); ``on_missed(relay_name)`` is called once per registration
    a relay missed or refused while another took the session (the transceiver counts them)."""

    def __init__(self, registrars: list[Registrar], on_missed: Callable[[str], None] | None = None) -> None:
        self.registrars = registrars
        self.on_missed = on_missed
        self.pending: dict[str, dict[Registrar, asyncio.Task]] = {}

    @classmethod
    def of_backend(cls, relays: list[tuple[str, str]], backend_id: int, backend_ip: str | None,
                   backend_port: int, token: str | None = None, backend_ip6: str | None = None,
                   watch_interval: float = 1.0, on_missed: Callable[[str], None] | None = None) -> RelayRegistrars:
        """One registrar per relay ``(name, control URL)`` for one backend, all with one ``instance``:
        this process (see ``Registrar``)."""
        instance = secrets.token_hex(8)
        return cls([Registrar(url, backend_id, backend_ip, backend_port, token, backend_ip6, watch_interval,
                              name=name, instance=instance) for name, url in relays], on_missed)

    async def start(self) -> None:
        """Start every registrar; raises only if no relay's agent could be reached."""
        errors = []
        for registrar in self.registrars:
            try:
                await registrar.start(required=len(self.registrars) == 1)
            except RegistrationError as exc:
                errors.append(exc)
                log.warning("relay %s: %s (will keep trying)", registrar.name, exc)
        if len(errors) == len(self.registrars):
            await self.stop()
            raise errors[0]

    async def register(self, ufrag: str) -> list[str]:
        """Register with every relay at once; return as soon as one accepted, with the names of those
        that had by then.  The others go on in ``pending``.  Raises the first relay's error (in the
        configured order) only when none accepted; then no relay retries the session."""
        tasks = [asyncio.ensure_future(r.register(ufrag)) for r in self.registrars]
        try:
            waiting = set(tasks)
            while waiting and not any(_accepted(t) for t in tasks):
                _, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled: nobody will unregister this ufrag, so stop registering it
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            for task in tasks:
                _ = task.cancelled() or task.exception()  # retrieved: no "never retrieved" warning
            raise
        if not any(_accepted(t) for t in tasks):
            raise next(t.exception() for t in tasks)  # type: ignore[misc]  # all done, none accepted
        for registrar, task in zip(self.registrars, tasks, strict=True):
            if task.done():
                self._settle(registrar, ufrag, task)
            else:
                self.pending.setdefault(ufrag, {})[registrar] = asyncio.ensure_future(
                    self._follow(registrar, ufrag, task))
        return [r.name for r, t in zip(self.registrars, tasks, strict=True) if _accepted(t)]

    async def _follow(self, registrar: Registrar, ufrag: str, task: asyncio.Task) -> None:
        """Wait for one relay's registration behind the answer and record its outcome."""
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            task.cancel()
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: its outcome no longer matters
            raise
        finally:
            following = self.pending.get(ufrag, {})
            following.pop(registrar, None)
            if not following:
                self.pending.pop(ufrag, None)
        self._settle(registrar, ufrag, task)

    def _settle(self, registrar: Registrar, ufrag: str, task: asyncio.Task) -> None:
        """A relay's outcome for a session another relay took: a miss is retried on its ticks."""
        if _accepted(task) or task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, RegistrationError) and not isinstance(exc, SessionConflict):
            log.warning("relay %s missed session %s: %s (retrying)", registrar.name, ufrag, exc)
            registrar.missed.add(ufrag)
        else:
            log.warning("relay %s refused session %s: %s", registrar.name, ufrag, exc)
        if self.on_missed is not None:
            self.on_missed(registrar.name)

    async def settled(self, ufrag: str) -> None:
        """Return once every registration of ``ufrag`` still running behind the answer has ended
        (accepted, or recorded as missed or refused)."""
        following = list(self.pending.get(ufrag, {}).values())
        if following:
            await asyncio.wait(following)

    async def unregister(self, ufrag: str) -> None:
        """Each relay: its registration of ``ufrag`` still running behind the answer ends first
        (``_end_pending``), then the DELETE."""
        async def one(registrar: Registrar) -> None:
            follower = self.pending.get(ufrag, {}).get(registrar)
            if follower is not None and not await self._end_pending(registrar, ufrag, follower) \
                    and ufrag not in registrar.sessions:
                return  # its PUT never left: nothing to delete there (and no wait for that agent's lock)
            await registrar.unregister(ufrag)
        await asyncio.gather(*(one(r) for r in self.registrars))

    @staticmethod
    async def _end_pending(registrar: Registrar, ufrag: str, follower: asyncio.Task) -> bool:
        """Cancel a registration whose PUT has not left yet (queued behind the agent's lock: False);
        await one already sent (True: its outcome recorded, bounded by the registrar's timeout).  A
        sent PUT cannot be called back: a DELETE overtaking it at a slow agent would leave the dead
        session routed there, and a miss recorded after the DELETE would be retried forever."""
        sent = ufrag in registrar.sending
        if not sent:
            follower.cancel()
        await asyncio.wait([follower])
        return sent

    async def stop(self) -> None:
        """End the registrations still running (``_end_pending``: a session that ended without
        unregistering), then stop every registrar (which deletes the sessions they took)."""
        await asyncio.gather(*(self._end_pending(r, ufrag, f) for ufrag, by_relay in list(self.pending.items())
                               for r, f in list(by_relay.items())))
        for registrar in self.registrars:
            await registrar.stop()


def _accepted(task: asyncio.Task) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None
