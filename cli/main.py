"""The `splitrelay` command: attach, inspect and run the relay, and build labs.

Every error is one line on stderr and a stable exit code (cli/errors.py);
every read command takes --json for scripts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time

import click
from splitrelay.cli import call as _call
from splitrelay.cli.errors import EXIT_UNREACHABLE, CliError, require_bcc, require_root

DEFAULT_CONTROL = os.environ.get("SPLITRELAY_CONTROL", "http://127.0.0.1:8470")


def _emit(data, as_json: bool, human) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        human(data)


def _table(rows: list[dict], columns: list[str]) -> None:
    if not rows:
        click.echo("(none)")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    click.echo("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for r in rows:
        click.echo("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))


def _library_errors():
    from splitrelay.edge.control_client import ControlError
    from splitrelay.edge.datapath import DatapathError
    from splitrelay.lab.netns import LabError
    from splitrelay.edge.neighbours import NeighbourError

    return (DatapathError, LabError, NeighbourError, ControlError)


class Main(click.Group):
    """Turns typed library errors into one line and an exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except _library_errors() as exc:
            code = EXIT_UNREACHABLE if getattr(exc, "status", None) == 0 else 1
            path = getattr(exc, "log_path", None)
            raise CliError(str(exc) + (f" (verifier log: {path})" if path and str(path) not in str(exc) else ""),
                           code) from None


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log what the daemons do.")
def main(verbose: bool) -> None:
    """splitrelay: an XDP edge relay for real-time voice AI over WebRTC.

    \b
    Quick start (root):
      splitrelay lab up --json          # a relay lab on this machine
      splitrelay stats --control URL    # counters from its edge agent
      splitrelay lab down
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


# -- edge ------------------------------------------------------------------------------

@main.group()
def edge() -> None:
    """Attach, detach, inspect and run the XDP relay on this host."""


def _stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM: a daemon's cue to shut down cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _agent_options(f):
    options = [
        click.argument("public_iface"),
        click.option("--internal", "internal_iface", required=True, help="Interface toward the transceivers."),
        click.option("--port", "relay_port", default=3478, show_default=True, type=click.IntRange(1, 65535),
                     help="The one public UDP port."),
        click.option("--public-ip", "public_ips", multiple=True, required=True,
                     help="Relay public address (repeat for IPv4 and IPv6)."),
        click.option("--gateway-ip", help="Public next hop (its MAC is read from the neighbour table)."),
        click.option("--gateway-mac", help="Public next hop MAC, instead of --gateway-ip."),
        click.option("--policy", type=click.Choice(["strict", "hint"]), default="strict", show_default=True,
                     help="strict: only registered ufrags open flows; hint: the ufrag's routing hint may."),
        click.option("--mode", type=click.Choice(["auto", "native", "generic"]), default="auto",
                     show_default=True, help="XDP mode; auto falls back to generic with a warning."),
        click.option("--instance", default="default", show_default=True,
                     help="Names the pinned maps: /sys/fs/bpf/splitrelay/<instance>."),
        click.option("--max-session-flows", default=4, show_default=True, type=click.IntRange(0, 65535),
                     help="Client 5-tuples one session may open (0 = unlimited): caps stolen-ufrag floods."),
        click.option("--hint-key-file", type=click.Path(exists=True, dir_okay=False),
                     help="32 hex digits shared with the transceivers: only hints with a valid SipHash tag "
                          "route (makes --policy hint safe on the open internet)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _agent_config(**kw):
    from ipaddress import ip_address

    from splitrelay.edge.agent import AgentConfig

    ips = kw.pop("public_ips")
    key_file = kw.pop("hint_key_file", None)
    if key_file:
        from splitrelay.wire.hint import HintError, load_key

        try:
            kw["hint_key"] = load_key(key_file)
        except HintError as exc:
            raise CliError(str(exc)) from None
    try:
        parsed = [ip_address(ip) for ip in ips]
    except ValueError as exc:
        raise CliError(str(exc)) from None
    kw["public_ip4"] = next((str(a) for a in parsed if a.version == 4), None)
    kw["public_ip6"] = next((str(a) for a in parsed if a.version == 6), None)
    return AgentConfig(**kw)


@edge.command("attach")
@_agent_options
def edge_attach(**kw) -> None:
    """Attach the XDP programs and configure the relay, then exit (they stay attached).

    \b
    Example:
      splitrelay edge attach pub0 --internal int0 --public-ip 203.0.113.1 --gateway-ip 203.0.113.254
    """
    require_root("attaching XDP")
    require_bcc()
    from splitrelay.edge.agent import EdgeAgent

    agent = EdgeAgent(_agent_config(**kw))
    mode = agent.attach()
    click.echo(f"attached ({mode}) to {kw['public_iface']} and {kw['internal_iface']}; "
               f"maps pinned at {agent.datapath.pin_dir}")


@edge.command("detach")
@click.argument("ifaces", nargs=-1, required=True)
@click.option("--instance", default="default", show_default=True)
@click.option("--keep-maps", is_flag=True, help="Keep the pinned maps (sessions, flows) for a later attach.")
def edge_detach(ifaces: tuple[str, ...], instance: str, keep_maps: bool) -> None:
    """Remove the XDP programs from IFACES (and the pinned maps unless --keep-maps).

    \b
    Example:
      splitrelay edge detach pub0 int0
    """
    require_root("detaching XDP")
    require_bcc()
    from splitrelay.edge.datapath import Datapath, unpin

    Datapath(instance=instance).detach(list(ifaces))
    removed = False if keep_maps else unpin(instance)
    click.echo(f"detached from {', '.join(ifaces)}" + ("; pinned maps removed" if removed else ""))


def _xdp_attachments() -> list[dict]:
    from pyroute2 import IPRoute

    out = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            xdp = link.get_attr("IFLA_XDP")
            if not xdp:
                continue
            attached = xdp.get_attr("IFLA_XDP_ATTACHED")
            if attached:
                modes = {1: "native", 2: "generic", 3: "offload", 4: "multi"}
                out.append({"iface": link.get_attr("IFLA_IFNAME"), "mode": modes.get(attached, str(attached)),
                            "prog_id": xdp.get_attr("IFLA_XDP_PROG_ID")})
    return out


@edge.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def edge_status(as_json: bool) -> None:
    """XDP programs attached in this network namespace and pinned relay instances with their map fill."""
    require_root("reading BPF maps")
    from splitrelay.edge.datapath import Datapath, pinned_instances

    data = {"attached": _xdp_attachments(), "instances": []}
    for name in pinned_instances():
        dp = Datapath(instance=name)
        fill = dp.map_fill()
        cfg = dp.config()
        data["instances"].append({
            "instance": name, "pin_dir": str(dp.pin_dir),
            "relay_port": cfg.relay_port if cfg else None, "policy": cfg.policy if cfg else None,
            "maps": {k: {"entries": v[0], "capacity": v[1]} for k, v in fill.items()},
        })

    def human(d: dict) -> None:
        click.echo("attached XDP programs:")
        _table(d["attached"], ["iface", "mode", "prog_id"])
        for inst in d["instances"]:
            maps = ", ".join(f"{k} {v['entries']}/{v['capacity']}" for k, v in inst["maps"].items())
            click.echo(f"instance {inst['instance']} (port {inst['relay_port']}, {inst['policy']}): {maps}")

    _emit(data, as_json, human)


DATAPATH_HELP = (
    "xdp: the relay runs in the kernel's XDP hook (needs root, bcc and `make setup`); packets never enter "
    "the relay's network stack, the transceiver sees each client's own address, and calls survive agent "
    "restarts (maps stay pinned). userspace: an asyncio relay on plain UDP sockets in this process, for hosts "
    "without XDP or bcc and as the benchmark baseline: same routing, counters and control API, but each flow "
    "uses a socket on the internal address (the transceiver sees the relay's internal address:port, which ICE "
    "takes as a peer-reflexive candidate), costs CPU per packet, and its state (and so every call) ends with "
    "the agent (--gateway-ip/--gateway-mac, --mode and --detach-on-exit do not apply).")


@edge.command("serve")
@_agent_options
@click.option("--datapath", type=click.Choice(["xdp", "userspace"]), default="xdp", show_default=True,
              help=DATAPATH_HELP)
@click.option("--internal-ip", "internal_ips", multiple=True,
              help="userspace: the relay's address on the internal side that flow sockets bind to (repeat for "
                   "IPv4 and IPv6); default: the --internal interface's first global address of each family. "
                   "Give it when that interface holds several.")
@click.option("--max-flows", type=click.IntRange(1, 1 << 24),
              help="Flow table size. xdp: default 1048576, fixed when the maps are first pinned. userspace: one "
                   "socket per flow, default min(65536, open-file limit - 256).")
@click.option("--listen", default="127.0.0.1:8470", show_default=True,
              help="host:port of the control API and /metrics (use the internal address).")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False),
              help="File holding the control API bearer token (or set SPLITRELAY_TOKEN).")
@click.option("--idle-timeout", "idle_timeout_s", default=30.0, show_default=True,
              help="Seconds before an idle flow is aged out (>= 15).")
@click.option("--detach-on-exit", is_flag=True,
              help="Remove programs and maps on exit (default: keep them so calls survive a restart).")
@click.option("--backends-file", type=click.Path(dir_okay=False),
              help='Follow a JSON backend table ([{"id":1,"ip":"10.0.0.11","port":5000}]), reloaded on change.')
@click.option("--k8s-service", metavar="NAMESPACE/NAME",
              help="Follow the endpoints of the transceivers' Kubernetes Service (port named 'media').")
@click.option("--k8s-api", help="Kubernetes API URL when not running in a pod.")
@click.option("--k8s-token-file", type=click.Path(exists=True, dir_okay=False),
              help="Bearer token for --k8s-api.")
def edge_serve(listen: str, token_file: str | None, k8s_token_file: str | None, internal_ips: tuple[str, ...],
               **kw) -> None:
    """Run the edge agent: attach (or start the userspace relay), serve the control API and metrics, age flows.

    \b
    Examples:
      splitrelay edge serve pub0 --internal int0 --public-ip 203.0.113.1 \\
          --gateway-ip 203.0.113.254 --listen 10.0.0.1:8470 --token-file /etc/splitrelay/token
      splitrelay edge serve eth1 --internal eth2 --public-ip 203.0.113.1 \\
          --datapath userspace --listen 10.0.0.1:8470     # no XDP on this host
    """
    from ipaddress import ip_address

    if kw["datapath"] == "xdp":
        require_root("the edge agent")
        require_bcc()
        if internal_ips:
            raise CliError("--internal-ip is for --datapath userspace (XDP forwards with the client's address)", 2)
    from splitrelay.edge.agent import EdgeAgent

    try:
        parsed = [ip_address(ip) for ip in internal_ips]
    except ValueError as exc:
        raise CliError(str(exc), 2) from None
    kw["internal_ip4"] = next((str(a) for a in parsed if a.version == 4), None)
    kw["internal_ip6"] = next((str(a) for a in parsed if a.version == 6), None)

    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise CliError(f"--listen must be host:port, got {listen!r}")
    token = open(token_file).read().strip() if token_file else os.environ.get("SPLITRELAY_TOKEN")
    k8s_token = open(k8s_token_file).read().strip() if k8s_token_file else None
    agent = EdgeAgent(_agent_config(listen_host=host.strip("[]"), listen_port=int(port), token=token,
                                    k8s_token=k8s_token, **kw))

    async def run() -> None:
        stop = _stop_on_signals()
        try:
            await agent.start()
        except OSError as exc:
            raise CliError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
        click.echo(f"edge agent ready: control http://{listen} boot_id {agent.boot_id}", err=True)
        try:
            await stop.wait()
        finally:
            await agent.stop()

    asyncio.run(run())


# -- control API readers ------------------------------------------------------------------

def _control_options(f):
    f = click.option("--token", envvar="SPLITRELAY_TOKEN", help="Bearer token (env SPLITRELAY_TOKEN).")(f)
    return click.option("--control", default=DEFAULT_CONTROL, show_default=True, envvar="SPLITRELAY_CONTROL",
                        help="Edge agent control URL (env SPLITRELAY_CONTROL).")(f)


def _client(control: str, token: str | None):
    from splitrelay.edge.control_client import ControlClient

    return ControlClient(control, token)


@main.group()
def backends() -> None:
    """Register, remove and list transceivers (backends) on an edge agent."""


@backends.command("add")
@click.argument("backend_id", type=click.IntRange(1, 262143))
@click.argument("address")
@_control_options
@click.option("--ip6", help="The backend's IPv6 address, for IPv6 clients.")
def backends_add(backend_id: int, address: str, control: str, token: str | None, ip6: str | None) -> None:
    """Register BACKEND_ID at ADDRESS (ip:port of its UDP mux).

    \b
    Example:
      splitrelay backends add 1 10.0.0.11:5000 --control http://10.0.0.1:8470
    """
    ip, _, port = address.rpartition(":")
    if not ip or not port.isdigit():
        raise CliError(f"ADDRESS must be ip:port, got {address!r}")
    b = _client(control, token).put_backend(backend_id, ip or None, int(port), ip6)
    click.echo(f"backend {b['id']} -> {b['ip']}:{b['port']} via {b['mac']}")


@backends.command("rm")
@click.argument("backend_id", type=click.IntRange(1, 262143))
@_control_options
def backends_rm(backend_id: int, control: str, token: str | None) -> None:
    """Remove a backend with its sessions and flows."""
    _client(control, token).delete_backend(backend_id)
    click.echo(f"backend {backend_id} removed")


@backends.command("list")
@_control_options
@click.option("--json", "as_json", is_flag=True)
def backends_list(control: str, token: str | None, as_json: bool) -> None:
    """Registered backends."""
    _emit(_client(control, token).backends(), as_json, lambda d: _table(d, ["id", "ip", "ip6", "port", "mac"]))


@main.group()
def sessions() -> None:
    """Sessions (server ufrag -> backend) on an edge agent."""


@sessions.command("list")
@_control_options
@click.option("--json", "as_json", is_flag=True)
def sessions_list(control: str, token: str | None, as_json: bool) -> None:
    """Registered sessions with their age and flow count."""
    _emit(_client(control, token).sessions(), as_json,
          lambda d: _table(d, ["ufrag", "backend", "age_s", "flows"]))


@main.group()
def flows() -> None:
    """Client flows the XDP program learned."""


@flows.command("list")
@_control_options
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--json", "as_json", is_flag=True)
def flows_list(control: str, token: str | None, limit: int, as_json: bool) -> None:
    """Flows: client 5-tuple -> backend, age, idle time, packets and bytes each way."""
    _emit(_client(control, token).flows(limit), as_json, lambda d: _table(
        d, ["client", "backend", "ufrag", "age_s", "idle_s", "packets", "bytes", "rx_packets", "rx_bytes"]))


@main.command()
@_control_options
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", type=float, default=None, metavar="SECONDS",
              help="Print rates every SECONDS until interrupted.")
def stats(control: str, token: str | None, as_json: bool, watch: float | None) -> None:
    """Data-plane counters by direction, verdict and reason (rates with --watch).

    \b
    Example:
      splitrelay stats --watch 1
    """
    client = _client(control, token)
    previous = None
    while True:
        counters = [c for c in client.stats()["counters"]]
        now = time.monotonic()
        if watch is None:
            _emit({"counters": counters}, as_json, lambda d: _table(
                [c for c in d["counters"] if c["packets"]] or d["counters"][:0],
                ["direction", "verdict", "reason", "packets", "bytes"]))
            return
        if previous:
            dt = now - previous[0]
            rates = [{**c, "pps": round((c["packets"] - p["packets"]) / dt, 1)}
                     for c, p in zip(counters, previous[1], strict=True) if c["packets"]]
            _emit({"interval_s": round(dt, 3), "counters": rates}, as_json, lambda d: (
                click.echo(time.strftime("%H:%M:%S")), _table(d["counters"], ["direction", "verdict", "reason",
                                                                               "pps", "packets"])))
        previous = (now, counters)
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return


# -- transceiver ----------------------------------------------------------------------

def _hostport(value: str, what: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise CliError(f"{what} must be host:port, got {value!r}")
    return host.strip("[]"), int(port)


def _backend_id(value: str, bind_host: str) -> int:
    from ipaddress import IPv4Address, ip_address

    if value == "from-ip":
        try:
            addr = ip_address(bind_host)
        except ValueError:
            raise CliError(f"--backend-id from-ip needs an IPv4 --bind address, got {bind_host!r}") from None
        if not isinstance(addr, IPv4Address) or not int(addr) & 0x3FFFF:
            raise CliError(f"--backend-id from-ip: {bind_host} gives no usable id (needs IPv4, low 18 bits != 0)")
        return int(addr) & 0x3FFFF
    if not value.isdigit() or not 1 <= int(value) <= 262143:
        raise CliError(f"--backend-id must be 1..262143 or from-ip, got {value!r}", 2)
    return int(value)


@main.group()
def transceiver() -> None:
    """Run the WebRTC endpoint (aiortc) that owns sessions behind a relay."""


def _handler_spec(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from splitrelay.transceiver.handlers import handler_factory

    try:
        handler_factory(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


@transceiver.command("serve")
@click.option("--backend-id", required=True, metavar="ID|from-ip",
              help="This transceiver's id at the relay, 1..262143 (carried in every session's ufrag); "
                   "'from-ip' takes the low 18 bits of the --bind IPv4 address (for Deployments).")
@click.option("--bind", default="127.0.0.1:5000", show_default=True,
              help="host:port of the one UDP socket serving every session (the backend address).")
@click.option("--relay", "relay_public", help="The relay's public ip:port, the only candidate clients see. "
              "Omit for direct mode (the bind address is advertised).")
@click.option("--relay-control", help="Edge agent control URL to register sessions with.")
@click.option("--whip-listen", default="127.0.0.1:8080", show_default=True, help="host:port of WHIP signaling.")
@click.option("--handler", default="echo", show_default=True, callback=_handler_spec, metavar="NAME[:k=v,...]",
              help="What answers the caller: echo[:delay=S], tone[:frequency=HZ], voice[:stt=sphinx|whisper,"
                   "tts=espeak|piper,silence_ms=MS,reply=module:function] (splitrelay[voice]), "
                   "pipecat:pipeline=module:function (splitrelay[pipecat]).")
@click.option("--token", envvar="SPLITRELAY_TOKEN", help="Bearer token of the edge control API.")
@click.option("--whip-token", envvar="SPLITRELAY_WHIP_TOKEN", help="Bearer token clients must send to WHIP.")
@click.option("--ip6", help="The backend address's IPv6 twin, for IPv6 clients.")
@click.option("--drain-timeout", default=0.0, show_default=True, type=click.FloatRange(0, 86400),
              help="On SIGTERM, refuse new offers and let live sessions end for up to this many seconds.")
@click.option("--hint-key-file", type=click.Path(exists=True, dir_okay=False),
              help="The relays' hint key (32 hex digits): ufrags carry a keyed (v2) routing hint.")
def transceiver_serve(backend_id: str, bind: str, relay_public: str | None, relay_control: str | None,
                      whip_listen: str, handler: str, token: str | None, whip_token: str | None,
                      ip6: str | None, drain_timeout: float, hint_key_file: str | None) -> None:
    """Serve WHIP and every session on one UDP port, registering sessions with the relay.

    \b
    Example:
      splitrelay transceiver serve --backend-id 1 --bind 10.0.0.11:5000 \\
          --relay 203.0.113.1:3478 --relay-control http://10.0.0.1:8470 --whip-listen 0.0.0.0:8080
    """
    from splitrelay.transceiver.mux import MuxError
    from splitrelay.transceiver.registration import RegistrationError
    from splitrelay.transceiver.service import Transceiver, TransceiverConfig

    bind_host, bind_port = _hostport(bind, "--bind")
    whip_host, whip_port = _hostport(whip_listen, "--whip-listen")
    backend_id = _backend_id(backend_id, bind_host)
    from splitrelay.wire.hint import HintError, load_key

    try:
        hint_key = load_key(hint_key_file) if hint_key_file else None
    except HintError as exc:
        raise CliError(str(exc)) from None
    config = TransceiverConfig(
        backend_id=backend_id, bind_host=bind_host, bind_port=bind_port,
        public_address=_hostport(relay_public, "--relay") if relay_public else None,
        whip_host=whip_host, whip_port=whip_port, relay_control=relay_control, relay_token=token,
        whip_token=whip_token, handler=handler, backend_ip6=ip6, hint_key=hint_key,
    )
    service = Transceiver(config)

    async def run() -> None:
        stop = _stop_on_signals()
        try:
            await service.start()
        except (MuxError, RegistrationError) as exc:
            await service.stop()
            raise CliError(str(exc)) from None
        except OSError as exc:
            await service.stop()
            raise CliError(f"cannot listen on {whip_listen}: {exc.strerror or exc}") from None
        click.echo(f"transceiver ready: WHIP {service.whip_url} backend {backend_id} "
                   f"on {bind_host}:{service.mux.local_address[1]}", err=True)
        try:
            await stop.wait()
            if drain_timeout:
                click.echo(f"draining: no new offers, {len(service.sessions)} live sessions, "
                           f"up to {drain_timeout:.0f} s", err=True)
                left = await service.drain(drain_timeout)
                click.echo(f"drained ({left} sessions cut at the deadline)", err=True)
        finally:
            await service.stop()

    asyncio.run(run())


@transceiver.command("sessions")
@click.argument("whip_url")
@click.option("--json", "as_json", is_flag=True)
def transceiver_sessions(whip_url: str, as_json: bool) -> None:
    """Live sessions of a transceiver with aiortc's stats (RTT, jitter, loss, packets).

    \b
    Example:
      splitrelay transceiver sessions http://10.0.0.11:8080/whip --json
    """
    import urllib.error
    import urllib.request

    url = whip_url.rstrip("/").removesuffix("/whip") + "/sessions"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            data = json.loads(resp.read())
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(f"transceiver at {url} is unreachable: {getattr(exc, 'reason', exc)}",
                       EXIT_UNREACHABLE) from None
    rows = [{"id": d["id"], "ufrag": d["ufrag"], "state": (d["connection_states"] or ["new"])[-1],
             "dtls_ms": round(d["dtls_connected_ms"] or 0, 1), "rtt_ms": d["stats"]["rtt_ms"],
             "jitter_ms": d["stats"]["jitter_ms"], "lost": d["stats"]["packets_lost"],
             "rx": d["stats"]["packets_received"], "tx": d["stats"]["packets_sent"]} for d in data]
    _emit(data, as_json, lambda _: _table(rows, ["id", "ufrag", "state", "dtls_ms", "rtt_ms", "jitter_ms",
                                                 "lost", "rx", "tx"]))


# -- lab ---------------------------------------------------------------------------

@main.group()
def lab() -> None:
    """A relay lab on this machine: client, relay and transceiver hosts in network namespaces."""


@lab.command("up")
@click.option("--transceivers", default=2, show_default=True, type=click.IntRange(1, 50))
@click.option("--name", help="Lab name (default: a fresh random one).")
@click.option("--policy", type=click.Choice(["strict", "hint"]), default="strict", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def lab_up(transceivers: int, name: str | None, policy: str, as_json: bool) -> None:
    """Build the namespaces, attach XDP in the relay and start its edge agent.

    \b
    Example:
      splitrelay lab up --transceivers 2 --json
      ip netns exec <client_netns> your-webrtc-client ...
    """
    require_root("a lab")
    require_bcc()
    from splitrelay.lab.stack import start_lab

    info = start_lab(transceivers=transceivers, name=name, policy=policy)
    _emit(info, as_json, lambda d: click.echo(
        f"lab {d['name']} up: relay {d['relay_public']} (client netns {d['client_netns']}), "
        f"control {d['control_url']}\ntear down with: splitrelay lab down --name {d['name']}"))


@lab.command("down")
@click.option("--name", help="Lab to remove (default: the one lab that is up).")
@click.option("--all", "all_labs", is_flag=True,
              help="Remove every lab that is up on this host (a test run's and other checkouts' too).")
def lab_down(name: str | None, all_labs: bool) -> None:
    """Stop the lab's processes and delete its namespaces, veths and pinned maps.

    \b
    With several labs up, name the one to remove (`splitrelay lab status` lists
    them) or say --all: a bare `lab down` never removes a lab it was not sure of.
    """
    require_root("a lab")
    from splitrelay.cli.errors import EXIT_USAGE
    from splitrelay.lab.stack import stop_lab
    from splitrelay.lab.topology import Lab

    if name and all_labs:
        raise CliError("give --name or --all, not both", EXIT_USAGE)
    up = Lab.names()
    if name:
        names = [name]
    elif len(up) > 1 and not all_labs:
        raise CliError(f"{len(up)} labs are up ({', '.join(up)}): say which with --name, or --all", EXIT_USAGE)
    else:
        names = up
    if not names:
        click.echo("no lab is up")
    for n in names:
        stop_lab(n)
        click.echo(f"lab {n} removed")


@lab.command("status")
@click.option("--json", "as_json", is_flag=True)
def lab_status(as_json: bool) -> None:
    """Labs that are up, with their addresses."""
    from splitrelay.lab.stack import lab_info
    from splitrelay.lab.topology import Lab

    data = [lab_info(Lab.load(n)) for n in Lab.names()]
    _emit(data, as_json, lambda d: _table(d, ["name", "relay_public", "client_netns", "control_url"]))


@main.command()
@click.option("--seconds", default=10.0, show_default=True, type=click.FloatRange(2, 300),
              help="How long the client talks.")
@click.option("--json", "as_json", is_flag=True, help="Print only the summary as JSON.")
def demo(seconds: float, as_json: bool) -> None:
    """Lab up, one real WebRTC voice session through XDP with a live status line, summary, teardown.

    \b
    Example:
      sudo splitrelay demo --seconds 5
    """
    require_root("the demo")
    require_bcc()
    from splitrelay.cli.demo import run_demo

    def status(line: str) -> None:
        if not as_json:
            click.echo("\r" + line.ljust(90), nl=False, err=True)

    if not as_json:
        click.echo("building lab: client, relay (XDP, ip_forward=0), 2 transceivers (aiortc, echo) ...", err=True)
    report = run_demo(seconds, status)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo("", err=True)
        click.echo(f"session via relay {report.relay_public} (WHIP {report.whip_url}):")
        click.echo(f"  answer {report.offer_to_answer_ms:.1f} ms, ICE connected {report.ice_connected_ms:.1f} ms, "
                   f"DTLS connected {report.dtls_connected_ms:.1f} ms after the offer"
                   if report.dtls_connected_ms else "  the session did not connect")
        if report.audio_rtt_ms is not None:
            click.echo(f"  audio round trip (mouth to ear, echo) {report.audio_rtt_ms:.0f} ms; "
                       f"data channel {report.datachannel_rtt_ms:.2f} ms; "
                       f"beeps heard {report.beeps_heard}/{report.beeps_sent}")
        click.echo(f"  XDP: {report.xdp_forwarded} packets forwarded, {report.xdp_dropped} dropped")
        click.echo("  " + ", ".join(f"{k} {v}" for k, v in report.counters.items()))
    if not report.ok:
        raise CliError(f"the demo session failed: {report.error}")


def _add_bench() -> None:
    from splitrelay.cli.bench import bench

    main.add_command(bench)


_add_bench()
_call.register(main)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
