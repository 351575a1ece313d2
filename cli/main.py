"""The `splitrelay` command: attach, inspect and run the relay, and build labs.

Every error is one line on stderr and a stable exit code (cli/errors.py);
every read command takes --json for scripts.  This module is the root group
only; each command group lives in its own module (edge, control, transceiver,
lab, demo, bench) and is added below.
"""

from __future__ import annotations

import logging
import sys

import click
from splitrelay.cli.errors import from_library
from splitrelay.errors import SplitrelayError


class Main(click.Group):
    """Turns typed library errors into one line and an exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SplitrelayError as exc:
            raise from_library(exc) from None


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log what the daemons do.")
def main(verbose: bool) -> None:
    """splitrelay: an XDP edge relay for real-time voice AI over WebRTC.

    \b
    Quick start (root):
      splitrelay lab up --name mylab    # a relay lab on this machine
      splitrelay stats --lab mylab      # counters from its edge agent
      splitrelay lab down --name mylab
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")



def _add_commands() -> None:
    """Each command group lives in its own module; imported here, so `--help` lists them all."""
    from splitrelay.cli.bench import bench
    from splitrelay.cli.call import call
    from splitrelay.cli.control import backends, flows, sessions, stats
    from splitrelay.cli.demo import demo
    from splitrelay.cli.edge import edge
    from splitrelay.cli.lab import lab
    from splitrelay.cli.token import token
    from splitrelay.cli.transceiver import transceiver

    for command in (edge, backends, sessions, flows, stats, transceiver, token, lab, demo, bench, call):
        main.add_command(command)


_add_commands()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
