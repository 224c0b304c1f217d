"""This host's side of the epoch it holds: the epoch, its phase, the tokens installed, and
the record and vote it keeps for the next run.

* **Adopting** an epoch is voting for it (the vote becomes its membership) and releases
  what this host no longer owns in it; it never acquires.
* **READY** makes its membership the record; the tokens are taken at the end of that step,
  and only under a lease that runs then (:meth:`Holding.take_tokens`).
* **Tokens are held only under an unbroken lease**: when it runs out they are dropped, and
  taken again only on a later READY (:meth:`Holding.lapse_if_expired`).
* A host that **leaves** on purpose (stop, drainstop, a new configuration) lends no vote: it
  reports its record and vote without itself.
"""

from __future__ import annotations

from collections.abc import Callable

from shoal.protocol.engine.beacon import Beacon
from shoal.protocol.engine.host_state import ELIGIBLE
from shoal.protocol.engine.leader import supersedes
from shoal.protocol.engine.peers import Roster
from shoal.protocol.engine.phase import Phase, Step, moved
from shoal.protocol.engine.ready import own_bounds
from shoal.protocol.epoch import EpochState
from shoal.protocol.events import EventId
from shoal.protocol.frames import EpochKey, Flag
from shoal.protocol.lease import quorate

Emit = Callable[..., None]


class Holding:
    def __init__(
        self,
        me: int,
        record: frozenset[int],
        vote: frozenset[int],
        roster: Roster,
        beacon: Beacon,
        emit: Emit,
        lost: Callable[[], None] = lambda: None,
    ) -> None:
        self.me = me
        self.record = record  # the members of the newest READY epoch known
        self.vote = vote  # the members of the epoch adopted last
        self.epoch: EpochState | None = None
        self.phase = Phase.NONE
        self.ready = False  # phase is READY (kept beside it: read for every echo)
        self.installed: frozenset[int] = frozenset()  # what the kernel is to accept
        self.own_bounds: dict[int, float] = {}  # when this host last heard each fenced host
        self.acquiring = False  # READY in this step: tokens taken at its end if leased
        self.acquiring_for: EpochKey | None = None  # the epoch READY was for
        self.why_converging = "starting"
        self._roster = roster
        self._beacon = beacon
        self._emit = emit
        self._lost = lost  # this host's tokens went other than by an epoch (affinity entries go)
        self._mine_cache: tuple[EpochKey | None, frozenset[int]] = (None, frozenset())

    def _move(self, step: Step) -> None:
        """The only writer of the phase."""
        self.phase = moved(self.phase, step)
        self.ready = self.phase is Phase.READY

    # ------------------------------------------------------------- shares

    def mine(self, e: EpochState) -> frozenset[int]:
        """This host's tokens in ``e`` (cached: computing them walks every map)."""
        if self._mine_cache[0] != e.key:
            toks = e.tokens_of(self.me) if self.me in e.members else frozenset()
            self._mine_cache = (e.key, toks)
        return self._mine_cache[1]

    def holds_share(self, e: EpochState) -> bool:
        """Installed is exactly this host's share of ``e`` (usually the very set the cache
        holds: no walk over thousands of tokens at every step)."""
        mine = self.mine(e)
        if self.installed is mine:
            return True
        if self.installed == mine:
            self.installed = mine  # the same tokens: from now on found by identity
            return True
        return False

    def released(self, e: EpochState) -> bool:
        """Nothing installed outside this host's share of ``e``."""
        mine = self.mine(e)
        return self.installed is mine or self.installed <= mine

    def flags(self, leading: bool) -> int:
        """What a heartbeat says of this host's holding (see :class:`Flag`)."""
        flags = 0 if self.installed else Flag.OWNS_NOTHING
        e = self.epoch
        if e is not None:
            flags |= Flag.HAS_EPOCH
            if self.released(e):
                flags |= Flag.RELEASED
            if self.ready and self.holds_share(e):
                flags |= Flag.ACQUIRED
            if self.ready and leading:
                flags |= Flag.READY
        return flags

    def converged(self, eligible: bool) -> bool:
        """A started member of a READY epoch, holding exactly its share."""
        e = self.epoch
        return (
            e is not None
            and self.ready
            and self.me in e.members
            and eligible
            and self.holds_share(e)
        )

    # -------------------------------------------------------------- votes

    def left(self, members: frozenset[int]) -> frozenset[int]:
        """A membership as a host that leaves it reports it: without itself, unless it was
        the only member. Then there are no others to carry on: a host that formed a cluster
        alone (cut off from the rest) and then stopped must still be outvoted by whoever
        forms the next one, or the rest would form theirs while it forms its own again."""
        rest = members - {self.me}
        return rest or members

    def lend_no_vote(self) -> None:
        """Leaving on purpose: the others carry on without this host, so its own vote no
        longer counts toward forming a cluster from its record."""
        self.record, self.vote = self.left(self.record), self.left(self.vote)

    # ------------------------------------------------------------- epochs

    def drop(self) -> None:
        self.epoch = None
        self._move(Step.DROP)
        self.installed = frozenset()
        self.own_bounds = {}
        self._lost()

    def may_adopt(self, state: EpochState, quorum: bool) -> bool:
        """A READY epoch is only ever left for one that descends from it, or one whose
        leader outvoted its membership too: a host never lends its vote to a competing
        branch behind its own branch's back. An epoch this host saw READY counts as READY
        here even after its lease lapsed (which makes it acquire again, not vote again). A
        host holding no epoch (started again, a new run) adopts only one that outvotes its
        record and vote: it may have lent them to a branch that went on without it."""
        if not quorum:
            return True
        if self.epoch is None:
            # holding no epoch (started again, a new run) is no licence to vote twice: what
            # it voted for before must be outvoted by the epoch it adopts now
            return all(
                not rec or rec in state.bases or quorate(state.members, rec)
                for rec in (self.record, self.vote)
            )
        if not self.phase.seen_ready:
            return True
        return supersedes(state, self.epoch.key, self.epoch.members, self.record, self.vote)

    def adopt(self, state: EpochState, started: bool, eligible: bool, now: float) -> None:
        """Hold ``state``: vote for it if a started member, release what is not ours."""
        prev = self.epoch
        self.epoch = state
        self._move(Step.ADOPT)
        if self.me in state.members and started:
            # adopting is voting: a leader that later counts on this host must outvote
            # this membership too, even if this host never hears that it became READY
            self.vote = state.members
        mine = self.mine(state) if eligible else frozenset()
        self.installed = self.installed & mine
        peers = self._roster.peers
        self.own_bounds = own_bounds(state, peers)
        self.why_converging = f"epoch {state.key} adopted"
        old = prev.members if prev else frozenset()
        for h in sorted(state.members - old - {self.me}):
            if h in peers:
                peers[h].joined_reported = True
            self._emit(EventId.HOST_JOINED, now, peer=h)
        for h in sorted(old - state.members - {self.me}):
            p = peers.get(h)
            if p is None or p.joined_reported or self._roster.alive(p, now):
                fields: dict[str, object] = {"reason": f"not in epoch {state.key}"}
                if p is not None and p.hb is not None and p.hb.state in ELIGIBLE:
                    # it left serving: a failure another host saw first, timed from here
                    fields["silent_s"] = round(now - p.seen(self._roster.detect), 3)
                self._emit(EventId.HOST_LEFT, now, peer=h, **fields)
            if p is not None:
                p.joined_reported = False
        self._beacon.dirty = True

    def on_ready(self, started: bool, eligible: bool, now: float) -> None:
        """The epoch is READY: remember its members (the record), and acquire at the end
        of this step if the lease runs then."""
        self._move(Step.READY)
        if self.epoch is not None and self.epoch.members:
            self.record = self.epoch.members
            if not started:
                self.record = self.left(self.record)  # left: no vote of its own
            self.vote = self.record
        if self.epoch is not None and eligible:
            self.acquiring = True
            self.acquiring_for = self.epoch.key

    def take_tokens(self, eligible: bool, lease: float | None, now: float) -> bool:
        """Acquire only under a lease that runs now. Without one the READY is not acted on
        (a later READY is): tokens taken anyway would be dropped at the next step, and each
        drop and take is a large kernel update. True when the READY lapsed so."""
        e = self.epoch
        if not self.acquiring or e is None:
            return False
        self.acquiring = False
        if not self.ready or e.key != self.acquiring_for:
            return False  # READY was told, and another epoch adopted before the share went in
        if self.me not in e.members:
            # nothing to take, so nothing a lease guards: a leader outside the epoch it
            # leads (it was fenced, then came back as the lowest id) must be able to keep
            # it READY, or it could never replace it with one that counts it in
            return False
        if lease is None or lease <= now or not eligible:
            self._move(Step.LAPSE)
            self.why_converging = "lease expired"
            self._lost()
            return True
        self.installed = self.mine(e)
        self._beacon.dirty = True
        return False

    def lapse_if_expired(self, lease: float | None, now: float) -> None:
        """Tokens are only ever held under an unbroken lease: once it lapsed, others may
        have been given them (fenced), so they must be acquired again on READY."""
        if lease is not None and lease <= now and self.installed:
            self.installed = frozenset()
            self._move(Step.LAPSE)
            self.why_converging = "lease expired"
            self._lost()
            self._emit(EventId.LEASE_LOST, now)
            self._beacon.dirty = True

    def release_all(self, why: str) -> None:
        if self.installed:
            self.installed = frozenset()
            self._beacon.dirty = True
        self._lost()
        self.why_converging = why
