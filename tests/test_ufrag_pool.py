# ruff: noqa: F811 - test parameters named after the imported `agent` fixture request it
"""Ufrags registered ahead of offers (transceiver/ufrag_pool.py): a real edge agent's control API
(in-process, as in test_transceiver_registration.py) and real loopback aiortc callers."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from splitrelay.transceiver.service import Transceiver, TransceiverConfig

from splitrelay.client.ice_restart import restart_ice

from .test_ice_restart import connected_caller, hears_itself_again
from .test_transceiver import Caller, offer_sdp, until
from .test_transceiver_registration import BACKEND_ID, BACKEND_IP, TOKEN, Agent
from .test_transceiver_registration import agent  # noqa: F401 - the fixture, requested by name below


async def pooled(agent: Agent, size: int) -> Transceiver:
    """A started transceiver whose pool is full (its first fill awaited, not raced)."""
    service = Transceiver(TransceiverConfig(
        backend_id=BACKEND_ID, bind_port=0, whip_port=0, relay_control=agent.url, relay_token=TOKEN,
        backend_ip=BACKEND_IP, watch_interval=0.05, ufrag_pool=size))
    await service.start()
    await service.ufrags.fill()
    assert len(service.ufrags.ready) == size
    return service


@pytest.fixture
async def pool_of(agent):  # noqa: F811 - the imported fixture
    """Factory: ``await pool_of(size)`` is a started transceiver with a full pool; stopped after the test."""
    services: list[Transceiver] = []

    async def make(size: int) -> Transceiver:
        services.append(await pooled(agent, size))
        return services[-1]

    try:
        yield make
    finally:
        for service in services:
            await service.stop()


def metric(service: Transceiver, name: str) -> float:
    return service.metrics.registry.get_sample_value(name) or 0.0


async def refilled(service: Transceiver, size: int, timeout: float = 10.0) -> None:
    """The pool is full again (bounded poll: the refill is a task of the pool's own)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while len(service.ufrags.ready) < size:
        assert loop.time() < end, f"the pool has {len(service.ufrags.ready)} of {size} after {timeout:g} s"
        await asyncio.sleep(0.01)


async def test_an_offer_is_answered_with_a_ready_ufrag_while_the_only_agent_is_down(agent, pool_of):
    service = await pool_of(2)
    ready = list(service.ufrags.ready)
    assert agent.ufrags() == {u: BACKEND_ID for u in ready}          # registered before any offer
    await agent.stop()                      # registering now would fail: the answer must not need it
    async with aiohttp.ClientSession() as http:
        caller = await connected_caller(service, http)
        assert caller.ufrag == ready[0]
        assert list(service.ufrags.ready) == ready[1:]
        await caller.hangup(http)



async def test_the_pool_refills_once_the_session_connected_and_the_agent_holds_live_and_ready(agent, pool_of):
    service = await pool_of(1)
    async with aiohttp.ClientSession() as http:
        caller = await connected_caller(service, http)
        await refilled(service, 1)
        assert agent.ufrags() == {caller.ufrag: BACKEND_ID, service.ufrags.ready[0]: BACKEND_ID}
        async with http.get(service.admin_url + "/metrics") as resp:
            assert "splitrelay_transceiver_ufrag_pool_ready 1.0" in await resp.text()
        await caller.hangup(http)
        assert agent.ufrags() == {service.ufrags.ready[0]: BACKEND_ID}  # the hang-up deleted its own
        assert metric(service, "splitrelay_transceiver_ufrag_pool_empty_total") == 0



async def test_an_empty_pool_registers_on_the_answers_path_and_counts_it(agent, pool_of):
    service = await pool_of(1)
    callers = [Caller(service.whip_url, 600.0), Caller(service.whip_url, 900.0)]
    try:
        async with aiohttp.ClientSession() as http:
            for caller in callers:   # both answered before either connects: the second finds the pool empty
                await caller.call(http)
            assert metric(service, "splitrelay_transceiver_ufrag_pool_empty_total") == 1
            assert {c.ufrag for c in callers} <= set(agent.ufrags())
            for caller in callers:
                await until(caller.heard_own, "the first echo")
                await caller.hangup(http)
    finally:
        for caller in callers:
            await caller.pc.close()


async def test_a_bad_offer_gives_its_ufrag_back_unseen_with_no_agent_call(agent, pool_of):
    service = await pool_of(1)
    ready = list(service.ufrags.ready)
    calls_before = list(agent.requests)
    offer = (await offer_sdp(datachannel=True)).replace("a=group:BUNDLE", "a=group:LS")  # 2 m-lines, no BUNDLE
    async with aiohttp.ClientSession() as http:
        async with http.post(service.whip_url, data=offer,
                             headers={"Content-Type": "application/sdp"}) as resp:
            assert resp.status == 400
            assert "BUNDLE" in await resp.text()
    assert list(service.ufrags.ready) == ready
    assert agent.requests[len(calls_before):] == [] and agent.ufrags() == {ready[0]: BACKEND_ID}



async def test_an_ice_restart_takes_a_ready_ufrag(pool_of):
    service = await pool_of(2)
    async with aiohttp.ClientSession() as http:
        caller = await connected_caller(service, http)
        ready_before_patch = list(service.ufrags.ready)
        await restart_ice(caller.pc, caller.location, http)
        assert service.sessions[caller.session_id].ufrag == ready_before_patch[0]
        await hears_itself_again(caller, "the echo after the restart")
        await caller.hangup(http)



async def test_an_agent_restart_gets_the_ready_ufrags_again_and_stop_deletes_them(agent):
    service = await pooled(agent, 3)
    try:
        ready = set(service.ufrags.ready)
        service.registrar.boot_changed.clear()
        await agent.restart()                                   # empty maps, a new boot_id
        await until(service.registrar.boot_changed, "the re-registration")
        assert agent.ufrags() == {u: BACKEND_ID for u in ready}
    finally:
        await service.stop()
    assert agent.ufrags() == {}
