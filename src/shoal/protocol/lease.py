"""The lease count: the send time of this host's newest heartbeat that a quorum echoed.

A host's lease runs from the send time of its newest heartbeat that a quorum of every
membership in force (the epoch's members; before the epoch is READY, its bases too) has
echoed, the sender counted. Counting that from scratch walks every member; in a steady
cluster each member's echo would then cost a walk of all the others, which at 256 hosts is
most of an engine's work. :class:`LeaseCount` keeps, for each beat sent since the newest
counted one, a tally per membership, so an echo costs an addition or two.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

NEVER = float("-inf")


def _majority(count: int, size: int, has_lowest: bool) -> bool:
    """The quorum rule: a strict majority, or exactly half with the lowest id among them."""
    return 2 * count > size or (2 * count == size and has_lowest)


def quorate(group: set[int] | frozenset[int], members: frozenset[int]) -> bool:
    """Whether ``group`` holds a quorum of ``members``."""
    return _majority(len(group & members), len(members), bool(members) and min(members) in group)


class Tally:
    """Hosts of one membership counted so far, to test for a quorum cheaply."""

    __slots__ = ("count", "has_lowest", "lowest", "members", "size")

    def __init__(self, members: frozenset[int]) -> None:
        self.members = members
        self.size = len(members)
        self.lowest = min(members) if members else 0
        self.count = 0
        self.has_lowest = False

    def add(self, host: int) -> None:
        if host in self.members:
            self.count += 1
            self.has_lowest |= host == self.lowest

    def quorate(self) -> bool:
        return _majority(self.count, self.size, self.has_lowest)


def _count(tallies: list[Tally], host: int) -> bool:
    """Count ``host`` in every tally; whether each holds a quorum now."""
    whole = True
    for t in tallies:
        t.add(host)
        whole = whole and t.quorate()
    return whole


def _tallies(bases: tuple[frozenset[int], ...], hosts: Iterable[int]) -> list[Tally]:
    out = [Tally(b) for b in bases]
    for h in hosts:
        for t in out:
            t.add(h)
    return out


class LeaseCount:
    """For one set of memberships: the newest send time a quorum of each echoed (the
    basis), and a tally for every beat sent after it."""

    def __init__(
        self,
        bases: tuple[frozenset[int], ...],
        me: int,
        acks: Mapping[int, float],
        sends: Iterable[float],
        voters: frozenset[int],
        built_for: tuple[object, ...] = (),
    ) -> None:
        """``acks``: per peer, the send time of the newest of our beats it echoed;
        ``sends``: the send times of our beats an echo may still count for; ``voters``:
        the hosts whose echoes count (the epoch's members); ``built_for``: the owner's key
        for the state this counts for."""
        self.bases = bases
        self.voters = voters
        self.built_for = built_for
        self.me = me
        tallies = _tallies(bases, [me])
        self.alone = all(t.quorate() for t in tallies)
        self.basis = NEVER
        acks = {h: at for h, at in acks.items() if at > NEVER and h in voters}
        for at, h in sorted(((at, h) for h, at in acks.items()), reverse=True):
            if _count(tallies, h):
                self.basis = at
                break
        self.pending: list[tuple[float, list[Tally]]] = []
        for s in sorted(s for s in sends if s > self.basis):
            self.pending.append(
                (s, _tallies(bases, [me, *(h for h, at in acks.items() if at >= s)]))
            )

    def sent(self, at: float, oldest: float) -> None:
        """A new beat sent at ``at``; beats sent before ``oldest`` no longer count."""
        self.pending = [x for x in self.pending if x[0] >= oldest]
        self.pending.append((at, _tallies(self.bases, [self.me])))

    def echoed(self, host: int, before: float, after: float) -> float | None:
        """``host``'s newest echo moved from the beat sent at ``before`` to the one sent at
        ``after``; the new basis if that made a newer beat quorate."""
        if host not in self.voters:
            return None
        newest = -1
        for i, (s, tallies) in enumerate(self.pending):  # in the order they were sent
            if s > after:
                break
            if s > before and _count(tallies, host):
                newest = i
        if newest < 0:
            return None
        self.basis = self.pending[newest][0]
        del self.pending[: newest + 1]
        return self.basis
