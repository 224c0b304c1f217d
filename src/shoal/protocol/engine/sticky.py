"""The engine's side of client affinity across convergence (the protocol is
:mod:`.handoff`'s): what the runtime reads for it and hands back (the epoch whose handoff
waits for the kernel's keys, the keys, their count while a drainstop keeps its affine
clients), the handoff's part of a step (composed without a read when nothing new can be
kept, given up when the keys come late, checked in, sent), the rule states a drainstop
offers, whose away entries stand, and when a lease that ran out moves the generation.

:class:`StickyRules` is a base of :class:`~shoal.protocol.engine.core.Engine`: what it
reads is declared below, and it calls back only :meth:`_emit` and :meth:`_step`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shoal.config import PortRule
from shoal.dataplane.contract import Away, Install, RuleState
from shoal.protocol.engine.beacon import Beacon
from shoal.protocol.engine.handoff import Handoffs
from shoal.protocol.engine.holding import Holding
from shoal.protocol.engine.peers import Peer, Roster
from shoal.protocol.engine.timing import Timing
from shoal.protocol.epoch import EpochState
from shoal.protocol.events import EventId
from shoal.protocol.frames import EpochKey

RESEND = 3  # periods between two sendings of a handoff not yet taken in


class StickyRules:
    """Affinity entries, handoffs and the drainstop that waits for affine clients."""

    rules: list[PortRule]
    rule_states: tuple[RuleState, ...]
    handoffs: Handoffs
    holding: Holding
    roster: Roster
    peers: dict[int, Peer]
    beacon: Beacon
    timing: Timing
    lease_until: float | None
    drain_affine: bool  # draining, a member until its affine clients went idle
    affine_left: int | None  # the kernel's affinity entries, as last reported
    _lease_ran: bool  # a lease ran at the last step
    _sticky_off: frozenset[int]  # sticky rules the kernel disables
    _sources_memo: tuple[object, frozenset[tuple[int, int, int]]] | None
    _offered_memo: tuple[tuple[RuleState, ...], tuple[RuleState, ...]] | None

    if TYPE_CHECKING:

        def _emit(self, eid: EventId, now: float, **fields: object) -> None: ...
        def _step(self, now: float, timers: bool = True) -> None: ...
        @property
        def record(self) -> frozenset[int]: ...

    # ------------------------------------------------------ the runtime's side

    def handoff_wanted(self) -> tuple[EpochKey, int] | None:
        """The epoch (and affinity generation) whose handoff waits for the kernel's
        affinity keys (see :mod:`.handoff`): the runtime reads them once the release is in
        the kernel, and hands them to :meth:`handoff_keys` with what this returned."""
        key = self.handoffs.wanted(self.holding.epoch)
        return None if key is None else (key, self.handoffs.generation)

    def handoff_keys(
        self, wanted: tuple[EpochKey, int], keys: dict[int, list[bytes]], now: float
    ) -> None:
        """The kernel's affinity keys per bucket token it does not own, read after the
        release of the epoch ``wanted`` names was installed (ignored if that epoch or
        generation is no longer the one waiting: read too late)."""
        e = self.holding.epoch
        epoch, generation = wanted
        hs = self.handoffs
        if e is None or e.key != epoch or hs.wanted(e) != epoch or hs.generation != generation:
            return
        self._compose(e, keys, now)
        self._step(now, timers=False)

    def take_away(self) -> list[Away]:
        """Away entries to put in the kernel before the next frames leave."""
        return self.handoffs.take_away()

    def set_affine(self, count: int, now: float) -> None:
        """The affinity entries the kernel holds, read after an install (a drainstop that
        keeps its affine clients waits for 0: see :attr:`drain_affine`)."""
        self.affine_left = max(0, count)
        self._step(now)

    # ------------------------------------------------------------ in a step

    def _compose(self, e: EpochState, keys: dict[int, list[bytes]] | None, now: float) -> None:
        self.handoffs.compose(e, keys, self.peers)
        for (to, rule), (clients, buckets) in sorted(self.handoffs.summary.items()):
            self._emit(EventId.HANDOFF_SENT, now, peer=to, rule=self.rules[rule].key,
                       clients=clients, buckets=buckets, epoch=str(e.key))  # fmt: skip
        self.beacon.dirty = True

    def _hand_off(self, now: float) -> None:
        """The handoff's part of a step, before lead or follow."""
        hs = self.handoffs
        e = self.holding.epoch
        if e is not None and hs.wanted(e):
            if not hs.needs_read(e, self.peers):
                self._compose(e, None, now)  # every key kept is where it must be already
            elif hs.overdue(e, now, self.timing.period):
                hs.lost()  # the kernel's keys came too late: its affine clients go
                self._emit(EventId.HANDOFF_GIVEN_UP, now, epoch=str(e.key))
                self._compose(e, None, now)
        if hs.check_in(e, self.peers):
            self.beacon.dirty = True
        if e is not None:
            for piece in hs.send(e, self.peers, now, RESEND * self.timing.period):
                self.beacon.send_handoff(piece)

    def _lease_ended(self, now: float) -> None:
        """A lease that ran ends (it lapsed, or this host left): whatever the kernel took by
        affinity under it may have been given away since, so its affinity entries go."""
        running = self.lease_until is not None and self.lease_until > now
        if self._lease_ran and not running:
            self.handoffs.lost()
        self._lease_ran = running

    # ------------------------------------------------------- what is published

    def _offered_states(self) -> tuple[RuleState, ...]:
        """The rule states this host reports and enforces: the operator's, every enabled
        rule draining while a drainstop keeps its affine clients."""
        if not self.drain_affine:
            return self.rule_states
        memo = self._offered_memo
        if memo is None or memo[0] is not self.rule_states:
            drained = tuple(
                RuleState.DRAINING if s is RuleState.ENABLED else s for s in self.rule_states
            )
            memo = self._offered_memo = (self.rule_states, drained)
        return memo[1]

    def _sticky_install(self, serving: bool, states: tuple[RuleState, ...]) -> Install:
        """What the kernel must enforce, with the affinity identity and the away entries'
        sources; a sticky rule the kernel disables drops its affine clients."""
        hs = self.handoffs
        hs.installed(self.holding.installed)
        off = frozenset(i for i in hs.sticky if states[i] is RuleState.DISABLED)
        if off - self._sticky_off:
            hs.lost()  # the kernel drops the rule's traffic: its affine clients go
        self._sticky_off = off
        return Install(self.holding.installed, serving, states, hs.identity, self._sources())

    def _sticky_deadline(self) -> float:
        """The soonest the handoffs need a step: a piece to send again, keys waited for
        too long, or the lease's end (a lapse moves the affinity generation)."""
        hs = self.handoffs
        period = self.timing.period
        t = min(hs.next_send(self.holding.epoch, RESEND * period), hs.wait_deadline(period))
        lease = self.lease_until
        if self._lease_ran and lease is not None:
            t = min(t, lease)
        return t

    def _sources(self) -> frozenset[tuple[int, int, int]]:
        """Whose away entries stand: the members of the newest READY epoch and of the epoch
        held (a host leaves them only once surely taking nothing: fenced, or gone on
        purpose), each with the run and generation its heartbeats report."""
        e = self.holding.epoch
        key = (self.roster.view, self.record, e.key if e else None)
        memo = self._sources_memo
        if memo is None or memo[0] != key:
            hosts = self.record | (e.members if e else frozenset())
            memo = self._sources_memo = (key, self.handoffs.sources(hosts, self.peers))
        return memo[1]
