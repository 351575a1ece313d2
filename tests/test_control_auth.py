"""Attacks on the edge agent's control API, tried against a real agent (real HTTP, real XDP).

The agent runs in this process on a veth pair of its own (tests/test_agent_api.py's
helpers) with a 64-hex-digit master token.  Each test is what someone holding a
transceiver's token, or no token at all, would try: take another backend's calls,
list them, point the relay elsewhere, or flood /metrics while calls hang up.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import threading
import time
from urllib.parse import quote

import pytest
import pytest_asyncio
from aiohttp import web
from splitrelay.bpf.testrun import XDP_REDIRECT, run_xdp
from splitrelay.edge.agent import AgentConfig, EdgeAgent
from splitrelay.wire.control_client import AsyncControlClient, ControlError
from splitrelay.edge.credentials import (
    BackendRange,
    CredentialError,
    backend_hmac,
    backend_token,
    from_ip_backends,
    pool_token,
)
from splitrelay.transceiver.registration import Forbidden, Registrar

from . import packets as P
from .conftest import needs_root
from .test_agent_api import (
    BACKEND_PORT,
    BACKENDS,
    agent_config,
    binding_request,
    empty_tables,
    confirm_flow,
    open_flow,
    url,
    veth_pair,
)

MASTER = secrets.token_hex(32)
asyncio_module = pytest.mark.asyncio(loop_scope="module")


# -- starting: no token, a short one, an empty file ------------------------------------------------

def config(**kw) -> AgentConfig:
    base = dict(public_iface="p0", internal_iface="i0", public_ip4=P.PUBLIC_IP4, plane_kind="userspace",
                listen_host="198.18.1.1", token=MASTER)
    return AgentConfig(**{**base, **kw})


def test_a_network_listener_without_a_token_refuses_to_start():
    with pytest.raises(CredentialError) as err:
        config(token=None)
    assert str(err.value) == ("the control API on 198.18.1.1 (not loopback) needs a token (--token-file) "
                              "of at least 32 bytes")


def test_a_network_listener_with_a_short_token_refuses_to_start():
    with pytest.raises(CredentialError) as err:
        config(token="x" * 31)
    assert str(err.value) == ("the control token is 31 bytes; a control API on 198.18.1.1 (not loopback) "
                              "needs at least 32")
    config(token="x" * 32)                                   # 32 bytes is enough
    config(listen_host="127.0.0.1", token=None)              # loopback may go without


def test_an_empty_token_file_is_an_error_not_auth_off(tmp_path):
    empty = tmp_path / "token"
    empty.write_text("  \n")
    proc = subprocess.run([sys.executable, "-m", "splitrelay.cli.main", "edge", "serve", "nosuch0",
                           "--internal", "nosuch1", "--public-ip", "198.51.100.1", "--datapath", "userspace",
                           "--listen", "127.0.0.1:0", "--token-file", str(empty)], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr == f"splitrelay: error: token file {empty} is empty\n"


def test_the_backend_token_command_prints_the_derived_token(tmp_path):
    key = tmp_path / "token"
    key.write_text(MASTER + "\n")
    proc = subprocess.run([sys.executable, "-m", "splitrelay.cli.main", "edge", "token", "--key-file", str(key),
                           "--backend", "7", "--json"], capture_output=True, text=True, check=True)
    import hashlib
    import hmac
    import json
    expected = hmac.new(MASTER.encode(), b"splitrelay-backend:7", hashlib.sha256).hexdigest()
    assert json.loads(proc.stdout) == {"backend": 7, "token": f"7.{expected}"}
    assert backend_token(MASTER, 7) == f"7.{expected}" and backend_hmac(MASTER, 7) == expected
    proc = subprocess.run([sys.executable, "-m", "splitrelay.cli.main", "edge", "token", "--key-file", str(key),
                           "--pool"], capture_output=True, text=True, check=True)
    pool = hmac.new(MASTER.encode(), b"splitrelay-pool", hashlib.sha256).hexdigest()
    assert proc.stdout == f"pool.{pool}\n" == pool_token(MASTER) + "\n"
    proc = subprocess.run([sys.executable, "-m", "splitrelay.cli.main", "edge", "token", "--key-file", str(key)],
                          capture_output=True, text=True)
    assert (proc.returncode, proc.stderr) == (2, "splitrelay: error: give --backend ID or --pool\n")


def test_the_token_command_prints_a_range_token_for_count_backends(tmp_path):
    import hashlib
    import hmac
    import json
    key = tmp_path / "token"
    key.write_text(MASTER + "\n")
    token = [sys.executable, "-m", "splitrelay.cli.main", "edge", "token", "--key-file", str(key)]
    proc = subprocess.run([*token, "--backend", "7", "--count", "4", "--json"], capture_output=True, text=True,
                          check=True)
    expected = hmac.new(MASTER.encode(), b"splitrelay-backend:7+4", hashlib.sha256).hexdigest()
    assert json.loads(proc.stdout) == {"backend": 7, "count": 4, "token": f"7+4.{expected}"}
    assert backend_token(MASTER, 7, 4) == f"7+4.{expected}" and backend_token(MASTER, 7, 1) == backend_token(
        MASTER, 7)
    proc = subprocess.run([*token, "--backend", "262143", "--count", "2"], capture_output=True, text=True)
    assert (proc.returncode, proc.stderr) == (
        1, "splitrelay: error: backends 262143..262144 are not all within 1..262143\n")


def test_the_pool_token_of_k_workers_per_host_is_its_own_hmac(tmp_path):
    import hashlib
    import hmac
    import json
    key = tmp_path / "token"
    key.write_text(MASTER + "\n")
    proc = subprocess.run([sys.executable, "-m", "splitrelay.cli.main", "edge", "token", "--key-file", str(key),
                           "--pool", "--count", "4", "--json"], capture_output=True, text=True, check=True)
    expected = hmac.new(MASTER.encode(), b"splitrelay-pool+4", hashlib.sha256).hexdigest()
    assert json.loads(proc.stdout) == {"pool": True, "count": 4, "token": f"pool+4.{expected}"}
    assert pool_token(MASTER, 4) == f"pool+4.{expected}" and pool_token(MASTER, 1) == pool_token(MASTER)


def test_from_ip_packs_k_workers_into_the_low_bits_of_the_address():
    assert from_ip_backends(1, 2) == BackendRange(2, 2)              # 127.0.0.1 with 2 workers: 2, 3
    assert from_ip_backends(0x2_0005, 4) == BackendRange(0x14, 4)    # low 16 bits 5, two bits per host
    assert from_ip_backends(0x1_0000, 4) is None                     # low 16 bits 0: no id
    assert from_ip_backends(7, 1) == BackendRange(7, 1)


# -- a real agent with scoped credentials ----------------------------------------------------------

@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def agent():
    """The agent on a veth pair of this module's own, with the master token and backend ports 5000-5999."""
    with veth_pair() as links:
        edge = EdgeAgent(agent_config(links, token=MASTER, backend_ports=(5000, 5999), ageing_interval_s=0.05))
        await edge.start()
        try:
            yield edge
        finally:
            await edge.stop()


@pytest.fixture
def short_windows(agent):
    """Liveness and session idle windows of half a second, for the tests that wait them out."""
    saved = agent.api.backend_live_s, agent.config.session_idle_s
    agent.api.backend_live_s = agent.config.session_idle_s = 0.5
    yield
    agent.api.backend_live_s, agent.config.session_idle_s = saved


@pytest_asyncio.fixture(loop_scope="module")
async def admin(agent):
    async with AsyncControlClient(url(agent), MASTER) as c:
        yield c


def as_backend(agent: EdgeAgent, backend_id: int) -> AsyncControlClient:
    return AsyncControlClient(url(agent), backend_token(MASTER, backend_id))


@pytest_asyncio.fixture(loop_scope="module")
async def calls(agent, admin):
    """Backends 1 and 2 (registered by the admin, no instance), each with one session that has a flow."""
    dp = empty_tables(agent)
    for backend_id, ufrag, port in ((1, "callOfA1", 40001), (2, "callOfB2", 40002)):
        ip4, ip6, _ = BACKENDS[backend_id]
        await admin.put_backend(backend_id, ip4, BACKEND_PORT, ip6)
        await admin.put_session(ufrag, backend_id)
        open_flow(agent, ufrag, client_port=port)
        confirm_flow(agent, backend_id, client_port=port)   # answered, as a call's flow is: not aged as pending
    return dp


async def status_of(client: AsyncControlClient, method: str, path: str, body=None, headers=None):
    status, raw = await client.request(method, path, body, headers=headers)
    return status, raw.decode()


def still_routed(agent: EdgeAgent, ufrag: str, port: int) -> bool:
    """B's call keeps working: its client's next packet is still redirected to its backend by XDP."""
    frame = P.udp_frame(binding_request(f"{ufrag}:cli1"), src=P.CLIENT_IP4, sport=port)
    return run_xdp(agent.plane.maps.program_fd("xdp_public"), frame).verdict == XDP_REDIRECT \
        and agent.plane.flow((P.CLIENT_IP4, port)) is not None


@needs_root
@asyncio_module
async def test_no_token_changes_nothing(agent, calls):
    async with AsyncControlClient(url(agent)) as nobody:
        for method, path in (("DELETE", "/v1/sessions/callOfB2"), ("GET", "/v1/sessions"),
                             ("DELETE", "/v1/backends/2"), ("GET", "/v1/flows")):
            assert await status_of(nobody, method, path) == (401, '{"error": "missing or wrong bearer token"}')
    assert still_routed(agent, "callOfB2", 40002)


@needs_root
@asyncio_module
async def test_backend_a_cannot_delete_backend_bs_call(agent, calls):
    async with as_backend(agent, 1) as a:
        assert await status_of(a, "DELETE", "/v1/sessions/callOfB2") == (
            403, '{"error": "backend 1\'s token cannot delete a session of another backend"}')
        assert await status_of(a, "DELETE", "/v1/backends/2") == (
            403, '{"error": "backend 1\'s token cannot change backend 2"}')
        assert await status_of(a, "PUT", "/v1/backends/2", {"ip": BACKENDS[1][0], "port": BACKEND_PORT}) == (
            403, '{"error": "backend 1\'s token cannot change backend 2"}')
        assert await status_of(a, "PUT", "/v1/sessions/stolenUfrag", {"backend": 2}) == (
            403, '{"error": "backend 1\'s token cannot change backend 2"}')
    assert agent.plane.session("callOfB2").backend_id == 2
    assert agent.plane.session("stolenUfrag") is None
    assert still_routed(agent, "callOfB2", 40002)


@needs_root
@asyncio_module
async def test_a_backend_token_manages_only_its_own_backend_and_sessions(agent, calls):
    async with as_backend(agent, 1) as a:
        assert (await a.put_backend(1, BACKENDS[1][0], BACKEND_PORT, instance="t1"))["id"] == 1
        await a.put_session("newOfA1x", 1)
        assert {s["ufrag"] for s in await a.sessions(backend=1)} == {"callOfA1", "newOfA1x"}
        await a.delete_session("newOfA1x")
        await a.delete_session("callOfA1")
        with pytest.raises(ControlError) as err:
            await a.delete_session("callOfA1")
        assert (err.value.status, err.value.message) == (404, "DELETE /v1/sessions/callOfA1: 404 no such session")


@needs_root
@asyncio_module
async def test_listing_and_admin_routes_need_the_admin_token(agent, calls):
    async with as_backend(agent, 1) as a:
        for path in ("/v1/sessions", "/v1/backends", "/v1/flows", "/v1/stats", "/v1/sessions?backend=2"):
            status, body = await status_of(a, "GET", path)
            assert status == 403, (path, body)
    assert await status_of(a, "GET", "/v1/sessions") == (
        403, '{"error": "backend 1\'s token cannot do this: it needs the admin token"}')


@needs_root
@asyncio_module
async def test_a_forged_or_renamed_backend_token_is_refused(agent, calls):
    token_of_1 = backend_token(MASTER, 1)
    forged = [token_of_1[:-1] + ("0" if token_of_1[-1] != "0" else "1"),   # one digit off
              "2." + token_of_1.partition(".")[2],                        # 1's proof, claiming 2
              "2." + backend_hmac(MASTER[:-1], 2),                        # a different master
              MASTER[:-1], "2", "2.", ".", "0." + backend_hmac(MASTER, 0)]
    async with AsyncControlClient(url(agent)) as c:
        for token in forged:
            status, _ = await status_of(c, "DELETE", "/v1/sessions/callOfB2",
                                        headers={"Authorization": f"Bearer {token}"})
            assert status == 401, token
    assert still_routed(agent, "callOfB2", 40002)


@needs_root
@asyncio_module
async def test_a_range_token_opens_each_backend_of_its_range_and_none_beside_it(agent, calls):
    """`transceiver serve --processes 2 --backend-id 2`'s token: its workers are backends 2 and 3."""
    async with AsyncControlClient(url(agent), backend_token(MASTER, 2, 2)) as workers:
        assert (await workers.put_backend(2, BACKENDS[2][0], BACKEND_PORT, instance="w0"))["id"] == 2
        assert (await workers.put_backend(3, BACKENDS[3][0], BACKEND_PORT, instance="w1"))["id"] == 3
        await workers.put_session("newOfW0x", 2)
        await workers.put_session("newOfW1x", 3)
        assert {s["ufrag"] for s in await workers.sessions(backend=3)} == {"newOfW1x"}
        await workers.delete_session("newOfW0x")
        await workers.delete_session("newOfW1x")
        # just outside the range, below (backend 1, live) and above (4)
        assert await status_of(workers, "DELETE", "/v1/sessions/callOfA1") == (
            403, '{"error": "backend 2..3\'s token cannot delete a session of another backend"}')
        for backend_id in (1, 4):
            assert await status_of(workers, "PUT", "/v1/sessions/stolenUfrag", {"backend": backend_id}) == (
                403, f'{{"error": "backend 2..3\'s token cannot change backend {backend_id}"}}')
        assert await status_of(workers, "PUT", "/v1/backends/1", {"ip": BACKENDS[1][0], "port": BACKEND_PORT}) == (
            403, '{"error": "backend 2..3\'s token cannot change backend 1"}')
        assert await status_of(workers, "GET", "/v1/sessions?backend=1") == (
            403, '{"error": "backend 2..3\'s token cannot change backend 1"}')
        assert await status_of(workers, "GET", "/v1/sessions") == (
            403, '{"error": "backend 2..3\'s token cannot do this: it needs the admin token"}')
    assert agent.plane.session("stolenUfrag") is None and agent.plane.session("callOfA1").backend_id == 1
    assert still_routed(agent, "callOfA1", 40001)


@needs_root
@asyncio_module
async def test_a_range_token_with_a_forged_count_or_first_id_is_refused(agent, calls):
    proof_of = {claim: backend_hmac(MASTER, claim) for claim in ("2+2", "2+0", "1+262144", "2")}
    forged = ["2+3." + proof_of["2+2"],          # 2..3's proof, claiming 2..4
              "1+3." + proof_of["2+2"],          # claiming 1..3
              "2+1." + proof_of["2+2"],          # a narrower claim is a different label too
              "2+2." + proof_of["2"],            # backend 2's single proof, claimed as a range
              "2." + proof_of["2+2"],            # the range's proof, claimed as backend 2 alone
              "2+0." + proof_of["2+0"],          # an empty range, even with its own HMAC
              "1+262144." + proof_of["1+262144"],   # past the last backend id
              "2+." + proof_of["2+2"], "+2." + proof_of["2+2"], "2+-1." + proof_of["2+2"]]
    async with AsyncControlClient(url(agent)) as c:
        for token in forged:
            assert await status_of(c, "DELETE", "/v1/sessions/callOfB2", headers={
                "Authorization": f"Bearer {token}"}) == (401, '{"error": "missing or wrong bearer token"}'), token
    assert still_routed(agent, "callOfB2", 40002)


@needs_root
@asyncio_module
async def test_backends_outside_the_allowed_networks_and_ports_are_refused(agent, admin, calls):
    for body, error in (({"ip": "192.0.2.7", "port": BACKEND_PORT},
                         "backend address 192.0.2.7 is outside the allowed networks "
                         "(198.18.10.0/24, fd00:5::/64)"),
                        ({"ip": BACKENDS[3][0], "ip6": "2001:db8::7", "port": BACKEND_PORT},
                         "backend address 2001:db8::7 is outside the allowed networks "
                         "(198.18.10.0/24, fd00:5::/64)"),
                        ({"ip": BACKENDS[3][0], "port": 53},
                         "backend port 53 is outside the allowed range 5000-5999")):
        assert await status_of(admin, "PUT", "/v1/backends/3", body) == (403, f'{{"error": "{error}"}}')
    assert agent.plane.backend(3) is None


@needs_root
@asyncio_module
async def test_a_pool_token_acts_only_as_the_backend_of_its_own_address(agent, calls):
    """From 127.0.0.1 a pool token is backend 1 (the low 18 bits), at 127.0.0.1: not the backend 1
    registered at another address, and never backend 2."""
    async with AsyncControlClient(url(agent), pool_token(MASTER)) as pool:
        assert await status_of(pool, "DELETE", "/v1/sessions/callOfA1") == (
            403, f'{{"error": "backend 1 is registered at {BACKENDS[1][0]}, not at the caller\'s address '
                 '127.0.0.1"}')
        assert await status_of(pool, "DELETE", "/v1/sessions/callOfB2") == (
            403, '{"error": "backend 1\'s token cannot delete a session of another backend"}')
        assert await status_of(pool, "PUT", "/v1/backends/1", {"ip": BACKENDS[1][0], "port": BACKEND_PORT}) == (
            403, f'{{"error": "a pool token registers only its caller\'s own address (127.0.0.1), not '
                 f'{BACKENDS[1][0]}"}}')
        assert (await status_of(pool, "GET", "/v1/sessions"))[0] == 403
    assert still_routed(agent, "callOfA1", 40001) and still_routed(agent, "callOfB2", 40002)


@needs_root
@asyncio_module
async def test_a_pool_token_of_two_workers_covers_its_addresss_two_ids_only(agent, calls):
    """From 127.0.0.1 (low bits 1) a "pool+2" token is backends 2 and 3 at 127.0.0.1: backend 2's call
    passes the id check and is refused by address; backend 1's is refused by id.  A token naming another
    count, or the count with another form, is no token at all."""
    async with AsyncControlClient(url(agent), pool_token(MASTER, 2)) as pool:
        assert await status_of(pool, "DELETE", "/v1/sessions/callOfB2") == (
            403, f'{{"error": "backend 2 is registered at {BACKENDS[2][0]}, not at the caller\'s address '
                 '127.0.0.1"}')
        assert await status_of(pool, "DELETE", "/v1/sessions/callOfA1") == (
            403, '{"error": "backend 2..3\'s token cannot delete a session of another backend"}')
    proof = pool_token(MASTER, 2).partition(".")[2]
    for forged in (f"pool+3.{proof}", f"pool+02.{proof}", f"pool+2.{proof[:-1]}0", f"pool2.{proof}",
                   f"pool+1.{proof}", "pool+2." + "0" * 64):
        async with AsyncControlClient(url(agent), forged) as nobody:
            assert await status_of(nobody, "DELETE", "/v1/sessions/callOfB2") == (
                401, '{"error": "missing or wrong bearer token"}'), forged
    assert still_routed(agent, "callOfA1", 40001) and still_routed(agent, "callOfB2", 40002)


# -- a live backend id cannot be taken; a dead one can ---------------------------------------------

@needs_root
@asyncio_module
async def test_a_second_instance_claiming_a_live_backend_id_gets_409(agent, admin, calls, short_windows):
    async with as_backend(agent, 2) as b:
        await b.put_backend(2, BACKENDS[2][0], BACKEND_PORT, instance="first")      # refreshed: live
        status, body = await status_of(b, "PUT", "/v1/backends/2",
                                       {"ip": BACKENDS[3][0], "port": BACKEND_PORT, "instance": "second"})
        assert (status, body) == (409, '{"error": "backend 2 is live at another address '
                                       f'({BACKENDS[2][0]}:{BACKEND_PORT}, instance first)"}}')
        assert still_routed(agent, "callOfB2", 40002)
        # the same address with a new instance is a restart of the same transceiver: not refused
        await b.put_backend(2, BACKENDS[2][0], BACKEND_PORT, instance="first-restarted")
        deadline = time.monotonic() + 10
        while 2 in agent.api.live_backends() and time.monotonic() < deadline:  # no refresh: it goes quiet
            await asyncio.sleep(0.05)
        assert (await b.put_backend(2, BACKENDS[3][0], BACKEND_PORT, instance="second"))["ip"] == BACKENDS[3][0]


# -- sessions nobody hung up are aged; a live backend's are not --------------------------------------

@needs_root
@asyncio_module
async def test_flowless_sessions_of_a_quiet_backend_are_aged_and_a_live_ones_are_kept(agent, admin, calls,
                                                                                      short_windows):
    await admin.put_session("leakedB2", 2)                    # backend 2: registered by the admin, never refreshed
    async with as_backend(agent, 1) as a:
        await a.put_backend(1, BACKENDS[1][0], BACKEND_PORT, instance="alive")
        await a.put_session("readyA1x", 1)                    # a live transceiver's ready ufrag
        deadline = time.monotonic() + 10
        while agent.plane.session("leakedB2") is not None and time.monotonic() < deadline:
            await a.put_backend(1, BACKENDS[1][0], BACKEND_PORT, instance="alive")   # its refresh
            await asyncio.sleep(0.05)
    assert agent.plane.session("leakedB2") is None
    assert agent.plane.session("readyA1x") is not None
    assert agent.plane.session("callOfB2") is not None       # it has a flow: a call in progress


# -- /metrics under a scrape flood ------------------------------------------------------------------

@needs_root
@asyncio_module
async def test_a_scrape_flood_never_walks_the_tables_nor_holds_the_deletes(agent, admin, calls):
    """500 scrapes, 50 at a time, while 40 calls hang up.  Before, every scrape walked all four maps on
    the table-walker thread (2,000 walks here, each DELETE queued behind them); now only the ager walks,
    once per pass, and the scrapes share the sizes its passes leave."""
    walks: list[tuple[str, bool]] = []      # (thread, whether it was the flow map)
    sweeps: list[int] = []
    plane = agent.plane.maps   # the XDP maps: their walks and deletions
    real_walk, real_del_sessions = plane._walk, plane.del_sessions
    flows_fd = plane.bpf[b"flows"].map_fd

    def counted_walk(table, *args, **kw):
        walks.append((threading.current_thread().name, table.map_fd == flows_fd))
        return real_walk(table, *args, **kw)

    def counted_del_sessions(ufrags):
        sweeps.append(len(ufrags))
        return real_del_sessions(ufrags)

    saved_interval = agent.config.ageing_interval_s
    agent.config.ageing_interval_s = 0.25
    plane._walk, plane.del_sessions = counted_walk, counted_del_sessions
    passes_before = agent.tables.passes
    try:
        # a scrape answers with the last pass's sizes: let one pass after the calls' flows leave them
        for _ in range(200):
            if agent.tables.passes >= passes_before + 2:
                break
            await asyncio.sleep(0.05)
        ufrags = [f"flood{i:03d}" for i in range(40)]
        for ufrag in ufrags:
            await admin.put_session(ufrag, 1)
        async with AsyncControlClient(url(agent)) as scraper:
            async def flood() -> int:
                done = 0
                for _ in range(10):
                    bodies = await asyncio.gather(*(scraper.metrics() for _ in range(50)))
                    assert all("splitrelay_edge_flows 2.0" in b for b in bodies)   # the two calls' flows
                    done += len(bodies)
                return done

            async def hang_ups() -> list[float]:
                took = []
                for ufrag in ufrags:
                    start = time.perf_counter()
                    await admin.delete_session(ufrag)
                    took.append(time.perf_counter() - start)
                return took

            scraped, took = await asyncio.gather(flood(), hang_ups())
        assert scraped == 500
        assert all(plane.session(u) is None for u in ufrags)
        passes = agent.tables.passes - passes_before
        assert walks and {thread for thread, _ in walks} == {"flow-table_0"}   # the ager's and the DELETEs' only
        # the flow map is walked once per ageing pass and once per DELETE sweep, never for a scrape
        assert sum(flows for _, flows in walks) <= passes + 1 + len(sweeps), (len(walks), passes, len(sweeps))
        assert max(took) < 5.0, max(took)
    finally:
        plane._walk, plane.del_sessions = real_walk, real_del_sessions
        agent.config.ageing_interval_s = saved_interval


# -- the Registrar: a failed DELETE is retried until it lands ---------------------------------------

@needs_root
@asyncio_module
async def test_a_failed_unregister_is_retried_until_the_agent_drops_the_session(agent, calls):
    """The first two DELETEs meet a 503 from a front that otherwise passes requests to the agent."""
    refused = []

    async def front(request: web.Request) -> web.StreamResponse:
        if request.method == "DELETE" and len(refused) < 2:
            refused.append(request.path)
            return web.json_response({"error": "overloaded"}, status=503)
        async with AsyncControlClient(url(agent), request.headers["Authorization"].partition(" ")[2]) as c:
            body = await request.read()
            status, raw = await c.request(request.method, request.rel_url.raw_path_qs, data=body or None)
        return web.Response(status=status, body=raw, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", front)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    registrar = Registrar(f"http://127.0.0.1:{port}", 1, BACKENDS[1][0], BACKEND_PORT,
                          token=backend_token(MASTER, 1), watch_interval=0.05)
    try:
        await registrar.start()
        await registrar.register("retryMe1")
        await registrar.unregister("retryMe1")
        assert agent.plane.session("retryMe1") is not None and "retryMe1" in registrar.leftover
        deadline = time.monotonic() + 10
        # both: the agent drops it before its 204 reaches the registrar, which then forgets it
        while (agent.plane.session("retryMe1") is not None or registrar.leftover) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert agent.plane.session("retryMe1") is None
        assert registrar.leftover == {} and refused == ["/v1/sessions/retryMe1"] * 2
        with pytest.raises(Forbidden):                       # its token opens backend 1 only
            await registrar._call("DELETE", f"/v1/sessions/{quote('callOfB2')}")
    finally:
        await registrar.stop()
        await runner.cleanup()


# -- the Kubernetes follower checks the API server's certificate -------------------------------------

def self_signed(tmp_path):
    """A certificate for 127.0.0.1 signed by nobody anyone trusts, and its key."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem"), "-days", "1",
                    "-subj", "/CN=kubernetes", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return tmp_path / "cert.pem", tmp_path / "key.pem"


@pytest.mark.asyncio
async def test_the_kubernetes_follower_refuses_an_api_server_it_cannot_verify(tmp_path):
    import ssl

    from splitrelay.edge.backend_sources import BackendSourceError, kubernetes_reader

    cert, key = self_signed(tmp_path)
    endpoints = {"subsets": [{"addresses": [{"ip": "10.244.0.11"}], "ports": [{"name": "media", "port": 5000}]}]}

    async def serve(request: web.Request) -> web.Response:
        return web.json_response(endpoints)

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/splitrelay/endpoints/splitrelay-whip", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    api = f"https://127.0.0.1:{runner.addresses[0][1]}"
    try:
        with pytest.raises(BackendSourceError) as err:     # an impostor on the path: not believed
            await kubernetes_reader("splitrelay/splitrelay-whip", api=api, token="t")()
        assert str(err.value).startswith(f"Kubernetes API {api} unreachable: ") and "certificate verify failed" \
            in str(err.value)
        trusted = await kubernetes_reader("splitrelay/splitrelay-whip", api=api, token="t", ca_file=str(cert))()
        assert [(s.ip, s.port) for s in trusted] == [("10.244.0.11", 5000)]
        unchecked = await kubernetes_reader("splitrelay/splitrelay-whip", api=api, token="t", insecure=True)()
        assert unchecked == trusted
    finally:
        await runner.cleanup()


@needs_root
@asyncio_module
async def test_a_running_registrar_keeps_its_backend_live(agent, calls, short_windows):
    """Its refresh is what makes the 409 and the session ageing tell a live transceiver from a dead one."""
    registrar = Registrar(url(agent), 1, BACKENDS[1][0], BACKEND_PORT, token=backend_token(MASTER, 1),
                          watch_interval=0.05, refresh_interval=0.1)
    try:
        await registrar.start()
        await registrar.register("readyOne1")
        first = agent.api.refreshed[1]
        deadline = time.monotonic() + 10
        while agent.api.refreshed[1] - first < 1.0 and time.monotonic() < deadline:   # twice the live window
            assert 1 in agent.api.live_backends()
            await asyncio.sleep(0.05)
        assert agent.api.refreshed[1] - first >= 1.0
        assert agent.plane.session("readyOne1") is not None     # flowless, but its backend is live: kept
    finally:
        await registrar.stop()
