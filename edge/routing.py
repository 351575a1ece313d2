"""Where a client's packet at the relay port goes: the routing decision, once, as a pure function.

This is the specification ``xdp_public`` (``bpf/relay.c``) implements in the
kernel: the userspace relay runs it for every STUN packet, and the
differential fuzz (tests/xdp/test_differential.py) checks the XDP program
against exactly this function.  It takes what the relay knows when a datagram
arrives (its payload, its address family, the client's current flow and
whether the flow table has room) and the tables (sessions, backends, policy,
hint key, per-session allowance), and returns the counter the packet lands in
and, when it is forwarded, the backend and the server ufrag of its flow.

Order of the checks, as in C: RFC 7983 class by the first byte; a Binding
Request by its server ufrag (the session table, else a routing hint: forged,
unknown, unregistered backend, wrong policy), then the client's flow
(refreshed when it already goes to that backend; a confirmed flow of another
backend is never moved: ``flow_takeover``), the ufrag's allowance of confirmed
flows and the table's room for a new flow, the backend's address family;
every other packet by the client's flow, where a pending flow (one its
backend has not answered yet) carries STUN only.  A new flow is pending; the
plane confirms it when the backend answers (``wire.stun.confirms_flow``).  What only a
plane can see (a socket it cannot open, a redirect the kernel refuses) it
counts itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from splitrelay import defaults
from splitrelay.bpf import consts
from splitrelay.bpf.consts import Policy
from splitrelay.edge.counters import counter_specs
from splitrelay.edge.records import Backend, Session
from splitrelay.wire.hint import FORGED
from splitrelay.wire.hint import inspect as hint_inspect
from splitrelay.wire.stun import StunError, server_ufrag

# a StunError's reason is its counter's reason (wire/stun.py mirrors relay.c)
STUN_DROP = {spec.reason: spec.name for spec in counter_specs()
             if spec.direction == "ingress" and spec.verdict == "dropped"}


@dataclass(frozen=True)
class Decision:
    counter: str                  # the SR_STATS name the packet is counted under
    backend_id: int | None = None  # the backend it is forwarded to; None: dropped
    ufrag: str | None = None      # the server ufrag its flow is (re)opened under; None: routed by flow
    opens_flow: bool = False      # the client gets a new pending flow (or its pending flow moves elsewhere)

    @property
    def forwarded(self) -> bool:
        return self.backend_id is not None


@dataclass
class RoutingTables:
    """What the decision reads.  The userspace relay holds one over its own dicts (so it is always
    current); ``snapshot`` reads any plane's through the DataPlane calls."""

    sessions: Mapping[str, Session] = field(default_factory=dict)
    backends: Mapping[int, Backend] = field(default_factory=dict)
    session_flows: Mapping[str, int] = field(default_factory=dict)   # ufrag -> its confirmed flows
    policy: Policy = defaults.POLICY
    hint_key: bytes | None = None
    max_session_flows: int = defaults.SESSION_FLOWS          # 0 = unlimited

    @classmethod
    def snapshot(cls, plane) -> RoutingTables:
        """The tables of a configured ``DataPlane`` as they are now."""
        cfg = plane.config()
        sessions = {s.ufrag: s for s in plane.sessions()}
        return cls(sessions=sessions, backends={b.backend_id: b for b in plane.backends()},
                   session_flows={u: s.flows for u, s in sessions.items()}, policy=cfg.policy,
                   hint_key=cfg.hint_key, max_session_flows=cfg.max_session_flows)


def _has_family(backend: Backend, family: int) -> bool:
    return (backend.ip6 if family == consts.FAMILY_V6 else backend.ip4) is not None


def route(payload: bytes, tables: RoutingTables, *, family: int = consts.FAMILY_V4,
          flow_backend: int | None = None, flow_pending: bool = False, flows_full: bool = False,
          ports_empty: bool = False) -> Decision:
    """The decision for one datagram from a client to the relay port (module docstring).

    ``flow_backend`` is the backend of the client's (ip, port) flow, None without one, and
    ``flow_pending`` whether that flow still waits for its backend's answer; ``flows_full`` says
    the flow table has no room for a new entry; ``ports_empty`` that a translating relay has no
    free flow port (checked first: the port is taken before the entry).
    """
    if not payload:
        return Decision("IN_DROP_UNKNOWN_CLASS")
    first = payload[0]
    if first <= 3:                                   # STUN
        try:
            ufrag = server_ufrag(payload)
        except StunError as exc:
            return Decision(STUN_DROP[exc.reason])
        if ufrag is not None:
            return _binding_request(ufrag, tables, family, flow_backend, flow_pending, flows_full, ports_empty)
    elif not (20 <= first <= 63 or 128 <= first <= 191):
        return Decision("IN_DROP_UNKNOWN_CLASS")     # ZRTP, TURN ChannelData, unassigned
    if flow_backend is None:                         # DTLS, RTP/RTCP, other STUN: by flow
        return Decision("IN_DROP_NO_FLOW")
    if flow_pending and first > 3:                   # no media before the backend answered
        return Decision("IN_DROP_PENDING")
    backend = tables.backends.get(flow_backend)
    if backend is None:
        return Decision("IN_DROP_NO_BACKEND")
    if not _has_family(backend, family):
        return Decision("IN_DROP_FAMILY")
    return Decision("IN_FWD_FLOW", flow_backend)


def _binding_request(ufrag: str, tables: RoutingTables, family: int, flow_backend: int | None,
                     flow_pending: bool, flows_full: bool, ports_empty: bool = False) -> Decision:
    session = tables.sessions.get(ufrag)
    if session is not None:
        backend_id, counter = session.backend_id, "IN_FWD_STUN_UFRAG"
    else:
        hinted = hint_inspect(ufrag, tables.hint_key)
        if hinted == FORGED:
            return Decision("IN_DROP_FORGED_HINT")
        if not hinted:
            return Decision("IN_DROP_UNKNOWN_UFRAG")
        if hinted not in tables.backends:
            return Decision("IN_DROP_NO_BACKEND")   # a hint naming an unknown backend: in any policy
        if tables.policy != Policy.HINT:
            return Decision("IN_DROP_UNKNOWN_UFRAG")
        backend_id, counter = hinted, "IN_FWD_STUN_HINT"
    backend = tables.backends.get(backend_id)
    if backend is None:
        return Decision("IN_DROP_NO_BACKEND")
    if flow_backend == backend_id:                   # a consent check (or an ICE restart): refresh
        if not _has_family(backend, family):
            return Decision("IN_DROP_FAMILY")
        return Decision(counter, backend_id, ufrag)
    if flow_backend is not None and not flow_pending:
        return Decision("IN_DROP_TAKEOVER")          # a confirmed flow stays with its backend
    if flow_backend is None and tables.max_session_flows and \
            tables.session_flows.get(ufrag, 0) >= tables.max_session_flows:
        return Decision("IN_DROP_SESSION_FLOWS")     # the ufrag's confirmed flows fill its allowance
    if flow_backend is None and ports_empty:
        return Decision("IN_DROP_PORT_POOL_EMPTY")   # translating: refused, no live flow is evicted
    if flow_backend is None and flows_full:
        return Decision("IN_DROP_FLOW_FULL")         # refused: no live flow is ever evicted
    if not _has_family(backend, family):
        return Decision("IN_DROP_FAMILY")            # (XDP has made the flow by then; no packet passes)
    return Decision(counter, backend_id, ufrag, opens_flow=True)


@dataclass(frozen=True)
class PortHolder:
    """Translation: the flow holding an internal (address set, port) pair, as its reverse slot and its
    flow entry say."""

    client: tuple[str, int]       # the client's (ip, port)
    backend_id: int
    flow_pair: int | None         # the pair the client's flow entry names; None: the entry is gone


def route_reply(src: tuple[str, int], dst: tuple[str, int], *, internal_ips: Sequence[str | None],
                ports: tuple[int, int], holders: Mapping[int, PortHolder], backends: Mapping[int, Backend],
                has_public_ip: bool = True) -> Decision:
    """What a translating relay does with a packet on its internal side (``reply_translated`` in relay.c).

    ``internal_ips`` are the relay's internal addresses of the packet's family, one per address set
    (index = set), ``ports`` the flow-port range, ``holders`` the allocated pairs ((set << 16) | port).
    Not for a relay's (internal address, a port of the range): the host's own (passed).  A pair no
    flow holds, or a sender that is not the holder's backend (address and port), is dropped: the
    internal side opens nothing.  A backend's packet (from its mux address and port) to anywhere
    but the relay is dropped (``no_flow``); one to the relay outside the range passes (``relay_address``).
    """
    sets = [i for i, ip in enumerate(internal_ips) if ip is not None and ip == dst[0]]
    from_a_backend = any(src == ((b.ip6 if ":" in src[0] else b.ip4), b.port) for b in backends.values())
    if not sets or not ports[0] <= dst[1] <= ports[1]:
        if not from_a_backend:
            return Decision("OUT_PASS_OTHER")
        return Decision("OUT_PASS_LOCAL" if sets else "OUT_DROP_NO_FLOW")
    pair = (sets[0] << 16) | dst[1]
    holder = holders.get(pair)
    if holder is None or (":" in holder.client[0]) != (":" in dst[0]):
        return Decision("OUT_DROP_UNALLOCATED_PORT")
    backend = backends.get(holder.backend_id)
    if backend is None or src != ((backend.ip6 if ":" in src[0] else backend.ip4), backend.port):
        return Decision("OUT_DROP_NOT_FLOW_BACKEND")
    if holder.flow_pair != pair:
        return Decision("OUT_DROP_UNALLOCATED_PORT")
    if not has_public_ip:
        return Decision("OUT_DROP_FAMILY")
    return Decision("OUT_FWD", holder.backend_id)
