"""ICE restart through the XDP relay: an aiortc caller in the client namespace restarts onto a new
local port (a new network, as a mobile client after a handover) with a WHIP PATCH."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest

from splitrelay.lab.stack import start_lab, stop_lab
from splitrelay.tokens import TOKEN_ENV
from splitrelay.lab.topology import Lab

from .conftest import needs_root

pytestmark = [needs_root, pytest.mark.lab]


@pytest.fixture(scope="module")
def restart_lab():
    info = start_lab(transceivers=1, handler="echo")
    try:
        yield Lab.load(info["name"]), info
    finally:
        stop_lab(info["name"])


def test_an_ice_restart_through_xdp_moves_media_to_the_new_port(restart_lab):
    lab, info = restart_lab
    argv = [sys.executable, "-m", "splitrelay.client.ice_restart", info["whip_url"], lab.client.ip4, "3"]
    proc = lab.popen(lab.client.netns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                     env={**os.environ, TOKEN_ENV: info["whip_token"]})
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err.strip().splitlines()[-3:]
    runs = json.loads(out)
    media = [r["media_ms"] for r in runs]
    print(f"ICE restart through XDP, PATCH to first media on the new port: median {statistics.median(media):.0f} "
          f"ms, worst {max(media):.0f} ms ({runs})")
    assert len(runs) == 3 and all(r["nominated_ms"] > 0 and r["media_ms"] > 0 for r in runs)
