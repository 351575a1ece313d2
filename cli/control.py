"""Readers and writers of an edge agent's control API: backends, sessions, flows, stats."""

from __future__ import annotations

import os
import time

import click
from splitrelay import defaults
from splitrelay.bpf.consts import MAX_BACKEND_ID
from splitrelay.cli.common import emit, table
from splitrelay.cli.errors import CliError
from splitrelay.cli.reach import InNamespace, lab_option, lab_relay, resolve

DEFAULT_CONTROL = os.environ.get("SPLITRELAY_CONTROL", f"http://{defaults.CONTROL_HOST}:{defaults.CONTROL_PORT}")


def _control_options(f):
    f = lab_option("the edge agent", relays=True)(f)
    f = click.option("--token", envvar="SPLITRELAY_TOKEN", help="Bearer token (env SPLITRELAY_TOKEN).")(f)
    return click.option("--control", default=DEFAULT_CONTROL, show_default=True, envvar="SPLITRELAY_CONTROL",
                        help="Edge agent control URL (env SPLITRELAY_CONTROL).")(f)


def _client(control: str, token: str | None):
    """The agent's control client; with --lab, each request is made inside the lab's relay namespace."""
    from splitrelay.wire.control_client import ControlClient
    from splitrelay.lab import reach

    where = resolve(control, "control", lambda lab, url: reach.control(lab, url, lab_relay()))
    return InNamespace(ControlClient(where.url, token or where.token), where)


@click.group()
def backends() -> None:
    """Register, remove and list transceivers (backends) on an edge agent."""


@backends.command("add")
@click.argument("backend_id", type=click.IntRange(1, MAX_BACKEND_ID))
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
@click.argument("backend_id", type=click.IntRange(1, MAX_BACKEND_ID))
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
    emit(_client(control, token).backends(), as_json, lambda d: table(d, ["id", "ip", "ip6", "port", "mac"]))


@click.group()
def sessions() -> None:
    """Sessions (server ufrag -> backend) on an edge agent."""


@sessions.command("list")
@_control_options
@click.option("--json", "as_json", is_flag=True)
@click.option("--backend", "backend_id", type=click.IntRange(1, MAX_BACKEND_ID),
              help="Only this backend's sessions: all its own token may read (every session needs the admin's).")
def sessions_list(control: str, token: str | None, as_json: bool, backend_id: int | None) -> None:
    """Registered sessions with their age and flow count.

    Each transceiver also registers a few ufrags ahead of its next offers
    (--ufrag-pool): they are listed too, with 0 flows, until a call takes one.
    """
    emit(_client(control, token).sessions(backend_id), as_json,
          lambda d: table(d, ["ufrag", "backend", "age_s", "flows"]))


@click.group()
def flows() -> None:
    """Client flows the XDP program learned."""


@flows.command("list")
@_control_options
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--json", "as_json", is_flag=True)
def flows_list(control: str, token: str | None, limit: int, as_json: bool) -> None:
    """Flows: client 5-tuple -> backend, age, idle time, packets and bytes each way."""
    emit(_client(control, token).flows(limit), as_json, lambda d: table(
        d, ["client", "backend", "ufrag", "age_s", "idle_s", "packets", "bytes", "rx_packets", "rx_bytes"]))


@click.command()
@_control_options
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", type=float, default=None, metavar="SECONDS",
              help="Print rates every SECONDS until interrupted.")
def stats(control: str, token: str | None, as_json: bool, watch: float | None) -> None:
    """Data-plane counters by direction, verdict and reason (rates with --watch).

    \b
    Examples:
      splitrelay stats --watch 1
      splitrelay stats --lab mylab        # the agent of lab mylab, from inside its relay namespace
    """
    client = _client(control, token)
    previous = None
    while True:
        counters = [c for c in client.stats()["counters"]]
        now = time.monotonic()
        if watch is None:
            data = {"counters": counters}
            ice_tcp = client.health().get("ice_tcp")   # the agent's ICE-TCP listener, when it runs one
            if ice_tcp:
                data["ice_tcp"] = ice_tcp

            def human(d: dict) -> None:
                table([c for c in d["counters"] if c["packets"]] or d["counters"][:0],
                      ["direction", "verdict", "reason", "packets", "bytes"])
                if "ice_tcp" in d:
                    t = d["ice_tcp"]
                    closed = ", ".join(f"{k} {v}" for k, v in sorted(t["closed"].items())) or "none"
                    click.echo(f"ICE-TCP port {t['port']}: {t['connections']} connections ({t['routed']} routed), "
                               f"frames {t['frames']}, closed: {closed}")

            emit(data, as_json, human)
            return
        if previous:
            dt = now - previous[0]
            rates = [{**c, "pps": round((c["packets"] - p["packets"]) / dt, 1)}
                     for c, p in zip(counters, previous[1], strict=True) if c["packets"]]
            emit({"interval_s": round(dt, 3), "counters": rates}, as_json, lambda d: (
                click.echo(time.strftime("%H:%M:%S")), table(d["counters"], ["direction", "verdict", "reason",
                                                                               "pps", "packets"])))
        previous = (now, counters)
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return
