"""Names of the data plane's per-CPU counters, read from their single definition.

``bpf/splitrelay.h`` lists every counter once in the ``SR_STATS`` X-macro; the
C enum and these Python names both come from that list, so adding a counter
is a one-line change that cannot drift between the two sides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from splitrelay.bpf import SOURCE_DIR

_ENTRY = re.compile(r'X\((\w+),\s*"(\w+)",\s*"(\w+)",\s*"(\w+)"\)')


@dataclass(frozen=True)
class CounterSpec:
    index: int
    name: str        # enum suffix, e.g. IN_FWD_FLOW
    direction: str   # ingress | egress
    verdict: str     # forwarded | dropped | passed
    reason: str


@dataclass
class Counter:
    spec: CounterSpec
    packets: int = 0
    bytes: int = 0


@lru_cache(maxsize=1)
def counter_specs() -> tuple[CounterSpec, ...]:
    header = (SOURCE_DIR / "splitrelay.h").read_text()
    start = header.index("#define SR_STATS(X)")
    block = header[start:header.index("#define SR_STAT_ENUM")]
    specs = tuple(
        CounterSpec(i, *match.groups()) for i, match in enumerate(_ENTRY.finditer(block))
    )
    if not specs:
        raise RuntimeError("no SR_STATS entries found in splitrelay.h")
    return specs


def sum_per_cpu(per_cpu_values) -> tuple[int, int]:
    """Sum one slot of the per-CPU stats array over all CPUs."""
    packets = bytes_ = 0
    for value in per_cpu_values:
        packets += value.packets
        bytes_ += value.bytes
    return packets, bytes_
