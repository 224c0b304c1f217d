"""The leader's decisions: who leads, whether a cluster may form, what the next epoch is.

Among live, started hosts with this host's cluster digest, those holding the newest epoch
compete and the lowest host id leads (:func:`elect`). Only the leader creates epochs: when
membership or a member's rule parameters change it computes the next epoch from its own
(minimal moves, exact balance) and broadcasts it.

With ``partition_policy = "quorum"`` an epoch must hold a quorum (a majority, or exactly half
with the lowest id) of every membership since the last READY epoch, of every member's
record (the newest READY membership it knew) and vote (the epoch it adopted last), so two
sides of a partition never both take over and no host lends its vote twice.

:class:`Leader` keeps what a leader derived last (the fingerprint of what its decision was
made from, the last plan) so that a step that changes nothing costs a comparison. Its
inputs are passed in; it never sees the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from shoal.config import PortRule
from shoal.protocol.engine.epochs import EpochStore
from shoal.protocol.engine.host_state import ELIGIBLE
from shoal.protocol.engine.peers import Peer, Roster
from shoal.protocol.engine.timing import Timing
from shoal.protocol.epoch import EpochState, next_epoch, same_assignment
from shoal.protocol.frames import EpochKey, Flag, Heartbeat, HostState, RuleReport
from shoal.protocol.lease import quorate

MAX_BASES = 16  # past this many, a leader changes nothing until its epoch is READY...
MAX_BASES_ENCODED = 255  # ... unless it never can be; an epoch encodes at most this many

Reports = dict[int, tuple[RuleReport, ...]]


def votes(record: frozenset[int], vote: frozenset[int]) -> tuple[frozenset[int], ...]:
    """What a leader must outvote for a host: the newest READY membership it knew and the
    membership of the epoch it adopted last (either may be empty; each once)."""
    return tuple(dict.fromkeys(x for x in (record, vote) if x))


def supersedes(
    state: EpochState,
    key: EpochKey,
    members: frozenset[int] | None,
    record: frozenset[int],
    vote: frozenset[int],
) -> bool:
    """Whether a host holding epoch ``key`` (of ``members``, if known), having seen it
    READY, may adopt ``state``: it descends from that epoch, or it outvoted its membership,
    the host's record or its vote. (A host that left on purpose lends no vote: its record,
    the members less itself, is what a leader outvotes for it.)"""
    return (
        key in state.lineage
        or (members is not None and members in state.bases)
        or (bool(record) and record in state.bases)
        or (bool(vote) and vote in state.bases)
    )


def stepped_out(hb: Heartbeat | None) -> bool:
    """The sender takes no new connections for good: it owns nothing, or it is draining (it
    releases what it holds once an epoch leaves it out; until then the fence covers it).
    Heard and not eligible, it left on purpose and its vote is not needed."""
    return hb is not None and (hb.has(Flag.OWNS_NOTHING) or hb.state is HostState.DRAINING)


def elect(
    candidates: tuple[int, EpochKey | None, int], me: int, eligible: bool, mine: EpochKey | None
) -> int | None:
    """The leader: the lowest id among eligible live hosts holding the best epoch, or the
    lowest of them if none holds one. ``candidates`` is the peers' (lowest id, best epoch,
    lowest id holding it); this host counts when ``eligible``, with its epoch ``mine``."""
    lowest, best, best_host = candidates
    if eligible:
        if not lowest or me < lowest:
            lowest = me
        if mine is not None:
            if best is None or mine.rank() > best.rank():
                best, best_host = mine, me
            elif mine == best and me < best_host:
                best_host = me
    if best is not None:
        return best_host
    return lowest or None


def never_ready(cur: EpochState, me: int, peers: Mapping[int, Peer], epochs: EpochStore) -> bool:
    """A member of ``cur`` holds an epoch it may have seen READY that ``cur`` neither
    descends from nor outvotes (see :func:`supersedes`): it will not adopt ``cur``, so
    ``cur`` can never be READY and waiting for it would wait for ever. (Judged from the
    member's heartbeat; wrong only towards a new epoch, which is as safe as any.)"""
    for h in cur.members:
        p = peers.get(h) if h != me else None
        hb = p.hb if p is not None else None
        if hb is None or hb.epoch is None or hb.epoch == cur.key or not hb.record:
            continue
        known = epochs.get(hb.epoch)
        members = known.members if known is not None else None
        if not supersedes(cur, hb.epoch, members, hb.record, hb.vote):
            return True
    return False


def outvoting(
    target: frozenset[int],
    recs: Mapping[int, tuple[frozenset[int], ...]],
    gone: frozenset[int],
) -> frozenset[int]:
    """The largest part of ``target`` that holds a quorum of each member's record and vote
    (hosts ``gone`` for good count as outvoted): a member that cannot be satisfied is left
    out, which may leave another unsatisfied in turn."""
    changed = True
    while changed:
        changed = False
        for h, vs in recs.items():
            if h in target and any(
                not quorate(target & (rec - gone or rec), rec - gone or rec) for rec in vs
            ):
                target = target - {h}
                changed = True
    return target


@dataclass(frozen=True)
class Seat:
    """This host, as the leader's decisions see it."""

    me: int
    incarnation: int
    record: frozenset[int]
    vote: frozenset[int]
    reports: tuple[RuleReport, ...]
    ready: bool  # its epoch is READY
    quorum: bool  # partition_policy = "quorum"
    started_at: float  # the engine's start (or last cluster reconfiguration)
    eligible_since: float  # its last start
    timing: Timing
    rules: list[PortRule]
    buckets: int
    pending: bool = False  # a host heard is not yet proven alive (see freshness)

    @property
    def votes(self) -> tuple[frozenset[int], ...]:
        return votes(self.record, self.vote)


@dataclass(frozen=True)
class Create:
    """Make this epoch (``cand``, or computed from the rest when None) and lead it."""

    cur: EpochState | None
    target: frozenset[int]
    fenced: frozenset[int]
    bases: tuple[frozenset[int], ...]
    reports: Reports
    cand: EpochState | None


@dataclass(frozen=True)
class Decision:
    ready: bool = False  # try to declare the current epoch READY
    no_quorum: tuple[list[int], list[int]] | None = None  # (live, members) to report
    create: Create | None = None


WAIT = Decision()
KEEP = Decision(ready=True)


class Leader:
    """What a leader decided last, and the next decision."""

    def __init__(self) -> None:
        self.fingerprint: object = None
        self._memo: tuple[int, tuple[object, ...]] | None = None
        self._planned: tuple[object, EpochState] | None = None  # the last next_epoch computed
        self._reported: object = None  # the last lack of quorum reported

    def forget(self) -> None:
        """The epoch was dropped: nothing derived from it holds."""
        self.fingerprint = self._memo = None

    def forget_plan(self) -> None:
        """Rules or bucket counts may differ now."""
        self._planned = None

    def unchanged(self, key: object, roster: Roster, now: float) -> bool:
        """Nothing the last decision was made from changed (``key``: the epoch, record,
        vote, rule states and configuration)."""
        kept = self._memo
        return kept is not None and kept[1] == key and roster.fresh(kept[0], now)

    def _keep(self, fp: object, key: tuple[object, ...], roster: Roster) -> Decision:
        # keep the newest objects: the next comparison then finds the very same ones (a
        # heartbeat parsed again brings equal but new tuples of rule reports)
        self.fingerprint = fp
        self._memo = (roster.view, key)
        return KEEP

    def _report(self, what: object, live: frozenset[int], members: frozenset[int]) -> Decision:
        if self._reported == what:
            return Decision(ready=True)
        self._reported = what
        return Decision(ready=True, no_quorum=(sorted(live), sorted(members)))

    def decide(
        self,
        seat: Seat,
        cur: EpochState | None,
        key: tuple[object, ...],
        roster: Roster,
        epochs: EpochStore,
        now: float,
    ) -> Decision:
        """The leader's step: form a cluster, keep the epoch, or make the next one."""
        peers = roster.peers
        members = {seat.me}
        reports: Reports = {seat.me: seat.reports}
        live = roster.live(now)
        for p in live:
            if roster.usable(p, now):
                assert p.hb is not None
                members.add(p.host_id)
                reports[p.host_id] = p.hb.rules
        target = frozenset(members)

        def votes_of(h: int) -> tuple[frozenset[int], ...]:
            return seat.votes if h == seat.me else peers[h].votes

        if cur is None:
            return self._form(seat, target, reports, live, votes_of, now)
        reported = tuple(sorted(reports.items()))
        fp = (target, reported, cur.key, tuple(votes_of(h) for h in sorted(target)))
        if fp == self.fingerprint:
            return self._keep(fp, key, roster)
        graceful = {
            h
            for h in cur.members
            if h != seat.me
            and h in peers
            and roster.alive(peers[h], now)
            and stepped_out(peers[h].hb)
            and not roster.usable(peers[h], now)
        }
        bases = (cur.members,) if seat.ready else (*cur.bases, cur.members)
        if seat.quorum:
            # every member's record and vote must be outvoted too, or a host coming from
            # another branch could lend its vote twice
            recs = {h: votes_of(h) for h in target}
            gone = frozenset(
                p.host_id
                for p in live
                if p.hb is not None and p.hb.state not in ELIGIBLE and stepped_out(p.hb)
            )
            target = outvoting(target, recs, gone)
            bases = (*bases, *(rec for h in sorted(target) for rec in recs[h]))
            # a host that left on purpose may have lent its vote to another side before it
            # left: its record says where, and that side must be outvoted as well
            left = [rec for h in sorted(graceful) for rec in votes_of(h)]
            bases = (*bases, *(rec - gone or rec for rec in left))
        bases = tuple(dict.fromkeys(bases))
        if seat.quorum:
            for base in bases:
                eff = base - graceful or base  # a base of leavers only is outvoted as it is
                if eff and not quorate(target & eff, eff):
                    return self._report(fp, target, eff)
            if len(bases) > MAX_BASES_ENCODED or (
                len(bases) > MAX_BASES and not never_ready(cur, seat.me, peers, epochs)
            ):
                return KEEP  # no further change until this epoch is READY
        fenced = (cur.members - target) | (frozenset() if seat.ready else cur.fenced)
        number = max(epochs.max_seen, cur.key.number) + 1
        epoch_key = EpochKey(number, seat.me, seat.incarnation)
        lineage = (cur.key,) if seat.ready else (*cur.lineage, cur.key)
        plan = (cur.key, target, reported)
        if self._planned is not None and self._planned[0] == plan:
            # the same members and parameters as last time (only records or votes moved):
            # the maps are the same, only what guards the epoch changes
            cand = replace(
                self._planned[1],
                key=epoch_key,
                fenced=fenced - target,
                bases=bases,
                lineage=lineage[-MAX_BASES - 1 :],
            )
        else:
            cand = next_epoch(
                cur,
                epoch_key,
                target,
                fenced - target,
                bases,
                lineage[-MAX_BASES - 1 :],
                reports,
                seat.rules,
                seat.buckets,
            )
            self._planned = (plan, cand)
        # the same assignment to the same members needs no new epoch: the current
        # membership as a base of its own adds nothing it does not satisfy already
        if same_assignment(cand, cur) and set(cand.bases) <= {*cur.bases, cur.members}:
            return self._keep(fp, key, roster)
        self.forget()
        return Decision(create=Create(cur, target, fenced, bases, reports, cand))

    def _form(
        self,
        seat: Seat,
        target: frozenset[int],
        reports: Reports,
        live: list[Peer],
        votes_of: Callable[[int], tuple[frozenset[int], ...]],
        now: float,
    ) -> Decision:
        """No epoch yet: form a cluster of ``target``, once it is safe to."""
        if now - seat.started_at < seat.timing.detect or seat.pending:
            return WAIT  # listen for an existing cluster first, and prove who is heard
        # a peer last heard stopped may have been started at the same moment: hear each
        # once more, from a heartbeat sent after this host's start (a frame is less than
        # half a period on the way), or two hosts could each form a cluster alone
        since = seat.eligible_since + seat.timing.period / 2
        if any(p.last_heard <= since for p in live):
            return WAIT
        started = {p.host_id: p.hb for p in live if p.hb is not None and p.hb.state in ELIGIBLE}
        if any(hb.epoch is not None for hb in started.values()):
            # an incumbent cluster with another configuration exists (a stopped host keeps
            # the epoch it last followed: not a cluster)
            return WAIT
        if not quorate(target, target | started.keys()):
            return WAIT  # hosts with another configuration outnumber this one
        if seat.quorum:
            for rec in [rec for h in sorted(target) for rec in votes_of(h)]:
                if not quorate(target & rec, rec):
                    d = self._report((target, rec), target, rec)
                    return replace(d, ready=False)
        return Decision(create=Create(None, target, frozenset(), (), reports, None))
