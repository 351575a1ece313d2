"""`splitrelay lab attack`: the data-plane attacks of lab/attacks.py against a lab that is up."""

from __future__ import annotations

import click
from splitrelay.cli.common import emit, table
from splitrelay.cli.errors import EXIT_USAGE, CliError, require_root
from splitrelay.cli.lab_fault import _lab, json_option, name_option


@click.command("attack")
@click.argument("names", nargs=-1, metavar="[NAME...]")
@name_option
@click.option("--list", "list_only", is_flag=True, help="List the attacks and exit.")
@json_option
def attack(names: tuple[str, ...], name: str | None, list_only: bool, as_json: bool) -> None:
    """Attack a running lab's relay as a stranger would, each time during a live aiortc call.

    \b
    Every packet leaves from the lab's client namespace (an extra address there
    is the non-consenting victim), never from this host.  Per attack: packets
    and bytes sent, flows the relay created for them, bytes it sent to the
    victim (amplification = reflected / sent), whether the call kept its audio,
    and whether the defence held.  Exit 1 if any defence failed.

    \b
    Examples:
      splitrelay lab up --name atk --policy hint
      splitrelay lab attack --name atk --json
      splitrelay lab attack --name atk takeover lockout-64
      splitrelay lab attack --list
    """
    from splitrelay.lab.attacks import ATTACKS, run_attacks

    if list_only:
        emit([{"name": a.name, "description": a.description} for a in ATTACKS.values()], as_json,
             lambda d: table(d, ["name", "description"]))
        return
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise CliError(f"no such attack: {', '.join(unknown)} (see: splitrelay lab attack --list)", EXIT_USAGE)
    require_root("a lab attack")
    reports = [r.to_dict() for r in run_attacks(_lab(name), list(names) or None)]
    emit(reports, as_json, lambda d: table(d, ["name", "packets_sent", "flows_created", "bytes_reflected",
                                               "amplification", "call_kept_audio", "defended", "skipped"]))
    if any(not r["defended"] and not r["skipped"] for r in reports):
        raise SystemExit(1)
