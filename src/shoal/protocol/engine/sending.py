"""Frames out: the heartbeat this host says each period (or sooner, when it has something
new to say), and the map chunks a leader sends while a host holds another epoch.

:class:`Sending` is the part of :class:`~shoal.protocol.engine.core.Engine` that composes
them; :class:`~shoal.protocol.engine.beacon.Beacon` numbers and encodes them. A base of the
engine: what it reads is declared below, and it calls back only :meth:`_emit`,
:meth:`_eligible_self` and :meth:`_reports`.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from shoal.protocol.engine.beacon import Beacon, acknowledged, silences
from shoal.protocol.engine.freshness import Freshness
from shoal.protocol.engine.handoff import Handoffs
from shoal.protocol.engine.holding import Holding
from shoal.protocol.engine.host_state import HostStateMachine
from shoal.protocol.engine.peers import NEVER, Peer, Roster, behind_on, other_cluster
from shoal.protocol.engine.tenure import Tenure
from shoal.protocol.engine.timing import Timing
from shoal.protocol.epoch import EpochState
from shoal.protocol.events import EventId
from shoal.protocol.frames import EpochKey, Health, Heartbeat, HostState, RuleReport


class Sending:
    """Heartbeats and map chunks, composed."""

    me: int
    incarnation: int
    digest: bytes
    dedicated_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    timing: Timing
    ack_window: float
    host: HostStateMachine
    peers: dict[int, Peer]
    roster: Roster
    holding: Holding
    handoffs: Handoffs
    tenure: Tenure
    beacon: Beacon
    leading: bool
    leader_id: int | None
    heal_reported: set[EpochKey]
    freshness: Freshness
    host_health: Health
    _send_memo: tuple[int, tuple[object, ...], bool] | None
    drain_affine: bool

    if TYPE_CHECKING:

        def _emit(self, eid: EventId, now: float, **fields: object) -> None: ...
        def _eligible_self(self, now: float) -> bool: ...
        def _reports(self) -> tuple[RuleReport, ...]: ...
        @property
        def record(self) -> frozenset[int]: ...
        @property
        def vote(self) -> frozenset[int]: ...

    def _maybe_send(self, now: float, leader: int | None) -> None:
        if not self.beacon.due(now, self.timing.period):
            return
        self._send_heartbeat(now)
        e = self.holding.epoch
        if e is None:
            return
        memo = self._send_memo
        key = (e.key, leader == self.me, self.host.state)
        if memo is not None and memo[1] == key and self.roster.fresh(memo[0], now):
            behind = memo[2]  # and no partition to report that was not reported already
        else:
            behind = self._behind_and_heal(e, leader, now)
            self._send_memo = (self.roster.view, key, behind)
        last = self.beacon.last_map_sent.get(e.key, NEVER)
        if behind and now - last >= self.timing.period:
            self.beacon.send_map(e, now)

    def _behind_and_heal(self, e: EpochState, leader: int | None, now: float) -> bool:
        """Whether, as the leader, a live host of this configuration holds another epoch
        (it needs the map); and, converged, report every other cluster of this
        configuration heard (a partition healed)."""
        live = self.roster.live(now)
        behind = leader == self.me and any(behind_on(p.hb, e, self.digest) for p in live)
        if self.host.state is HostState.CONVERGED:
            for p in live:
                hb = p.hb
                if not other_cluster(hb, p.host_id, e, self.digest):
                    continue
                assert hb is not None and hb.epoch is not None
                if hb.epoch not in self.heal_reported:
                    self.heal_reported.add(hb.epoch)
                    self._emit(EventId.PARTITION_HEALED, now, a=e.default_host, b=p.host_id)
        return behind

    def _wire_state(self) -> HostState:
        """The state heartbeats say: a host that drains while its affine clients stay is a
        member whose rules all drain (its affinity block says it leaves)."""
        if self.drain_affine:
            converged = self.holding.converged(True)
            return HostState.CONVERGED if converged else HostState.CONVERGING
        return self.host.state

    def _send_heartbeat(self, now: float) -> None:
        self.roster.suspect(now)  # (once a period: whose beats to look for in echoes)
        e = self.holding.epoch
        acks: frozenset[int] = frozenset()
        acked_peers: list[Peer] = []
        fenced: tuple[tuple[int, int], ...] = ()
        if e is not None:
            if self._eligible_self(now):
                acked = acknowledged(e, self.leader_id, self.peers)
                acks, acked_peers = self.beacon.to_acknowledge(
                    acked, self.roster, self.ack_window, now
                )
            fenced = silences(e.fenced, self.peers, now)
        said = Heartbeat(
            host_id=self.me,
            incarnation=self.incarnation,
            seq=0,
            state=self._wire_state(),
            flags=self.holding.flags(self.leading),
            config_digest=self.digest,
            epoch=e.key if e else None,
            epoch_digest=e.digest() if e else b"\x00" * 8,
            acks=acks,
            rules=self._reports(),
            silences=fenced,
            dedicated_ip=self.dedicated_ip,
            record=self.record,
            vote=self.vote,
            asks=self.freshness.asks(now),
            health=self.host_health,
            affinity=self.handoffs.announce(e, self.drain_affine),
        )
        self.beacon.send_heartbeat(said, acked_peers, now, self.timing.period)
        if self.tenure.count is not None:
            self.tenure.count.sent(now, now - self.timing.echo_horizon)
