"""A peer connection's state changes with their times: one helper for both ends of a call.

The transceiver's session and the probe (a client) each record every ICE, DTLS,
peer-connection and gathering state change, to show an operator (or a benchmark)
how a call came up and how it ended.  Both keep them here, so the two records read
the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

KINDS = ("ice", "dtls", "connection", "gathering")


@dataclass(frozen=True)
class StateChange:
    at_ms: float   # since the history's origin
    kind: str      # "ice", "dtls", "connection" or "gathering"
    state: str


class StateHistory:
    """States per kind, each starting at "new", and every change in order with its time since ``origin``
    (``time.monotonic()``)."""

    def __init__(self, origin: float | None = None) -> None:
        self.origin = time.monotonic() if origin is None else origin
        self.states: dict[str, list[str]] = {kind: ["new"] for kind in KINDS}
        self.changes: list[StateChange] = []

    def since_origin_ms(self) -> float:
        return (time.monotonic() - self.origin) * 1000.0

    def record(self, kind: str, state: str) -> float | None:
        """Note ``kind`` is now ``state``; the change's time in ms, or None when it is no change."""
        states = self.states[kind]
        if states[-1] == state:
            return None
        states.append(state)
        at_ms = round(self.since_origin_ms(), 3)
        self.changes.append(StateChange(at_ms, kind, state))
        return at_ms

    def reached(self, kind: str, *states: str) -> bool:
        return any(state in self.states[kind] for state in states)
