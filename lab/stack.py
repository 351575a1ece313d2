"""A running lab: the namespaces from lab/topology.py plus the daemons inside them.

`splitrelay lab up`, the demo and the end-to-end tests all start the same
stack this way, each daemon as a real process in its own namespace.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from ipaddress import ip_address
from pathlib import Path

from splitrelay.wire.control_client import ControlClient
from splitrelay.edge.credentials import backend_token
from splitrelay.edge.xdp.loader import unpin
from splitrelay.lab import impair, udp_block
from splitrelay.lab.floating import floated
from splitrelay.lab.impair import Impairment
from splitrelay.lab.host import BACKEND_PORT
from splitrelay.lab.topology import SECRETS, STATE_DIR, Lab
from splitrelay.lab.netns import LabError, in_netns
from splitrelay import defaults, tokens

CONTROL_PORT = defaults.CONTROL_PORT
WHIP_PORT = 8080
ADMIN_PORT = 8081
BROWSER_ORIGIN = "http://localhost"   # the origin client/browser.py serves its call page from
LAB_TOKEN_TTL = 3600.0                # a lab_info token outlives any test's call, and no lab's state
TCP_PORT = 443          # every lab agent's ICE-TCP port (edge serve's default), offered by every transceiver
READY_TIMEOUT = 120.0  # bounds a failure only: a bcc compile took 31 s at load 12; --relays N compiles N at once


def control_url(lab: Lab, relay: int = 1) -> str:
    """Relay ``relay``'s agent: its control API and /metrics, on that relay's internal address."""
    return f"http://{lab.relay(relay).internal.ip4}:{CONTROL_PORT}"


def instance(lab: Lab, relay: int = 1) -> str:
    """The pinned-map instance of relay ``relay``'s agent (relay 1's is the lab's name, as always)."""
    return lab.name if relay == 1 else f"{lab.name}-r{relay}"


def control_key_file(lab: Lab) -> Path:
    """The lab's master control token (made on first use): every agent's --token-file, the admin's token."""
    path = lab.secret_file("control.key")
    if not path.exists():
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32) + "\n")
    return path


def control_token(lab: Lab, backend_id: int | None = None, count: int = 1) -> str:
    """The admin token of the lab's agents, or with ``backend_id`` that transceiver's own (with
    ``count``, the range token of its ``count`` worker processes' backends)."""
    master = control_key_file(lab).read_text().strip()
    return master if backend_id is None else backend_token(master, backend_id, count)


def whip_url(t) -> str:  # noqa: ANN001
    return f"http://{t.signal_ip4}:{WHIP_PORT}/whip"


def admin_url(t) -> str:  # noqa: ANN001
    """Transceiver ``t``'s admin listener (/sessions, /metrics): on its signaling address, not loopback, so
    Prometheus and the CLI reach it from another of the lab's namespaces, behind the lab's admin token."""
    return f"http://{t.signal_ip4}:{ADMIN_PORT}"


def make_secrets(lab: Lab) -> None:
    """The lab's WHIP key and admin token, unless it has them: random, readable by their owner only."""
    for what in SECRETS:
        path = lab.secret_file(what)
        if not path.exists():
            STATE_DIR.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(32) + "\n")


def auth_args(lab: Lab) -> list[str]:
    """`transceiver serve` arguments with the lab's credentials: offer tokens for audience = the lab's
    name, the lab's browser page's origin, the admin listener behind the admin token."""
    make_secrets(lab)
    return ["--whip-key-file", str(lab.secret_file("whip.key")), "--whip-audience", lab.name,
            "--cors-origin", BROWSER_ORIGIN, "--admin-token-file", str(lab.secret_file("admin.token"))]


def admin_get(lab: Lab, url: str, path: str) -> bytes:
    """GET ``path`` of the admin listener at ``url`` (``admin_url(t)``) with the lab's admin token, from
    the client's namespace."""
    import urllib.request

    token = tokens.load_key(lab.secret_file("admin.token")).decode()
    request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}"})

    def get() -> bytes:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 - the lab's own URL
            return resp.read()

    return in_netns(lab.client.netns, get)


def whip_token(lab: Lab, ttl_s: float = LAB_TOKEN_TTL, max_call_s: float | None = LAB_TOKEN_TTL) -> str:
    """A fresh offer token for the lab's transceivers, as an app backend would mint one."""
    return tokens.mint(tokens.load_key(lab.secret_file("whip.key")), lab.name, ttl_s, max_call_s)


def lab_info(lab: Lab) -> dict:
    return {
        "whip_url": whip_url(lab.transceivers[0]),
        "whip_urls": [whip_url(t) for t in lab.transceivers],
        "name": lab.name,
        "client_netns": lab.client.netns,
        "relay_netns": lab.relay_public.netns,
        "relay_public": f"{lab.relay_public.ip4}:{lab.relay_port}",
        "relay_public6": f"[{lab.relay_public.ip6}]:{lab.relay_port}",
        "control_url": control_url(lab),
        "metrics_urls": [control_url(lab) + "/metrics"] + [admin_url(t) + "/metrics" for t in lab.transceivers],
        # what a client needs (None for a lab whose transceivers the lab did not start): a token good for
        # LAB_TOKEN_TTL (mint more with whip_key_file) and the file of the token that opens every admin_url
        "whip_token": whip_token(lab) if lab.secret_file("whip.key").exists() else None,
        "whip_key_file": str(lab.secret_file("whip.key")),
        "whip_audience": lab.name,
        "admin_token_file": str(lab.secret_file("admin.token")),
        "transceivers": [
            {"netns": t.netns, "backend_id": t.backend_id, "backend": f"{t.ip4}:{BACKEND_PORT}",
             "whip_url": whip_url(t), "admin_url": admin_url(t)}
            for t in lab.transceivers
        ],
        "impaired": {link: {"netns": entry["netns"], **impaired_with(lab, link)}
                     for link, entry in lab.impaired.items()},
        "floated": move.to_dict() if (move := floated(lab)) else None,   # an address moved (lab/floating.py)
        "router": lab.router.info() if lab.router else None,     # a routed lab's (lab/router.py)
        "transceivers_network": lab.networks.get("transceivers"),   # [IPv4, IPv6] behind it, or None
        "udp_blocked": udp_block.udp_blocked(lab),   # the client's UDP to the relays is dropped (--block-udp)
        "tcp_port": TCP_PORT,
        "relays": [
            {"index": r.index, "netns": r.netns, "relay_public": f"{r.public.ip4}:{lab.relay_port}",
             "relay_public6": f"[{r.public.ip6}]:{lab.relay_port}", "control_url": control_url(lab, r.index),
             "client_ip": r.client.ip4, "client_ip6": r.client.ip6, "instance": instance(lab, r.index),
             "impaired": r.link in lab.impaired}
            for r in lab.relays
        ],
    }


def impaired_with(lab: Lab, link: str) -> dict:
    """The impairment a link's forwarder runs with (lab/impair.py), {} when it is not known."""
    try:
        return json.loads(impair.config_path(lab, link).read_text())
    except (OSError, ValueError):
        return {}


def wait_ready(proc: subprocess.Popen, log_path: Path, marker: str, what: str,
               timeout: float = READY_TIMEOUT) -> None:
    """Follow a daemon's log until it prints ``marker``; fail with its last words if it dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text() if log_path.exists() else ""
        if marker in text:
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    lines = (log_path.read_text() if log_path.exists() else "").strip().splitlines()
    tail = " | ".join(lines[-3:]) or "no output"
    raise LabError(f"{what} did not become ready (exit {proc.poll()}): {tail}; log: {log_path}")


def log_file(lab: Lab, daemon: str) -> Path:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    return STATE_DIR / f"{lab.name}-{daemon}.log"


def start_agent(lab: Lab, policy: str = defaults.POLICY, extra_args: list[str] | None = None,
                plane: str = "xdp", relay: int = 1) -> subprocess.Popen:
    """The edge agent in relay ``relay``'s namespace, on the XDP data plane or the userspace relay."""
    proc, path = spawn_agent(lab, policy, extra_args, plane, relay)
    wait_ready(proc, path, "edge agent ready", _agent_name(relay))
    return proc


def _agent_name(relay: int) -> str:
    return "edge agent" if relay == 1 else f"edge agent of relay {relay}"


def spawn_agent(lab: Lab, policy: str = defaults.POLICY, extra_args: list[str] | None = None,
                plane: str = "xdp", relay: int = 1) -> tuple[subprocess.Popen, Path]:
    """Start relay ``relay``'s agent without waiting (several compile their XDP programs at once)."""
    r = lab.relay(relay)
    argv = [sys.executable, "-m", "splitrelay.cli.main", "-v", "edge", "serve", r.public.ifname,
            "--internal", r.internal.ifname, "--public-ip", r.public.ip4,
            "--public-ip", r.public.ip6, "--gateway-ip", r.client.ip4,
            "--listen", f"{r.internal.ip4}:{CONTROL_PORT}", "--instance", instance(lab, relay),
            "--policy", policy, "--port", str(lab.relay_port), "--detach-on-exit", "--plane", plane,
            "--token-file", str(control_key_file(lab)),
            # behind a router the transceivers are not on the relay's internal network (the default range)
            *[arg for net in (lab.networks["transceivers"] if lab.router else [])
              for arg in ("--backend-cidr", net)],
            *(extra_args or [])]
    path = log_file(lab, "agent" if relay == 1 else f"agent{relay}")
    with path.open("w") as log:  # the daemon outlives `lab up`: its output goes to a file, not a pipe
        proc = lab.popen(r.netns, argv, stderr=log, stdout=log, stdin=subprocess.DEVNULL)
    return proc, path


def start_transceiver(lab: Lab, t, handler: str = "echo",  # noqa: ANN001
                      extra_args: list[str] | None = None, dual_stack: bool = False,
                      relays: list[int] | None = None, processes: int = 1) -> subprocess.Popen:
    """Transceiver ``t`` with every relay (or only those numbered in ``relays``), in ``processes``
    worker processes (backend ids ``t.backend_id`` + i, UDP ports BACKEND_PORT + i; transceiver/workers.py).

    ``dual_stack``: its socket bound to ``[::]``, so IPv6 clients reach
    it through the relays' IPv6 candidates (bound to its IPv4 address, what a relay forwards to its IPv6 one
    meets no socket; browsers then prefer IPv6, so the lab's IPv4 expectations stay with the default)."""
    bind = ["--bind", f"[::]:{BACKEND_PORT}", "--backend-ip", t.ip4] if dual_stack else [
        "--bind", f"{t.ip4}:{BACKEND_PORT}"]
    argv = [sys.executable, "-m", "splitrelay.cli.main", "-v", "transceiver", "serve",
            "--processes", str(processes), "--backend-id", str(t.backend_id), *bind, "--ip6", t.ip6,
            # every relay, relay 1 (the client's default route) first and so preferred; both of each
            # relay's public addresses: IPv6 clients get a candidate too
            *relay_args(lab, relays), "--token", control_token(lab, t.backend_id, processes),
            "--whip-listen", f"{t.signal_ip4}:{WHIP_PORT}", "--admin-listen", admin_url(t).split("//")[1],
            *auth_args(lab), "--handler", handler, *(extra_args or [])]
    path = log_file(lab, f"t{t.index}")
    with path.open("w") as log:
        proc = lab.popen(t.netns, argv, stderr=log, stdout=log, stdin=subprocess.DEVNULL)
    wait_ready(proc, path, "transceiver ready", f"transceiver {t.index}")
    return proc


def relay_args(lab: Lab, relays: list[int] | None = None) -> list[str]:
    """`transceiver serve` arguments naming every relay of the lab (or those numbered in ``relays``)
    with its agent, in relay order."""
    args = []
    for r in lab.relays if relays is None else [lab.relay(i) for i in relays]:
        args += ["--relay", relay_spec(lab, r, r.link), "--relay-control", control_url(lab, r.index)]
    return args


def relay_spec(lab: Lab, r, name: str | None = None) -> str:  # noqa: ANN001
    """A `transceiver serve --relay` value for relay ``r``: both public addresses and its TCP port."""
    return (f"{name}=" if name else "") + \
        f"{r.public.ip4}:{lab.relay_port},[{r.public.ip6}]:{lab.relay_port},tcp:{TCP_PORT}"


def control(lab: Lab, fn, relay: int = 1):
    """Call relay ``relay``'s agent's control API from inside that relay's namespace."""
    return in_netns(lab.relay(relay).netns,
                    lambda: fn(ControlClient(control_url(lab, relay), control_token(lab))))


def start_lab(transceivers: int = 2, name: str | None = None, policy: str = defaults.POLICY,
              handler: str | list[str] | None = "echo", agent_args: list[str] | None = None,
              hint_key_file: str | None = None, impair: Impairment | None = None, relays: int = 1,
              far: Impairment | None = None, translate: bool = False, routed: bool = False,
              translate_addrs: int = 1, block_udp: bool = False) -> dict:
    """Namespaces, one edge agent per relay and (unless handler is None) one transceiver per host;
    ``impair`` delays/drops UDP on the client's link to relay 1, ``far`` on its link to the last relay;
    ``handler``: one spec for every transceiver, or a list of one spec per transceiver; ``translate``:
    the agents translate both sides and the transceivers have no route to the client (Lab.create);
    ``routed`` (needs ``translate``): the transceivers sit in their own network behind a router;
    ``translate_addrs`` (with ``translate``): internal addresses per family each relay translates with;
    ``block_udp``: the client's network drops UDP to the relays (lab/udp_block.py), so only ICE-TCP works.

    Every transceiver is a backend of every relay: each registers itself and its sessions with every
    relay (one --relay/--relay-control pair per relay, relay 1 preferred), or, with ``handler=None``,
    the lab puts it in every relay's backend table.
    """
    lab = Lab.create(transceivers=transceivers, name=name, impair=impair, relays=relays, far=far,
                     translate=translate, routed=routed)
    try:
        make_secrets(lab)   # also when the caller starts the transceivers: lab_info's token needs the key
        key_args = ["--hint-key-file", hint_key_file] if hint_key_file else []
        agent_args = (agent_args or []) + (["--translate"] if translate else [])
        addr_args = {r.index: add_internal_addresses(lab, r, translate_addrs) if translate else []
                     for r in lab.relays}
        agents = [spawn_agent(lab, policy, (agent_args or []) + key_args + addr_args[r.index], relay=r.index)
                  for r in lab.relays]
        for r, (proc, path) in zip(lab.relays, agents, strict=True):
            wait_ready(proc, path, "edge agent ready", _agent_name(r.index))
        if block_udp:
            udp_block.block_udp(lab)
        own_source = agent_args and any(a in agent_args for a in ("--backends-file", "--k8s-service"))
        for position, t in enumerate([] if own_source else lab.transceivers):  # else the agents' own source
            if handler is not None:
                spec = handler[position % len(handler)] if isinstance(handler, list) else handler
                start_transceiver(lab, t, spec, key_args)
                continue
            for r in lab.relays:
                control(lab, lambda c, t=t: c.put_backend(t.backend_id, t.ip4, BACKEND_PORT, t.ip6), r.index)
    except BaseException:
        stop_lab(lab.name)
        raise
    return lab_info(lab)


def add_internal_addresses(lab: Lab, r, count: int) -> list[str]:  # noqa: ANN001
    """Give relay ``r``'s internal interface ``count`` - 1 more addresses of each family (host numbers
    100 + 10 j above its own, so relays' never meet) and return the agent's ``--internal-ip`` arguments
    for all of them; none for one (the agent's default is the interface's own address)."""
    if count <= 1:
        return []
    ips = [(r.internal.ip4, r.internal.ip6)] + [
        (str(ip_address(r.internal.ip4) + 100 + 10 * j), str(ip_address(r.internal.ip6) + 100 + 10 * j))
        for j in range(count - 1)]
    for ip4, ip6 in ips[1:]:
        lab.run(r.netns, ["ip", "addr", "add", f"{ip4}/32", "dev", r.internal.ifname])
        lab.run(r.netns, ["ip", "addr", "add", f"{ip6}/128", "dev", r.internal.ifname, "nodad"])
    return [arg for pair in ips for ip in pair for arg in ("--internal-ip", ip)]


def stop_lab(name: str) -> None:
    lab = Lab.load(name)
    lab.destroy()
    for r in lab.relays:
        unpin(instance(lab, r.index))
    for path in STATE_DIR.glob(f"{name}-*.log"):
        path.unlink()
    (STATE_DIR / f"{name}-floating.state").unlink(missing_ok=True)   # a floated address (lab/floating.py)


def probe(lab: Lab, whip_urls: list[str], duration: float, sessions: int = 1) -> subprocess.Popen:
    """Start WHIP voice probes (plain aiortc clients) in the lab's client namespace."""
    argv = [sys.executable, "-m", "splitrelay.client.probe", *whip_urls, "--duration", str(duration),
            "--sessions", str(sessions), "--token", whip_token(lab)]
    return lab.popen(lab.client.netns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def probe_result(proc: subprocess.Popen, timeout: float) -> list[dict]:
    out, err = proc.communicate(timeout=timeout)
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        raise LabError(f"probe failed (exit {proc.returncode}): {err.strip().splitlines()[-1:] or out}") from None
