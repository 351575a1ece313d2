"""Where labs are recorded on the host: one JSON file per lab, and the files that live beside it.

A lab is recorded before anything is built, so ``splitrelay lab down``/``status`` from
another process, or a half-built lab, can always be found and torn down.  What a lab
keeps beside its record (secrets, daemon logs, impairment configs, a floated address)
is named ``<lab name>-<what>`` and goes with the lab.
"""

from __future__ import annotations

import os
from pathlib import Path

STATE_DIR = Path(os.environ.get("SPLITRELAY_LAB_DIR", "/run/splitrelay/labs"))
