"""`transceiver serve --processes N` (N > 1): the worker command lines, and the supervisor's run.

Each worker is `transceiver serve --processes 1` with every option the supervisor got, except its own
backend id, UDP port and a loopback WHIP listener; options read from the environment (tokens) stay
there, so no secret lands in a worker's command line (/proc/PID/cmdline is world-readable).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import TYPE_CHECKING

import click
from splitrelay.bpf.consts import MAX_BACKEND_ID
from splitrelay.cli.errors import CliError

if TYPE_CHECKING:
    from splitrelay.transceiver.service import TransceiverConfig

# set for each worker below; the supervisor applies --prefer/--prefer-header and tells the worker (PREFERRED)
PER_WORKER = {"backend_id", "bind", "whip_listen", "admin_listen", "processes", "prefer", "prefer_header"}


def default_processes() -> int:
    """The cores this process may run on (its CPU affinity, not the host's count)."""
    return len(os.sched_getaffinity(0))


def worker_backend_ids(base: int, count: int, from_ip: bool) -> list[int]:
    """Worker i's backend id.  An explicit id takes ``base``..``base + count - 1`` (the operator gives
    each host a block).  ``from-ip`` (``base`` = the address's low 18 bits) packs the worker into the
    low bits, ``(ip << b) | i`` with b bits for ``count`` workers, so hosts whose addresses differ in
    their low 18 - b bits never collide."""
    if not from_ip:
        if base + count - 1 > MAX_BACKEND_ID:
            raise CliError(f"--backend-id {base} with --processes {count} needs ids up to {base + count - 1}, "
                           f"beyond {MAX_BACKEND_ID}", 2)
        return [base + i for i in range(count)]
    from splitrelay.edge.credentials import from_ip_backends

    block = from_ip_backends(base, count)
    if block is None:
        bits = (count - 1).bit_length()
        raise CliError(f"--backend-id from-ip with --processes {count}: "
                       f"the address's low {18 - bits} bits are 0", 2)
    return [block.first + i for i in range(count)]


def refuse_narrow_token(token: str | None, backend_ids: list[int]) -> None:
    """A backend token that does not claim every worker's id would have the agent answer 403 to the
    workers beyond it, one by one: say so at once, with the command that prints the right one."""
    from splitrelay.edge.credentials import claim_of, covers, pool_claim

    pool_count = pool_claim(token) if token else None
    if pool_count is not None and pool_count != len(backend_ids):
        raise CliError(f"the control token is a pool token for {pool_count} worker(s) per host; the "
                       f"{len(backend_ids)} workers need `splitrelay edge token --pool --count "
                       f"{len(backend_ids)}`", 2)
    claim = claim_of(token) if token else None
    if claim is None:
        return   # none, the master, a pool token of the right count: the agent judges
    missing = [b for b in backend_ids if not covers(claim[1], b)]
    if missing:
        raise CliError(f"the control token is backend {claim[1]}'s; the {len(backend_ids)} workers are backends "
                       f"{backend_ids[0]}..{backend_ids[-1]}: give the range token of `splitrelay edge token "
                       f"--backend {backend_ids[0]} --count {len(backend_ids)}`", 2)


def _option_args(ctx: click.Context) -> list[str]:
    """Every option the user set, as argv: not the per-worker ones, not those with an environment variable."""
    args: list[str] = []
    for param in ctx.command.params:
        name = param.name
        if name in PER_WORKER or not isinstance(param, click.Option) or param.envvar:
            continue  # per worker, or travels in the environment (_env)
        source = ctx.get_parameter_source(name)
        if source in (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.ENVIRONMENT):
            continue
        value = ctx.params[name]
        flag = param.opts[0]
        if param.is_flag:
            args += [flag] if value else (param.secondary_opts[:1] if param.secondary_opts else [])
        elif param.multiple:
            for item in value:
                args += [flag, str(item)]
        elif value is not None:
            args += [flag, str(value)]
    return args


def _env(ctx: click.Context) -> dict[str, str]:
    """The workers' environment: ours, plus options given on our command line whose option reads an
    environment variable (a token) moved there."""
    env = dict(os.environ)
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Option) and param.envvar and value is not None:
            if ctx.get_parameter_source(param.name) != click.core.ParameterSource.DEFAULT:
                env[param.envvar if isinstance(param.envvar, str) else param.envvar[0]] = str(value)
    return env


def serve_workers(ctx: click.Context, processes: int, from_ip: bool, config: TransceiverConfig,
                  drain_timeout: float) -> None:
    """Run the supervisor until SIGTERM/SIGINT (transceiver/workers.py); ``config`` is what a single
    transceiver would have served (its listeners, credentials and relays are the supervisor's)."""
    from splitrelay.transceiver import relays as relay_options
    from splitrelay.transceiver.admission import Admission, AdmissionConfig
    from splitrelay.transceiver.workers import PREFERRED, Supervisor, SupervisorError

    p = ctx.params
    choosers, relays = config.choosers, config.all_relays()
    backend_id, bind_host, bind_port = config.backend_id, config.bind_host, config.bind_port
    whip_host, whip_port = config.whip_host, config.whip_port

    def prefer(facts: relay_options.SignalingFacts) -> str | None:
        relay = relay_options.choose(choosers, facts, [r for r in relays if r.candidates])
        return relay.name if relay else None

    if bind_port + processes - 1 > 65535:
        raise CliError(f"--bind port {bind_port} with --processes {processes} needs ports up to "
                       f"{bind_port + processes - 1}, beyond 65535", 2)
    backend_ids = worker_backend_ids(backend_id, processes, from_ip)
    refuse_narrow_token(config.relay_token, backend_ids)
    # the offer rate is per client address, which only the supervisor sees: it limits, the workers do not
    shared = _option_args(ctx) + (["--prefer-header", PREFERRED] if choosers else []) + ["--offer-rate", "0"]
    admission = Admission(AdmissionConfig(0, 0, p["offer_rate"], p["offer_burst"]), None)
    root = ctx.find_root()
    verbose = ["-v"] if root.params.get("verbose") else []
    host = f"[{bind_host}]" if ":" in bind_host else bind_host
    argvs = [[sys.executable, "-m", "splitrelay.cli.main", *verbose, "transceiver", "serve", "--processes", "1",
              "--backend-id", str(backend_id), "--bind", f"{host}:{bind_port + i if bind_port else 0}",
              "--whip-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", *shared]
             for i, backend_id in enumerate(backend_ids)]
    supervisor = Supervisor(argvs, backend_ids, whip_host, whip_port, drain_timeout, env=_env(ctx),
                            echo=lambda line: click.echo(line, err=True), prefer=prefer if choosers else None,
                            admission=admission, admin_host=config.admin_host, admin_port=config.admin_port,
                            admin_token=config.admin_token, cors_origins=tuple(config.cors_origins))

    async def run() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):   # systemd signals the workers too: none is restarted
            asyncio.get_running_loop().add_signal_handler(sig, lambda: (supervisor.begin_stop(), stop.set()))
        try:
            await supervisor.start()
        except SupervisorError as exc:
            await supervisor.stop()
            raise CliError(str(exc)) from None
        except OSError as exc:
            await supervisor.stop()
            raise CliError(f"cannot listen on {whip_host}:{whip_port} or {config.admin_host}:{config.admin_port}: "
                           f"{exc.strerror or exc}") from None
        pids = " ".join(str(w.pid) for w in supervisor.workers)
        click.echo(f"transceiver ready: WHIP {supervisor.whip_url} admin {supervisor.admin_url} "
                   f"backends {backend_ids[0]}..{backend_ids[-1]} "
                   f"in {processes} processes (pids {pids})", err=True)
        try:
            await stop.wait()
        finally:
            await supervisor.stop()

    asyncio.run(run())

