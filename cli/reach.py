"""`--lab NAME` for every command that talks to an agent or a transceiver.

A lab's addresses are routed nowhere on the host, so such a command either names
the lab (and makes its requests from inside the lab's namespace, lab/reach.py) or
runs inside the lab already; a lab address given from the host without --lab is
refused with exit 2 instead of leaving by the host's default route.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource
from splitrelay.cli.errors import EXIT_USAGE, CliError

_META = "splitrelay.lab"
_RELAY = "splitrelay.lab.relay"


def lab_option(what: str, relays: bool = False):
    """--lab NAME: reach ``what`` of that lab from inside its namespace (and --relay K: of which relay)."""
    def remember(key: str):
        def callback(ctx: click.Context, _param: click.Parameter, value: object) -> object:
            ctx.meta[key] = value
            return value
        return callback

    def decorate(f):
        f = click.option("--lab", metavar="NAME", expose_value=False, callback=remember(_META),
                         help=f"Reach {what} of lab NAME (`splitrelay lab status` lists them): its URL from "
                              "the lab's state, requested from inside the lab's namespace.")(f)
        if relays:
            f = click.option("--relay", "lab_relay", metavar="K", type=click.IntRange(1), default=1,
                             show_default=True, expose_value=False, callback=remember(_RELAY),
                             help="With --lab: the agent of the lab's relay K (`lab up --relays N`).")(f)
        return f

    return decorate


def lab_relay() -> int:
    """The relay --relay named (1 unless given)."""
    return click.get_current_context().meta.get(_RELAY) or 1


def resolve(url: str | None, param: str, for_lab: Callable[..., Any]):
    """Where a request to ``url`` (the value of option ``param``) goes: ``for_lab(lab, url_or_None)``
    with --lab (the URL only when given on the command line), else ``url`` here, unless it is a lab's."""
    from splitrelay.lab.reach import Reach, unreachable_from_here
    from splitrelay.lab.topology import Lab

    ctx = click.get_current_context()
    name = ctx.meta.get(_META)
    if name:
        explicit = ctx.get_parameter_source(param) == ParameterSource.COMMANDLINE
        return for_lab(Lab.load(name), url if explicit else None)
    if url is None:
        raise CliError(f"give {param.replace('_', '-')} or --lab NAME", EXIT_USAGE)
    labs = unreachable_from_here(url)
    if labs:
        raise CliError(f"{_why(url, labs)}: add --lab {labs[0] if len(labs) == 1 else 'NAME'}", EXIT_USAGE)
    return Reach(url)


def refuse_lab_address(url: str | None) -> None:
    """Exit 2 when ``url`` is a lab's and this process is outside that lab (daemons take no --lab)."""
    from splitrelay.lab.reach import unreachable_from_here

    labs = unreachable_from_here(url) if url else []
    if labs:
        raise CliError(f"{_why(url, labs)}: run this inside the lab's namespace", EXIT_USAGE)


def _why(url: str, labs: list[str]) -> str:
    from splitrelay.lab.reach import url_host

    return f"{url_host(url)} is an address of lab {', '.join(labs)}, which this host does not route"


class InNamespace:
    """Every method call of ``target`` runs where ``reach`` says (its sockets are made there)."""

    def __init__(self, target: Any, reach: Any) -> None:
        self._target, self._reach = target, reach

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr
        return lambda *args, **kwargs: self._reach.call(lambda: attr(*args, **kwargs))
