"""The relays a transceiver advertises, and which of them a client should prefer.

One answer names every relay: a client that loses its relay moves to another
relay's candidate without signaling again (issue 12, section 3a).  The order is
deliberate, through ICE candidate priorities (RFC 8445 5.1.2): every candidate is
``host`` (type preference 126), so the *local preference* alone ranks them:

* the preferred relay's candidates get 65535, 65534, ... (in the order given:
  IPv4 then IPv6 for ``--relay 203.0.113.1:3478,[2001:db8::1]:3478``);
* each backup relay r (1, 2, ... in configured order) gets 32767 - 256*r - i.

So every pair through the preferred relay outranks every backup pair for the
client's (controlling) agent, and a backup wins only when the preferred relay's
checks fail.  A relay with an ICE-TCP port (``tcp:443`` in its spec, edge/ice_tcp.py)
adds a passive TCP candidate (RFC 6544) per address, ranked the same way in a band
below every UDP candidate (16383 - i for the preferred relay, 8191 - 256*r - i for
backups), so UDP wins wherever it works and TCP is the last resort.

The first-hop latency is what the preference is for, so the choice is made per
offer, at signaling time, by a chain of ``RelayChooser`` callables:

* ``ByClientPrefix`` (the default when ``--prefer`` maps are given): the
  longest prefix that holds the WHIP request's source address names the relay;
* ``ByHeader``: a header the edge in front of WHIP sets (a CDN's or load
  balancer's geo-IP verdict, say ``X-Splitrelay-Relay: fra``).  Only enable it
  when that edge overwrites the header: a client could otherwise choose.
* a geo-IP lookup is one more chooser: any ``(facts, relays) -> Relay | None``.

The first chooser that answers wins; if none does, the first configured relay.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from splitrelay.errors import SplitrelayError

Address = tuple[str, int]

PREFERRED_LOCAL_PREF = 65535
BACKUP_LOCAL_PREF = 32767
BACKUP_STEP = 256
TCP_PREFERRED_LOCAL_PREF = 16383   # below the lowest UDP one (32767 - 256 * 63) for up to 63 backups
TCP_BACKUP_LOCAL_PREF = 8191


class RelaySpecError(SplitrelayError, ValueError):
    """A --relay / --prefer value that cannot be parsed (one-line reason)."""


class TcpAddress(NamedTuple):
    """The address of a passive ICE-TCP candidate: the answer lists it with ``tcptype passive``."""

    host: str
    port: int


@dataclass(frozen=True)
class Relay:
    """One relay: its name, its public candidates (IPv4 and/or IPv6), its edge agent's URL and the
    TCP port its agent listens on for ICE-TCP (None: the answer offers no TCP candidate)."""

    name: str
    candidates: tuple[Address, ...]
    control_url: str | None = None
    tcp_port: int | None = None


@dataclass(frozen=True)
class SignalingFacts:
    """What the WHIP request tells about the client, for choosing its relay."""

    remote: str | None = None                         # the request's peer address
    headers: Mapping[str, str] = field(default_factory=dict)


RelayChooser = Callable[[SignalingFacts, Sequence[Relay]], "Relay | None"]
"""Contract: return the relay this client should prefer, or None to let the next chooser
decide.  Runs on the event loop for every offer, so it must answer without blocking."""


def parse_address(text: str) -> Address:
    """``198.51.100.1:3478`` or ``[2001:db8::1]:3478``."""
    host, sep, port = text.strip().rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if ":" in host and not bracketed:  # 2001:db8::1:3478 is ambiguous
        raise RelaySpecError(f"{text!r} is not ip:port (IPv6 as [addr]:port)")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise RelaySpecError(f"{text!r} is not ip:port (IPv6 as [addr]:port)") from None
    if not sep or not 1 <= number <= 65535:
        raise RelaySpecError(f"{text!r} is not ip:port (IPv6 as [addr]:port)")
    return host, number


def parse_relay(text: str, index: int, control_url: str | None = None) -> Relay:
    """``[NAME=]ADDR[,ADDR][,tcp:PORT]``: a relay's public candidates, named ``relayN`` (1-based) by
    default; ``tcp:PORT`` also offers a passive ICE-TCP candidate on each address at PORT."""
    name, sep, addresses = text.partition("=")
    if not sep:
        name, addresses = f"relay{index + 1}", text
    items = [a.strip() for a in addresses.split(",") if a.strip()]
    tcp = [a for a in items if a.startswith("tcp:")]
    candidates = tuple(parse_address(a) for a in items if a not in tcp)
    if not candidates:
        raise RelaySpecError(f"relay {text!r} names no address")
    tcp_port = None
    if tcp:
        port = tcp[-1][len("tcp:"):]
        if len(tcp) > 1 or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise RelaySpecError(f"relay {text!r}: give one tcp:PORT with PORT 1..65535")
        tcp_port = int(port)
    return Relay(name.strip(), candidates, control_url, tcp_port)


def ordered_candidates(relays: Sequence[Relay], preferred: Relay | None) -> list[tuple[Address, int]]:
    """Every relay's candidates with their ICE local preference, the preferred relay's first: the UDP
    ones, then the TCP ones (as ``TcpAddress``) of relays with a TCP port."""
    if not relays:
        return []
    preferred = preferred if preferred in relays else relays[0]
    backups = [r for r in relays if r is not preferred]
    out = []
    for top, backup_top, tcp in ((PREFERRED_LOCAL_PREF, BACKUP_LOCAL_PREF, False),
                                 (TCP_PREFERRED_LOCAL_PREF, TCP_BACKUP_LOCAL_PREF, True)):
        for rank, relay in enumerate([preferred, *backups]):
            if tcp and relay.tcp_port is None:
                continue
            base = top if rank == 0 else backup_top - BACKUP_STEP * rank
            out += [(TcpAddress(host, relay.tcp_port) if tcp else (host, port), base - i)
                    for i, (host, port) in enumerate(relay.candidates)]
    return out


class ByClientPrefix:
    """The relay named by the longest configured prefix holding the request's source address."""

    def __init__(self, prefixes: Sequence[tuple[str, str]]) -> None:
        try:
            self.prefixes = sorted(((ipaddress.ip_network(p, strict=False), name) for p, name in prefixes),
                                   key=lambda item: -item[0].prefixlen)
        except ValueError as exc:
            raise RelaySpecError(str(exc)) from None

    def __call__(self, facts: SignalingFacts, relays: Sequence[Relay]) -> Relay | None:
        try:
            source = ipaddress.ip_address((facts.remote or "").split("%")[0])
        except ValueError:
            return None
        if source.version == 6 and source.ipv4_mapped:
            source = source.ipv4_mapped
        for network, name in self.prefixes:
            if source.version == network.version and source in network:
                return _named(relays, name)
        return None


class ByHeader:
    """The relay named in a request header that the edge in front of WHIP sets (geo-IP, anycast PoP)."""

    def __init__(self, header: str) -> None:
        self.header = header

    def __call__(self, facts: SignalingFacts, relays: Sequence[Relay]) -> Relay | None:
        value = next((v for k, v in facts.headers.items() if k.lower() == self.header.lower()), None)
        return _named(relays, value.strip()) if value else None


def _named(relays: Sequence[Relay], name: str) -> Relay | None:
    return next((r for r in relays if r.name == name), None)


def choose(choosers: Sequence[RelayChooser], facts: SignalingFacts, relays: Sequence[Relay]) -> Relay | None:
    """The first chooser's answer, else the first relay (None without relays: direct mode)."""
    for chooser in choosers:
        relay = chooser(facts, relays)
        if relay is not None:
            return relay
    return relays[0] if relays else None


def choosers_from_options(prefer: Sequence[str], prefer_header: str | None) -> list[RelayChooser]:
    """``--prefer-header`` (first) and ``--prefer PREFIX=RELAY`` as a chooser chain."""
    choosers: list[RelayChooser] = [ByHeader(prefer_header)] if prefer_header else []
    if prefer:
        choosers.append(ByClientPrefix(parse_prefix_map(prefer)))
    return choosers


def parse_prefix_map(items: Sequence[str]) -> list[tuple[str, str]]:
    """``PREFIX=RELAY`` strings (``--prefer 198.51.100.0/24=near``)."""
    out = []
    for item in items:
        prefix, sep, name = item.partition("=")
        if not sep or not name.strip():
            raise RelaySpecError(f"{item!r} is not PREFIX=RELAY")
        out.append((prefix.strip(), name.strip()))
    return out


def relays_from_options(specs: Sequence[str], control_urls: Sequence[str]) -> list[Relay]:
    """``--relay`` values paired, in order, with ``--relay-control`` values (one each, or none)."""
    if control_urls and specs and len(control_urls) != len(specs):
        raise RelaySpecError(f"{len(specs)} --relay but {len(control_urls)} --relay-control: give one per relay "
                             "(in the same order) or none")
    if not specs:  # a control URL alone: register, advertise the bind address
        return [Relay(f"relay{i + 1}", (), url) for i, url in enumerate(control_urls)]
    relays = [parse_relay(spec, i, control_urls[i] if control_urls else None) for i, spec in enumerate(specs)]
    names = [r.name for r in relays]
    if len(set(names)) != len(names):
        raise RelaySpecError(f"relay names must differ: {', '.join(names)}")
    return relays
