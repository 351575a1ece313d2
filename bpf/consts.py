"""The numbers C and Python share, read once from their single definition, ``bpf/splitrelay.h``.

Every ``#define SR_<NAME> <integer>`` of the header becomes ``<NAME>`` here
(``SR_UFRAG_MAX`` -> ``UFRAG_MAX``), so a limit changed in the header changes
for the agent, the wire parsers, the userspace relay and the CLI at once.  The
counter list (the ``SR_STATS`` X-macro) is read by ``edge/counters.py``; the
routing policies are every ``SR_POLICY_<NAME>`` (``Policy``), so a policy added
to the header is a name the CLI offers and the agent writes, with no string to
keep in step.
"""

from __future__ import annotations

import re
from enum import StrEnum
from functools import lru_cache

from splitrelay.bpf import SOURCE_DIR

HEADER = SOURCE_DIR / "splitrelay.h"
_DEFINE = re.compile(r"^\s*#define\s+SR_(\w+)\s+(0x[0-9A-Fa-f]+|\d+)\b", re.MULTILINE)


@lru_cache(maxsize=1)
def defines() -> dict[str, int]:
    """Every integer ``#define SR_*`` of splitrelay.h, without the ``SR_`` prefix."""
    found = {name: int(value, 0) for name, value in _DEFINE.findall(HEADER.read_text())}
    if "UFRAG_MAX" not in found:
        raise RuntimeError(f"no SR_* integer defines found in {HEADER}")
    return found


_D = defines()
UFRAG_MIN: int = _D["UFRAG_MIN"]
UFRAG_MAX: int = _D["UFRAG_MAX"]
STUN_MAX_ATTRS: int = _D["STUN_MAX_ATTRS"]
STUN_MAX_MSG: int = _D["STUN_MAX_MSG"]
MAX_BACKENDS: int = _D["MAX_BACKENDS"]
MAX_SESSIONS: int = _D["MAX_SESSIONS"]
MAX_FLOWS: int = _D["MAX_FLOWS"]           # the default; the agent may compile a smaller table
DEFAULT_SESSION_FLOWS: int = _D["DEFAULT_SESSION_FLOWS"]
PENDING_FLOWS: int = _D["PENDING_FLOWS"]         # pending flows one ufrag may hold (a ring: oldest replaced)
MAX_TX_PORTS: int = _D["MAX_TX_PORTS"]
PORT_SLOTS: int = _D["PORT_SLOTS"]               # translation: reverse slots per address set, one per port
MAX_XLATE_ADDRS: int = _D["MAX_XLATE_ADDRS"]     # translation: internal addresses per family, at most
XLATE_PORT_MIN: int = _D["XLATE_PORT_MIN"]       # translation: the default range of flow ports
XLATE_PORT_MAX: int = _D["XLATE_PORT_MAX"]
FAMILY_V4: int = _D["FAMILY_V4"]
FAMILY_V6: int = _D["FAMILY_V6"]
BACKEND_V4: int = _D["BACKEND_V4"]       # sr_backend.flags
BACKEND_V6: int = _D["BACKEND_V6"]
# sr_config.policy: each SR_POLICY_<NAME> of the header, by its lower-case name ("strict": 0, ...)
POLICIES: dict[str, int] = {name[len("POLICY_"):].lower(): value for name, value in _D.items()
                            if name.startswith("POLICY_")}
# a policy by name: Policy.STRICT == "strict" (a str, so JSON, the CLI and health read it unchanged)
Policy = StrEnum("Policy", [(name.upper(), name) for name in POLICIES])
HINT_V1: int = _D["HINT_V1"]
HINT_V2: int = _D["HINT_V2"]
HINT_V1_LEN: int = _D["HINT_V1_LEN"]
HINT_ID_BITS: int = _D["HINT_ID_BITS"]
HINT_MSG_LEN: int = _D["HINT_MSG_LEN"]
MAX_BACKEND_ID: int = (1 << HINT_ID_BITS) - 1   # a backend id is what a routing hint can carry
