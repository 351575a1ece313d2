"""``MuxedConnection``: the aioice Connection of a session on the transceiver's one-port mux (mux.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from aioice import Candidate, stun
from aioice.candidate import candidate_foundation, candidate_priority
from aioice.ice import CandidatePair, Connection, StunProtocol

from splitrelay.transceiver.candidates import ignored_because
from splitrelay.transceiver.dtls_role import FirstFlightResender
from splitrelay.transceiver.mux import Address, MuxTransport, UdpMux
from splitrelay.transceiver.paths import MuxProtocol, PathFollower
from splitrelay.transceiver.relays import TcpAddress


class MuxedConnection(Connection):
    """An aioice Connection whose only candidates are the public candidates, all on the mux."""

    def __init__(self, *args: Any, mux: UdpMux,  # noqa: ANN401
                 public_candidates: Sequence[tuple[Address, int]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mux = mux
        # (address, ICE local preference) of this session's candidates; default: the mux's, in order
        self.public_candidates = list(public_candidates or [])
        self.consent_expired = False  # closed by aioice's own consent check (RFC 7675), not by us
        self._consent_running = False
        self.paths = PathFollower(self)  # follows the client to a new path (paths.py)
        self._candidates_generation: str | None = None  # local ufrag the count below is for
        self._candidates_checked = 0                    # remote candidates let through in that generation
        self._client_heard = asyncio.Event()  # the client's first check authenticated: ours may start
        self.first_flight = FirstFlightResender(lambda data: self.sendto(data, 1))  # dtls_role.py

    def check_incoming(self, message: Any, addr: tuple[str, int], protocol: StunProtocol) -> None:  # noqa: ANN401
        """aioice's, plus RFC 8445 7.3.1.4: a check received on a pair whose own check is In-Progress
        retransmits that check at once.  aioice waits for its 500 ms RTO instead; in the lab the
        transceiver's first check of a new ICE generation was lost (it left before the client's
        new flow existed) and every restart took 530 ms instead of ~50 ms."""
        super().check_incoming(message, addr, protocol)
        if "USE-CANDIDATE" in message.attributes and not self.ice_controlling:
            self.first_flight.nomination()
        pair = next((p for p in self._check_list if p.protocol is protocol and p.remote_addr == addr), None)
        if pair is not None and pair.state == CandidatePair.State.IN_PROGRESS and pair.task is not None:
            pair.task.cancel()
            pair.task = None
            pair.state = CandidatePair.State.WAITING
            self.check_start_task(pair)

    async def sendto(self, data: bytes, component: int) -> None:
        self.paths.sending()   # probes a selected path gone silent (paths.py)
        self.first_flight.sent(data)
        await super().sendto(data, component)

    def data_received(self, data: bytes, component: int) -> None:
        self.first_flight.received(data)
        super().data_received(data, component)

    def check_complete(self, pair: CandidatePair) -> None:
        """aioice's, plus: the first valid pair is selected at once, before the client nominates one
        (RFC 8445 12.1: an agent MAY send data on any valid pair before selected pairs exist); the
        client's nomination, when it comes, moves the call there as before.  aioice waits for the
        nomination, and aiortc starts DTLS only then.  libdatachannel (libjuice) nominates only once
        no higher-priority pair is still being checked, else after 2 s (its NOMINATION_TIMEOUT): one
        dead pair (the relay's IPv6 address, which the lab's IPv4-only transceiver never answers) held
        every libdatachannel call's DTLS 2.0 s after its ICE was connected (17 of 20 runs)."""
        if pair.state == CandidatePair.State.SUCCEEDED:  # our check, answered under the client's password
            self.mux.bind_address(pair.remote_addr, pair.protocol)
        before = self._nominated.get(pair.component)
        super().check_complete(pair)
        if (not self.ice_controlling and pair.state == CandidatePair.State.SUCCEEDED
                and pair.component not in self._nominated and not self._check_list_done):
            self._nominated[pair.component] = pair
            self._check_list_maybe_complete()
        self.paths.check_completed(pair, before)

    def request_received(self, message: Any, addr: tuple[str, int], protocol: StunProtocol) -> None:  # noqa: ANN401
        """aioice's, and a request it authenticates (RFC 8489 9.1.3: USERNAME and MESSAGE-INTEGRITY
        under our password) binds its address to this session on the mux; nothing else does."""
        attributes = message.attributes
        authentic = (not self._closing and message.message_method == stun.Method.BINDING
                     and "USERNAME" in attributes and "MESSAGE-INTEGRITY" in attributes
                     and self._valid_username(attributes["USERNAME"])
                     and message.check_message_integrity(self.local_password.encode("utf8")))
        super().request_received(message, addr, protocol)
        if authentic:
            self.mux.bind_address(addr, protocol)
            self._client_heard.set()

    async def add_remote_candidate(self, remote_candidate: Candidate | None) -> None:
        """aioice's, for the candidates candidates.py lets through: a bounded number per ICE generation,
        and none a relay could not reach the client at."""
        if remote_candidate is not None:
            if self._candidates_generation != self.local_username:  # an ICE restart began a new count
                self._candidates_generation, self._candidates_checked = self.local_username, 0
            reason = ignored_because(remote_candidate, self._candidates_checked, self.mux.relayed)
            if reason is not None:
                self.mux.candidates_ignored[reason] += 1
                return
            self._candidates_checked += 1
        await super().add_remote_candidate(remote_candidate)

    async def connect(self) -> None:
        """aioice's, once the client's first check has come (answered at once meanwhile, and then
        checked back as aioice's early checks).  Our candidates are the relays' public addresses, so
        the client's checks reach us whatever its NAT; a check of ours sent before is one the client
        gets before it has applied the answer.  libdatachannel (v0.24.5) then has a peer-reflexive
        pair that it checks the moment the answer reaches its ICE agent, before it stores the answer:
        its DTLS could start and meet our certificate with no answer to check it against (its own race,
        upstream PR #1612).  12 libdatachannel callers at once through the XDP lab: 11 of 120 calls
        failed so, 0 of 120 with this wait (and 2 of 240 vs 0 of 240 straight to a transceiver)."""
        await self._client_heard.wait()
        if self._closing:
            raise ConnectionError("ICE closed before the client checked")
        await super().connect()
        self._consent_running = True  # connect() has just started the consent task

    async def close(self) -> None:
        self._client_heard.set()
        # aioice's consent check drops its task handle just before it closes the connection itself
        if self._consent_running and self._query_consent_task is None and not self._closing:
            self.consent_expired = True
        self._consent_running = False
        self.first_flight.close()
        await super().close()

    async def get_component_candidates(self, component: int, addresses: list[str],
                                       timeout: int = 5) -> list[Candidate]:
        candidates = []
        public = self.public_candidates or [(a, 65535 - i) for i, a in enumerate(self.mux.public_candidates)]
        for address, local_pref in public:
            host, port = address
            if isinstance(address, TcpAddress):   # the relay's ICE-TCP listener (edge/ice_tcp.py) carries
                candidates.append(Candidate(      # it to the mux as UDP: no protocol of its own, never paired
                    foundation=candidate_foundation("host", "tcp", host), component=component, transport="tcp",
                    priority=candidate_priority(component, "host", local_pref=local_pref),
                    host=host, port=port, type="host", tcptype="passive"))
                continue
            protocol = MuxProtocol(self)
            protocol.local_candidate = Candidate(
                foundation=candidate_foundation("host", "udp", host), component=component, transport="udp",
                priority=candidate_priority(component, "host", local_pref=local_pref),  # see relays.py
                host=host, port=port, type="host",
            )
            protocol.connection_made(MuxTransport(self.mux, protocol, self.local_username))
            self.mux.register(self.local_username, protocol)
            self._protocols.append(protocol)
            candidates.append(protocol.local_candidate)
        return candidates
