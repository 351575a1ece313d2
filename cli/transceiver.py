"""`splitrelay transceiver`: run the WebRTC endpoint, and read its live sessions."""

from __future__ import annotations

import asyncio
import json
import os

import click
from splitrelay.bpf.consts import MAX_BACKEND_ID
from splitrelay.tokens import DEFAULT_AUDIENCE, TOKEN_ENV
from splitrelay.cli.common import emit, stop_on_signals, table
from splitrelay.cli.errors import EXIT_UNREACHABLE, CliError
from splitrelay.cli.reach import lab_option, refuse_lab_address, resolve
from splitrelay.transceiver.dtls_role import DEFAULT_ROLE, ROLES
from splitrelay.transceiver.opus import DEFAULT_OPUS_MODE, OPUS_MODE_ENV, OPUS_MODES


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
        if not isinstance(addr, IPv4Address) or not int(addr) & MAX_BACKEND_ID:
            raise CliError(f"--backend-id from-ip: {bind_host} gives no usable id (needs IPv4, low 18 bits != 0)")
        return int(addr) & MAX_BACKEND_ID
    if not value.isdigit() or not 1 <= int(value) <= MAX_BACKEND_ID:
        raise CliError(f"--backend-id must be 1..{MAX_BACKEND_ID} or from-ip, got {value!r}", 2)
    return int(value)


@click.group()
def transceiver() -> None:
    """Run the WebRTC endpoint (aiortc) that owns sessions behind a relay."""


def _handler_spec(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from splitrelay.transceiver.handlers import handler_factory

    try:
        handler_factory(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def admission_options(command):  # noqa: ANN001, ANN201 - a click decorator
    """What an anonymous caller may cost (transceiver/limits.py): TransceiverConfig's fields of those names."""
    from splitrelay.transceiver import limits

    options = [
        click.option("--max-sessions", type=click.IntRange(0), default=0, show_default=True,
                     help="Live sessions this transceiver takes; more offers get 503 with Retry-After. 0 = no "
                          "limit: set it to what the handler's CPU allows (bench capacity measures it)."),
        click.option("--max-pending", type=click.IntRange(0), default=limits.MAX_PENDING, show_default=True,
                     help="Sessions answered but not yet connected (what a flood of offers that never connect "
                          "holds, each for --connect-timeout); beyond it offers get 503. 0 = no limit."),
        click.option("--offer-rate", type=click.FloatRange(0), default=limits.OFFER_RATE, show_default=True,
                     metavar="PER_S",
                     help="Offers per second from one source address (an IPv6 /64 counts as one), after "
                          "--offer-burst; beyond it 429 with Retry-After. 0 = no limit (behind a proxy, where "
                          "every offer comes from the proxy's address)."),
        click.option("--offer-burst", type=click.IntRange(1), default=limits.OFFER_BURST, show_default=True,
                     help="Offers a quiet source may send at once."),
        click.option("--connect-timeout", type=click.FloatRange(0.1, 300), default=limits.CONNECT_TIMEOUT,
                     show_default=True, metavar="S",
                     help="An answered session that has not connected (ICE and DTLS) by then ends, and the relays "
                          "forget its ufrag."),
        click.option("--address-timeout", type=click.FloatRange(0.1, 3600), default=limits.ADDRESS_TIMEOUT,
                     show_default=True, metavar="S",
                     help="A client address silent this long is unbound from its session (RFC 7675's 30 s "
                          "consent); it binds again only with an authenticated ICE check."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@transceiver.command("serve")
@click.option("--backend-id", required=True, metavar="ID|from-ip",
              help=f"This transceiver's id at the relay, 1..{MAX_BACKEND_ID} (carried in every session's ufrag); "
                   "'from-ip' takes the low 18 bits of the --bind IPv4 address (for Deployments).")
@click.option("--bind", default="127.0.0.1:5000", show_default=True,
              help="host:port of the one UDP socket serving every session (the backend address).")
@click.option("--relay", "relay_specs", multiple=True, metavar="[NAME=]IP:PORT[,[IP6]:PORT][,tcp:PORT]",
              help="A relay's public address(es), the candidates clients see; repeat for several relays "
                   "(the first is preferred unless --prefer says otherwise). Omit for direct mode. tcp:PORT: "
                   "the relay's ICE-TCP port (edge serve --tcp-port), offered on each address below every "
                   "UDP candidate, for clients whose network drops UDP.")
@click.option("--relay-control", "relay_controls", multiple=True,
              help="Edge agent control URL to register sessions with; one per --relay, in the same order.")
@click.option("--prefer", "prefer", multiple=True, metavar="PREFIX=RELAY",
              help="Clients whose WHIP request comes from PREFIX prefer relay RELAY (longest prefix wins).")
@click.option("--prefer-header", metavar="HEADER",
              help="The preferred relay's name is in this request header, set by the edge in front of WHIP.")
@click.option("--whip-listen", default="127.0.0.1:8080", show_default=True,
              help="host:port of WHIP signaling, /healthz and /readyz (the public listener). Anything but "
                   "loopback needs --whip-key-file or --whip-token (or --insecure-open).")
@click.option("--admin-listen", default="127.0.0.1:8081", show_default=True,
              help="host:port of /sessions and /metrics (the admin listener). Anything but loopback needs "
                   "--admin-token-file (or --insecure-open).")
@click.option("--admin-token-file", type=click.Path(exists=True, dir_okay=False),
              help="The admin listener's bearer token (at least 32 bytes), e.g. for Prometheus.")
@click.option("--whip-key-file", "whip_key_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Key (at least 32 bytes) that signs offer tokens (`splitrelay token mint`); repeat while "
                   "rotating: a token signed by any of them is good.")
@click.option("--whip-audience", default=DEFAULT_AUDIENCE, show_default=True, metavar="POOL",
              help="The audience (aud) an offer token must name: this transceiver pool.")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="A web origin whose pages may call WHIP (repeat; '*' for any). Default: none.")
@click.option("--insecure-open", is_flag=True,
              help="Serve non-loopback listeners without any credential, CORS for any origin (tests, demos).")
@click.option("--handler", default="echo", show_default=True, callback=_handler_spec, metavar="NAME[:k=v,...]",
              help="What answers the caller: echo[:delay=S], tone[:frequency=HZ], voice[:stt=sphinx|whisper,"
                   "tts=espeak|piper,silence_ms=MS,turn=fixed|smart,ask_ms=MS,pause_ms=MS,reask_ms=MS,max_wait_ms=MS,model_nice=N,"
                   "backchannel=on,"
                   "reply=module:function] (splitrelay[voice]; turn=smart asks an end-of-turn model after a short "
                   "pause, docs/VOICE.md), "
                   "pipecat:pipeline=module:function (splitrelay[pipecat]).")
@click.option("--token", envvar="SPLITRELAY_TOKEN",
              help="Edge control API token: this backend's own (`splitrelay edge token --backend ID` on the "
                   "relay), which opens only this backend and its sessions (env SPLITRELAY_TOKEN).")
@click.option("--whip-token", envvar=TOKEN_ENV,
              help="A static bearer token clients send to WHIP (the simple mode; tokens from --whip-key-file "
                   "expire and bound the call).")
@click.option("--backend-ip", help="The IPv4 address relays forward to, when --bind is a wildcard ([::]:PORT "
                                   "serves IPv4 and IPv6 clients on one socket); default: the --bind host.")
@click.option("--ip6", help="The backend address's IPv6 twin, for IPv6 clients.")
@click.option("--drain-timeout", default=0.0, show_default=True, type=click.FloatRange(0, 86400),
              help="On SIGTERM, refuse new offers and let live sessions end for up to this many seconds.")
@click.option("--hint-key-file", type=click.Path(exists=True, dir_okay=False),
              help="The relays' hint key (32 hex digits): ufrags carry a keyed (v2) routing hint.")
@click.option("--ufrag-pool", default=4, show_default=True, type=click.IntRange(0, 256), metavar="N",
              help="Keep N session ufrags registered with the relays ahead of offers, so an answer waits "
                   "for no agent; 0 registers each session before its answer leaves.")
@click.option("--dtls-role", type=click.Choice(ROLES), default=DEFAULT_ROLE, show_default=True,
              help="The answer's a=setup where the offer leaves it to us: passive, the client starts DTLS "
                   "once its own ICE is done; active, we send the ClientHello, and again just after the "
                   "client nominates (transceiver/dtls_role.py).")
@click.option("--processes", type=click.IntRange(0, 1024), default=0, metavar="N",
              help="Serve with N processes, one per core, each its own backend (ids ID..ID+N-1, UDP ports "
                   "PORT..PORT+N-1) behind one WHIP URL; 0 (default): the cores this process may use. "
                   "1 runs one process, no supervisor.")
@click.option("--event-loop", type=click.Choice(["uvloop", "asyncio"]), default="uvloop", show_default=True,
              envvar="SPLITRELAY_EVENT_LOOP",
              help="The event loop every packet of every call runs through: uvloop costs less CPU per call "
                   "(transceiver/loop.py); asyncio is Python's own (env SPLITRELAY_EVENT_LOOP).")
@click.option("--opus-mode", type=click.Choice(list(OPUS_MODES)), default=DEFAULT_OPUS_MODE, show_default=True,
              envvar=OPUS_MODE_ENV,
              help="What the outbound encoder is: voip (SILK+CELT for speech, in-band FEC for a lossy downlink, "
                   "6.5 ms lookahead) or lowdelay (CELT only, no FEC, 2.5 ms lookahead, about a third of the "
                   "encoder's CPU: more calls per core on clean links; transceiver/opus.py; env "
                   "SPLITRELAY_OPUS_MODE).")
@admission_options
def transceiver_serve(backend_id: str, bind: str, relay_specs: tuple[str, ...], relay_controls: tuple[str, ...],
                      prefer: tuple[str, ...], prefer_header: str | None, whip_listen: str,
                      admin_listen: str, admin_token_file: str | None, whip_key_files: tuple[str, ...],
                      whip_audience: str, cors_origins: tuple[str, ...], insecure_open: bool, handler: str,
                      token: str | None, whip_token: str | None,
                      backend_ip: str | None, ip6: str | None, drain_timeout: float,
                      hint_key_file: str | None, ufrag_pool: int, dtls_role: str, processes: int,
                      event_loop: str, opus_mode: str, **limits: float) -> None:
    """Serve WHIP and every session on one UDP port, registering sessions with the relay.

    \b
    Example:
      splitrelay transceiver serve --backend-id 1 --bind 10.0.0.11:5000 \\
          --relay 203.0.113.1:3478 --relay-control http://10.0.0.1:8470 --whip-listen 0.0.0.0:8080 \\
          --whip-key-file /etc/splitrelay/whip.key --whip-audience eu-1 --cors-origin https://app.example
    """
    for relay_control in relay_controls:
        refuse_lab_address(relay_control)
    from splitrelay.transceiver import garbage
    from splitrelay.transceiver.mux import MuxError
    from splitrelay.transceiver.registration import RegistrationError
    from splitrelay import tokens
    from splitrelay.transceiver.listeners import refuse_exposure
    from splitrelay.transceiver.service import Transceiver, TransceiverConfig
    from splitrelay.transceiver.loop import EventLoopError, loop_name
    from splitrelay.transceiver.loop import run as run_on

    os.environ[OPUS_MODE_ENV] = opus_mode   # read where each session's encoder is made (transceiver/opus.py)
    bind_host, bind_port = _hostport(bind, "--bind")
    whip_host, whip_port = _hostport(whip_listen, "--whip-listen")
    admin_host, admin_port = _hostport(admin_listen, "--admin-listen")
    from splitrelay.cli import workers

    processes = processes or workers.default_processes()
    from_ip, backend_id = backend_id == "from-ip", _backend_id(backend_id, backend_ip or bind_host)
    from splitrelay.transceiver import relays as relay_options
    from splitrelay.wire.hint import HintError, load_key

    try:
        hint_key = load_key(hint_key_file) if hint_key_file else None
        relays = relay_options.relays_from_options(relay_specs, relay_controls)
        choosers = relay_options.choosers_from_options(prefer, prefer_header)
    except (HintError, relay_options.RelaySpecError) as exc:
        raise CliError(str(exc)) from None
    config = TransceiverConfig(
        backend_id=backend_id, bind_host=bind_host, bind_port=bind_port, relays=relays, choosers=choosers,
        whip_host=whip_host, whip_port=whip_port, relay_token=token,
        whip_token=whip_token, handler=handler, backend_ip=backend_ip, backend_ip6=ip6, hint_key=hint_key,
        ufrag_pool=ufrag_pool, dtls_role=dtls_role,
        whip_keys=[tokens.load_key(f) for f in whip_key_files], whip_audience=whip_audience,
        cors_origins=cors_origins or (("*",) if insecure_open else ()), admin_host=admin_host,
        admin_port=admin_port,
        admin_token=tokens.load_key(admin_token_file).decode() if admin_token_file else None,
        insecure_open=insecure_open, **limits,
    )
    refuse_exposure(config)
    if processes > 1:  # a supervisor and its workers, each one of these with --processes 1
        workers.serve_workers(click.get_current_context(), processes, from_ip, config, drain_timeout)
        return
    service = Transceiver(config)

    async def run() -> None:
        stop = stop_on_signals()
        try:
            await service.start()
        except (MuxError, RegistrationError) as exc:
            await service.stop()
            raise CliError(str(exc)) from None
        except OSError as exc:
            await service.stop()
            raise CliError(f"cannot listen on {whip_listen} or {admin_listen}: {exc.strerror or exc}") from None
        garbage.freeze()  # what the process is once up stays out of every later collection (garbage.py)
        click.echo(f"transceiver ready: WHIP {service.whip_url} admin {service.admin_url} backend {backend_id} "
                   f"on {bind_host}:{service.mux.local_address[1]} ({loop_name(asyncio.get_running_loop())} loop)",
                   err=True)
        try:
            await stop.wait()
            if drain_timeout:
                click.echo(f"draining: no new offers, {len(service.sessions)} live sessions, "
                           f"up to {drain_timeout:.0f} s", err=True)
                left = await service.drain(drain_timeout)
                click.echo(f"drained ({left} sessions cut at the deadline)", err=True)
        finally:
            await service.stop()

    try:
        run_on(run(), event_loop)
    except EventLoopError as exc:
        raise CliError(str(exc), 2) from None


@transceiver.command("sessions")
@click.argument("admin_url", required=False)
@click.option("--admin-token-file", type=click.Path(exists=True, dir_okay=False),
              help="The admin listener's bearer token (with --lab: the lab's).")
@click.option("--json", "as_json", is_flag=True)
@lab_option("the transceiver (ADMIN_URL, default the lab's first)")
def transceiver_sessions(admin_url: str | None, admin_token_file: str | None, as_json: bool) -> None:
    """Live sessions of a transceiver with aiortc's stats (RTT, jitter, loss, packets), from its admin
    listener (--admin-listen: the WHIP listener lists no calls).

    \b
    Examples:
      splitrelay transceiver sessions http://127.0.0.1:8081 --json
      splitrelay transceiver sessions --lab mylab
    """
    import urllib.error
    import urllib.request

    from splitrelay.lab import reach
    from splitrelay.tokens import load_key

    where = resolve(admin_url, "admin_url", reach.admin)
    if where.url.rstrip("/").endswith("/whip"):
        raise CliError("give the admin listener's URL (--admin-listen), not the WHIP URL: "
                       "the WHIP listener lists no calls", 2)
    url = where.url.rstrip("/") + "/sessions"
    token_file = admin_token_file or where.token_file
    request = urllib.request.Request(url)
    if token_file:
        request.add_header("Authorization", f"Bearer {load_key(token_file).decode()}")

    def fetch() -> bytes:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.read()

    try:
        data = json.loads(where.call(fetch))
    except urllib.error.HTTPError as exc:
        raise CliError(f"transceiver at {url} answered {exc.code}: {exc.read().decode(errors='replace').strip()}",
                       EXIT_UNREACHABLE) from None
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(f"transceiver at {url} is unreachable: {getattr(exc, 'reason', exc)}",
                       EXIT_UNREACHABLE) from None
    rows = [{"id": d["id"], "ufrag": d["ufrag"], "state": (d["connection_states"] or ["new"])[-1],
             "dtls_ms": round(d["dtls_connected_ms"] or 0, 1), "rtt_ms": d["stats"]["rtt_ms"],
             "jitter_ms": d["stats"]["jitter_ms"], "lost": d["stats"]["packets_lost"],
             "rx": d["stats"]["packets_received"], "tx": d["stats"]["packets_sent"]} for d in data]
    emit(data, as_json, lambda _: table(rows, ["id", "ufrag", "state", "dtls_ms", "rtt_ms", "jitter_ms",
                                                 "lost", "rx", "tx"]))
