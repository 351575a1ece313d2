"""Where labs are recorded on the host: one JSON file per lab, and the files that live beside it.

A lab is recorded before anything is built, so ``splitrelay lab down``/``status`` from
another process, or a half-built lab, can always be found and torn down.  What a lab
keeps beside its record (secrets, daemon logs, impairment configs, a floated address)
is named ``<lab name>-<what>`` and goes with the lab.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from splitrelay.lab.netns import LabError

STATE_DIR = Path(os.environ.get("SPLITRELAY_LAB_DIR", "/run/splitrelay/labs"))


def record(name: str) -> Path:
    return STATE_DIR / f"{name}.json"


def claim(name: str, data: dict[str, Any]) -> bool:
    """Record a new lab under ``name`` unless one is (an exclusive create: runs may overlap)."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(record(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    return True


def write(name: str, data: dict[str, Any]) -> None:
    """Replace a lab's record at once (a reader never sees half of it)."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = STATE_DIR / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(record(name))


def read(name: str) -> dict[str, Any]:
    path = record(name)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LabError(f"no lab named {name!r} is up") from None
    except json.JSONDecodeError as exc:
        raise LabError(f"lab state {path} is unreadable: {exc}") from None


def names() -> list[str]:
    """Every lab recorded here."""
    if not STATE_DIR.exists():
        return []
    return sorted(p.stem for p in STATE_DIR.glob("*.json"))
