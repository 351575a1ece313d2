"""The plane that relays nothing: the default where no ``DataPlane`` (edge/plane.py) is given.

A control API or the metrics under test, or an agent being built, need a plane
to ask; this one answers every read with nothing and refuses every write in one
line, so a missing plane is never mistaken for an empty relay that accepted a write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from splitrelay.edge.counters import Counter, counter_specs
from splitrelay.edge.plane import PENDING_TIMEOUT_S
from splitrelay.edge.records import NO_MAC, Attachment, Backend, DataPlaneError, Flow, RelayConfig, Session


class NullPlane:
    """A plane that relays nothing: reads are empty, removals find nothing, writes are refused.

    The default where no plane is given (a control API or metrics under test, an agent
    being built); every write says in one line that there is no data plane.
    """

    kind = "none"
    reads_block = False
    attachments: Sequence[Attachment] = ()

    def _refuse(self) -> None:
        raise DataPlaneError("this relay has no data plane")

    def setup(self) -> str:
        return self.kind

    def activate(self, loop: asyncio.AbstractEventLoop) -> str:
        return "no data plane: nothing is forwarded"

    def shutdown(self) -> None:
        pass

    def next_hop_mac(self, ip: str) -> str:
        return NO_MAC

    def internal_mac(self) -> str:
        return NO_MAC

    def configure(self, cfg: RelayConfig) -> None:
        self._refuse()

    def config(self) -> RelayConfig | None:
        return None

    def set_backend(self, backend: Backend) -> None:
        self._refuse()

    def backend(self, backend_id: int) -> Backend | None:
        return None

    def backends(self) -> list[Backend]:
        return []

    def del_backend(self, backend_id: int) -> bool:
        return False

    def set_session(self, ufrag: str, backend_id: int) -> None:
        self._refuse()

    def session(self, ufrag: str) -> Session | None:
        return None

    def sessions(self) -> list[Session]:
        return []

    def del_sessions(self, ufrags: list[str]) -> dict[str, bool]:
        return {ufrag: False for ufrag in ufrags}

    def del_session(self, ufrag: str) -> bool:
        return False

    def flows(self, limit: int | None = None) -> list[Flow]:
        return []

    def flow(self, client: tuple[str, int]) -> Flow | None:
        return None

    def del_flow(self, client: tuple[str, int]) -> bool:
        return False

    def age_flows(self, idle_s: float, pending_s: float = PENDING_TIMEOUT_S) -> int:
        return 0

    def map_fill(self) -> dict[str, tuple[int, int]]:
        return {name: (0, 0) for name in ("backends", "backend_addrs", "sessions", "flows")}

    def counters(self) -> dict[str, Counter]:
        return {spec.name: Counter(spec) for spec in counter_specs()}

    def reset_counters(self) -> None:
        pass
