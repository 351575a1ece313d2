"""`splitrelay lab`: build, list and remove relay labs on this machine."""

from __future__ import annotations

import click
from splitrelay import defaults
from splitrelay.cli.common import emit, table
from splitrelay.cli.errors import EXIT_USAGE, CliError, require_bcc, require_root


@click.group()
def lab() -> None:
    """A relay lab on this machine: client, relay and transceiver hosts in network namespaces."""


@lab.command("up")
@click.option("--transceivers", default=2, show_default=True, type=click.IntRange(1, 50))
@click.option("--name", help="Lab name (default: a fresh random one).")
@click.option("--policy", type=click.Choice(defaults.POLICY_NAMES), default=defaults.POLICY.value,
              show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--delay-ms", type=click.FloatRange(0, 10000), default=0.0,
              help="One-way delay added to UDP on the client's link, each way (the round trip grows twice this).")
@click.option("--jitter-ms", type=click.FloatRange(0, 10000), default=0.0,
              help="Uniform +- variation of that delay (frames keep their order).")
@click.option("--loss", type=click.FloatRange(0, 1), default=0.0,
              help="Probability (0..1) that a UDP frame on the client's link is dropped, each way.")
@click.option("--relays", default=1, show_default=True, type=click.IntRange(1, 8),
              help="Relays in front of the same transceivers, each with its own public network, agent and "
                   "internal address (on the transceivers' segment, or one router hop from them with --routed); "
                   "the client has a link to each (relay 1 is its default route).")
@click.option("--far-delay-ms", type=click.FloatRange(0, 10000), default=0.0,
              help="Make the last relay far: this one-way delay on the client's link to it, each way "
                   "(needs --relays 2 or more).")
@click.option("--translate", is_flag=True,
              help="The relays translate both sides (edge serve --translate) and the transceivers get no route "
                   "to the client's network: replies reach it only through the relay's translation.")
@click.option("--routed", is_flag=True,
              help="Put the transceivers in an L3 network of their own behind a router namespace on the "
                   "relays' internal segment; they route only the relays' internal network, via the router "
                   "(needs --translate).")
@click.option("--translate-addrs", default=1, show_default=True, type=click.IntRange(1, 16),
              help="With --translate: internal addresses per family each relay translates with (the extra ones "
                   "added to its internal interface; 65,535 flows per address).")
@click.option("--block-udp", is_flag=True,
              help="The client's network drops UDP to the relays (nftables in its namespace), as a firewall "
                   "that lets only TCP out would: calls work only over the relays' ICE-TCP port.")
def lab_up(transceivers: int, name: str | None, policy: str, as_json: bool, delay_ms: float, jitter_ms: float,
           loss: float, relays: int, far_delay_ms: float, translate: bool, routed: bool,
           translate_addrs: int, block_udp: bool) -> None:
    """Build the namespaces, attach XDP in the relay and start its edge agent.

    \b
    The client's link can be made slow and lossy (this kernel has no netem: a
    small forwarder, lab/impair.py, sits on the link); ARP and ND are never
    delayed or dropped.

    \b
    Examples:
      splitrelay lab up --transceivers 2 --json
      ip netns exec <client_netns> your-webrtc-client ...
      splitrelay lab up --name lossy --loss 0.02 --jitter-ms 20 --delay-ms 20
      splitrelay lab up --name two --relays 2 --far-delay-ms 40
      splitrelay stats --lab two --relay 2
      splitrelay lab up --name hop --routed --translate --relays 2
      splitrelay lab up --name tcponly --block-udp     # ICE-TCP on 443 only

    \b
    With --relays, each transceiver registers itself and its sessions with
    every relay and offers every relay's candidates, relay 1 (the client's
    default route) preferred.  Each relay's public network is routed back
    through that relay, so answers leave by the relay the client used.

    \b
    With --routed, the transceivers are one router hop from the relays, in
    their own network (--json shows "router" and "transceivers_network"):
    each relay's XDP plane sends to the router's MAC, and the transceivers
    reach nothing but the relays' internal network, so --translate is needed.
    """
    from splitrelay.lab.router import ROUTED_NEEDS_TRANSLATE

    if routed and not translate:
        raise CliError(ROUTED_NEEDS_TRANSLATE, EXIT_USAGE)
    if translate_addrs > 1 and not translate:
        raise CliError("--translate-addrs needs --translate", EXIT_USAGE)
    require_root("a lab")
    require_bcc()
    from splitrelay.lab.impair import Impairment
    from splitrelay.lab.stack import start_lab

    if far_delay_ms and relays < 2:
        raise CliError("--far-delay-ms needs --relays 2 or more", EXIT_USAGE)
    impair = Impairment(delay_ms, jitter_ms, loss) if delay_ms or jitter_ms or loss else None
    far = Impairment(far_delay_ms) if far_delay_ms else None
    info = start_lab(transceivers=transceivers, name=name, policy=policy, impair=impair, relays=relays, far=far,
                     translate=translate, routed=routed, translate_addrs=translate_addrs, block_udp=block_udp)

    def human(d: dict) -> None:
        click.echo(f"lab {d['name']} up: relay {d['relay_public']} (client netns {d['client_netns']}), "
                   f"control {d['control_url']}")
        for r in d["relays"][1:]:
            click.echo(f"  relay {r['index']}: {r['relay_public']}, control {r['control_url']}"
                       + (" (far)" if r["impaired"] else ""))
        if d["udp_blocked"]:
            click.echo(f"  the client's UDP to the relays is dropped: calls use ICE-TCP port {d['tcp_port']}")
        if d["router"]:
            click.echo(f"  transceivers routed: {' '.join(d['transceivers_network'])} via router "
                       f"{d['router']['internal'][0]} (netns {d['router']['netns']})")
        click.echo(f"inspect with: splitrelay stats --lab {d['name']}\n"
                   f"tear down with: splitrelay lab down --name {d['name']}")

    emit(info, as_json, human)


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
    emit(data, as_json, lambda d: table(d, ["name", "relay_public", "client_netns", "control_url"]))


def _add_fault() -> None:
    from splitrelay.cli.lab_fault import fault

    lab.add_command(fault)


_add_fault()


def _add_attack() -> None:
    from splitrelay.cli.lab_attack import attack

    lab.add_command(attack)


_add_attack()
