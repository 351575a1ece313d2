"""The aioice/aiortc internals the transceiver relies on, named one by one.

The mux (transceiver/mux.py), the ICE seam (transceiver/ice.py) and ICE restart
reach into aioice's ``Connection`` and aiortc's ``RTCIceTransport``.  pyproject.toml
pins both; this test is what fails in CI when someone moves the pin and an internal
moved with it, instead of every call failing in production.
"""

from __future__ import annotations

import importlib.metadata

import aioice
import aiortc.rtcicetransport
import pytest
from aioice.ice import CandidatePair, Connection, StunProtocol

from splitrelay.transceiver import mux
from splitrelay.transceiver.mux import MuxError, check_aioice, missing_internals


def test_the_installed_aioice_and_aiortc_are_the_pinned_ones():
    assert aioice.__version__.startswith("0.13.")
    assert importlib.metadata.version("aiortc").startswith("1.16.")


@pytest.mark.parametrize("name", [
    "_protocols",            # the StunProtocols pairing, checks, consent and close() walk
    "_nominated",            # the selected pair per component: where media goes (following a switch)
    "_check_list",           # pairs, reset by an ICE restart
    "_check_list_done",
    "_check_list_state",
    "_closing",              # tells aioice's own consent-expiry close from ours
    "_query_consent_task",
    "_remote_candidates",
    "_remote_candidates_end",
    "_local_username",       # replaced by an ICE restart
    "_local_password",
    "_nominating",
    "_early_checks_done",
])
def test_aioice_connection_still_has(name):
    assert hasattr(Connection(ice_controlling=False), name)


@pytest.mark.parametrize("name", [
    "get_component_candidates", "check_incoming", "check_start_task", "check_complete", "_find_pair",
    "request_received", "sort_check_list", "_pair_remote_candidate", "_check_list_maybe_fail",
])
def test_aioice_connection_still_has_method(name):
    assert callable(getattr(Connection, name))


def test_aioice_stun_protocol_and_candidate_pair_keep_their_shape():
    assert "local_candidate" in StunProtocol.__annotations__
    assert callable(StunProtocol.datagram_received) and callable(StunProtocol.request)
    assert CandidatePair.State.SUCCEEDED and "protocol" in CandidatePair.__init__.__code__.co_names


def test_aiortc_still_builds_its_ice_connection_by_the_name_we_swap():
    assert hasattr(aiortc.rtcicetransport, "Connection")
    assert "_connection" in aiortc.rtcicetransport.RTCIceTransport.__init__.__code__.co_names


def test_the_runtime_guard_agrees_and_names_what_is_missing(monkeypatch):
    assert missing_internals() == []
    check_aioice()
    monkeypatch.setattr(mux, "CONNECTION_ATTRIBUTES", mux.CONNECTION_ATTRIBUTES + ("_renamed_in_a_future_aioice",))
    with pytest.raises(MuxError) as exc:
        check_aioice()
    assert str(exc.value) == (f"aioice {aioice.__version__} lacks Connection._renamed_in_a_future_aioice; "
                              "the transceiver's mux needs aioice 0.13")
