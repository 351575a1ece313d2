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


def lab_option(what: str):
    """--lab NAME: reach ``what`` of that lab from inside its namespace."""
    def remember(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
        ctx.meta[_META] = value
        return value

    return click.option("--lab", metavar="NAME", expose_value=False, callback=remember,
                        help=f"Reach {what} of lab NAME (`splitrelay lab status` lists them): its URL from "
                             "the lab's state, requested from inside the lab's namespace.")


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
