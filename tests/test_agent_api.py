"""The edge agent in this process against a real data plane: control API, metrics, ageing, restarts.

``EdgeAgent`` runs on 127.0.0.1 (ephemeral port) with the XDP programs loaded,
pinned under a unique instance and attached to a veth pair of its own (``srE*``,
deleted afterwards), and is driven through ``AsyncControlClient``.  Flows are
made without any traffic: a real STUN Binding Request runs through
``xdp_public`` by BPF_PROG_TEST_RUN.  The agent as a process is
tests/test_agent_lab.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import socket
import struct
import subprocess
import time
from contextlib import contextmanager
from urllib.parse import quote

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families
from splitrelay.edge.agent import AgentConfig, EdgeAgent
from splitrelay.wire.control_client import AsyncControlClient, ControlError
from splitrelay.edge.counters import counter_specs
from splitrelay.edge.records import DataPlaneError
from splitrelay.edge.neighbours import NeighbourError
from splitrelay.bpf.testrun import XDP_REDIRECT, run_xdp

from . import packets as P
from .conftest import needs_root
from .vectors import rfc5769

pytestmark = needs_root

TOKEN = secrets.token_urlsafe(24)
WRONG_TOKEN = TOKEN[:-1] + ("y" if TOKEN.endswith("x") else "x")  # one character off, never the token itself
GATEWAY_IP = "198.51.100.254"
BACKENDS = {1: ("198.18.10.11", "fd00:5::11", "02:b0:00:00:00:11"),
            2: ("198.18.10.12", "fd00:5::12", "02:b0:00:00:00:12"),
            3: ("198.18.10.13", None, "02:b0:00:00:00:13")}
UNREACHABLE_IP = "198.18.10.99"   # no neighbour entry: resolution times out
BACKEND_PORT = 5000


# -- a veth pair of our own, with the next hops in its neighbour table -------------------------

def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextmanager
def veth_pair():
    """srE<hex>p (public) / srE<hex>i (internal) in this namespace; gateway and backends as neighbours."""
    tag = secrets.token_hex(3)
    public, internal = f"srE{tag}p", f"srE{tag}i"
    _ip("link", "add", public, "type", "veth", "peer", "name", internal)
    try:
        for name in (public, internal):
            _ip("link", "set", name, "up")
        _ip("neigh", "replace", GATEWAY_IP, "lladdr", P.GATEWAY_MAC, "dev", public, "nud", "permanent")
        for ip4, ip6, mac in BACKENDS.values():
            _ip("neigh", "replace", ip4, "lladdr", mac, "dev", internal, "nud", "permanent")
            if ip6:
                _ip("-6", "neigh", "replace", ip6, "lladdr", mac, "dev", internal, "nud", "permanent")
        yield public, internal
    finally:
        subprocess.run(["ip", "link", "del", public], capture_output=True)


def xdp_attached(ifname: str) -> bool:
    # `ip`, not pyroute2: its IPRoute runs an event loop of its own and refuses to inside ours
    out = subprocess.run(["ip", "-j", "link", "show", "dev", ifname], check=True, capture_output=True).stdout
    return "xdp" in json.loads(out)[0]


def agent_config(links: tuple[str, str], **kw) -> AgentConfig:
    base = dict(public_iface=links[0], internal_iface=links[1], public_ip4=P.PUBLIC_IP4,
                public_ip6=P.PUBLIC_IP6, relay_port=P.RELAY_PORT, gateway_ip=GATEWAY_IP,
                instance=f"srE-{secrets.token_hex(4)}", listen_host="127.0.0.1", listen_port=0,
                ageing_interval_s=0.1, neighbour_timeout_s=0.5, detach_on_exit=True,
                backend_cidrs=("198.18.10.0/24", "fd00:5::/64"))
    base.update(kw)
    return AgentConfig(**base)


def url(agent: EdgeAgent) -> str:
    return f"http://127.0.0.1:{agent.port}"


# -- flows without traffic: a real Binding Request through xdp_public (BPF_PROG_TEST_RUN) ------

def binding_request(username: str) -> bytes:
    value = username.encode()
    attr = struct.pack("!HH", 0x0006, len(value)) + value + b"\0" * (-len(value) % 4)
    return struct.pack("!HHI", 0x0001, len(attr), 0x2112A442) + secrets.token_bytes(12) + attr


def open_flow(agent: EdgeAgent, ufrag: str, client_ip: str = P.CLIENT_IP4, client_port: int = P.CLIENT_PORT):
    frame = P.udp_frame(binding_request(f"{ufrag}:cli1"), src=client_ip, sport=client_port,
                        v6=":" in client_ip)
    result = run_xdp(agent.plane.maps.program_fd("xdp_public"), frame)
    assert result.verdict == XDP_REDIRECT, result.name
    return result


def confirm_flow(agent: EdgeAgent, backend_id: int = 1, client_ip: str = P.CLIENT_IP4,
                 client_port: int = P.CLIENT_PORT) -> None:
    """The backend answers the client's request (a Binding success response through xdp_internal), as a
    call's transceiver does: the pending flow ``open_flow`` left is confirmed and is no longer aged
    out as a stranger's would be after a few seconds."""
    ip4, _, mac = BACKENDS[backend_id]
    frame = P.udp_frame(rfc5769()["2.2"], src=ip4, dst=client_ip, sport=BACKEND_PORT, dport=client_port,
                        src_mac=mac, dst_mac=P.RELAY_INT_MAC)
    result = run_xdp(agent.plane.maps.program_fd("xdp_internal"), frame)
    assert result.verdict == XDP_REDIRECT, result.name


def backdate_flows(agent: EdgeAgent, seconds: float, client_port: int | None = None) -> None:
    """Pretend a flow's last packet came ``seconds`` ago (the plane has no flow writer).

    Never before the clock's zero: ``now - seconds`` on a machine up for less than that would
    wrap the u64 field to the far future (a flow that never ages), so it stops at boot.
    """
    table = agent.plane.maps.bpf[b"flows"]
    for key, leaf in list(table.items()):
        if client_port is None or socket.ntohs(key.port) == client_port:
            leaf.last_seen_ns = max(0, time.monotonic_ns() - int(seconds * 1e9))
            table[key] = leaf


# -- the shared agent --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def links():
    with veth_pair() as pair:
        yield pair


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def agent(links):
    edge = EdgeAgent(agent_config(links, token=TOKEN))
    await edge.start()
    try:
        yield edge
    finally:
        await edge.stop()
        assert not edge.plane.maps.pin_dir.exists()
        assert not any(xdp_attached(name) for name in links)


@pytest_asyncio.fixture(loop_scope="module")
async def client(agent):
    async with AsyncControlClient(url(agent), TOKEN) as c:
        yield c


@pytest_asyncio.fixture(loop_scope="module")
async def anonymous(agent):
    async with AsyncControlClient(url(agent)) as c:
        yield c


def empty_tables(agent: EdgeAgent):
    """No backend, session or flow left, and nothing the control API remembers of backends."""
    dp = agent.plane
    for b in dp.backends():
        dp.del_backend(b.backend_id)
    for s in dp.sessions():
        dp.del_session(s.ufrag)
    for f in dp.flows():
        dp.del_flow((f.client_ip, f.client_port))
    agent.api.instances.clear()
    agent.api.refreshed.clear()
    return dp


@pytest_asyncio.fixture(loop_scope="module")
async def state(agent, client):
    """Backends 1 and 2, session 'existing1' on 1 with one flow; nothing else."""
    dp = empty_tables(agent)
    for backend_id in (1, 2):
        ip4, ip6, _ = BACKENDS[backend_id]
        await client.put_backend(backend_id, ip4, BACKEND_PORT, ip6)
    await client.put_session("existing1", 1)
    open_flow(agent, "existing1")
    confirm_flow(agent)
    return dp


async def snapshot(client: AsyncControlClient):
    flows = [{k: v for k, v in f.items() if k not in ("age_s", "idle_s")} for f in await client.flows()]
    sessions = [{k: v for k, v in s.items() if k != "age_s"} for s in await client.sessions()]
    return (await client.backends(), sorted(sessions, key=lambda s: s["ufrag"]),
            sorted(flows, key=lambda f: f["client"]))


async def scrape(client: AsyncControlClient) -> dict:
    return {f.name: f for f in text_string_to_metric_families(await client.metrics())}


async def scrape_after_next_pass(agent: EdgeAgent, client: AsyncControlClient) -> dict:
    """A scrape whose table sizes were read after now: /metrics answers with the last ageing pass's."""
    seen = agent.tables.passes
    for _ in range(400):   # 20 s: a failure, not a wait
        if agent.tables.passes >= seen + 2:   # the pass under way when we came may have read before now
            return await scrape(client)
        await asyncio.sleep(0.05)
    raise AssertionError("no ageing pass in 20 s")


def sample(families: dict, family: str, **labels) -> float:
    found = [s.value for s in families[family].samples
             if s.name in (family, family + "_total") and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (family, labels, found)
    return found[0]


asyncio_module = pytest.mark.asyncio(loop_scope="module")


# -- every endpoint ------------------------------------------------------------------------------

@asyncio_module
async def test_health_is_open_and_names_the_agent(agent, anonymous):
    health = await anonymous.health()
    assert health == {"status": "ok", "boot_id": agent.boot_id, "instance": agent.config.instance,
                      "relay_port": P.RELAY_PORT, "public_ip": P.PUBLIC_IP4, "policy": "strict",
                      "datapath": "xdp"}
    assert len(health["boot_id"]) == 16 and EdgeAgent(agent.config).boot_id != agent.boot_id


@asyncio_module
async def test_backend_lifecycle(agent, client, state):
    ip4, ip6, mac = BACKENDS[3]
    assert await client.put_backend(3, ip4, BACKEND_PORT) == {
        "id": 3, "ip": ip4, "ip6": None, "port": BACKEND_PORT, "mac": mac}      # MAC from the neighbour table
    status, _ = await client.request("PUT", "/v1/backends/3", {"ip": ip4, "port": BACKEND_PORT})
    assert status == 200                                                           # 201 new, 200 updated
    status, _ = await client.request("PUT", "/v1/backends/4", {"ip": ip4, "port": 6000})
    assert status == 201
    await client.put_backend(3, ip4, 5001)
    backends = {b["id"]: b for b in await client.backends()}
    assert sorted(backends) == [1, 2, 3, 4] and backends[3]["port"] == 5001
    assert backends[1] == {"id": 1, "ip": BACKENDS[1][0], "ip6": BACKENDS[1][1], "port": BACKEND_PORT,
                           "mac": BACKENDS[1][2]}
    assert state.backend(3).smac.lower() == agent.api.relay_mac.lower()       # relay's own internal MAC
    await client.delete_backend(3)
    await client.delete_backend(4)
    with pytest.raises(ControlError) as err:
        await client.delete_backend(3)
    assert err.value.status == 404
    assert sorted(b["id"] for b in await client.backends()) == [1, 2]


@asyncio_module
async def test_ipv6_only_backend(client, state):
    _, ip6, mac = BACKENDS[2]
    assert (await client.put_backend(2, None, BACKEND_PORT, ip6))["mac"] == mac
    assert {b["id"]: b["ip"] for b in await client.backends()}[2] is None


@asyncio_module
async def test_session_lifecycle(client, state):
    created = await client.request("PUT", "/v1/sessions/newSess1", {"backend": 2})
    assert created[0] == 201 and json.loads(created[1]) == {"ufrag": "newSess1", "backend": 2}
    assert (await client.request("PUT", "/v1/sessions/newSess1", {"backend": 2}))[0] == 200  # identical
    with pytest.raises(ControlError) as err:
        await client.put_session("newSess1", 1)
    assert err.value.status == 409 and "owned by backend 2" in str(err.value)
    sessions = {s["ufrag"]: s for s in await client.sessions()}
    assert set(sessions) == {"existing1", "newSess1"}
    assert sessions["existing1"]["backend"] == 1 and sessions["existing1"]["flows"] == 1
    assert sessions["newSess1"]["flows"] == 0 and 0 <= sessions["newSess1"]["age_s"] < 5
    await client.delete_session("newSess1")
    with pytest.raises(ControlError) as err:
        await client.delete_session("newSess1")
    assert err.value.status == 404


@asyncio_module
async def test_ufrags_with_slash_and_plus_round_trip(client, state):
    for ufrag in ("BAAB+/xY0123+/ab", "a/b+", "////", "A" * 32):
        assert (await client.put_session(ufrag, 1))["ufrag"] == ufrag
        assert ufrag in [s["ufrag"] for s in await client.sessions()]
        await client.delete_session(ufrag)
        assert ufrag not in [s["ufrag"] for s in await client.sessions()]


@asyncio_module
async def test_flows_stats_and_limit(agent, client, state):
    def ufrag_steered(counters: list[dict]) -> tuple[int, int]:
        c = next(c for c in counters if c["name"] == "IN_FWD_STUN_UFRAG")
        return c["packets"], c["bytes"]

    before = ufrag_steered((await client.stats())["counters"])
    open_flow(agent, "existing1", client_port=40001)
    open_flow(agent, "existing1", client_ip=P.CLIENT_IP6)
    flows = await client.flows()
    assert sorted(f["client"] for f in flows) == sorted(
        [f"{P.CLIENT_IP4}:{P.CLIENT_PORT}", f"{P.CLIENT_IP4}:40001", f"[{P.CLIENT_IP6}]:{P.CLIENT_PORT}"])
    for f in flows:
        assert f["backend"] == 1 and f["ufrag"] == "existing1" and f["packets"] >= 1 and f["bytes"] > 0
        assert set(f) == {"client", "backend", "ufrag", "age_s", "idle_s", "packets", "bytes", "rx_packets",
                          "rx_bytes", "pending"}
        # the state's flow was answered by its backend; the two new ones were learned from a request alone
        assert f["pending"] is (f["client"] != f"{P.CLIENT_IP4}:{P.CLIENT_PORT}")
        assert 0 <= f["idle_s"] <= f["age_s"] < 30
    assert len(await client.flows(limit=1)) == 1
    assert [s["flows"] for s in await client.sessions()] == [3]
    stats = (await client.stats())["counters"]
    assert [c["name"] for c in stats] == [spec.name for spec in counter_specs()]
    assert all(set(c) == {"name", "direction", "verdict", "reason", "packets", "bytes"} for c in stats)
    packets, octets = ufrag_steered(stats)
    assert packets == before[0] + 2 and octets > before[1]     # the two Binding Requests above, nothing else


@asyncio_module
async def test_deleting_a_session_removes_its_flows(agent, client, state):
    await client.put_session("otherSess", 2)
    open_flow(agent, "otherSess", client_port=41000)
    assert len(await client.flows()) == 2
    await client.delete_session("existing1")
    assert [(f["ufrag"], f["backend"]) for f in await client.flows()] == [("otherSess", 2)]


@asyncio_module
async def test_deletes_that_arrive_together_share_one_pass_over_the_flows(agent, client, state):
    """Hang-ups at scale: concurrent DELETEs are answered one by one but cost one flow-table read."""
    names = [f"many{i:04d}" for i in range(120)]
    await asyncio.gather(*(client.put_session(n, 2) for n in names))
    for i, name in enumerate(names[:10]):
        open_flow(agent, name, client_port=42000 + i)
    passes = []
    real = agent.plane.del_sessions

    def counted(ufrags):
        passes.append(len(ufrags))
        return real(ufrags)

    agent.plane.del_sessions = counted
    try:
        answers = await asyncio.gather(*(client.request("DELETE", f"/v1/sessions/{n}")
                                         for n in names + ["neverThere", "missing2"]))
    finally:
        del agent.plane.del_sessions
    assert [status for status, _ in answers] == [204] * len(names) + [404, 404]
    assert sum(passes) == len(names) + 2 and len(passes) < len(names) / 4    # batched, nobody left out
    assert [s["ufrag"] for s in await client.sessions()] == ["existing1"]
    assert [f["ufrag"] for f in await client.flows()] == ["existing1"]      # the ten sessions' flows went


@asyncio_module
async def test_deleting_a_backend_removes_its_sessions_and_flows_only(agent, client, state):
    await client.put_session("otherSess", 2)
    open_flow(agent, "otherSess", client_port=41000)
    await client.delete_backend(1)
    assert [s["ufrag"] for s in await client.sessions()] == ["otherSess"]
    assert [f["ufrag"] for f in await client.flows()] == ["otherSess"]
    assert [b["id"] for b in await client.backends()] == [2]


@asyncio_module
async def test_a_new_backend_instance_drops_the_old_processes_sessions(agent, client, state):
    ip4, ip6, _ = BACKENDS[1]
    await client.put_backend(1, ip4, BACKEND_PORT, ip6, instance="proc-a")
    await client.put_backend(1, ip4, BACKEND_PORT, ip6, instance="proc-a")     # same process: kept
    assert [s["ufrag"] for s in await client.sessions()] == ["existing1"]
    await client.put_session("keepMe22", 2)
    await client.put_backend(1, ip4, BACKEND_PORT, ip6, instance="proc-b")     # restarted: dropped
    assert [s["ufrag"] for s in await client.sessions()] == ["keepMe22"]
    assert await client.flows() == []


# -- bad requests: 4xx, one line, nothing changes ----------------------------------------------

B, S = "/v1/backends/", "/v1/sessions/"
GOOD_BACKEND = {"ip": BACKENDS[3][0], "port": BACKEND_PORT}


def backend_body(**kw):
    return {**GOOD_BACKEND, **kw}


BAD_REQUESTS = {
    # body: not JSON, not an object, too large
    "json-garbage": ("PUT", S + "goodUfrag", {"data": b"{nope"}, 400),
    "json-empty": ("PUT", S + "goodUfrag", {"data": b""}, 400),
    "json-not-utf8": ("PUT", S + "goodUfrag", {"data": b'{"backend": "\xff\xfe"}'}, 400),
    "json-deeply-nested": ("PUT", S + "goodUfrag", {"data": b"[" * 6000 + b"]" * 6000}, 400),
    "json-array": ("PUT", S + "goodUfrag", {"body": [1]}, 400),
    "json-null": ("PUT", S + "goodUfrag", {"data": b"null"}, 400),
    "json-string": ("PUT", B + "3", {"data": b'"198.18.10.13"'}, 400),
    "body-too-large": ("PUT", B + "3", {"body": backend_body(pad="x" * 20000)}, 413),
    # session body
    "backend-as-string": ("PUT", S + "goodUfrag", {"body": {"backend": "1"}}, 400),
    "backend-as-bool": ("PUT", S + "goodUfrag", {"body": {"backend": True}}, 400),
    "backend-as-float": ("PUT", S + "goodUfrag", {"body": {"backend": 1.0}}, 400),
    "backend-missing": ("PUT", S + "goodUfrag", {"body": {}}, 400),
    "backend-zero": ("PUT", S + "goodUfrag", {"body": {"backend": 0}}, 400),
    "backend-too-large": ("PUT", S + "goodUfrag", {"body": {"backend": 262144}}, 400),
    "session-unknown-field": ("PUT", S + "goodUfrag", {"body": {"backend": 1, "ttl": 5}}, 400),
    "session-unknown-backend": ("PUT", S + "goodUfrag", {"body": {"backend": 99}}, 409),
    "session-owned-by-another": ("PUT", S + "existing1", {"body": {"backend": 2}}, 409),
    # ufrag in the path
    "ufrag-too-short": ("PUT", S + "abc", {"body": {"backend": 1}}, 400),
    "ufrag-too-long": ("PUT", S + "a" * 33, {"body": {"backend": 1}}, 400),
    "ufrag-dash": ("PUT", S + "bad-char", {"body": {"backend": 1}}, 400),
    "ufrag-equals": ("PUT", S + "abcd=", {"body": {"backend": 1}}, 400),
    "ufrag-colon": ("PUT", S + "abcd:efgh", {"body": {"backend": 1}}, 400),
    "ufrag-space": ("PUT", S + "abcd%20efgh", {"body": {"backend": 1}}, 400),
    "ufrag-nul": ("PUT", S + "abcd%00efgh", {"body": {"backend": 1}}, 400),
    "ufrag-non-ascii": ("PUT", S + quote("abcdé"), {"body": {"backend": 1}}, 400),
    "delete-ufrag-bad": ("DELETE", S + "ab-cd", {}, 400),
    "delete-session-unknown": ("DELETE", S + "neverThere", {}, 404),
    # backend id in the path
    "backend-id-zero": ("PUT", B + "0", {"body": GOOD_BACKEND}, 400),
    "backend-id-too-large": ("PUT", B + "262144", {"body": GOOD_BACKEND}, 400),
    "backend-id-negative": ("PUT", B + "-1", {"body": GOOD_BACKEND}, 400),
    "backend-id-text": ("PUT", B + "three", {"body": GOOD_BACKEND}, 400),
    "backend-id-arabic-digit": ("PUT", B + quote("١"), {"body": GOOD_BACKEND}, 400),
    "backend-id-5000-digits": ("PUT", B + "9" * 5000, {"body": GOOD_BACKEND}, 400),
    "delete-backend-unknown": ("DELETE", B + "77", {}, 404),
    "delete-backend-bad-id": ("DELETE", B + "0", {}, 400),
    # backend body
    "port-zero": ("PUT", B + "3", {"body": backend_body(port=0)}, 400),
    "port-too-large": ("PUT", B + "3", {"body": backend_body(port=65536)}, 400),
    "port-as-string": ("PUT", B + "3", {"body": backend_body(port="5000")}, 400),
    "port-as-bool": ("PUT", B + "3", {"body": backend_body(port=True)}, 400),
    "port-missing": ("PUT", B + "3", {"body": {"ip": BACKENDS[3][0]}}, 400),
    "ip-missing": ("PUT", B + "3", {"body": {"port": BACKEND_PORT}}, 400),
    "ip-both-null": ("PUT", B + "3", {"body": backend_body(ip=None, ip6=None)}, 400),
    "ip-garbage": ("PUT", B + "3", {"body": backend_body(ip="not-an-ip")}, 400),
    "ip-as-int": ("PUT", B + "3", {"body": backend_body(ip=3322088971)}, 400),
    "ip-is-v6": ("PUT", B + "3", {"body": backend_body(ip="fd00:5::13")}, 400),
    "ip6-is-v4": ("PUT", B + "3", {"body": backend_body(ip6="198.18.10.13")}, 400),
    "ip6-scoped": ("PUT", B + "3", {"body": backend_body(ip6="fe80::1%eth0")}, 400),
    "ip-unspecified": ("PUT", B + "3", {"body": backend_body(ip="0.0.0.0")}, 400),
    "ip-multicast": ("PUT", B + "3", {"body": backend_body(ip="224.0.0.1")}, 400),
    "ip-loopback": ("PUT", B + "3", {"body": backend_body(ip="127.0.0.1")}, 400),
    "ip-broadcast": ("PUT", B + "3", {"body": backend_body(ip="255.255.255.255")}, 400),
    "ip6-unspecified": ("PUT", B + "3", {"body": backend_body(ip6="::")}, 400),
    "backend-unknown-field": ("PUT", B + "3", {"body": backend_body(mac="02:00:00:00:00:01")}, 400),
    "instance-as-int": ("PUT", B + "1", {"body": backend_body(ip=BACKENDS[1][0], instance=7)}, 400),
    "instance-empty": ("PUT", B + "1", {"body": backend_body(ip=BACKENDS[1][0], instance="")}, 400),
    "instance-too-long": ("PUT", B + "1", {"body": backend_body(ip=BACKENDS[1][0], instance="x" * 65)}, 400),
    "instance-newline": ("PUT", B + "1", {"body": backend_body(ip=BACKENDS[1][0], instance="a\nb")}, 400),
    "backend-unreachable": ("PUT", B + "3", {"body": backend_body(ip=UNREACHABLE_IP)}, 422),
    "known-backend-moved-unreachable": ("PUT", B + "1", {"body": backend_body(ip=UNREACHABLE_IP)}, 422),
    # query, routes, methods
    "limit-negative": ("GET", "/v1/flows?limit=-1", {}, 400),
    "limit-zero": ("GET", "/v1/flows?limit=0", {}, 400),
    "limit-text": ("GET", "/v1/flows?limit=all", {}, 400),
    "limit-too-large": ("GET", "/v1/flows?limit=99999999999", {}, 400),
    "unknown-route": ("GET", "/v1/nothing", {}, 404),
    "wrong-method": ("POST", S + "goodUfrag", {"body": {"backend": 1}}, 405),
    # auth: a valid request without the right token changes nothing either
    "no-token-put-session": ("PUT", S + "stolenUfrag", {"body": {"backend": 1}, "auth": None}, 401),
    "no-token-delete-session": ("DELETE", S + "existing1", {"auth": None}, 401),
    "no-token-delete-backend": ("DELETE", B + "1", {"auth": None}, 401),
    "no-token-list": ("GET", "/v1/sessions", {"auth": None}, 401),
    "wrong-token": ("DELETE", S + "existing1", {"auth": "Bearer " + WRONG_TOKEN}, 401),
    "token-prefix": ("DELETE", S + "existing1", {"auth": "Bearer " + TOKEN[:-1]}, 401),
    "token-without-scheme": ("DELETE", S + "existing1", {"auth": TOKEN}, 401),
    "basic-scheme": ("DELETE", S + "existing1", {"auth": "Basic " + TOKEN}, 401),
}


@asyncio_module
@pytest.mark.parametrize("case", BAD_REQUESTS)
async def test_bad_requests_are_refused_with_a_reason_and_change_nothing(agent, client, anonymous, state, case):
    method, path, kw, expected = BAD_REQUESTS[case]
    before = await snapshot(client)
    assert before[1] and before[2]       # sessions and a flow to lose
    kw = dict(kw)
    auth = kw.pop("auth", ...)           # ... = the client's own token
    caller = anonymous if auth is None else client
    headers = {"Authorization": auth} if isinstance(auth, str) else None
    status, raw = await caller.request(method, path, headers=headers, **kw)
    assert status == expected, raw
    error = json.loads(raw)["error"]
    assert isinstance(error, str) and error and "\n" not in error
    assert await snapshot(client) == before


@asyncio_module
async def test_a_refusal_reads_well_through_the_client(client, state):
    with pytest.raises(ControlError) as err:
        await client.put_backend(3, UNREACHABLE_IP, BACKEND_PORT)
    assert err.value.status == 422
    assert str(err.value).startswith(f"PUT /v1/backends/3: 422 cannot reach backend {UNREACHABLE_IP}")
    async with AsyncControlClient("http://127.0.0.1:9", timeout=0.5) as nobody:
        with pytest.raises(ControlError) as err:
            await nobody.health()
    assert err.value.status == 0 and "unreachable" in str(err.value)


@asyncio_module
async def test_token_rules(client, anonymous, state):
    assert (await anonymous.request("GET", "/metrics"))[0] == 200
    assert (await anonymous.request("GET", "/v1/health"))[0] == 200
    status, _ = await anonymous.request("GET", "/v1/backends")
    assert status == 401
    for scheme in ("Bearer", "bearer", "BEARER"):  # the scheme is case-insensitive, the token is not
        status, _ = await anonymous.request("GET", "/v1/stats", headers={"Authorization": f"{scheme} {TOKEN}"})
        assert status == 200, scheme
    status, _ = await anonymous.request("GET", "/v1/stats", headers={"Authorization": f"Bearer {TOKEN.upper()}"})
    assert status == 401 or TOKEN.upper() == TOKEN


# -- metrics -------------------------------------------------------------------------------------

@asyncio_module
async def test_metrics_parse_and_match_the_maps(agent, client, state):
    await client.request("PUT", "/v1/sessions/metricSess1", {"backend": 7})   # a 409 with a ufrag in the path
    await client.request("GET", "/v1/nothing/here")
    families = await scrape_after_next_pass(agent, client)
    expected = {
        "splitrelay_edge_packets": "counter", "splitrelay_edge_bytes": "counter",
        "splitrelay_edge_flows": "gauge", "splitrelay_edge_sessions": "gauge", "splitrelay_edge_backends": "gauge",
        "splitrelay_edge_map_entries": "gauge", "splitrelay_edge_map_capacity_entries": "gauge",
        "splitrelay_edge_xdp_info": "gauge", "splitrelay_edge_datapath_up": "gauge",
        "splitrelay_edge_control_request_duration_seconds": "histogram",
        "splitrelay_edge_flow_ageing_runs": "counter", "splitrelay_edge_flows_aged": "counter",
        "splitrelay_edge_flow_ageing_errors": "counter",
    }
    for name, kind in expected.items():
        assert name in families and families[name].type == kind, name
    assert sample(families, "splitrelay_edge_backends") == 2
    assert sample(families, "splitrelay_edge_sessions") == 1
    assert sample(families, "splitrelay_edge_flows") == 1
    assert sample(families, "splitrelay_edge_map_entries", map="flows") == 1
    assert sample(families, "splitrelay_edge_map_capacity_entries", map="sessions") == 65536
    assert sample(families, "splitrelay_edge_datapath_up") == 1
    assert sample(families, "splitrelay_edge_packets", direction="ingress", verdict="forwarded",
                  reason="stun_ufrag") >= 1
    labelsets = {(s.labels["direction"], s.labels["verdict"], s.labels["reason"])
                 for s in families["splitrelay_edge_packets"].samples}
    assert labelsets == {(spec.direction, spec.verdict, spec.reason) for spec in counter_specs()}
    info = {(s.labels["iface"], s.labels["program"]) for s in families["splitrelay_edge_xdp_info"].samples}
    assert info == {(agent.config.public_iface, "xdp_public"), (agent.config.internal_iface, "xdp_internal")}
    routes = {(s.labels["method"], s.labels["route"], s.labels["code"])
              for s in families["splitrelay_edge_control_request_duration_seconds"].samples}
    assert ("PUT", "/v1/sessions/{ufrag}", "409") in routes and ("PUT", "/v1/backends/{id}", "201") in routes
    assert ("GET", "unmatched", "404") in routes
    assert not any("metricSess1" in r or "nothing" in r for _, r, _ in routes)  # templates, never raw paths


@asyncio_module
async def test_exported_counters_never_go_backwards_when_the_map_restarts(agent, client, state):
    def stun(families):
        return sample(families, "splitrelay_edge_packets", direction="ingress", verdict="forwarded",
                      reason="stun_ufrag")

    before = stun(await scrape(client))
    assert before >= 1
    agent.plane.reset_counters()      # what a recreated (unpinned) stats map looks like
    assert {c["name"]: c["packets"] for c in (await client.stats())["counters"]}["IN_FWD_STUN_UFRAG"] == 0
    assert stun(await scrape(client)) == before
    open_flow(agent, "existing1", client_port=42000)
    assert stun(await scrape(client)) == before + 1


def test_monotonic_counters_keep_an_offset_per_counter():
    from splitrelay.edge.metrics import MonotonicCounters

    totals = MonotonicCounters()
    assert [totals.update("x", raw) for raw in (5, 9, 2, 4, 0, 3)] == [5, 9, 11, 13, 13, 16]
    assert totals.update("y", 7) == 7  # independent per counter
    assert totals.resets == 2


# -- ageing --------------------------------------------------------------------------------------

@asyncio_module
async def test_ageing_removes_idle_flows_only(agent, client, state):
    open_flow(agent, "existing1", client_port=43000)
    backdate_flows(agent, agent.config.idle_timeout_s + 5, client_port=P.CLIENT_PORT)
    backdate_flows(agent, agent.config.idle_timeout_s - 5, client_port=43000)  # idle, but not long enough
    runs_before = sample(await scrape(client), "splitrelay_edge_flow_ageing_runs")
    deadline = time.monotonic() + 5
    while len(await client.flows()) != 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(3 * agent.config.ageing_interval_s)   # more passes: the fresher flow stays
    flows = await client.flows()
    assert [f["client"] for f in flows] == [f"{P.CLIENT_IP4}:43000"]
    assert [s["flows"] for s in await client.sessions()] == [1]      # the session's allowance recounted
    families = await scrape(client)
    assert sample(families, "splitrelay_edge_flows_aged") >= 1
    assert sample(families, "splitrelay_edge_flow_ageing_runs") > runs_before
    assert sample(families, "splitrelay_edge_flow_ageing_errors") == 0


def test_config_refuses_ageing_below_consent_freshness_and_other_mistakes():
    ok = dict(public_iface="srEx0", internal_iface="srEx1", public_ip4="198.51.100.1", gateway_mac=P.GATEWAY_MAC)
    AgentConfig(**ok)
    bad = [
        ({"idle_timeout_s": 10}, "idle timeout must be >= 15"),
        ({"ageing_interval_s": 0}, "ageing interval"),
        ({"ageing_interval_s": 20}, "ageing interval"),
        ({"public_iface": "eth0"}, "refusing to attach XDP to eth0"),
        ({"gateway_mac": None}, "next hop"),
        ({"policy": "loose"}, "policy"),
        ({"relay_port": 0}, "relay port"),
        ({"listen_port": 70000}, "listen port"),
        ({"public_ip4": None}, "public IPv4 or IPv6"),
        ({"public_ip4": "fd00::1"}, "not an IPv4"),
        ({"gateway_ip": "gw"}, "not an IP address"),
    ]
    for change, message in bad:
        with pytest.raises(DataPlaneError, match=message):
            AgentConfig(**{**ok, **change})


# -- lifecycle: restart adoption, failed starts --------------------------------------------------

@pytest.fixture
def spare_links():
    with veth_pair() as pair:
        yield pair


@asyncio_module
async def test_restart_keeps_xdp_and_adopts_the_pinned_maps(spare_links):
    first = EdgeAgent(agent_config(spare_links, detach_on_exit=False))
    await first.start()
    try:
        async with AsyncControlClient(url(first)) as c:   # no token configured: all open
            await c.put_backend(1, BACKENDS[1][0], BACKEND_PORT)
            await c.put_session("survivor1", 1)
            open_flow(first, "survivor1")
    finally:
        await first.stop()
    second = None
    try:
        assert all(xdp_attached(name) for name in spare_links)          # calls keep flowing meanwhile
        assert first.plane.maps.pin_dir.exists()
        async with AsyncControlClient(url(first), timeout=0.5) as c:
            with pytest.raises(ControlError) as err:
                await c.health()
        assert err.value.status == 0
        second = EdgeAgent(dataclasses.replace(first.config, detach_on_exit=True))
        await second.start()
        async with AsyncControlClient(url(second)) as c:
            assert (await c.health())["boot_id"] != first.boot_id
            assert [b["id"] for b in await c.backends()] == [1]
            assert [s["ufrag"] for s in await c.sessions()] == ["survivor1"]
            assert [f["ufrag"] for f in await c.flows()] == ["survivor1"]
    finally:
        if second is not None:
            await second.stop()
        else:
            first.plane.maps.destroy(list(spare_links))
    assert not first.plane.maps.pin_dir.exists() and not any(xdp_attached(n) for n in spare_links)


@asyncio_module
async def test_a_failed_start_leaves_nothing_running(spare_links):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        edge = EdgeAgent(agent_config(spare_links, listen_port=taken.getsockname()[1]))
        with pytest.raises(OSError):
            await edge.start()
    assert not edge.plane.maps.pin_dir.exists() and not any(xdp_attached(n) for n in spare_links)
    # a gateway that does not answer fails before anything is loaded or pinned
    edge = EdgeAgent(agent_config(spare_links, gateway_ip="198.51.100.253", gateway_timeout_s=0.2))
    with pytest.raises(NeighbourError):
        await edge.start()
    assert not edge.plane.maps.pin_dir.exists() and not any(xdp_attached(n) for n in spare_links)
