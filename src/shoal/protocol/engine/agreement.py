"""Agreeing on the epoch: what the leader decides and creates, what a follower adopts, and
when the epoch turns READY here.

:class:`Agreement` is the part of :class:`~shoal.protocol.engine.core.Engine` that runs the
"lead or follow" step: the decisions are :mod:`.leader`'s pure functions, the READY rule is
:mod:`.ready`'s, the epoch held is :class:`~.holding.Holding`'s. A base of the engine: what it
reads is declared below, and it calls back only :meth:`_emit` and :meth:`_eligible_self`.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

from shoal.config import PortRule, ShoalConfig
from shoal.dataplane.contract import RuleState
from shoal.protocol.engine.beacon import Beacon
from shoal.protocol.engine.epochs import EpochStore
from shoal.protocol.engine.handoff import Handoffs
from shoal.protocol.engine.holding import Holding
from shoal.protocol.engine.host_state import HostStateMachine
from shoal.protocol.engine.leader import Create, Leader, Seat
from shoal.protocol.engine.peers import Peer, Roster
from shoal.protocol.engine.ready import blocker
from shoal.protocol.engine.timing import Timing
from shoal.protocol.epoch import EpochState, next_epoch
from shoal.protocol.events import EventId
from shoal.protocol.frames import EpochKey, Flag, Health, RuleReport


class Agreement:
    """The leader's and a follower's steps toward the epoch."""

    cfg: ShoalConfig
    me: int
    incarnation: int
    digest: bytes
    quorum: bool
    rules: list[PortRule]
    rule_states: tuple[RuleState, ...]
    rule_health: tuple[Health, ...]
    timing: Timing
    host: HostStateMachine
    roster: Roster
    leader: Leader
    epochs: EpochStore
    holding: Holding
    handoffs: Handoffs
    started_at: float
    eligible_since: float
    wake: float
    lease_until: float | None
    epochs_created: int
    _reports_memo: (
        tuple[ShoalConfig, tuple[RuleState, ...], tuple[Health, ...], tuple[RuleReport, ...]] | None
    )

    beacon: Beacon

    if TYPE_CHECKING:

        def _emit(self, eid: EventId, now: float, **fields: object) -> None: ...
        def _eligible_self(self, now: float) -> bool: ...
        def _started(self) -> bool: ...
        def _offered_states(self) -> tuple[RuleState, ...]: ...
        @property
        def record(self) -> frozenset[int]: ...
        @property
        def vote(self) -> frozenset[int]: ...

    def _reports(self) -> tuple[RuleReport, ...]:
        """This host's parameters per rule (the same tuple until they change: every step
        and heartbeat reads them)."""
        cfg, states, health = self.cfg, self._offered_states(), self.rule_health
        memo = self._reports_memo
        if memo is not None and memo[0] is cfg and memo[1] is states and memo[2] is health:
            return memo[3]
        out = []
        for i, rule in enumerate(self.rules):
            hr = cfg.host_rule(rule.key)
            out.append(RuleReport(hr.weight, states[i], cfg.priority(rule.key), health[i]))
        self._reports_memo = (cfg, states, health, tuple(out))
        return self._reports_memo[3]

    def _lead(self, now: float) -> None:
        cur = self.holding.epoch
        key = (cur and cur.key, self.record, self.vote, self._reports(), self.cfg)
        if cur is not None and self.leader.unchanged(key, self.roster, now):
            # nothing the fingerprint is made of changed since it last matched
            self._declare_ready(now)
            return
        seat = Seat(
            self.me,
            self.incarnation,
            self.record,
            self.vote,
            self._reports(),
            self.holding.ready,
            self.quorum,
            self.started_at,
            self.eligible_since,
            self.timing,
            self.rules,
            self.cfg.cluster.buckets,
            self.roster.pending(now, 3 * self.timing.detect),
        )
        d = self.leader.decide(seat, cur, key, self.roster, self.epochs, now)
        if d.no_quorum is not None:
            live, members = d.no_quorum
            self._emit(EventId.NO_QUORUM, now, live=live, members=members)
        if d.create is not None:
            self._create(d.create, now)
        elif d.ready:
            self._declare_ready(now)

    def _create(self, c: Create, now: float) -> None:
        cand = c.cand
        if cand is None:
            key = EpochKey(self.epochs.max_seen + 1, self.me, self.incarnation)
            buckets = self.cfg.cluster.buckets
            cand = next_epoch(
                c.cur, key, c.target, c.fenced, c.bases, (), c.reports, self.rules, buckets
            )
        self.epochs_created += 1
        moved = 0
        if c.cur is not None:
            for a, b in zip(c.cur.maps, cand.maps, strict=True):
                if a is not None and b is not None:
                    moved += sum(map(operator.ne, a, b))
        members = sorted(c.target)
        self._emit(EventId.EPOCH_CREATED, now, epoch=str(cand.key), members=members, moved=moved)
        self.epochs.remember(cand)
        self._adopt(cand, now)
        self.beacon.send_map(cand, now)
        self._declare_ready(now)

    def _follow(self, leader: Peer, now: float) -> None:
        hb = leader.hb
        assert hb is not None
        if hb.epoch is None:
            return
        e = self.holding.epoch
        if e is None or hb.epoch != e.key:
            state = self.epochs.get(hb.epoch)
            if state is None or state.digest() != hb.epoch_digest:
                return  # wait for the chunks; the leader resends when it sees us behind
            if not self.holding.may_adopt(state, self.quorum):
                return
            self._adopt(state, now)
        if hb.has(Flag.READY) and not self.holding.ready and self._fresh_ready(leader):
            self._ready(now)

    def _fresh_ready(self, leader: Peer) -> bool:
        """A member acts on its leader's READY only once the leader has heard it since it
        last started: a READY seen just after a restart may come from before the leader
        gave this host's share away."""
        e = self.holding.epoch
        return e is None or self.me not in e.members or leader.ack_at >= self.eligible_since

    def _adopt(self, state: EpochState, now: float) -> None:
        self.holding.adopt(state, self._started(), self._eligible_self(now), now)

    def _declare_ready(self, now: float) -> None:
        """Leader: READY once releases are reported and fences have passed."""
        e = self.holding.epoch
        if e is None or self.holding.ready:
            return
        h = self.holding
        why = blocker(
            e,
            self.me,
            self.roster,
            h.own_bounds,
            self.eligible_since,
            self.digest,
            self.timing,
            now,
            self.handoffs.handed_in if self.handoffs.sticky else None,
        )
        if why is None:
            self._ready(now)
        elif why < float("inf"):
            self.wake = min(self.wake, why)

    def _ready(self, now: float) -> None:
        """The epoch is READY: the record moves, and this host acquires at the end of the
        step if its lease runs then (a lapse before this acquisition says nothing of it)."""
        self.holding.on_ready(self._started(), self._eligible_self(now), now)
        lease = self.lease_until
        if self.holding.acquiring and lease is not None and lease <= now:
            self.lease_until = None
