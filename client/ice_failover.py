"""What a browser does when its relay dies, for aiortc callers (aioice never switches pairs).

libwebrtc keeps backup pairs alive, marks the selected pair unwritable after about
5 s without answers, and switches to the best writable backup, nominating it
(USE-CANDIDATE on its checks).  ``switch_to`` is that switch, done on demand: a
nominating check on the pair to ``remote`` (another relay's candidate), after which
the caller's media goes there.  The detection delay is the browser's business; the
tests measure what the transceiver does once the client has switched.
"""

from __future__ import annotations

import asyncio

from aioice.ice import CandidatePair, Connection


def nominate_like_a_browser(connection: Connection) -> None:
    """From now on the caller nominates only the pair it switches to (``switch_to``).

    aioice's controlling agent nominates aggressively: every check it sends, triggered
    ones included, carries USE-CANDIDATE, so a keepalive on a backup pair would move the
    call.  Browsers nominate only their selected pair.  aioice has no switch for that;
    telling it the peer is ICE-lite and that a nomination is under way stops both of its
    nomination paths (check_start)."""
    connection.remote_is_lite = True
    connection._nominating.add(1)  # noqa: SLF001


async def keep_alive(connection: Connection, remote: tuple[str, int]) -> None:
    """One non-nominating check on the pair to ``remote``, as a browser keeps a backup pair alive."""
    candidate = _remote_candidate(connection, remote)
    protocol = next(p for p in connection._protocols if p.local_candidate.can_pair_with(candidate))  # noqa: SLF001
    request = connection.build_request(CandidatePair(protocol, candidate), nominate=False)
    await protocol.request(request, remote, integrity_key=connection.remote_password.encode("utf8"))


def _remote_candidate(connection: Connection, remote: tuple[str, int]):  # noqa: ANN202
    candidate = next((c for c in connection._remote_candidates  # noqa: SLF001
                      if (c.host, c.port) == remote and c.component == 1), None)
    if candidate is None:
        raise ValueError(f"no remote candidate at {remote[0]}:{remote[1]}")
    return candidate


async def switch_to(connection: Connection, remote: tuple[str, int], timeout: float = 5.0,
                    local_host: str | None = None) -> CandidatePair:
    """Nominate the pair to the remote candidate at ``remote`` and send on it from now on;
    ``local_host``: from that local address (the one on the backup relay's network)."""
    candidate = _remote_candidate(connection, remote)
    protocol = next(p for p in connection._protocols  # noqa: SLF001
                    if p.local_candidate.can_pair_with(candidate)
                    and local_host in (None, p.local_candidate.host))
    pair = connection._find_pair(protocol, candidate) or CandidatePair(protocol, candidate)  # noqa: SLF001
    if pair not in connection._check_list:  # noqa: SLF001 - aioice dropped unchecked pairs at nomination
        connection._check_list.append(pair)  # noqa: SLF001
    pair.state, pair.nominated, pair.task = CandidatePair.State.WAITING, False, None
    lite = connection.remote_is_lite
    connection.remote_is_lite = False  # controlling + aggressive nomination: USE-CANDIDATE
    try:
        connection.check_start_task(pair)
        await asyncio.wait_for(asyncio.shield(pair.task), timeout)
    finally:
        connection.remote_is_lite = lite
    if connection._nominated.get(1) is not pair:  # noqa: SLF001
        raise ConnectionError(f"the pair to {remote[0]}:{remote[1]} did not answer its nominating check")
    return pair
