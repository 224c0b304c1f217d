"""The READY rule: when a leader may let the members of its epoch acquire.

Adopting an epoch only *removes* what a host no longer owns. The leader declares the epoch
READY once (:func:`blocker`):

* every member is heard, follows the epoch and reports the release, in a heartbeat sent
  after it heard this leader since the leader's last start, and has not left since
  (:func:`left`);
* every live non-member (not fenced) surely takes nothing in it (:func:`released_for`);
* every host removed without saying so (crashed, cut off: *fenced*) has surely lost its
  lease: no acknowledgement can still be keeping it alive. Each member reports for how long
  it has not heard each fenced host (its silences, :func:`fence_report`); a host that left
  the cluster (suspended, stopped: it lent its vote) and acknowledged it is bounded by when
  its heartbeats stopped acknowledging it, as seen here; the fence passes a lease and a
  margin after the latest such bound;
* with sticky rules, every member holds every handoff addressed to it (``handed_in``: see
  :mod:`.handoff`), so that no new owner acquires a bucket before it refuses the clients
  that others keep serving there.
"""

from __future__ import annotations

from collections.abc import Mapping

from shoal.protocol.engine.beacon import UNKNOWN_SILENCE
from shoal.protocol.engine.host_state import ELIGIBLE
from shoal.protocol.engine.peers import NEVER, Peer, Roster
from shoal.protocol.engine.timing import Timing
from shoal.protocol.epoch import EpochState
from shoal.protocol.frames import Flag, Heartbeat


def released_for(hb: Heartbeat | None, e: EpochState, digest: bytes) -> bool:
    """A non-member surely takes nothing in ``e``: it owns nothing and either cannot
    acquire at all (stopped, draining, suspended) or already follows ``e``."""
    if hb is None or not hb.has(Flag.OWNS_NOTHING):
        return False
    if hb.config_digest != digest:
        # another configuration: it never forms a cluster while ours holds an epoch
        return hb.epoch is None
    return hb.state not in ELIGIBLE or hb.epoch == e.key


def left(hb: Heartbeat) -> bool:
    """A member that left (stopped, draining, suspended) since its epoch was made: it lent
    the others its vote, may have been READY in a competing epoch before, and follows this
    one as a bystander. Its epoch is stale: one without it must replace it (or none, where
    the rest are no quorum); found by a sticky sweep of the simulator (see
    ``tests/test_affinity_sim.py::test_a_member_that_left_counts_toward_no_ready``)."""
    return hb.state not in ELIGIBLE


def own_bounds(e: EpochState, peers: Mapping[int, Peer]) -> dict[int, float]:
    """When this host last heard each host ``e`` fences (at adoption: its own echoes of
    them are bounded so)."""
    out = {}
    for c in e.fenced:
        p = peers.get(c)
        out[c] = p.last_heard if p is not None else NEVER
    return out


def fence_report(mine: EpochState | None, p: Peer, hb: Heartbeat, now: float) -> None:
    """Bound, from a member's post-adoption heartbeat, the send time of the newest
    heartbeat of a fenced host it acknowledged: when it last heard that host (its reported
    silence), or now if unknown."""
    if mine is None or not mine.fenced or hb.epoch != mine.key or not hb.has(Flag.RELEASED):
        return
    silences = dict(hb.silences)
    if p.fence_epoch != mine.key:
        p.fence_epoch, p.fence_bounds = mine.key, {}
    for c in mine.fenced:
        x = silences.get(c)
        if x is None:
            bound = now
        elif x == UNKNOWN_SILENCE:
            bound = NEVER
        else:
            bound = now - x / 1000
        p.fence_bounds[c] = min(p.fence_bounds.get(c, bound), bound)


def blocker(
    e: EpochState,
    me: int,
    roster: Roster,
    bounds: Mapping[int, float],
    eligible_since: float,
    digest: bytes,
    timing: Timing,
    now: float,
    handed_in: bool | None = None,
) -> float | None:
    """What keeps ``e`` from READY: None when nothing does; a time when only a fence does
    (it passes then); ``inf`` when the members' reports are awaited."""
    peers = roster.peers
    wait = float("inf")
    if handed_in is False and me in e.members:
        return wait  # sticky rules: this host's handoffs are not all in yet
    for q in e.members:
        if q == me:
            continue
        p = peers.get(q)
        if p is None or p.hb is None or not roster.alive(p, now):
            return wait
        if p.hb.epoch != e.key or not p.hb.has(Flag.RELEASED):
            return wait
        if left(p.hb):
            return wait
        if handed_in is not None and not (p.hb.affinity and p.hb.affinity.handed_in):
            return wait
        if p.ack_at < eligible_since:
            return wait  # sent before it heard this host since its last start: maybe stale
    for p in roster.live(now):
        if (
            p.host_id not in e.members
            and p.host_id not in e.fenced
            and not released_for(p.hb, e, digest)
        ):
            return wait
    for c in e.fenced:
        pc = peers.get(c)
        if pc is not None and roster.alive(pc, now) and released_for(pc.hb, e, digest):
            continue
        bound = bounds.get(c, now)
        for q in e.members:
            if q == me:
                continue
            pq = peers[q]
            if pq.fence_epoch != e.key or c not in pq.fence_bounds:
                return wait
            bound = max(bound, pq.fence_bounds[c])
        for p in peers.values():
            # a host that left (stopped, suspended, draining) lent the others its vote, so
            # the members alone may be no quorum of the fenced host's epoch: until it
            # left, its acknowledgements may have kept the fenced host's lease alive.
            # Members and leavers together are a quorum of that epoch; the acknowledgements
            # of any other host cannot make one, and are not waited for
            hb = p.hb
            if hb is not None and hb.state not in ELIGIBLE and p.host_id not in e.members:
                bound = max(bound, p.acked_until(c))
        if now < bound + timing.margin + timing.lease:
            return bound + timing.margin + timing.lease
    return None
