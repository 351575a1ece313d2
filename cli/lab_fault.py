"""`splitrelay lab fault`: silent faults under a live call in a lab that is up (lab/faults.py, lab/floating.py)."""

from __future__ import annotations

import click
from splitrelay.cli.common import emit
from splitrelay.cli.errors import EXIT_USAGE, CliError, require_root


def _lab(name: str | None):  # noqa: ANN202
    from splitrelay.lab.topology import Lab

    up = Lab.names()
    if name is None:
        if len(up) != 1:
            raise CliError(f"{len(up)} labs are up ({', '.join(up) or 'none'}): say which with --name", EXIT_USAGE)
        name = up[0]
    return Lab.load(name)


name_option = click.option("--name", help="The lab (default: the one lab that is up).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")


@click.group("fault")
def fault() -> None:
    """Break a running lab the way relays fail, silently (no link goes down), and heal it.

    \b
    Examples:
      splitrelay lab up --name two --relays 2
      splitrelay lab fault kill --name two --relay 1      # 3a: clients must move to relay 2
      splitrelay lab fault float --name two --to 2        # 3b: relay 1's address now reaches relay 2
      splitrelay lab fault heal --name two                # everything back home
    """


@fault.command("kill")
@name_option
@click.option("--relay", default=1, show_default=True, type=click.IntRange(1, 8), help="The relay that dies.")
@json_option
def fault_kill(name: str | None, relay: int, as_json: bool) -> None:
    """Silence a relay: its port on the internal switch drops everything, as when the host dies.

    Clients see their consent checks go unanswered; its agent stays up but is cut off."""
    require_root("a lab fault")
    from splitrelay.lab.faults import RelayDies

    lab = _lab(name)
    RelayDies(lab, relay).apply()
    emit({"lab": lab.name, "killed": relay}, as_json,
         lambda d: click.echo(f"lab {d['lab']}: relay {relay} silenced (heal with: splitrelay lab fault heal "
                              f"--name {d['lab']})"))


@fault.command("float")
@name_option
@click.option("--relay", default=1, show_default=True, type=click.IntRange(1, 8),
              help="The relay whose public address moves.")
@click.option("--to", "standby", default=2, show_default=True, type=click.IntRange(1, 8),
              help="The standby relay that takes it over.")
@click.option("--gateway/--no-gateway", default=True, show_default=True,
              help="Float the relay's internal address too (VRRP-style, announced by gratuitous ARP and "
                   "unsolicited NA): the transceivers' way back while relays only DNAT.  Not needed once "
                   "relays translate both sides.")
@json_option
def fault_float(name: str | None, relay: int, standby: int, gateway: bool, as_json: bool) -> None:
    """Move a relay's public address (IPv4 and IPv6) to a standby relay, as a floating IP moves.

    \b
    The lab's internet (the client's namespace) maps the address 1:1 onto the
    standby's, as a cloud edge maps an Elastic IP: clients keep the same
    address and pair and see no change; the standby learns each flow from the
    client's next consent check.  One address floats at a time."""
    require_root("a lab fault")
    from splitrelay.lab.faults import AddressFloats

    lab = _lab(name)
    move = AddressFloats(lab, relay, standby, gateway).apply()
    emit({"lab": lab.name, "floated": move.to_dict()}, as_json,
         lambda d: click.echo(f"lab {d['lab']}: relay {relay}'s {move.public[0]} and {move.public[1]} now reach "
                              f"relay {standby}" + (f" (with the gateway {move.internal[0]})" if gateway else "")))


@fault.command("heal")
@name_option
@json_option
def fault_heal(name: str | None, as_json: bool) -> None:
    """Undo every fault applied: every relay forwarding again and a floated address back home; idempotent."""
    require_root("a lab fault")
    from splitrelay.lab.faults import AddressFloats, heal

    lab = _lab(name)
    move = next((f.move for f in heal(lab) if isinstance(f, AddressFloats)), None)
    emit({"lab": lab.name, "revived": [r.index for r in lab.relays], "returned": move and move.to_dict()}, as_json,
         lambda d: click.echo(f"lab {d['lab']}: every relay forwarding"
                              + (f", relay {move.relay}'s address home" if move else "")))
