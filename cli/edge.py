"""`splitrelay edge`: attach, detach, inspect and run the XDP relay on this host."""

from __future__ import annotations

import asyncio
import os

import click
from splitrelay import defaults
from splitrelay.cli.common import emit, stop_on_signals, table
from splitrelay.cli.errors import CliError, require_bcc, require_root


@click.group()
def edge() -> None:
    """Attach, detach, inspect and run the XDP relay on this host."""



_RANGE = "{}-{}"   # FIRST-LAST, as _port_range reads it


def _agent_options(f):
    options = [
        click.argument("public_iface"),
        click.option("--internal", "internal_iface", required=True, help="Interface toward the transceivers."),
        click.option("--port", "relay_port", default=defaults.RELAY_PORT, show_default=True,
                     type=click.IntRange(1, 65535),
                     help="The one public UDP port."),
        click.option("--public-ip", "public_ips", multiple=True, required=True,
                     help="Relay public address (repeat for IPv4 and IPv6)."),
        click.option("--gateway-ip", help="Public next hop (its MAC is read from the neighbour table)."),
        click.option("--gateway-mac", help="Public next hop MAC, instead of --gateway-ip."),
        click.option("--policy", type=click.Choice(defaults.POLICY_NAMES), default=defaults.POLICY.value,
                     show_default=True,
                     help="strict: only registered ufrags open flows; hint: the ufrag's routing hint may."),
        click.option("--mode", type=click.Choice(["auto", "native", "generic"]), default="auto",
                     show_default=True, help="XDP mode; auto falls back to generic with a warning."),
        click.option("--instance", default=defaults.INSTANCE, show_default=True,
                     help="Names the pinned maps: /sys/fs/bpf/splitrelay/<instance>."),
        click.option("--max-session-flows", default=defaults.SESSION_FLOWS, show_default=True,
                     type=click.IntRange(0, 65535),
                     help="Client 5-tuples one session may open (0 = unlimited): caps stolen-ufrag floods."),
        click.option("--hint-key-file", type=click.Path(exists=True, dir_okay=False),
                     help="32 hex digits shared with the transceivers: only hints with a valid SipHash tag "
                          "route (makes --policy hint safe on the open internet)."),
        click.option("--translate", is_flag=True,
                     help="xdp: translate both sides: the transceiver sees the relay's internal address and a "
                          "per-flow port instead of the client, and needs no route back to clients "
                          "(docs/DESIGN.md). The userspace plane always does."),
        click.option("--translate-ports", default=_RANGE.format(*defaults.TRANSLATE_PORTS), show_default=True,
                     metavar="FIRST-LAST", help="--translate: the internal UDP ports flows take (one flow each); "
                                                "keep them clear of this host's own ephemeral ports."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _port_range(text: str, option: str) -> tuple[int, int]:
    first, _, last = text.partition("-")
    if not (first.isdigit() and last.isdigit()):
        raise CliError(f"{option} must be FIRST-LAST, got {first}{'-' if last else ''}{last}", 2)
    return int(first), int(last)


def _agent_config(**kw):
    from ipaddress import ip_address

    from splitrelay.edge.agent import AgentConfig

    ips = kw.pop("public_ips")
    kw["translate_ports"] = _port_range(kw.pop("translate_ports", _RANGE.format(*defaults.TRANSLATE_PORTS)),
                                        "--translate-ports")
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


INTERNAL_IP_OPTION = click.option(
    "--internal-ip", "internal_ips", multiple=True,
    help="--translate (or serve --plane userspace): the relay's address on the internal side that flows come "
         "from (repeat for IPv4 and IPv6); default: the --internal interface's first global address "
         "of each family. Give it when that interface holds several. With --translate, repeat it for "
         "several addresses per family (each must be on --internal; up to 16; the i-th IPv4 pairs "
         "with the i-th IPv6, so give as many of each or none of one): 65,535 flows per address.")


def _internal_addresses(kw: dict, internal_ips: tuple[str, ...], refusal: str) -> None:
    """Sort --internal-ip into kw (first of each family, then the rest); ``refusal`` is the one line for
    XDP without --translate, which forwards with the client's address and so has no use for them."""
    from ipaddress import ip_address

    if internal_ips and kw.get("plane_kind", "xdp") == "xdp" and not kw["translate"]:
        raise CliError(refusal, 2)
    try:
        parsed = [ip_address(ip) for ip in internal_ips]
    except ValueError as exc:
        raise CliError(str(exc), 2) from None
    kw["internal_ip4"] = next((str(a) for a in parsed if a.version == 4), None)
    kw["internal_ip6"] = next((str(a) for a in parsed if a.version == 6), None)
    if kw.get("plane_kind") == "userspace" and len(parsed) > len({a.version for a in parsed}):
        raise CliError("--internal-ip: the userspace relay takes one address per family", 2)
    kw["internal_more"] = tuple(str(a) for a in parsed if str(a) not in (kw["internal_ip4"], kw["internal_ip6"]))


@edge.command("attach")
@_agent_options
@INTERNAL_IP_OPTION
def edge_attach(internal_ips: tuple[str, ...], **kw) -> None:
    """Attach the XDP programs and configure the relay, then exit (they stay attached).

    \b
    Example:
      splitrelay edge attach pub0 --internal int0 --public-ip 203.0.113.1 --gateway-ip 203.0.113.254
    """
    require_root("attaching XDP")
    require_bcc()
    _internal_addresses(kw, internal_ips, "--internal-ip is for --translate (XDP forwards with the client's "
                                          "address)")
    from splitrelay.edge.agent import EdgeAgent

    agent = EdgeAgent(_agent_config(**kw))
    mode = agent.attach()
    click.echo(f"attached ({mode}) to {kw['public_iface']} and {kw['internal_iface']}; "
               f"maps pinned at {agent.plane.maps.pin_dir}")


@edge.command("detach")
@click.argument("ifaces", nargs=-1, required=True)
@click.option("--instance", default=defaults.INSTANCE, show_default=True)
@click.option("--keep-maps", is_flag=True, help="Keep the pinned maps (sessions, flows) for a later attach.")
def edge_detach(ifaces: tuple[str, ...], instance: str, keep_maps: bool) -> None:
    """Remove the XDP programs from IFACES (and the pinned maps unless --keep-maps).

    \b
    Example:
      splitrelay edge detach pub0 int0
    """
    require_root("detaching XDP")
    require_bcc()
    from splitrelay.edge.xdp.maps import XdpMaps
    from splitrelay.edge.xdp.loader import unpin

    XdpMaps(instance=instance).detach(list(ifaces))
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
    from splitrelay.edge.xdp.maps import XdpMaps
    from splitrelay.edge.xdp.loader import pinned_instances

    data = {"attached": _xdp_attachments(), "instances": []}
    for name in pinned_instances():
        maps = XdpMaps(instance=name)
        fill = maps.map_fill()
        cfg = maps.config()
        data["instances"].append({
            "instance": name, "pin_dir": str(maps.pin_dir),
            "relay_port": cfg.relay_port if cfg else None, "policy": cfg.policy if cfg else None,
            "maps": {k: {"entries": v[0], "capacity": v[1]} for k, v in fill.items()},
        })

    def human(d: dict) -> None:
        click.echo("attached XDP programs:")
        table(d["attached"], ["iface", "mode", "prog_id"])
        for inst in d["instances"]:
            maps = ", ".join(f"{k} {v['entries']}/{v['capacity']}" for k, v in inst["maps"].items())
            click.echo(f"instance {inst['instance']} (port {inst['relay_port']}, {inst['policy']}): {maps}")

    emit(data, as_json, human)


PLANE_HELP = (
    "xdp: the relay runs in the kernel's XDP hook (needs root, bcc and `make setup`); packets never enter "
    "the relay's network stack, the transceiver sees each client's own address, and calls survive agent "
    "restarts (maps stay pinned). userspace: an asyncio relay on plain UDP sockets in this process, for hosts "
    "without XDP or bcc and as the benchmark baseline: same routing, counters and control API, but each flow "
    "uses a socket on the internal address (the transceiver sees the relay's internal address:port, which ICE "
    "takes as a peer-reflexive candidate), costs CPU per packet, and its state (and so every call) ends with "
    "the agent (--gateway-ip/--gateway-mac, --mode and --detach-on-exit do not apply).")


@edge.command("serve")
@_agent_options
@click.option("--plane", "--datapath", "plane_kind", type=click.Choice(defaults.PLANE_KINDS),
              default=defaults.PLANE, show_default=True, help=PLANE_HELP + " (--datapath: its former name.)")
@INTERNAL_IP_OPTION
@click.option("--max-flows", type=click.IntRange(1, 1 << 24),
              help="Flow table size. xdp: default 1048576, fixed when the maps are first pinned. userspace: one "
                   "socket per flow, default min(65536, open-file limit - 256).")
@click.option("--listen", default=f"{defaults.CONTROL_HOST}:{defaults.CONTROL_PORT}", show_default=True,
              help="host:port of the control API and /metrics (use the internal address).")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False),
              help="File holding the control API's master (admin) token, >= 32 bytes (or set SPLITRELAY_TOKEN); "
                   "needed unless --listen is loopback. Each transceiver gets only its backend's token "
                   "(`splitrelay edge token`).")
@click.option("--backend-cidr", "backend_cidrs", multiple=True, metavar="CIDR",
              help="Networks backends may be registered in (repeat); default: the --internal interface's own "
                   "networks. A backend elsewhere is refused (403): a transceiver's token cannot aim the relay "
                   "at an arbitrary address.")
@click.option("--backend-ports", default="1-65535", show_default=True, metavar="FIRST-LAST",
              help="Ports a backend's media socket may use.")
@click.option("--session-idle", "session_idle_s", default=600.0, show_default=True,
              help="Seconds a session may go without a flow, once its transceiver stopped refreshing its "
                   "backend, before the agent removes it (its DELETE was lost).")
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
@click.option("--k8s-ca-file", type=click.Path(exists=True, dir_okay=False),
              help="CA that signs the Kubernetes API's certificate (default: in a pod, its service account's; "
                   "else the system's).")
@click.option("--k8s-insecure", is_flag=True,
              help="Do not verify the Kubernetes API's certificate (anyone on the path could then choose "
                   "this relay's backends).")
@click.option("--tcp-port", default=443, show_default=True, type=click.IntRange(0, 65535),
              help="ICE-TCP (RFC 6544/4571) for clients whose network drops UDP: a TCP listener on the public "
                   "interface (IPv4 and IPv6) that carries each connection to its transceiver as UDP, routed "
                   "like the UDP port. 0: off. Transceivers advertise it with --relay ...,tcp:PORT.")
@click.option("--tcp-max-connections", default=20000, show_default=True, type=click.IntRange(1, 1 << 20),
              help="ICE-TCP connections this relay holds at once; more are closed at accept.")
@click.option("--tcp-max-per-source", default=256, show_default=True, type=click.IntRange(1, 1 << 20),
              help="ICE-TCP connections from one client address (a NAT puts many callers behind one).")
def edge_serve(listen: str, token_file: str | None, k8s_token_file: str | None, internal_ips: tuple[str, ...],
               backend_ports: str, **kw) -> None:
    """Run the edge agent: attach (or start the userspace relay), serve the control API and metrics, age flows.

    \b
    Examples:
      splitrelay edge serve pub0 --internal int0 --public-ip 203.0.113.1 \\
          --gateway-ip 203.0.113.254 --listen 10.0.0.1:8470 --token-file /etc/splitrelay/token
      splitrelay edge serve eth1 --internal eth2 --public-ip 203.0.113.1 \\
          --plane userspace --listen 10.0.0.1:8470     # no XDP on this host
    """
    if kw["plane_kind"] == "xdp":
        require_root("the edge agent")
        require_bcc()
    _internal_addresses(kw, internal_ips, "--internal-ip is for --plane userspace or --translate (XDP "
                                          "forwards with the client's address)")
    from splitrelay.edge.agent import EdgeAgent

    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise CliError(f"--listen must be host:port, got {listen!r}")
    from splitrelay.edge.credentials import read_token_file

    token = read_token_file(token_file) if token_file else os.environ.get("SPLITRELAY_TOKEN")
    k8s_token = read_token_file(k8s_token_file, "Kubernetes token file") if k8s_token_file else None
    kw["backend_ports"] = _port_range(backend_ports, "--backend-ports")
    agent = EdgeAgent(_agent_config(listen_host=host.strip("[]"), listen_port=int(port), token=token,
                                    k8s_token=k8s_token, **kw))

    async def run() -> None:
        stop = stop_on_signals()
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


@edge.command("token")
@click.option("--key-file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The agent's master token file (its --token-file).")
@click.option("--backend", "backend_id", type=int, help="The transceiver's backend id.")
@click.option("--count", type=click.IntRange(1), default=1, show_default=True, metavar="K",
              help="The token of K backends, ids ID..ID+K-1: a `transceiver serve --processes K` host's.")
@click.option("--pool", is_flag=True, help="Instead: the token of transceivers run with --backend-id from-ip "
              "(with --count K: those run with --processes K).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def edge_token(key_file: str, backend_id: int | None, count: int, pool: bool, as_json: bool) -> None:
    """Print the control token of one backend: give it to that transceiver only (its --token).

    It opens that backend and its sessions, nothing else: "<id>." followed by the 64 hex digits of
    HMAC-SHA256(master, "splitrelay-backend:<id>"). The agent recomputes it, so nothing is stored;
    a new master token retires every backend token at once (SECURITY.md). With --count K: the one
    token of the K workers of `transceiver serve --processes K --backend-id ID`, "<ID>+<K>." and
    the HMAC of "splitrelay-backend:<ID>+<K>", which opens backends ID..ID+K-1. With --pool: the one
    token of every `--backend-id from-ip` transceiver, which opens only the backend its request's
    source address gives, registered at that address; with --pool --count K, that of hosts running
    `--backend-id from-ip --processes K`, which opens the K ids the address gives.

    \b
    Examples:
      splitrelay edge token --key-file /etc/splitrelay/token --backend 7
      splitrelay edge token --key-file /etc/splitrelay/token --backend 8 --count 4   # ids 8..11
      splitrelay edge token --key-file /etc/splitrelay/token --pool    # a Kubernetes Secret's
      splitrelay edge token --key-file /etc/splitrelay/token --pool --count 4
    """
    from splitrelay.edge.credentials import backend_token, pool_token, read_token_file

    if (backend_id is None) == (not pool):
        raise CliError("give --backend ID or --pool", 2)
    master = read_token_file(key_file)
    data = ({"pool": True, "token": pool_token(master, count)} if pool else
            {"backend": backend_id, "token": backend_token(master, backend_id, count)})
    data.update({"count": count} if count > 1 else {})
    emit(data, as_json, lambda d: click.echo(d["token"]))
