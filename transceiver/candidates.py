"""Which of a client's signalled ICE candidates the transceiver checks at all.

Every remote candidate costs a connectivity check to its address, retransmitted
by aioice (RTO 0.5 s, doubling): 5 packets within a 10 s connect timeout, 7 in
all.  The address is whatever an anonymous offer (or ICE-restart PATCH) names, so
without a bound an offer of 4,142 bytes naming one victim in 50 candidates made
the relay send 250 packets (35,500 bytes) there, and offers may carry ~700.

* At most ``MAX_REMOTE_CANDIDATES`` per ICE generation (offer, then each
  restart) are checked; the rest are ignored, not refused: the session still
  connects on the client's own checks, which aioice learns as peer-reflexive.
  16 is what real clients stay under: Chromium gathers one UDP host candidate per
  network (at most 5 IPv6 ones, ``WebRTC-MaxIPv6Networks``) plus one srflx and one
  relay per STUN/TURN server, and its TCP candidates are never checked (aioice
  pairs UDP only, and they are not counted); Firefox and libdatachannel gather
  alike, so 16 leaves room for a multi-homed, dual-stack client behind a VPN.
* Through a relay (``relayed``), loopback, link-local, multicast, unspecified and
  mDNS (``.local``) targets are never checked: none of them names the client as
  the relay or the transceiver can reach it, and each would make one of them send
  to an address that never asked (its own loopback, a neighbour on its own link,
  a multicast group, the broadcast address).  In direct mode (a client on the same host or link) they
  are its real addresses and stay.
"""

from __future__ import annotations

import ipaddress

from aioice import Candidate

from splitrelay.transceiver.limits import MAX_REMOTE_CANDIDATES

OVER_CAP = "over_cap"          # reasons a candidate is not checked (UdpMux.candidates_ignored keys)
NOT_ROUTABLE = "not_routable"
NOT_UDP = "not_udp"


def ignored_because(candidate: Candidate, checked: int, relayed: bool,
                    cap: int = MAX_REMOTE_CANDIDATES) -> str | None:
    """Why ``candidate`` is not to be checked (None: check it); ``checked``: how many of this ICE
    generation's candidates already are."""
    if candidate.transport.lower() != "udp":
        return NOT_UDP
    if relayed and not _reachable_through_relay(candidate.host):
        return NOT_ROUTABLE
    if checked >= cap:
        return OVER_CAP
    return None


def _reachable_through_relay(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False  # an mDNS name: it resolves only on the client's own link
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return not (addr.is_loopback or addr.is_link_local or addr.is_multicast or addr.is_unspecified
                or (addr.version == 4 and addr.is_reserved))  # 240/4, with 255.255.255.255
