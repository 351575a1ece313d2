"""WHIP signaling authorization, tried as an attacker would against a real transceiver and real aiortc calls.

A stranger who reaches the WHIP port, even one holding a valid offer token, must not end,
restart or list anybody's call; offers need a token the app backend minted (or the static one);
a listener that faces a network without a credential refuses to start.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import subprocess
import sys
import time

import aiohttp
import pytest

from splitrelay import tokens
from splitrelay.transceiver.listeners import ExposureError, refuse_exposure
from splitrelay.transceiver.service import Transceiver, TransceiverConfig
from splitrelay.wire.whip import SESSION_ID

from .test_ice_restart import hears_itself_again
from .test_transceiver import BACKEND_ID, Caller, ended, offer_sdp, until

KEY = b"k" * 16 + secrets.token_bytes(16)
POOL = "pool-a"
ADMIN_TOKEN = "admin-" + "a" * 32
SDPFRAG = {"Content-Type": "application/trickle-ice-sdpfrag", "If-Match": "*"}


def token(**kw) -> str:
    return tokens.mint(KEY, kw.pop("audience", POOL), kw.pop("ttl_s", 60), **kw)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


@pytest.fixture
async def guarded():
    """A transceiver as production runs it: signed offer tokens, an admin token, one allowed origin."""
    service = Transceiver(TransceiverConfig(backend_id=BACKEND_ID, bind_port=0, whip_port=0, whip_keys=[KEY],
                                            whip_audience=POOL, admin_token=ADMIN_TOKEN,
                                            cors_origins=("https://app.example",)))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def connected(service: Transceiver, http: aiohttp.ClientSession, **claims) -> Caller:
    caller = Caller(service.whip_url, 700.0, token=token(**claims))
    await caller.call(http)
    await until(caller.connected, "the caller to connect")
    await until(caller.heard_own, "the caller to hear its echo")
    return caller


# -- session resources are capabilities -----------------------------------------------------------

async def test_a_stranger_with_a_valid_token_cannot_end_or_restart_a_call_and_the_call_goes_on(guarded):
    async with aiohttp.ClientSession() as http:
        caller = await connected(guarded, http)
        base = guarded.whip_url + "/sessions/"
        assert caller.location.startswith(base)
        secret = caller.location.removeprefix(base)
        assert len(base64.urlsafe_b64decode(secret + "==")) == 16 and secret != caller.session_id
        stranger = bearer(token())
        guessed = [caller.session_id, caller.ufrag, secret[:-1] + ("A" if secret[-1] != "A" else "B"),
                   secret.upper() if secret.upper() != secret else secret.lower(),
                   *(secrets.token_urlsafe(16) for _ in range(20))]
        for resource in guessed:
            async with http.delete(base + resource, headers=stranger) as resp:
                assert resp.status == 404, resource      # (a ufrag may hold '/': then no route matches)
            async with http.patch(base + resource, data="a=ice-ufrag:abcd\r\na=ice-pwd:" + "p" * 22 + "\r\n",
                                  headers={**SDPFRAG, **stranger}) as resp:
                assert resp.status == 404, resource
        # the session's public id answers as a resource that never existed: the 404 reveals nothing
        async with http.delete(base + caller.session_id, headers=stranger) as resp:
            assert await resp.text() == "no such session\n"
        assert caller.session_id in guarded.sessions
        await hears_itself_again(caller, "the echo after every stranger's DELETE and PATCH")
        async with http.delete(caller.location) as resp:      # its holder needs nothing but the secret
            assert resp.status == 200
        assert (await ended(guarded, caller.session_id))["end_reason"] == "deleted"
        async with http.delete(caller.location) as resp:      # and it is gone with the session
            assert resp.status == 404
        await caller.hangup()


# -- no call listing on the public listener -------------------------------------------------------

async def test_the_public_listener_lists_no_calls_and_the_admin_listener_wants_its_token(guarded):
    async with aiohttp.ClientSession() as http:
        caller = await connected(guarded, http)
        public = guarded.whip_url.removesuffix("/whip")
        for path in ("/sessions", "/sessions?ended=1", f"/sessions/{caller.session_id}", "/metrics"):
            async with http.get(public + path) as resp:
                assert resp.status == 404, path
        async with http.get(public + "/healthz") as resp:
            assert resp.status == 200
        for path in ("/sessions", "/metrics"):
            for headers in ({}, bearer("wrong"), bearer(token())):
                async with http.get(guarded.admin_url + path, headers=headers) as resp:
                    assert resp.status == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
                    assert await resp.text() == "missing or wrong admin bearer token\n"
        async with http.get(guarded.admin_url + "/sessions", headers=bearer(ADMIN_TOKEN)) as resp:
            assert [s["id"] for s in await resp.json()] == [caller.session_id]
        async with http.get(guarded.admin_url + "/metrics", headers=bearer(ADMIN_TOKEN)) as resp:
            assert "splitrelay_transceiver_sessions 1.0" in await resp.text()
        await caller.hangup(http)


# -- offers need a token the backend minted ---------------------------------------------------------

OTHER_KEY = secrets.token_bytes(32)


def signed_as(alg: str) -> str:
    """A token whose header names ``alg`` but which carries a good HS256 signature by KEY: only the
    header's algorithm is wrong (alg confusion: "none" and the rest are refused, whatever signs them)."""
    signing_input = ".".join(base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()
                             for part in ({"alg": alg, "typ": "JWT"}, {"aud": POOL, "exp": 2**40}))
    signature = hmac.new(KEY, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


@pytest.mark.parametrize("offered,reason", [   # each minted when its test runs: a token's ttl is 60 s
    (lambda: None, "missing bearer token"),
    (lambda: token(now=time.time() - 120), "token expired"),
    (lambda: token(audience="pool-b"), "token is for another audience"),
    (lambda: tokens.mint(OTHER_KEY, POOL, 60), "token signature does not verify"),
    (lambda: token()[:-2] + "xx", "token signature does not verify"),
    (lambda: "not-a-token", "malformed token"),
    (lambda: signed_as("none"), "malformed token"),
    (lambda: signed_as("HS512"), "malformed token"),
    (lambda: "a.b.c", "malformed token"),
], ids=["missing", "expired", "audience", "other-key", "tampered", "garbage", "alg-none", "alg-hs512", "not-json"])
async def test_an_offer_without_a_good_token_is_401_with_its_reason_and_creates_nothing(guarded, offered, reason):
    value = offered()
    headers = bearer(value) if value else {}
    async with aiohttp.ClientSession() as http:
        async with http.post(guarded.whip_url, data=await offer_sdp(),
                             headers={"Content-Type": "application/sdp", **headers}) as resp:
            assert resp.status == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
            assert await resp.text() == reason + "\n"
    assert guarded.sessions == {} and guarded.mux.by_ufrag == {}


async def test_a_call_ends_when_its_tokens_max_call_runs_out_and_is_counted(guarded):
    async with aiohttp.ClientSession() as http:
        caller = await connected(guarded, http, max_call_s=2.0)
        record = await ended(guarded, caller.session_id, timeout=20)
        assert record["end_reason"] == "max call"
        assert guarded.metrics.registry.get_sample_value("splitrelay_transceiver_sessions_max_call_total") == 1
        assert guarded.mux.by_ufrag == {}
        await caller.hangup()


def test_tokens_agree_with_pyjwt_both_ways():
    jwt = pytest.importorskip("jwt")   # an independent HS256 implementation, the oracle only
    ours = tokens.mint(KEY, POOL, 60, max_call_s=600, now=1_700_000_000)
    assert jwt.decode(ours, KEY, algorithms=["HS256"], audience=POOL, options={"verify_exp": False}) == {
        "aud": POOL, "iat": 1_700_000_000, "exp": 1_700_000_060, "max_call_s": 600}
    theirs = jwt.encode({"aud": [POOL, "pool-c"], "exp": 1_700_000_060, "max_call_s": 30}, KEY, algorithm="HS256")
    assert tokens.verify(theirs, [KEY], POOL, now=1_700_000_000) == tokens.Grant(POOL, 1_700_000_060, 30.0)


def test_the_rfc_7515_hs256_example_verifies():
    """RFC 7515 A.1: its signature verifies (so the claims are read: it has no aud, and has expired)."""
    example = ("eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogIm"
               "h0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")
    key = base64.urlsafe_b64decode("AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUu"
                                   "TwjAzZr1Z9CAow==")
    for now, reason in ((1300819379, tokens.WRONG_AUDIENCE), (1300819380, tokens.EXPIRED)):
        with pytest.raises(tokens.TokenError) as exc:
            tokens.verify(example, [key], POOL, now=now)
        assert str(exc.value) == reason
    with pytest.raises(tokens.TokenError, match=f"^{tokens.BAD_SIGNATURE}$"):
        tokens.verify(example, [key[:-1] + b"x"], POOL, now=0)


def test_a_token_signed_by_any_key_in_rotation_verifies():
    minted = tokens.mint(OTHER_KEY, POOL, 60)
    assert tokens.verify(minted, [KEY, OTHER_KEY], POOL).audience == POOL


@pytest.mark.parametrize("content,reason", [
    (b"", "the key file {} is empty"), (b" \n", "the key file {} is empty"),
    (b"short\n", "the key in {} has 5 bytes; it needs at least 32"),
])
def test_an_empty_or_short_key_file_is_an_error_not_auth_off(tmp_path, content, reason):
    path = tmp_path / "whip.key"
    path.write_bytes(content)
    with pytest.raises(tokens.TokenError) as exc:
        tokens.load_key(path)
    assert str(exc.value) == reason.format(path)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitrelay.cli.main", *args], capture_output=True, text=True,
                          timeout=120)


def test_token_mint_prints_a_token_the_transceiver_accepts(tmp_path):
    (tmp_path / "key").write_bytes(KEY + b"\n")
    proc = cli("token", "mint", "--key-file", str(tmp_path / "key"), "--audience", POOL, "--ttl", "60",
               "--max-call", "600", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert tokens.verify(out["token"], [KEY], POOL) == tokens.Grant(POOL, out["expires_at"], 600.0)
    (tmp_path / "empty").write_bytes(b"")
    proc = cli("token", "mint", "--key-file", str(tmp_path / "empty"), "--audience", POOL)
    assert proc.returncode != 0 and proc.stderr.strip().endswith(f"the key file {tmp_path / 'empty'} is empty")


# -- unsafe starts are refused ----------------------------------------------------------------------

def test_a_non_loopback_listener_without_a_credential_refuses_to_start():
    with pytest.raises(ExposureError) as exc:
        refuse_exposure(TransceiverConfig(backend_id=1, whip_host="0.0.0.0", whip_port=8080))
    assert str(exc.value) == ("refusing to serve WHIP on 0.0.0.0:8080 to anyone: give --whip-key-file or "
                              "--whip-token, or --insecure-open")
    with pytest.raises(ExposureError) as exc:
        refuse_exposure(TransceiverConfig(backend_id=1, whip_host="::", whip_keys=[KEY], admin_host="10.0.0.5",
                                          admin_port=8081))
    assert str(exc.value) == ("refusing to serve /sessions and /metrics on 10.0.0.5:8081 to anyone: give "
                              "--admin-token-file, or --insecure-open")
    for fine in (TransceiverConfig(backend_id=1, whip_host="localhost", admin_host="::1"),
                 TransceiverConfig(backend_id=1, whip_host="0.0.0.0", whip_token="t", admin_host="0.0.0.0",
                                   admin_token=ADMIN_TOKEN),
                 TransceiverConfig(backend_id=1, whip_host="0.0.0.0", admin_host="0.0.0.0", insecure_open=True)):
        refuse_exposure(fine)


def test_the_cli_refuses_an_open_whip_listener_in_one_line():
    proc = cli("transceiver", "serve", "--backend-id", "1", "--bind", "127.0.0.1:0", "--whip-listen", "0.0.0.0:0")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "splitrelay: error: refusing to serve WHIP on 0.0.0.0:0 to anyone: give --whip-key-file or --whip-token, "
        "or --insecure-open"]


# -- CORS -----------------------------------------------------------------------------------------

async def test_cors_echoes_only_an_allowed_origin(guarded):
    async with aiohttp.ClientSession() as http:
        async with http.options(guarded.whip_url, headers={"Origin": "https://app.example"}) as resp:
            assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert resp.headers["Vary"] == "Origin"
        async with http.options(guarded.whip_url, headers={"Origin": "https://evil.example"}) as resp:
            assert "Access-Control-Allow-Origin" not in resp.headers
        async with http.post(guarded.whip_url, data=await offer_sdp(), headers={
                "Content-Type": "application/sdp", "Origin": "https://app.example", **bearer(token())}) as resp:
            assert resp.status == 201
            assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert SESSION_ID in resp.headers["Access-Control-Expose-Headers"]
            location = resp.headers["Location"]
        async with http.delete(guarded.whip_url.removesuffix("/whip") + location,
                               headers={"Origin": "https://evil.example"}) as resp:
            assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers
