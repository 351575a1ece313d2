"""The records (edge/records.py) to and from the XDP maps' keys and values, and nothing else.

The ctypes types come from bcc, which derives them from ``bpf/splitrelay.h``
(``table.Key`` / ``table.Leaf``); this module only fills and reads their
fields: network byte order for addresses and ports, MACs as 6 bytes, ufrags
zero padded.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress

from splitrelay.bpf import consts
from splitrelay.edge.records import POLICIES, PUBLIC_SLOT, Backend, Flow, RelayConfig
from splitrelay.wire.byteorder import addr_from_words, be16, be32_words, from_be16, mac_bytes, mac_str

_POLICY_NAMES = {v: k for k, v in POLICIES.items()}


def config_leaf(leaf, cfg: RelayConfig):
    """Fill an ``sr_config`` (enabled) from ``cfg``."""
    if cfg.public_ip4:
        leaf.public_ip4 = be32_words(ipaddress.IPv4Address(cfg.public_ip4))[0]
    if cfg.public_ip6:
        for i, word in enumerate(be32_words(ipaddress.IPv6Address(cfg.public_ip6))):
            leaf.public_ip6[i] = word
    leaf.relay_port = be16(cfg.relay_port)
    leaf.policy = POLICIES[cfg.policy]
    leaf.enabled = 1
    ct.memmove(leaf.public_mac, mac_bytes(cfg.public_mac), 6)
    ct.memmove(leaf.gateway_mac, mac_bytes(cfg.gateway_mac), 6)
    leaf.public_slot = PUBLIC_SLOT
    leaf.max_session_flows = cfg.max_session_flows
    if cfg.hint_key:
        leaf.hint_key_set = 1
        ct.memmove(leaf.hint_key, cfg.hint_key, 16)
    leaf.translate = int(cfg.translate)
    leaf.port_first, leaf.port_last = cfg.translate_ports
    sets = cfg.internal_sets() if cfg.translate else []
    leaf.xlate_addrs = len(sets)
    for n, (ip4, ip6) in enumerate(sets):
        if ip4:
            leaf.internal_ip4[n] = be32_words(ipaddress.IPv4Address(ip4))[0]
        if ip6:
            for i, word in enumerate(be32_words(ipaddress.IPv6Address(ip6))):
                leaf.internal_ip6[4 * n + i] = word
    return leaf


def config_from(leaf) -> RelayConfig | None:
    if not leaf.enabled:
        return None
    ip6 = addr_from_words(list(leaf.public_ip6), 6)
    return RelayConfig(
        relay_port=from_be16(leaf.relay_port),
        public_mac=mac_str(leaf.public_mac),
        gateway_mac=mac_str(leaf.gateway_mac),
        public_ip4=str(addr_from_words([leaf.public_ip4], 4)) if leaf.public_ip4 else None,
        public_ip6=str(ip6) if int(ip6) else None,
        policy=_POLICY_NAMES[leaf.policy],
        max_session_flows=leaf.max_session_flows,
        hint_key=bytes(leaf.hint_key) if leaf.hint_key_set else None,
        translate=bool(leaf.translate),
        translate_ports=(leaf.port_first, leaf.port_last) if leaf.port_last else RelayConfig.translate_ports,
        **_internal_from(leaf),
    )


def _internal_from(leaf) -> dict:
    """RelayConfig's internal_ip4/internal_ip6/internal_more from sr_config's address-set arrays."""
    v4 = [str(addr_from_words([leaf.internal_ip4[i]], 4)) for i in range(leaf.xlate_addrs) if leaf.internal_ip4[i]]
    v6 = [str(a) for i in range(leaf.xlate_addrs)
          if int(a := addr_from_words(list(leaf.internal_ip6[4 * i:4 * i + 4]), 6))]
    return {"internal_ip4": v4[0] if v4 else None, "internal_ip6": v6[0] if v6 else None,
            "internal_more": tuple(v4[1:] + v6[1:])}


def addr_key(key, ip: str, port: int):
    """Fill an ``sr_addr_key`` with (ip, port)."""
    addr = ipaddress.ip_address(ip)
    for i, word in enumerate(be32_words(addr)):
        key.addr[i] = word
    key.port = be16(port)
    key.family = addr.version
    return key


def backend_leaf(leaf, b: Backend):
    """Fill an ``sr_backend`` from ``b``."""
    if b.ip4:
        leaf.addr4 = be32_words(ipaddress.IPv4Address(b.ip4))[0]
        leaf.flags |= consts.BACKEND_V4
    if b.ip6:
        for i, word in enumerate(be32_words(ipaddress.IPv6Address(b.ip6))):
            leaf.addr6[i] = word
        leaf.flags |= consts.BACKEND_V6
    leaf.port = be16(b.port)
    ct.memmove(leaf.dmac, mac_bytes(b.dmac), 6)
    ct.memmove(leaf.smac, mac_bytes(b.smac), 6)
    leaf.tx_slot = b.tx_slot
    return leaf


def backend_from(backend_id: int, leaf) -> Backend:
    return Backend(
        backend_id=backend_id,
        port=from_be16(leaf.port),
        dmac=mac_str(leaf.dmac),
        smac=mac_str(leaf.smac),
        ip4=str(addr_from_words([leaf.addr4], 4)) if leaf.flags & consts.BACKEND_V4 else None,
        ip6=str(addr_from_words(list(leaf.addr6), 6)) if leaf.flags & consts.BACKEND_V6 else None,
        tx_slot=leaf.tx_slot,
    )


def ufrag_text(raw) -> str:
    """An ``sr_ufrag_key``'s characters as text."""
    return bytes(raw).rstrip(b"\0").decode("ascii", "replace")


def flow_from(key, leaf) -> Flow:
    return Flow(
        client_ip=str(addr_from_words(list(key.addr), key.family)),
        client_port=from_be16(key.port),
        backend_id=leaf.backend_id,
        ufrag=ufrag_text(leaf.ufrag.ufrag),
        client_mac=mac_str(leaf.client_mac),
        created_ns=leaf.created_ns,
        last_seen_ns=leaf.last_seen_ns,
        packets=leaf.packets,
        bytes=leaf.bytes,
        rx_packets=leaf.rx_packets,
        rx_bytes=leaf.rx_bytes,
        internal_port=from_be16(leaf.xlate_port),
        internal_set=leaf.xlate_addr,
        pending=bool(leaf.pending),
    )
