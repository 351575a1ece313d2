"""What every data plane stores and answers with: the relay's config, backends, sessions and flows.

Both planes (``xdp/plane.py``, ``userspace/plane.py``) take and return these
dataclasses, so the control API, the metrics and the agent never see how a
plane keeps them (BPF maps or Python dicts).  Each validates itself on
construction with a one-line ``DataPlaneError``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, fields

from splitrelay import defaults
from splitrelay.bpf import consts
from splitrelay.wire.stun import UFRAG_RULE, is_ufrag

from splitrelay.errors import SplitrelayError

POLICIES = consts.POLICIES
PUBLIC_SLOT = 0       # tx_ports devmap slots (sr_config.public_slot, sr_backend.tx_slot)
INTERNAL_SLOT = 1
NO_MAC = "00:00:00:00:00:00"   # a plane that writes no Ethernet headers (userspace) needs no MACs


class DataPlaneError(SplitrelayError):
    """The data plane could not do what was asked (one-line reason)."""


class TableFullError(DataPlaneError):
    """A backend or session table is full (the control API answers 503, as for a full BPF map)."""


def check_ufrag(ufrag: str) -> str:
    """``ufrag`` if the relay can route by it (``wire.stun.is_ufrag``), else DataPlaneError."""
    if not is_ufrag(ufrag):
        raise DataPlaneError(f"{UFRAG_RULE}, got {ufrag!r}")
    return ufrag


def parse_ip(value: str, version: int | None = None) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``value`` as an address (of IP ``version`` when given), else one-line DataPlaneError."""
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise DataPlaneError(f"not an IP address: {value!r}") from None
    if version and addr.version != version:
        raise DataPlaneError(f"{value} is not an IPv{version} address")
    return addr


def check_range(name: str, pair: tuple[int, int]) -> None:
    """One-line DataPlaneError unless ``pair`` is a port range (first <= last) within 1..65535."""
    first, last = pair
    if not 1 <= first <= last <= 65535:
        raise DataPlaneError(f"{name} must be a range within 1..65535, got {first}-{last}")


def check_internal_sets(ip4: str | None, ip6: str | None, more=()) -> None:
    """One-line DataPlaneError unless the internal addresses pair up into at most MAX_XLATE_ADDRS sets.

    Set i is the i-th IPv4 with the i-th IPv6 and a flow holds one (set, port) pair whatever its
    family, so the families give as many addresses each, or one family none.
    """
    by: dict[int, list[str]] = {4: [ip4] if ip4 else [], 6: [ip6] if ip6 else []}
    for ip in more:
        addr = parse_ip(ip)
        by[addr.version].append(str(addr))
    n4, n6 = len(by[4]), len(by[6])
    if n4 and n6 and n4 != n6:
        raise DataPlaneError(f"internal addresses pair up by position: give as many IPv4 as IPv6 "
                            f"(or none of one family), got {n4} IPv4 and {n6} IPv6")
    if max(n4, n6) > consts.MAX_XLATE_ADDRS:
        raise DataPlaneError(f"at most {consts.MAX_XLATE_ADDRS} internal addresses per family, got {max(n4, n6)}")
    for version, ips in by.items():
        if len(set(ips)) != len(ips):
            raise DataPlaneError(f"an internal IPv{version} address is given twice: {', '.join(ips)}")


@dataclass(kw_only=True)
class RelaySettings:
    """A relay's settings as its operator gives them, declared and validated here once.

    The agent's config and every plane's (``edge/plane.py`` ``PlaneConfig``) are these plus their
    own; what a plane writes (``RelayConfig``) is these plus what it resolved (MACs, addresses).
    """

    relay_port: int = defaults.RELAY_PORT
    public_ip4: str | None = None
    public_ip6: str | None = None
    policy: str = defaults.POLICY
    max_session_flows: int = defaults.SESSION_FLOWS   # client 5-tuples one session may open; 0 = unlimited
    hint_key: bytes | None = None  # with a key only keyed (v2) routing hints route
    translate: bool = False        # both sides translated (issue 12 §1); False: DNAT, the client's address kept
    internal_ip4: str | None = None   # translate: the relay's internal addresses flows come from
    internal_ip6: str | None = None   # (the userspace plane: where its flow sockets bind)
    internal_more: tuple[str, ...] = ()   # translate: further internal addresses, either family, in order
    translate_ports: tuple[int, int] = defaults.TRANSLATE_PORTS   # inclusive

    def __post_init__(self) -> None:
        check_range("translation ports", self.translate_ports)
        check_internal_sets(self.internal_ip4, self.internal_ip6, self.internal_more)
        if self.hint_key is not None and len(self.hint_key) != 16:
            raise DataPlaneError(f"hint key must be 16 bytes, got {len(self.hint_key)}")
        if not 0 <= self.max_session_flows <= 65535:
            raise DataPlaneError(f"max session flows must be 0..65535, got {self.max_session_flows}")
        if not 1 <= self.relay_port <= 65535:
            raise DataPlaneError(f"relay port must be 1..65535, got {self.relay_port}")
        if self.policy not in POLICIES:
            raise DataPlaneError(f"policy must be one of {sorted(POLICIES)}, got {self.policy!r}")
        if self.public_ip4 is None and self.public_ip6 is None:
            raise DataPlaneError("a relay needs a public IPv4 or IPv6 address")
        for value, version in ((self.public_ip4, 4), (self.public_ip6, 6), (self.internal_ip4, 4),
                               (self.internal_ip6, 6)):
            if value is not None:
                parse_ip(value, version)

    def relay_config(self, public_mac: str = NO_MAC, gateway_mac: str = NO_MAC, **resolved) -> RelayConfig:
        """What a plane writes: these settings with the MACs it resolved and, in ``resolved``, what it
        decided in place of a setting (translation's internal addresses, say)."""
        given = {f.name: getattr(self, f.name) for f in fields(RelaySettings)}
        return RelayConfig(**{**given, **resolved}, public_mac=public_mac, gateway_mac=gateway_mac)


@dataclass(kw_only=True)
class RelayConfig(RelaySettings):
    """A relay's config as a plane holds it (``sr_config``): its settings and the MACs it resolved."""

    public_mac: str = NO_MAC
    gateway_mac: str = NO_MAC

    def internal_sets(self) -> list[tuple[str | None, str | None]]:
        """The translation address sets: the i-th internal IPv4 with the i-th IPv6 (sr_config's arrays)."""
        by = {4: [self.internal_ip4] if self.internal_ip4 else [],
              6: [self.internal_ip6] if self.internal_ip6 else []}
        for ip in self.internal_more:
            by[ipaddress.ip_address(ip).version].append(ip)
        n = max(len(by[4]), len(by[6]))
        return [(by[4][i] if by[4] else None, by[6][i] if by[6] else None) for i in range(n)]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.translate and self.internal_ip4 is None and self.internal_ip6 is None:
            raise DataPlaneError("translation needs the relay's internal IPv4 or IPv6 address")


@dataclass
class Backend:
    backend_id: int
    port: int
    dmac: str
    smac: str
    ip4: str | None = None
    ip6: str | None = None
    tx_slot: int = INTERNAL_SLOT

    def __post_init__(self) -> None:
        if not 1 <= self.backend_id <= consts.MAX_BACKEND_ID:
            raise DataPlaneError(f"backend id must be 1..{consts.MAX_BACKEND_ID}, got {self.backend_id}")
        if not 1 <= self.port <= 65535:
            raise DataPlaneError(f"backend port must be 1..65535, got {self.port}")
        if self.ip4 is None and self.ip6 is None:
            raise DataPlaneError("a backend needs an IPv4 or IPv6 address")


@dataclass
class Session:
    ufrag: str
    backend_id: int
    created_ns: int
    flows: int = 0


@dataclass
class Flow:
    client_ip: str
    client_port: int
    backend_id: int
    ufrag: str
    client_mac: str
    created_ns: int
    last_seen_ns: int
    packets: int
    bytes: int
    rx_packets: int
    rx_bytes: int
    internal_port: int = 0   # translate: the relay's internal port the transceiver sees as this client
    internal_set: int = 0    # translate: ... on this internal address set (RelayConfig.internal_sets())
    pending: bool = False    # opened by the client's request, not yet answered by its backend: STUN only

    @property
    def internal_pair(self) -> int:
        """The (address set, port) pair the flow holds in the translation pool (edge/xdp/ports.py); 0: none."""
        return (self.internal_set << 16) | self.internal_port if self.internal_port else 0

    @property
    def client(self) -> str:
        host = f"[{self.client_ip}]" if ":" in self.client_ip else self.client_ip
        return f"{host}:{self.client_port}"


@dataclass
class Attachment:
    ifname: str
    ifindex: int
    program: str
    mode: str
