"""A client network that drops UDP: the lab's stand-in for a firewall that lets only TCP out.

Corporate and hotel networks that block UDP drop it silently (no ICMP, no
error at the sender), so the rule is an nftables drop on the client
namespace's output, for UDP to every relay's public network only: signaling,
which runs over TCP on its own network, is untouched, and nothing outside the
client's namespace changes.  ``lab up --block-udp`` and the browser tests use it
(a real client behind such a firewall needs nothing from us but the relay's TCP
candidate).
"""

from __future__ import annotations

import re
import shutil

from splitrelay.lab.netns import LabError
from splitrelay.lab.topology import Lab

TABLE = "splitrelay_block_udp"


def _ruleset(lab: Lab) -> str:
    nets4 = ", ".join(lab.public_network(r.index)[0] for r in lab.relays)
    nets6 = ", ".join(lab.public_network(r.index)[1] for r in lab.relays)
    return (f"table inet {TABLE} {{\n chain out {{\n  type filter hook output priority 0; policy accept;\n"
            f"  meta l4proto udp ip daddr {{ {nets4} }} counter drop\n"
            f"  meta l4proto udp ip6 daddr {{ {nets6} }} counter drop\n }}\n}}\n")


def block_udp(lab: Lab) -> None:
    """Drop every UDP packet the client sends toward a relay (idempotent)."""
    if shutil.which("nft") is None:
        raise LabError("blocking UDP needs nft (apt-get install nftables; scripts/setup.sh does it)")
    unblock_udp(lab)
    lab.run(lab.client.netns, ["nft", "-f", "-"], input=_ruleset(lab))


def unblock_udp(lab: Lab) -> None:
    if udp_blocked(lab):
        lab.run(lab.client.netns, ["nft", "delete", "table", "inet", TABLE])


def udp_blocked(lab: Lab) -> bool:
    """The rule is in place (False where nft is not installed: then nothing can have put it there)."""
    if shutil.which("nft") is None:
        return False
    return lab.run(lab.client.netns, ["nft", "list", "table", "inet", TABLE], check=False).returncode == 0


def dropped_packets(lab: Lab) -> int:
    """UDP packets the rule has dropped so far (0 when it is not in place)."""
    out = lab.run(lab.client.netns, ["nft", "list", "table", "inet", TABLE], check=False).stdout
    return sum(int(n) for n in re.findall(r"packets (\d+) bytes \d+ drop", out))
