"""Which path the transceiver sends a session's media on, when the client's path changes.

aioice as the controlled agent sends on ``_nominated``, the pair the client last
nominated (USE-CANDIDATE).  That already follows a browser that moves to another
relay's candidate (issue 12, 3a): libwebrtc nominates the pair it switches to, and
aioice's ``check_incoming`` re-nominates on it, after a triggered check when the pair
is new (tests/test_failover.py shows it).  It does not follow a client whose path
changes *without* a nomination:

* a relay's public address moved to a standby relay (floating IP, 3b): the client
  sees no change and nominates nothing, but with address translation its packets
  now come from the standby relay's internal address and a new per-flow port;
* a client whose agent switches by sending media on a backup pair it already
  nominated once (renomination-less agents).

``PathFollower`` latches onto the client's new source address under two conditions,
both needed:

1. the pair to that address is *authenticated both ways*: it SUCCEEDED, i.e. our
   check to it was answered with MESSAGE-INTEGRITY under the client's password (the
   client's consent/binding request from the new address, itself checked under ours,
   is what makes aioice start that triggered check);
2. *media* (DTLS, RTP/RTCP; not STUN keepalives) arrives from it while the selected
   pair has been silent for ``FOLLOW_SILENCE``: a live selected path never loses the
   call to a backup pair's keepalives.

The mux routes a new address to a session only after a Binding Request naming its
ufrag, and a forged source cannot make our check to it succeed, so a spoofed
datagram never redirects a call's media.

It also *probes* a path that went silent: while we send media on the selected pair and
nothing has come from it for ``FOLLOW_SILENCE``, one consent check goes out on it (at most
every ``PROBE_EVERY``).  Where the relay's address floated to a standby (3b, relays that
only DNAT: the client's address is unchanged), that check crosses the standby, whose XDP
opens the flow from a backend's check, so the client's media flows again without waiting
for the client's own next check (Chromium's come ~5 s apart: the gap was that wait, 0.3-5 s,
measured in bench/failover.py).  A silent path costs one check a second; nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aioice.ice import CandidatePair, StunProtocol

log = logging.getLogger(__name__)

Address = tuple[str, int]
# A call sends 50 packets/s (Opus DTX: one every 400 ms at worst); 500 ms without a packet on the
# selected path while authenticated media arrives on another means the client moved.
FOLLOW_SILENCE = 0.5
PROBE_EVERY = 1.0            # at most one probe of a silent selected path per second
NOMINATED = "nominated"      # path change reasons (PathFollower.changes)
LATCHED = "latched"
RESTARTED = "restarted"


def is_media(data: bytes) -> bool:
    """DTLS (20..63) or RTP/RTCP (128..191), RFC 7983; STUN (0..3) is not media."""
    return bool(data) and (20 <= data[0] <= 63 or 128 <= data[0] <= 191)


class PathFollower:
    """Per session ICE connection: when each remote address was last heard, and the path changes."""

    def __init__(self, connection: Any, silence: float = FOLLOW_SILENCE) -> None:  # noqa: ANN401 - MuxedConnection
        self.connection = connection
        self.silence = silence
        self.last_heard: dict[Address, float] = {}
        self.last_media: dict[Address, float] = {}
        self.changes: list[tuple[float, str, Address]] = []   # (time.monotonic(), reason, remote address)
        self.on_change: Callable[[str, Address], None] | None = None
        self.probes = 0            # consent checks sent because the selected path went silent
        self._probed_at = -1e9

    def selected(self) -> CandidatePair | None:
        return self.connection._nominated.get(1)

    def heard(self, addr: Address, data: bytes) -> None:
        now = asyncio.get_running_loop().time()
        self.last_heard[addr] = now
        if is_media(data):
            self.last_media[addr] = now
            self._maybe_latch(addr, now)

    def sending(self) -> None:
        """We are about to send on the selected pair: probe it if the client has gone silent there."""
        selected = self.selected()
        password = self.connection.remote_password
        if selected is None or password is None:
            return
        now = asyncio.get_running_loop().time()
        heard = self.last_heard.get(selected.remote_addr)
        if heard is None or now - heard < self.silence or now - self._probed_at < PROBE_EVERY:
            return
        self._probed_at = now
        self.probes += 1
        request = self.connection.build_request(selected, nominate=False)
        probe = asyncio.ensure_future(selected.protocol.request(request, selected.remote_addr,
                                                                integrity_key=password.encode("utf8"),
                                                                retransmissions=0))
        probe.add_done_callback(lambda done: done.cancelled() or done.exception())  # unanswered is fine

    def check_completed(self, pair: CandidatePair, before: CandidatePair | None) -> None:
        """After aioice's check_complete (``before``: the selected pair until then): note a
        nomination that moved the media, or latch if this newly authenticated pair carries it."""
        after = self.selected()
        if before is not None and after is not None and after is not before:
            self.note(NOMINATED, after.remote_addr)
        elif pair.state == CandidatePair.State.SUCCEEDED:
            self._maybe_latch(pair.remote_addr, asyncio.get_running_loop().time())

    def note(self, reason: str, addr: Address) -> None:
        self.changes.append((time.monotonic(), reason, addr))
        log.info("ICE %s: media now goes to %s:%d (%s)", self.connection, addr[0], addr[1], reason)
        if self.on_change:
            self.on_change(reason, addr)

    def _maybe_latch(self, addr: Address, now: float) -> None:
        selected = self.selected()
        if selected is None or selected.remote_addr == addr:
            return
        if now - self.last_media.get(addr, -1e9) > self.silence:
            return  # no media from there lately: keepalives alone never move the call
        if now - self.last_heard.get(selected.remote_addr, -1e9) < self.silence:
            return  # the selected path is alive
        pair = next((p for p in self.connection._check_list
                     if p.remote_addr == addr and p.component == selected.component
                     and p.state == CandidatePair.State.SUCCEEDED), None)
        if pair is None:
            return  # not authenticated (yet): the triggered check's success calls back here
        self.connection._nominated[selected.component] = pair
        self.note(LATCHED, addr)


class MuxProtocol(StunProtocol):
    """aioice's StunProtocol, telling the session's PathFollower what it heard from where."""

    def datagram_received(self, data: bytes | str, addr: tuple[Any, ...]) -> None:
        self.receiver.paths.heard((addr[0], addr[1]), data)
        super().datagram_received(data, addr)
