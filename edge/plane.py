"""The contract between the edge agent and a data plane, and the planes' shared settings.

The agent, the control API and the metrics hold one ``DataPlane`` and never
ask which kind it is.  One file per plane implements it (STUNner's offload
engines are the model): ``xdp.plane.XdpPlane`` (the programs of
``bpf/relay.c``, state in pinned BPF maps that outlive the agent),
``userspace.plane.UserspacePlane`` (the same decisions on UDP sockets, state in
this process) and ``null_plane.NullPlane``, the default where no plane is given,
which holds nothing and relays nothing.

A plane owns its tables: the agent asks it to store, list, age and delete
entries, never how they are kept, so a plane may keep more than it shows
(translation state, reverse maps) as long as these promises hold.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from splitrelay import defaults
from splitrelay.edge.counters import Counter
from splitrelay.edge.records import (
    Attachment,
    Backend,
    DataPlaneError,
    Flow,
    RelayConfig,
    RelaySettings,
    Session,
    parse_ip,
)

# A pending flow (opened by a client's request) whose backend has not answered in this long is a
# spoofed or forged request's: it goes at the next ageing pass.  ICE answers in one round trip.
PENDING_TIMEOUT_S = 5.0


@dataclass(kw_only=True)
class PlaneConfig(RelaySettings):
    """What a plane is built with: the relay's settings (``records.RelaySettings``), its interfaces and
    tables, and the options only one plane reads (the others ignore them), each declared once."""

    public_iface: str
    internal_iface: str
    instance: str = defaults.INSTANCE
    max_flows: int | None = None            # flow table size (default: the plane's own)
    # xdp: it writes Ethernet headers, attaches programs and pins maps
    gateway_ip: str | None = None           # the public next hop, resolved to a MAC at setup
    gateway_mac: str | None = None          # ... or given
    gateway_timeout_s: float = 3.0
    neighbour_timeout_s: float = 1.5        # a backend PUT answers 422 before a 2 s client gives up
    mode: str = "auto"                      # auto | native | generic
    pin_root: str = defaults.PIN_ROOT
    detach_on_exit: bool = False
    port_quarantine_s: float = 60.0         # translate: a freed port waits longer than the idle timeout

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_flows is not None and self.max_flows < 1:
            raise DataPlaneError(f"flow table size must be >= 1, got {self.max_flows}")
        if self.gateway_ip is not None:
            parse_ip(self.gateway_ip)


@runtime_checkable
class DataPlane(Protocol):
    """One relay instance's forwarding, as the agent drives it."""

    kind: str
    """The name /metrics and /v1/health report for this plane ("xdp", "userspace")."""

    reads_block: bool
    """True when a whole-table read (flows, ageing, deletions) may take long and is safe on another
    thread: the agent then runs them in one walker thread.  False when the tables live on the event
    loop and must be read there."""

    attachments: Sequence[Attachment]
    """The interfaces this plane has put programs on; empty for a plane that attaches none."""

    # -- lifecycle ---------------------------------------------------------------------------

    def setup(self) -> str:
        """Make the relay ready to forward (blocking); returns the mode it runs in.

        Everything an operator can fix (a missing interface, an unresolvable next hop, a bad
        config) fails here with one line before anything is loaded, pinned, attached or bound.
        The relay's config is written before it forwards a packet."""

    def activate(self, loop: asyncio.AbstractEventLoop) -> str:
        """Begin forwarding on ``loop`` (once, after ``setup``); returns one line saying where."""

    def shutdown(self) -> None:
        """The agent is exiting.  A plane whose state lives in this process stops and forgets it; a
        plane whose state outlives the process keeps forwarding unless its options say to remove
        what this agent attached.  Shutting down a plane that never started is not an error."""

    def next_hop_mac(self, ip: str) -> str:
        """The destination MAC a backend at ``ip`` needs (blocking), or a one-line error when it
        cannot be reached.  A plane that writes no Ethernet headers answers ``NO_MAC``."""

    def internal_mac(self) -> str:
        """The relay's own MAC on the internal side (blocking; ``NO_MAC`` for a plane without one)."""

    # -- tables ------------------------------------------------------------------------------

    def configure(self, cfg: RelayConfig) -> None:
        """Write the relay's config; policy, allowance and hint key apply to the next packet."""

    def config(self) -> RelayConfig | None:
        """The config written last, or None before ``configure``."""

    def set_backend(self, backend: Backend) -> None:
        """Add or replace a backend; live flows of a replaced one follow it to its new address.
        A full table raises (``TableFullError`` or the kernel's error)."""

    def backend(self, backend_id: int) -> Backend | None:
        """One backend, or None."""

    def backends(self) -> list[Backend]:
        """Every backend, by id."""

    def del_backend(self, backend_id: int) -> bool:
        """Remove a backend with its sessions and every flow to it; False (not an error) when absent."""

    def set_session(self, ufrag: str, backend_id: int) -> None:
        """Route Binding Requests for ``ufrag`` to the backend; a bad ufrag raises DataPlaneError."""

    def session(self, ufrag: str) -> Session | None:
        """One session with the flows it holds of its allowance, or None."""

    def sessions(self) -> list[Session]:
        """Every session."""

    def del_sessions(self, ufrags: list[str]) -> dict[str, bool]:
        """Remove sessions and the flows they opened, in one pass; for each, whether it was there.
        Removing a session that is not there is not an error."""

    def del_session(self, ufrag: str) -> bool:
        """``del_sessions`` for one."""

    def flows(self, limit: int | None = None) -> list[Flow]:
        """The flows (at most ``limit``), in no particular order."""

    def flow(self, client: tuple[str, int]) -> Flow | None:
        """The flow of a client (ip, port), or None."""

    def del_flow(self, client: tuple[str, int]) -> bool:
        """Remove one flow and give its session the allowance back; False (not an error) when absent."""

    def age_flows(self, idle_s: float, pending_s: float = PENDING_TIMEOUT_S) -> int:
        """Remove every flow no client packet refreshed for ``idle_s``, and every pending one opened
        more than ``pending_s`` ago; returns how many went, and leaves each ufrag's allowance in use
        equal to its live confirmed flows."""

    def map_fill(self) -> dict[str, tuple[int, int]]:
        """(entries, capacity) of the backends, backend_addrs, sessions and flows tables."""

    def counters(self) -> dict[str, Counter]:
        """Every counter of SR_STATS by its enum name, in order; values never decrease until reset."""

    def reset_counters(self) -> None:
        """Set every counter to zero."""

