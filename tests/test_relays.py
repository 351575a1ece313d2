"""One answer, several relays: candidates of every relay, the client's preferred one first,
and every relay's agent told about every session (real control APIs, real aiortc callers)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aioice.candidate import candidate_priority

from splitrelay.transceiver.relays import (
    ByClientPrefix, ByHeader, Relay, RelaySpecError, SignalingFacts, TcpAddress, choose, ordered_candidates,
    parse_relay, relays_from_options,
)
from splitrelay.transceiver.service import Transceiver, TransceiverConfig

from .test_transceiver import Caller, offer_sdp, until
from .test_transceiver_registration import BACKEND_ID, BACKEND_IP, TOKEN, Agent

NEAR = Relay("near", (("198.51.100.1", 3478), ("2001:db8::1", 3478)))
FAR = Relay("far", (("203.0.113.1", 3478),))
SPARE = Relay("spare", (("192.0.2.77", 3478), ("2001:db8::77", 3478)))


def test_the_preferred_relay_outranks_every_backup_and_backups_keep_their_order():
    ranked = ordered_candidates([NEAR, FAR, SPARE], preferred=FAR)
    assert [a for a, _ in ranked] == [("203.0.113.1", 3478), ("198.51.100.1", 3478), ("2001:db8::1", 3478),
                                      ("192.0.2.77", 3478), ("2001:db8::77", 3478)]
    prefs = [p for _, p in ranked]
    assert prefs == sorted(prefs, reverse=True) and len(set(prefs)) == len(prefs)
    assert prefs[0] == 65535 and max(prefs[1:]) < 32768     # a whole band between preferred and backups


def test_tcp_candidates_rank_below_every_udp_candidate_and_keep_the_relay_order_among_themselves():
    near, spare = (Relay(r.name, r.candidates, None, 443) for r in (NEAR, SPARE))
    ranked = ordered_candidates([near, FAR, spare], preferred=spare)
    tcp = [(a, p) for a, p in ranked if isinstance(a, TcpAddress)]
    udp = [(a, p) for a, p in ranked if not isinstance(a, TcpAddress)]
    assert [a for a, _ in udp] == [a for a, _ in ordered_candidates([NEAR, FAR, SPARE], preferred=SPARE)]
    assert tcp == [(("192.0.2.77", 443), 16383), (("2001:db8::77", 443), 16382),       # FAR offers no TCP
                   (("198.51.100.1", 443), 8191 - 256), (("2001:db8::1", 443), 8190 - 256)]
    assert max(p for _, p in tcp) < min(p for _, p in udp)
    assert ranked == udp + tcp


def test_a_relay_spec_names_its_tcp_port_once():
    assert parse_relay("near=198.51.100.1:3478,[2001:db8::1]:3478,tcp:443", 0) == Relay(
        "near", NEAR.candidates, None, 443)
    for bad in ("198.51.100.1:3478,tcp:0", "198.51.100.1:3478,tcp:x", "198.51.100.1:3478,tcp:443,tcp:444"):
        with pytest.raises(RelaySpecError) as exc:
            parse_relay(bad, 0)
        assert str(exc.value) == f"relay {bad!r}: give one tcp:PORT with PORT 1..65535"
    with pytest.raises(RelaySpecError) as exc:
        parse_relay("tcp:443", 0)
    assert str(exc.value) == "relay 'tcp:443' names no address"


def test_the_client_prefix_picks_the_relay_longest_match_first_and_falls_back_to_the_first():
    chooser = ByClientPrefix([("10.0.0.0/8", "far"), ("10.1.0.0/16", "spare"), ("2001:db8:5::/48", "far")])
    relays = [NEAR, FAR, SPARE]
    assert choose([chooser], SignalingFacts("10.1.2.3"), relays) is SPARE
    assert choose([chooser], SignalingFacts("10.9.2.3"), relays) is FAR
    assert choose([chooser], SignalingFacts("::ffff:10.9.2.3"), relays) is FAR   # v4-mapped from a "::" listener
    assert choose([chooser], SignalingFacts("2001:db8:5::9"), relays) is FAR
    assert choose([chooser], SignalingFacts("192.0.2.1"), relays) is NEAR        # no match: the first relay
    assert choose([chooser], SignalingFacts(None), relays) is NEAR


def test_an_edge_header_names_the_relay_before_the_prefix_map():
    choosers = [ByHeader("X-Splitrelay-Relay"), ByClientPrefix([("0.0.0.0/0", "far")])]
    facts = SignalingFacts("10.0.0.1", {"x-splitrelay-relay": "spare"})
    assert choose(choosers, facts, [NEAR, FAR, SPARE]) is SPARE
    assert choose(choosers, SignalingFacts("10.0.0.1", {"X-Splitrelay-Relay": "gone"}), [NEAR, FAR]) is FAR


def test_relay_options_parse_and_bad_ones_say_why():
    assert parse_relay("near=198.51.100.1:3478,[2001:db8::1]:3478", 0) == NEAR
    assert parse_relay("203.0.113.1:3478", 1).name == "relay2"
    relays = relays_from_options(["198.51.100.1:3478", "203.0.113.1:3478"], ["http://a:8470", "http://b:8470"])
    assert [r.control_url for r in relays] == ["http://a:8470", "http://b:8470"]
    with pytest.raises(RelaySpecError) as exc:
        relays_from_options(["198.51.100.1:3478", "203.0.113.1:3478"], ["http://a:8470"])
    assert str(exc.value) == ("2 --relay but 1 --relay-control: give one per relay (in the same order) or none")
    with pytest.raises(RelaySpecError) as exc:
        parse_relay("2001:db8::1:3478", 0)
    assert str(exc.value) == "'2001:db8::1:3478' is not ip:port (IPv6 as [addr]:port)"
    with pytest.raises(RelaySpecError, match="must differ"):
        relays_from_options(["a=198.51.100.1:3478", "a=203.0.113.1:3478"], [])


@pytest.fixture
async def two_agents():
    agents = [Agent(), Agent()]
    for a in agents:
        await a.start()
    try:
        yield agents
    finally:
        for a in agents:
            await a.stop()


async def post_offer(service: Transceiver) -> tuple[int, str]:
    """A WHIP POST of a fresh offer: (status, body)."""
    async with aiohttp.ClientSession() as http:
        async with http.post(service.whip_url, data=await offer_sdp(),
                             headers={"Content-Type": "application/sdp"}) as resp:
            return resp.status, await resp.text()


def missed_count(service: Transceiver, relay: str) -> float:
    return service.metrics.registry.get_sample_value(
        "splitrelay_transceiver_relay_registrations_missed_total", {"relay": relay}) or 0.0


def candidate_lines(answer: str) -> list[tuple[str, int, int]]:
    """(host, port, priority) of each a=candidate line, in the answer's order."""
    out = []
    for line in answer.splitlines():
        if line.startswith("a=candidate:"):
            fields = line.split()
            out.append((fields[4], int(fields[5]), int(fields[3])))
    return out


async def test_one_answer_names_every_relay_in_both_families_the_clients_relay_first(two_agents):
    near, far = two_agents
    service = Transceiver(TransceiverConfig(
        backend_id=BACKEND_ID, bind_port=0, whip_port=0, relay_token=TOKEN, backend_ip=BACKEND_IP,
        relays=[Relay("near", NEAR.candidates, near.url), Relay("far", FAR.candidates, far.url)],
        choosers=[ByClientPrefix([("127.0.0.0/8", "far")])],   # this test's client is on loopback
        ufrag_pool=0))  # the agents hold exactly the live sessions (test_ufrag_pool.py: ready ufrags)
    await service.start()
    try:
        status, answer = await post_offer(service)
        assert status == 201
        found = candidate_lines(answer)
        assert [(h, p) for h, p, _ in found] == [("203.0.113.1", 3478), ("198.51.100.1", 3478),
                                                 ("2001:db8::1", 3478)]
        assert found[0][2] == candidate_priority(1, "host", local_pref=65535) > found[1][2] > found[2][2]
        ufrag = next(line.split(":", 1)[1] for line in answer.splitlines() if line.startswith("a=ice-ufrag"))
        assert near.ufrags() == far.ufrags() == {ufrag: BACKEND_ID}     # every relay routes the session
        assert near.dp.backend(BACKEND_ID) is not None and far.dp.backend(BACKEND_ID) is not None
    finally:
        await service.stop()
    assert near.ufrags() == far.ufrags() == {}


async def test_a_relay_that_missed_the_registration_gets_it_on_its_next_tick(two_agents):
    up, down = two_agents
    await down.stop()                                    # unreachable at start and at the offer
    service = Transceiver(TransceiverConfig(
        backend_id=BACKEND_ID, bind_port=0, whip_port=0, relay_token=TOKEN, backend_ip=BACKEND_IP,
        watch_interval=0.05,
        relays=[Relay("up", NEAR.candidates, up.url), Relay("down", FAR.candidates, down.url)],
        ufrag_pool=0))  # registration on the answer's path
    await service.start()                                # one relay reachable is enough to start
    try:
        assert (await post_offer(service))[0] == 201     # one relay accepted: the call goes on
        (ufrag,) = up.ufrags()
        late = service.registrars.registrars[1]
        await service.registrars.settled(ufrag)          # the answer may have left before the miss
        assert late.missed == {ufrag} and missed_count(service, "down") == 1
        late.boot_changed.clear()
        await down.start(down.port)
        await until(late.boot_changed, "the late relay to be registered")
        assert down.ufrags() == {ufrag: BACKEND_ID} and down.dp.backend(BACKEND_ID) is not None
        assert late.missed == set()
    finally:
        await service.stop()


async def test_no_relay_reachable_refuses_the_offer(two_agents):
    service = Transceiver(TransceiverConfig(
        backend_id=BACKEND_ID, bind_port=0, whip_port=0, relay_token=TOKEN, backend_ip=BACKEND_IP,
        relays=[Relay("a", NEAR.candidates, two_agents[0].url), Relay("b", FAR.candidates, two_agents[1].url)],
        ufrag_pool=0))  # registration on the answer's path
    await service.start()
    try:
        for a in two_agents:
            await a.stop()
        status, text = await post_offer(service)
        assert status == 503 and "unreachable" in text
        assert service.sessions == {} and service.mux.by_ufrag == {}
    finally:
        await service.stop()


@pytest.mark.parametrize("preferred", ["live", "dead"])
async def test_a_caller_checks_the_preferred_relay_first_and_a_dead_one_falls_back_to_the_backup(preferred):
    """The 'live' relay is the mux's own address, the 'dead' one a loopback port nobody serves:
    the client's agent orders its checks by our priorities, and the call works either way."""
    service = Transceiver(TransceiverConfig(backend_id=BACKEND_ID, bind_port=0, whip_port=0))
    await service.start()
    live = service.mux.local_address
    service.config.relays = [Relay("dead", (("127.0.0.3", 9),)), Relay("live", (live,))]
    service.config.choosers = [ByHeader("X-Relay")]
    caller = Caller(service.whip_url, 700.0)
    try:
        async with aiohttp.ClientSession(headers={"X-Relay": preferred}) as http:
            await caller.call(http)
            connection = caller.pc.getTransceivers()[0].sender.transport.transport._connection  # noqa: SLF001
            first = connection._check_list[0].remote_addr  # noqa: SLF001 - the pair the client checks first
            assert first == (live if preferred == "live" else ("127.0.0.3", 9))
            await until(caller.heard_own, f"echo with the {preferred} relay preferred")
            assert connection._nominated[1].remote_addr == live  # noqa: SLF001
            await caller.hangup(http)
    finally:
        await service.stop()


async def test_a_relay_down_for_one_offer_gets_the_session_when_it_answers_again(two_agents):
    """Same agent process back (same boot_id, maps kept): the missed session alone is retried."""
    up, blip = two_agents
    service = Transceiver(TransceiverConfig(
        backend_id=BACKEND_ID, bind_port=0, whip_port=0, relay_token=TOKEN, backend_ip=BACKEND_IP,
        watch_interval=0.05,
        relays=[Relay("up", NEAR.candidates, up.url), Relay("blip", FAR.candidates, blip.url)],
        ufrag_pool=0))  # registration on the answer's path
    await service.start()
    try:
        await blip.stop()
        assert (await post_offer(service))[0] == 201
        (ufrag,) = up.ufrags()
        late = service.registrars.registrars[1]
        await service.registrars.settled(ufrag)
        assert late.missed == {ufrag} and blip.ufrags() == {}
        await blip.start(blip.port)                      # the same boot_id: no re-registration pass
        for _ in range(300):
            if not late.missed:
                break
            await asyncio.sleep(0.01)
        assert blip.ufrags() == {ufrag: BACKEND_ID} and late.reregistrations == 0
    finally:
        await service.stop()
    assert up.ufrags() == blip.ufrags() == {}
