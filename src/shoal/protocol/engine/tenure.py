"""This host's lease: until when it may take new connections.

A host takes new connections only while a quorum of its epoch's members acknowledges
hearing it: the lease runs for :attr:`Timing.lease` from the send time of its newest
heartbeat such a quorum echoed (before the epoch is READY, a quorum of each of its bases
too). The kernel enforces the expiry even when the daemon is gone. A host alone in its
epoch holds it from now; with the available policy it holds it from the newest beat any
member echoed (a silent host must still be fenced). Between steps each new echo extends
the lease through :attr:`Tenure.count` (the engine's receive path does it in place).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from shoal.protocol.engine.peers import NEVER, Peer
from shoal.protocol.engine.timing import Timing
from shoal.protocol.epoch import EpochState
from shoal.protocol.lease import LeaseCount


def later(lease: float | None, until: float) -> float:
    """A lease is only ever extended while it lasts."""
    return until if lease is None or until > lease else lease


class Tenure:
    """The rules that set the lease, and the tally they keep (the lease itself is an output
    of the engine, :attr:`Engine.lease_until`)."""

    def __init__(self, me: int) -> None:
        self.me = me
        self.count: LeaseCount | None = None

    def update(
        self,
        lease: float | None,
        now: float,
        epoch: EpochState,
        ready: bool,
        quorum: bool,
        peers: Mapping[int, Peer],
        beat_sent: Sequence[float],
        regime: tuple[object, ...],
        t: Timing,
    ) -> float | None:
        """The lease of a started member of ``epoch`` holding ``lease`` now, from what its
        members echoed."""
        me = self.me
        if epoch.members == {me}:
            return now + t.lease
        if not quorum:
            # every side serves on, but a host that goes silent must still be fenced: its
            # lease counts from the newest of its beats any member echoed (that member
            # reports when it last heard it), not from now, which may be a period after
            # the last heartbeat anyone heard
            echoed = [
                p.ack_at for h in epoch.members if h != me and (p := peers.get(h)) is not None
            ]
            newest = max(echoed, default=NEVER)
            return later(lease, min(now, newest) + t.lease) if newest > NEVER else lease
        # until the epoch is READY, hosts may still be at any epoch since the last READY
        # one: the lease needs a quorum of each of those memberships too
        count = self.count
        if count is None or regime != count.built_for:
            bases = (epoch.members,) if ready else (epoch.members, *epoch.bases)
            acks = {
                h: p.ack_at for h in epoch.members if h != me and (p := peers.get(h)) is not None
            }
            oldest = now - t.echo_horizon
            sends = [s for s in beat_sent if oldest <= s <= now]
            count = self.count = LeaseCount(bases, me, acks, sends, epoch.members, regime)
        if count.alone:
            return later(lease, now + t.lease)
        if count.basis > NEVER:
            return later(lease, min(now, count.basis) + t.lease)
        return lease
