"""The voice path through the relay on a bad client link: 2 % loss and 20 ms jitter (lab/impair.py).

Behaviour, not timing: the call keeps its audio (the carrier comes back in nearly every
frame), every loss is concealed and counted on the side that suffered it, and the
buffer's measured jitter is reported.  The numbers live in BENCHMARKS.md
(``python -m splitrelay.bench.audio --impaired``).
"""

from __future__ import annotations

import pytest

from splitrelay.bench.audio import call_through_lossy_lab
from splitrelay.lab.impair import Impairment

from .conftest import needs_root

pytestmark = [needs_root, pytest.mark.lab, pytest.mark.timeout(240)]


def test_audio_keeps_playing_through_loss_and_jitter_and_every_loss_is_concealed_and_counted():
    call = call_through_lossy_lab(8.0, Impairment(delay_ms=20, jitter_ms=20, loss=0.02, seed=5))
    report, server = call["report"], call["server"]
    assert report["ok"], report["error"]
    assert report["packets_lost_uplink"] >= 1 and report["packets_lost_downlink"] >= 1   # the link did drop
    # each side concealed what it lost (a late packet concealed and dropped counts too), and said so
    assert server["frames_concealed"] >= report["packets_lost_uplink"] - server["frames_late"]
    assert report["frames_concealed"] >= 1
    assert call["concealed_metric"] == server["frames_concealed"]        # and Prometheus counts them too
    # the echo kept playing: the carrier came back at level in at least 90 % of the frames sent
    assert report["audio_loss"] is not None and report["audio_loss"] <= 0.10
    assert server["receive_jitter_ms"] > 0 and server["stages"]["in_to_out"]["n"] > 100
