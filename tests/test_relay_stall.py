"""A relay whose agent is slow to take a session: the answer does not wait for it, the session
reaches it afterwards, and a hang-up meanwhile leaves nothing behind there.  Real control APIs
(tests/test_transceiver_registration.py's Agent), one of them behind a real HTTP server that holds
session PUTs, as a paused or overloaded agent process does."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from splitrelay.client.ice_restart import restart_ice
from splitrelay.transceiver.registration import Registrar, RelayRegistrars
from splitrelay.transceiver.relays import Relay
from splitrelay.transceiver.service import Transceiver, TransceiverConfig

from .test_ice_restart import connected_caller, hears_itself_again
from .test_relays import FAR, NEAR, missed_count, post_offer, two_agents  # noqa: F401 - the fixture
from .test_transceiver import until
from .test_transceiver_registration import BACKEND_ID, BACKEND_IP, TOKEN, Agent

FORWARDED_HEADERS = ("Authorization", "Content-Type")


class StallingFront:
    """An HTTP server in front of an agent: forwards every request, but while ``release`` is clear
    holds session PUTs (``held`` is set when one arrives, ``passed`` once one held PUT got the
    agent's answer, or ``refuse_held``'s 503 instead).  ``deleted`` is set when a DELETE was
    answered, ``puts`` counts session PUTs, ``deletes_while_held`` the DELETEs that arrived while a
    PUT was held."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.release = asyncio.Event()
        self.release.set()
        self.held = asyncio.Event()
        self.passed = asyncio.Event()
        self.deleted = asyncio.Event()
        self.puts = 0
        self.refuse_held = False
        self.holding = 0
        self.deletes_while_held = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.forward)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # noqa: SLF001

    async def stop(self) -> None:
        self.release.set()
        if self.runner:
            await self.runner.cleanup()

    async def forward(self, request: web.Request) -> web.Response:
        stalled = request.method == "PUT" and request.path.startswith("/v1/sessions/") and \
            not self.release.is_set()
        if request.method == "DELETE" and self.holding:
            self.deletes_while_held += 1
        if request.method == "PUT" and request.path.startswith("/v1/sessions/"):
            self.puts += 1
        if stalled:
            self.holding += 1
            self.held.set()
            await self.release.wait()
            self.holding -= 1
            if self.refuse_held:
                self.passed.set()
                return web.json_response({"error": "overloaded"}, status=503)
        body = await request.read()
        headers = {k: request.headers[k] for k in FORWARDED_HEADERS if k in request.headers}
        async with aiohttp.ClientSession() as http:
            async with http.request(request.method, self.agent.url + request.path_qs, data=body,
                                    headers=headers) as resp:
                answer = web.Response(status=resp.status, body=await resp.read(),
                                      headers={"Content-Type": resp.headers.get("Content-Type", "text/plain")})
        if stalled:
            self.passed.set()
        if request.method == "DELETE":
            self.deleted.set()
        return answer


async def slow_second_relay(fast: Agent, slow: Agent, advertised: bool = True,
                            ) -> tuple[Transceiver, StallingFront, StallingFront]:
    """A transceiver whose relays are "fast" and "slow", each agent behind a front (fast's never holds).
    ``advertised=False``: the relays' candidates are not in the answer, the mux's own address is
    (a loopback caller can connect)."""
    fronts = [StallingFront(fast), StallingFront(slow)]
    for front in fronts:
        await front.start()
    near, far = (NEAR.candidates, FAR.candidates) if advertised else ((), ())
    service = Transceiver(TransceiverConfig(
        backend_id=BACKEND_ID, bind_port=0, whip_port=0, relay_token=TOKEN, backend_ip=BACKEND_IP,
        relays=[Relay("fast", near, fronts[0].url), Relay("slow", far, fronts[1].url)],
        ufrag_pool=0))  # each session registers on its answer's path: that path is what stalls here
    await service.start()
    return service, *fronts


async def test_the_answer_leaves_while_a_slow_relay_holds_the_registration_and_it_gets_there_after(two_agents):  # noqa: F811
    fast, slow = two_agents
    service, fast_front, front = await slow_second_relay(fast, slow)
    try:
        front.release.clear()
        status, _ = await post_offer(service)     # before: waited for the slow relay's PUT (its timeout)
        assert status == 201
        (ufrag,) = fast.ufrags()
        await until(front.held, "the slow relay's agent to hold the session's PUT")
        assert slow.ufrags() == {} and ufrag in service.registrars.pending
        front.release.set()
        await service.registrars.settled(ufrag)
        assert slow.ufrags() == {ufrag: BACKEND_ID}
        late = service.registrars.registrars[1]
        assert late.sessions == {ufrag} and late.missed == set() and missed_count(service, "slow") == 0
        assert service.registrars.pending == {}
    finally:
        await service.stop()
        for f in (fast_front, front):
            await f.stop()
    assert fast.ufrags() == slow.ufrags() == {}


@pytest.mark.parametrize("outcome", ["accepted", "refused"])
async def test_a_hang_up_while_a_relay_still_registers_the_session_leaves_no_ufrag_there(two_agents, outcome,  # noqa: F811
                                                                                         caplog):
    """Accepted: the DELETE follows the PUT's answer.  Refused (503): the miss is recorded before the
    hang-up forgets the session, not after (else the next watch tick would register it again)."""
    fast, slow = two_agents
    service, fast_front, front = await slow_second_relay(fast, slow)
    try:
        front.release.clear()
        front.refuse_held = outcome == "refused"
        assert (await post_offer(service))[0] == 201
        (session_id,) = service.sessions
        await until(front.held, "the slow relay's agent to hold the session's PUT")
        hang_up = asyncio.ensure_future(service.close_session(session_id))
        await until(fast_front.deleted, "the hang-up's DELETE at the fast relay")
        assert not hang_up.done() and front.deletes_while_held == 0   # it waits for the PUT it sent
        front.release.set()                      # the held PUT lands now, after the hang-up began
        assert await hang_up
        assert front.passed.is_set() and front.deleted.is_set() == (outcome == "accepted")
        late = service.registrars.registrars[1]
        assert fast.ufrags() == slow.ufrags() == {}
        assert late.sessions == late.missed == set() and service.registrars.pending == {}
        misses = [r for r in caplog.records if "relay slow missed session" in r.getMessage()]  # once, counted
        assert len(misses) == missed_count(service, "slow") == (1 if outcome == "refused" else 0)
    finally:
        await service.stop()
        for f in (fast_front, front):
            await f.stop()


async def test_an_ice_restart_answers_once_one_relay_took_the_new_ufrag_and_retires_every_old_one(two_agents):  # noqa: F811
    fast, slow = two_agents
    service, fast_front, front = await slow_second_relay(fast, slow, advertised=False)
    try:
        async with aiohttp.ClientSession() as http:
            caller = await connected_caller(service, http)
            old = service.sessions[caller.session_id].ufrag
            await service.registrars.settled(old)
            assert fast.ufrags() == slow.ufrags() == {old: BACKEND_ID}
            front.release.clear()
            await restart_ice(caller.pc, caller.location, http)   # PATCH answered, new pair nominated
            new = service.sessions[caller.session_id].ufrag
            await until(front.held, "the slow relay's agent to hold the new ufrag's PUT")
            assert new in fast.ufrags() and new not in slow.ufrags()
            front.release.set()
            await service.registrars.settled(new)
            await hears_itself_again(caller, "the echo after the restart")
            assert fast.ufrags() == slow.ufrags() == {new: BACKEND_ID}   # the old one retired from both
            assert missed_count(service, "slow") == 0             # taken behind the answer, not on a retry
            await caller.hangup(http)
        assert fast.ufrags() == slow.ufrags() == {}
    finally:
        await service.stop()
        for f in (fast_front, front):
            await f.stop()


async def held_registrars(fast: Agent, slow: Agent) -> tuple[RelayRegistrars, StallingFront]:
    """A transceiver's registrars alone, for "fast" and "slow" (behind a front, holding from now on);
    a long timeout: a held PUT must not time out on a loaded machine."""
    front = StallingFront(slow)
    await front.start()
    registrars = RelayRegistrars([Registrar(url, BACKEND_ID, BACKEND_IP, 5000, TOKEN, name=name, timeout=60.0)
                                  for name, url in (("fast", fast.url), ("slow", front.url))])
    await registrars.start()
    front.release.clear()
    assert await registrars.register("sent0001") == ["fast"]
    await until(front.held, "the slow relay's agent to hold the first PUT")
    assert await registrars.register("queued01") == ["fast"]   # behind the first: one PUT at a time per agent
    assert set(registrars.pending) == {"sent0001", "queued01"}
    return registrars, front


async def test_unregistering_a_session_whose_put_is_still_queued_cancels_it_without_waiting(two_agents):  # noqa: F811
    fast, slow = two_agents
    registrars, front = await held_registrars(*two_agents)
    try:
        await registrars.unregister("queued01")             # while the first PUT is still held
        assert front.holding == 1 and set(registrars.pending) == {"sent0001"}
        assert fast.ufrags() == {"sent0001": BACKEND_ID}
        front.release.set()
        await registrars.settled("sent0001")
        assert slow.ufrags() == {"sent0001": BACKEND_ID} and front.puts == 1
        assert registrars.registrars[1].sessions == {"sent0001"} and registrars.registrars[1].missed == set()
    finally:
        await registrars.stop()
        await front.stop()
    assert fast.ufrags() == slow.ufrags() == {}


async def test_stopping_the_registrars_awaits_a_sent_registration_and_drops_a_queued_one(two_agents):  # noqa: F811
    """Registrations no session unregistered (stop's own path): the sent PUT's session is deleted
    once it landed, the queued one is never sent."""
    fast, slow = two_agents
    registrars, front = await held_registrars(*two_agents)
    try:
        queued = registrars.pending["queued01"][registrars.registrars[1]]
        stopping = asyncio.ensure_future(registrars.stop())
        await asyncio.wait([queued])
        assert queued.cancelled() and not stopping.done() and front.holding == 1   # the sent one holds it
        front.release.set()
        await stopping
        assert registrars.pending == {} and front.puts == 1
        assert fast.ufrags() == slow.ufrags() == {}
    finally:
        await registrars.stop()
        await front.stop()
