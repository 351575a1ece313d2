"""ICE restart (RFC 8445 section 9) for an aioice ``Connection``, which has none.

A restart is a new ICE *generation* on the same Connection object: new local
credentials, the old generation's pairs and remote candidates forgotten, checks
run again against the peer's new credentials and candidates.  Everything above
the Connection (aiortc's RTCIceTransport, the DTLS association, SRTP keys, the
SCTP association) keeps running, because it only ever calls ``send``/``recv``,
which follow ``_nominated``.  The old selected pair keeps carrying media until the
new generation nominates a pair (RFC 8445 9: "media continues to flow on the
previously selected pair"), so a restart on a path that still works has no gap.

Used by both roles: the transceiver (controlled, transceiver/ice.py) and the
WHIP client's restart helper (controlling, client/ice_restart.py); it imports
aioice only.  The internals it touches are listed in transceiver/mux.py
(``CONNECTION_ATTRIBUTES``) and pinned by tests/test_ice_internals.py.
"""

from __future__ import annotations

import asyncio
import secrets

from aioice import Candidate
from aioice.ice import CandidatePair, Connection, validate_password, validate_username

from splitrelay.errors import SplitrelayError

CHECK_PACING = 0.02  # s between new checks, aioice's own Ta (connect())


class IceRestartFailed(SplitrelayError):
    """The new generation found no working pair in time (the old pair, if alive, still carries media)."""


def new_credentials(ufrag_chars: int = 8) -> tuple[str, str]:
    """A random ufrag and a 144-bit password of ice-chars."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    return ("".join(secrets.choice(alphabet) for _ in range(ufrag_chars)),
            "".join(secrets.choice(alphabet) for _ in range(24)))


def begin_generation(connection: Connection, ufrag: str, password: str) -> None:
    """Switch to new local credentials and forget the old generation's pairs (not the selected one)."""
    validate_username(ufrag)
    validate_password(password)
    for pair in connection._check_list:
        if pair.task is not None:
            pair.task.cancel()
    connection._local_username = ufrag
    connection._local_password = password
    connection._check_list = []
    connection._remote_candidates = []
    connection._remote_candidates_end = False
    connection._nominating = set()
    connection._check_list_done = False
    connection._check_list_state = asyncio.Queue()


async def run_generation(connection: Connection, remote_ufrag: str, remote_password: str,
                         candidates: list[Candidate], timeout: float = 10.0,
                         local: list[Candidate] | None = None) -> CandidatePair:
    """Check the new generation's pairs until one is nominated (by us when controlling, aioice's
    aggressive nomination; by the peer's USE-CANDIDATE when controlled); returns that pair.
    ``local``: pair only these local candidates (a new network's), not every socket we have:
    aioice pairs all of them, and a controlling agent's late nomination of an old socket's pair
    moved a lab call back to the old network 500 ms after its restart."""
    connection.remote_username = remote_ufrag
    connection.remote_password = remote_password
    for candidate in candidates:
        await connection.add_remote_candidate(candidate)
    await connection.add_remote_candidate(None)
    if local is not None:
        connection._check_list[:] = [p for p in connection._check_list if p.local_candidate in local]
    connection.sort_check_list()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        nominated = next((p for p in connection._check_list
                          if p.nominated and p.state == CandidatePair.State.SUCCEEDED), None)
        if nominated is not None:
            return nominated
        if connection._closing:
            raise IceRestartFailed("the connection closed during the ICE restart")
        states = {p.state for p in connection._check_list}
        if connection._check_list and states == {CandidatePair.State.FAILED}:
            raise IceRestartFailed("every candidate pair of the new ICE generation failed")
        if loop.time() > deadline:
            raise IceRestartFailed(f"no pair of the new ICE generation nominated within {timeout:g} s")
        pending = next((p for p in connection._check_list if p.state == CandidatePair.State.WAITING), None) or \
            next((p for p in connection._check_list if p.state == CandidatePair.State.FROZEN), None)
        if pending is not None:
            connection.check_start_task(pending)
        await asyncio.sleep(CHECK_PACING)
