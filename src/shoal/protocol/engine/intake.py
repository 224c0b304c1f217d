"""Frames in: authentication, the replay check, repeats recognised from their bytes, and
what a heartbeat or a map chunk tells this host.

:class:`FrameIntake` is the part of :class:`~shoal.protocol.engine.core.Engine` that owns
the receive path and its state (the rejection counters, a second host seen using this
host's id). It is a base of the engine, not an object of its own, because the repeat path
runs for every frame: one attribute lookup more per frame is measurable at 256 hosts. What
it reads of the engine is declared below, and it calls back only :meth:`_step`,
:meth:`_emit` and :meth:`_publish`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shoal.config import PortRule, ShoalConfig
from shoal.protocol.codec import Codec, Envelope, Repeat, parse, repeat_of
from shoal.protocol.engine.beacon import Beacon
from shoal.protocol.engine.epochs import EpochStore
from shoal.protocol.engine.holding import Holding
from shoal.protocol.engine.host_state import ELIGIBLE
from shoal.protocol.engine.leader import votes
from shoal.protocol.engine.peers import Peer, Roster
from shoal.protocol.engine.ready import fence_report
from shoal.protocol.engine.tenure import Tenure, later
from shoal.protocol.engine.timing import Timing
from shoal.protocol.events import EventId
from shoal.protocol.frames import HEADER_LEN, Heartbeat, MapChunk, Rejection


class FrameIntake:
    """The receive path of the engine."""

    # owned here (set by _start_intake)
    rejected: dict[str, int]
    frames_received: int
    own_id_seen: list[float]  # when frames of another run with this host's id came
    duplicate_until: float  # this host takes nothing until then: its id is used twice

    # the engine's, read and written here
    me: int
    incarnation: int
    cfg: ShoalConfig
    rules: list[PortRule]
    codec: Codec
    digest: bytes
    timing: Timing
    detect: float
    ack_window: float
    peers: dict[int, Peer]
    roster: Roster
    epochs: EpochStore
    tenure: Tenure
    holding: Holding
    beacon: Beacon
    beat_sent: list[float]
    lease_until: float | None
    _deadline: float

    if TYPE_CHECKING:

        def _step(self, now: float, timers: bool = True) -> None: ...
        def _emit(self, eid: EventId, now: float, **fields: object) -> None: ...
        def _publish(self) -> None: ...

    def _start_intake(self) -> None:
        self.rejected = {r.value: 0 for r in Rejection}
        self.frames_received = 0
        self.own_id_seen = []
        self.duplicate_until = float("-inf")

    def receive(self, data: bytes, now: float) -> Rejection | None:
        """Handle one received frame; returns why it was dropped, if it was.

        A heartbeat that repeats what its sender said last (see :class:`Repeat`) only
        refreshes liveness and acknowledgement times: in a steady cluster that is nearly
        every frame, so it is recognised from its bytes, without decoding them.
        """
        self.frames_received += 1
        p = self.peers.get(data[12] << 8 | data[13]) if len(data) > HEADER_LEN else None
        if p is not None and (rep := p.repeat) is not None:
            seq = self.codec.open_repeat(data, rep)
            if seq is not None:
                if seq > p.last_seq:  # (older ones meet the replay window below)
                    self._repeated(p, rep, data, seq, now)
                    return None
                if seq < 0:
                    return self._reject(Rejection.BAD_AUTH)
        env = self.codec.open(data)
        if isinstance(env, Rejection):
            return self._reject(env)
        why = self._admit(env, now)
        if why is not None:
            return self._reject(why)
        frame = parse(env)
        if isinstance(frame, Rejection):
            return self._reject(frame)
        if isinstance(frame, Heartbeat):
            p = self.peers[env.host_id]
            if self._on_heartbeat(frame, now):
                p.hb_seq = env.seq
                same = frame.config_digest == self.digest
                p.repeat = repeat_of(data, frame, self.me) if same else None
        else:
            self._on_chunk(frame)
        self._step(now, timers=False)
        return None

    def _admit(self, frame: Envelope, now: float) -> Rejection | None:
        h = frame.host_id
        self._heard(now)
        if h == self.me:
            if frame.incarnation == self.incarnation:
                return Rejection.OWN
            # frames of an earlier run of this host may still be in flight: only a steady
            # stream from another incarnation means a second host uses this id
            self.own_id_seen = [t for t in self.own_id_seen if now - t < self.timing.detect]
            self.own_id_seen.append(now)
            if len(self.own_id_seen) >= 3:
                if self.duplicate_until < now:
                    self._emit(EventId.DUPLICATE_HOST_ID, now, peer=h)
                self.duplicate_until = now + self.timing.detect
                self.holding.release_all("host id used twice")
                self._publish()  # heard between steps: the kernel must let go at once
            return Rejection.OWN
        why, duplicate = self.roster.admit(frame, now, self.timing.detect)
        if duplicate:
            self._emit(EventId.DUPLICATE_HOST_ID, now, peer=h)
        return why

    def _heard(self, now: float) -> None:
        """A host was heard: the soonest silence deadline is now + detect at the latest."""
        if self.roster.heard(now):
            self._deadline = min(self._deadline, self.roster.expiry_check)

    def _reject(self, why: Rejection) -> Rejection:
        self.rejected[why.value] += 1
        return why

    def _repeated(self, p: Peer, rep: Repeat, data: bytes, seq: int, now: float) -> None:
        """``p`` said again what its heartbeat parsed last said: it is alive, and its beat
        and its echo of ours may have moved (whether it acknowledges us has not)."""
        p.advance(seq)
        p.hb_seq = seq
        roster = self.roster
        if p.last_heard + self.ack_window < now:
            roster.view += 1  # heard again after a silence: acknowledged again
        p.last_heard = now
        if roster.expiry_check > now + self.detect:  # (Roster.heard, written out: every frame)
            roster.expiry_check = now + self.detect
            self._deadline = min(self._deadline, roster.expiry_check)
        p.beat = data[rep.beat_at]
        if rep.echo_at:
            self._echoed(p, data[rep.echo_at], now)
        if p.fence_epoch is not None:
            assert p.hb is not None
            fence_report(self.holding.epoch, p, p.hb, now)

    def _on_heartbeat(self, hb: Heartbeat, now: float) -> bool:
        """Record a heartbeat; False when it is older than the one already held."""
        p = self.peers[hb.host_id]
        self.roster.view += 1
        p.last_heard = max(p.last_heard, now)
        if p.hb is not None and hb.seq < p.hb_seq:
            return False
        e = self.holding.epoch
        if p.beat < 0 and e is not None and hb.host_id in e.members:
            self.beacon.dirty = True  # a member heard for the first time: acknowledge it now
        p.hb = hb
        p.votes = votes(hb.record, hb.vote)
        p.beat = hb.beat
        p.eligible = self._could_join(hb)
        if hb.epoch is not None:
            self.epochs.saw(hb.epoch)
        if hb.config_digest != self.digest:
            if not p.mismatch_reported:
                p.mismatch_reported = True
                self._emit(
                    EventId.CONFIG_MISMATCH,
                    now,
                    peer=hb.host_id,
                    theirs=hb.config_digest.hex(),
                    ours=self.digest.hex(),
                )
            p.acks_me = False
            return True
        p.mismatch_reported = False
        # a host only acknowledges members of its own epoch, whichever that is; the fence
        # bounds every acknowledgement by its sender's silence report, not by epoch
        p.acks_me = self.me in hb.acks
        if p.acks_me:
            self._echoed(p, hb.echoes[sorted(hb.acks).index(self.me)], now)
        if p.fence_epoch is not None and p.fence_epoch != hb.epoch:
            p.fence_epoch, p.fence_bounds = None, {}
        fence_report(e, p, hb, now)
        return True

    def _echoed(self, p: Peer, echo: int, now: float) -> None:
        """``p`` acknowledged our heartbeat numbered ``echo``: the lease counts from when
        we sent it."""
        sent = self.beat_sent[echo]
        before = p.ack_at
        if sent <= before or not now - self.timing.echo_horizon <= sent <= now:
            return
        p.ack_at = sent
        tenure = self.tenure
        count = tenure.count
        if count is None or sent <= count.basis:
            return  # the lease already counts from this beat or a newer one (most echoes)
        h = self.holding  # (_lease_regime, written out: every echo that moves the lease)
        if count.built_for == (h.epoch, h.ready, self.roster.generation):
            basis = count.echoed(p.host_id, before, sent)
            # a lease not yet given or already run out is left to the next step, which must
            # see the lapse first
            lease = self.lease_until
            if basis is not None and lease is not None and lease > now:
                self.lease_until = later(lease, basis + self.timing.lease)

    def _on_chunk(self, ch: MapChunk) -> None:
        if self.epochs.add_chunk(ch, self.rules, self.cfg.cluster.buckets) is False:
            self.rejected[Rejection.MALFORMED.value] += 1

    def _could_join(self, hb: Heartbeat) -> bool:
        """A started host with this host's configuration, as its heartbeat says."""
        return (
            hb.config_digest == self.digest
            and hb.state in ELIGIBLE
            and len(hb.rules) == len(self.rules)
        )
