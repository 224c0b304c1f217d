"""What this host knows of its peers: who was heard when, their replay windows, their last
heartbeats, and the results derived from all of them, behind one version counter.

Every change to what is known of the peers (a heartbeat parsed, a peer added or forgotten,
one gone silent or heard again, a duplicate id seen or past) moves :attr:`Roster.view`. A
result derived from the peers is kept with the view it was derived at and reused while
:meth:`Roster.fresh` says nothing moved: at hundreds of hosts, deriving them at every frame
would cost more than the frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from shoal.protocol.codec import Envelope, Repeat
from shoal.protocol.engine.host_state import SERVING
from shoal.protocol.epoch import EpochState
from shoal.protocol.frames import EpochKey, Heartbeat, HostState, Rejection

NEVER = float("-inf")
WINDOW = 30  # frames of a peer that may arrive out of order; 30 bits keep it one machine word
WINDOW_MASK = (1 << WINDOW) - 1
SUSPECT = 1.5  # periods unheard before a peer's beats are looked for in others' echoes
FORGET_AFTER = 600.0  # seconds unheard before a peer is forgotten
SWEEP_EVERY = 60.0  # seconds between sweeps for peers to forget


def after(t: float) -> float:
    """The first time later than ``t`` (a duplicate id blocks a host until ``t``
    included)."""
    return math.nextafter(t, math.inf)


@dataclass(slots=True)
class Peer:
    host_id: int
    incarnation: int
    last_seq: int
    window: int  # replay window: bit i set = last_seq - i seen
    first_heard: float
    last_heard: float
    proven: bool = False  # it proved it is alive in this incarnation (see freshness)
    hb: Heartbeat | None = None
    votes: tuple[frozenset[int], ...] = ()  # of hb (see leader.votes), kept with it
    repeat: Repeat | None = None  # of hb, when it has this host's digest (receive fast path)
    hb_seq: int = -1  # the newest heartbeat whose content hb holds
    acks_me: bool = False
    eligible: bool = False  # same digest, started, same rule count (from its heartbeat)
    ack_at: float = NEVER  # when we sent the newest of our heartbeats it acknowledged
    beat: int = -1  # the beat of its newest heartbeat
    # when another host's heartbeat last echoed a beat of it that this host missed (taken
    # as a period before that heartbeat came), and that beat: see Roster.vouch
    vouched: float = NEVER
    vouched_beat: int = -1
    fence_epoch: EpochKey | None = None
    fence_bounds: dict[int, float] = field(default_factory=dict)
    acks_left: dict[int, float] = field(default_factory=dict)  # host -> when it stopped acking it
    duplicate_until: float = NEVER
    mismatch_reported: bool = False
    joined_reported: bool = False

    def acked_until(self, host: int) -> float:
        """The latest time an acknowledgement of ``host`` by this peer can have been sent
        (bounded by arrivals here): now-ish while its heartbeat acknowledges it, else when
        its first heartbeat without it came."""
        if self.hb is not None and host in self.hb.acks:
            return self.last_heard
        return self.acks_left.get(host, NEVER)

    def seen(self, detect: float) -> float:
        """The last moment it is known alive: heard here, or vouched for by others at most
        ``detect`` after it was last heard here (a host that this one cannot hear at all,
        whoever else can, is not kept for good: an epoch it is a member of could never be
        READY without its heartbeats)."""
        heard = self.last_heard
        v = self.vouched
        if v <= heard:
            return heard
        return min(v, heard + detect)

    def advance(self, seq: int) -> None:
        """A frame numbered past the newest one seen: slide the replay window to it."""
        self.window = ((self.window << (seq - self.last_seq)) | 1) & WINDOW_MASK
        self.last_seq = seq


def behind_on(hb: Heartbeat | None, e: EpochState, digest: bytes) -> bool:
    """The sender, of this configuration and serving, holds another epoch than ``e``: it
    needs ``e``'s map."""
    return (
        hb is not None and hb.config_digest == digest and hb.state in SERVING and hb.epoch != e.key
    )


def other_cluster(hb: Heartbeat | None, host: int, e: EpochState, digest: bytes) -> bool:
    """The sender, of this configuration and not a member of ``e``, is converged in another
    epoch: two clusters of one configuration (a partition healed)."""
    return (
        hb is not None
        and hb.epoch is not None
        and hb.epoch != e.key
        and host not in e.members
        and hb.state is HostState.CONVERGED
        and hb.config_digest == digest
    )


class Roster:
    """The peers of one host, their liveness and the replay check."""

    keep_derived = True  # False: every derived result is derived afresh (to check the caches)

    def __init__(self, detect: float, now: float, period: float) -> None:
        self.peers: dict[int, Peer] = {}
        self.detect = detect
        self.period = period  # a vouch counts from a period before the heartbeat bearing it
        self.suspects: list[Peer] = []  # not heard for over SUSPECT periods: see vouch
        self.view = 0  # what is known of the peers changed: derived results are stale
        self.generation = 0  # peers replaced or forgotten: a lease count rebuilds
        self.runs = 0  # a run (host, incarnation) proven, replaced or forgotten
        self.expiry_check = float("inf")  # the soonest a heard host's silence is detected
        self._next_sweep = NEVER
        self._swept_at = now
        self._candidates: tuple[int, tuple[int, EpochKey | None, int]] | None = None

    # ------------------------------------------------------------ liveness

    def heard(self, now: float) -> bool:
        """A host was heard: the soonest silence deadline is now + detect at the latest.
        True when that moved the deadline closer."""
        if self.expiry_check > now + self.detect:
            self.expiry_check = now + self.detect
            return True
        return False

    def alive(self, p: Peer, now: float) -> bool:
        """Heard within the detection time. Every liveness test is written exactly so, as
        the sweep computes deadlines (``seen + detect``): with ``now - detect`` a
        rounding could keep a host alive an instant past the deadline that reported it
        silent, and what steps keep from the peers would then outlive its cause."""
        return p.seen(self.detect) + self.detect > now and p.hb is not None

    def live(self, now: float) -> list[Peer]:
        d = self.detect
        return [p for p in self.peers.values() if p.hb is not None and p.seen(d) + d > now]

    # ----------------------------------------------------------- vouching

    def suspect(self, now: float) -> None:
        """Note the peers not heard for over :data:`SUSPECT` periods (once a period: their
        beats are then looked for in the others' echoes, see :meth:`vouch`)."""
        since = now - SUSPECT * self.period
        peers = self.peers.values()
        self.suspects = [p for p in peers if p.last_heard < since and p.hb is not None]

    def vouch(self, p: Peer, echo: int, now: float) -> None:
        """Another host's authenticated heartbeat echoes ``p``'s beat ``echo``. If that is
        a beat this host missed, ``p`` was alive after it was last heard here: its silence
        counts from a period before this heartbeat came (the echo is at most that old when
        the other host hears ``p``'s every beat). Only liveness reads it: the lease and the
        fence count what each host heard itself, so a vouch never keeps a lease alive."""
        ref = p.vouched_beat if p.vouched > p.last_heard else p.beat
        if p.beat < 0 or not 0 < (echo - ref) & 0xFF < 128:
            return  # a beat heard here already (or no newer one): nothing learned
        at = now - self.period
        if at <= p.seen(self.detect):
            return
        if not self.alive(p, now):
            self.view += 1  # silent, and alive after all
        p.vouched, p.vouched_beat = at, echo

    def fresh(self, view: int, now: float) -> bool:
        """A result derived from the peers at ``view`` still holds: nothing known of them
        changed since, and no silence or duplicate id has run out (each is a deadline)."""
        return view == self.view and now < self.expiry_check and self.keep_derived

    def usable(self, p: Peer, now: float) -> bool:
        """A peer that may be a member: eligible by its heartbeat, and no duplicate id."""
        return p.eligible and p.duplicate_until < now

    # -------------------------------------------------------------- replay

    def admit(self, frame: Envelope, now: float, proof: bool) -> Rejection | None:
        """The replay check of a frame of another host (``proof``: a proof naming this
        host's incarnation). A new incarnation of a proven peer is taken on only with a
        proof: until then the peer stays as it was, and the frame is ``unproven``."""
        h = frame.host_id
        p = self.peers.get(h)
        if p is None or (frame.incarnation > p.incarnation and (proof or not p.proven)):
            # from a proof on, every frame numbered before it counts as seen: it may have
            # been recorded before this host could tell
            seen = WINDOW_MASK if proof else 1
            self.peers[h] = Peer(h, frame.incarnation, frame.seq, seen, now, now, proof)
            self.generation += 1
            self.runs += 1
            self.view += 1
            return None
        if frame.incarnation > p.incarnation:
            return Rejection.UNPROVEN
        if frame.incarnation < p.incarnation:
            return Rejection.REPLAY
        diff = frame.seq - p.last_seq
        if diff > 0:
            p.advance(frame.seq)
        elif -diff >= WINDOW or p.window >> -diff & 1:
            return Rejection.REPLAY
        else:
            p.window |= 1 << -diff
        if proof and not p.proven:
            p.proven = True
            p.first_heard = now  # what was heard before the proof proved nothing
            p.window = WINDOW_MASK
            self.runs += 1
            self.view += 1
        return None

    def pending(self, now: float, patience: float) -> bool:
        """A run heard since less than ``patience`` whose heartbeat this host has not taken
        yet (it is not proven, or its first heartbeat since the proof has not come): it may
        well be a host starting at the same time, so no cluster is formed without it yet. A
        replay of a dead host delays a new cluster that long, no longer."""
        return any(p.hb is None and p.first_heard > now - patience for p in self.peers.values())

    def known_runs(self) -> frozenset[tuple[int, int]]:
        """The runs (host, incarnation) proven alive: their frames are the ones to read
        first (see :mod:`shoal.daemon.wire`)."""
        return frozenset((p.host_id, p.incarnation) for p in self.peers.values() if p.proven)

    def duplicate(self, p: Peer, now: float, hold: float) -> bool:
        """Another run of ``p``'s id proved it is alive: two hosts use it; neither may be a
        member for ``hold``. True when it was not blocked already."""
        new = p.duplicate_until < now
        p.duplicate_until = now + hold
        self.view += 1
        self.expiry_check = min(self.expiry_check, after(p.duplicate_until))
        return new

    # --------------------------------------------------------------- sweep

    def due(self, now: float) -> bool:
        """Whether a silence or duplicate deadline has passed, or a sweep is due."""
        return now >= self.expiry_check or now >= self._next_sweep

    def sweep(self, now: float) -> list[Peer]:
        """Note silences and duplicates that ran out, forget peers unheard for ten minutes;
        returns the peers gone silent that had been reported as joined (in the order they
        were first heard), no longer reported so."""
        self._next_sweep = now + SWEEP_EVERY
        detect = self.detect
        soonest = float("inf")
        swept, self._swept_at = self._swept_at, now
        left: list[Peer] = []
        for p in list(self.peers.values()):
            if p.duplicate_until > NEVER:
                flip = after(p.duplicate_until)  # eligible again from then
                if flip > now:
                    soonest = min(soonest, flip)
                elif flip > swept:
                    self.view += 1
            if p.hb is None:
                continue
            deadline = p.seen(detect) + detect
            if deadline > now:
                if deadline < soonest:
                    soonest = deadline
                continue
            if deadline > swept:
                self.view += 1  # gone silent since the last sweep
            if p.joined_reported:
                p.joined_reported = False
                left.append(p)
            if now - p.last_heard > FORGET_AFTER:
                del self.peers[p.host_id]
                self.generation += 1
                self.runs += 1
                self.view += 1
        self.expiry_check = soonest
        return left

    # ---------------------------------------------------------- candidates

    def candidates(self, now: float) -> tuple[int, EpochKey | None, int]:
        """Over eligible live peers: the lowest id, the best epoch and the lowest id
        holding it (0 and None when there are none)."""
        memo = self._candidates
        if memo is not None and self.fresh(memo[0], now):
            return memo[1]
        best: EpochKey | None = None
        best_host = lowest = 0
        detect = self.detect
        for p in self.peers.values():
            if not p.eligible or p.seen(detect) + detect <= now or p.duplicate_until >= now:
                continue
            h = p.host_id
            if not lowest or h < lowest:
                lowest = h
            hb = p.hb
            assert hb is not None
            k = hb.epoch
            if k is None:
                continue
            if k == best:
                if h < best_host:
                    best_host = h
            elif best is None or k.rank() > best.rank():
                best, best_host = k, h
        out = (lowest, best, best_host)
        self._candidates = (self.view, out)
        return out
