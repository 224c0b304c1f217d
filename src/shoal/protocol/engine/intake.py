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

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from shoal.config import PortRule, ShoalConfig
from shoal.protocol.codec import Codec, Envelope, Repeat, parse, repeat_of
from shoal.protocol.engine.beacon import Beacon
from shoal.protocol.engine.epochs import EpochStore
from shoal.protocol.engine.freshness import Freshness
from shoal.protocol.engine.handoff import Handoffs
from shoal.protocol.engine.holding import Holding
from shoal.protocol.engine.host_state import ELIGIBLE
from shoal.protocol.engine.leader import votes
from shoal.protocol.engine.peers import WINDOW, Peer, Roster
from shoal.protocol.engine.ready import fence_report
from shoal.protocol.engine.tenure import Tenure, later
from shoal.protocol.engine.timing import Timing
from shoal.protocol.events import EventId
from shoal.protocol.frames import (
    HEADER_LEN,
    Answer,
    FrameType,
    Handoff,
    Heartbeat,
    MapChunk,
    Proof,
    Rejection,
    Request,
)

_RUN = struct.Struct("!Q4xI")  # incarnation, (content number), sequence number at byte 14


class FrameIntake:
    """The receive path of the engine."""

    # owned here (set by _start_intake)
    rejected: dict[str, int]
    frames_received: int
    freshness: Freshness  # what this host asks of its peers and owes them
    duplicate_until: float  # this host takes nothing until then: its id is used twice
    remote: list[Request | Answer]  # remote-control frames for this host, from proven runs

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
    handoffs: Handoffs
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
        self.freshness = Freshness()
        self.duplicate_until = float("-inf")
        self.remote: list[Request | Answer] = []  # for the shell: see Engine.take_remote

    def receive(self, data: bytes, now: float) -> Rejection | None:
        """Handle one received frame; returns why it was dropped, if it was.

        A heartbeat that repeats what its sender said last (see :class:`Repeat`) only
        refreshes liveness and acknowledgement times: in a steady cluster that is nearly
        every frame, so it is recognised from its bytes, without decoding them.
        """
        self.frames_received += 1
        host = data[12] << 8 | data[13] if len(data) > HEADER_LEN else 0
        p = self.peers.get(host) if host else None
        if host == self.me and _RUN.unpack_from(data, 14)[0] == self.incarnation:
            return self._reject(Rejection.OWN)  # this run's own frame: a copy, no HMAC spent
        if p is not None:
            inc, seq = _RUN.unpack_from(data, 14)
            if inc == p.incarnation:
                back = p.last_seq - seq
                if back >= WINDOW or (back >= 0 and p.window >> back & 1):
                    # seen already, or older than the window: a replay costs no HMAC
                    return self._reject(Rejection.REPLAY)
            if (rep := p.repeat) is not None:
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
        if env.ftype == FrameType.PROOF:
            return self._on_proof(env, now)
        if env.host_id == self.me:
            return self._reject(self._own(env, now))
        why = self._admit(env, now)
        if why is not None:
            return self._reject(why)
        frame = parse(env)
        if isinstance(frame, Rejection):
            return self._reject(frame)
        if isinstance(frame, Heartbeat):
            p = self.peers[env.host_id]
            if frame.asks and self.me in frame.asks:
                self._owe(frame, now)
            if not p.proven:
                self._ask(p.host_id, now)
                return self._reject(Rejection.UNPROVEN)
            if self._on_heartbeat(frame, now):
                p.hb_seq = env.seq
                # a heartbeat that asks this host for a proof is read in full each time:
                # the proof answering it may have been lost
                same = frame.config_digest == self.digest and self.me not in frame.asks
                p.repeat = repeat_of(data, frame, self.me) if same else None
        elif isinstance(frame, MapChunk):
            self._on_chunk(frame)
        elif isinstance(frame, Handoff):
            if not self.peers[env.host_id].proven:
                self._ask(env.host_id, now)
                return self._reject(Rejection.UNPROVEN)
            if not self.handoffs.on_piece(frame, self.holding.epoch):
                return None  # a piece that completed nothing changes nothing yet
            for (src, rule), taken in sorted(self.handoffs.taken.items()):
                if src == frame.host_id:
                    self._emit(EventId.HANDOFF_TAKEN, now, peer=src, rule=self.rules[rule].key,
                               clients=taken, epoch=str(frame.epoch))  # fmt: skip
        elif isinstance(frame, Request | Answer):  # the shell's to carry out
            if not self.peers[env.host_id].proven:
                self._ask(env.host_id, now)
                return self._reject(Rejection.UNPROVEN)
            broadcast = isinstance(frame, Request) and frame.peer == 0
            if broadcast or frame.peer == self.me:
                self.remote.append(frame)
            return None
        self._step(now, timers=False)
        return None

    def _own(self, env: Envelope, now: float) -> Rejection:
        """A frame with this host's id: its own, an earlier run's (in flight, or replayed),
        or a second host's with this id. Only a proof tells the last two apart: ask for
        one, and answer theirs."""
        if env.incarnation != self.incarnation:
            self._ask(self.me, now)
            self._answer(env, now)
        return Rejection.OWN

    def _admit(self, frame: Envelope, now: float) -> Rejection | None:
        h = frame.host_id
        self._heard(now)
        why = self.roster.admit(frame, now, proof=False)
        if why is not None and frame.incarnation != self.peers[h].incarnation:
            # another run than the one held: a new run of the peer, or an old one still
            # alive. Ask it for a proof, and answer its asks: it cannot prove itself here
            # before this host proved itself there
            self._ask(h, now)
            self._answer(frame, now)
        return why

    def _answer(self, env: Envelope, now: float) -> None:
        """Owe a proof to the heartbeat in ``env`` if it asks this host for one."""
        frame = parse(env)
        if isinstance(frame, Heartbeat) and self.me in frame.asks:
            self._owe(frame, now)

    def _ask(self, host: int, now: float) -> None:
        """Ask ``host`` to prove it is alive, in the heartbeats of the detection time."""
        if self.freshness.ask(host, now + self.detect, self.beacon.seq + 1):
            self.beacon.dirty = True
            self._publish()

    def _owe(self, hb: Heartbeat, now: float) -> None:
        """``hb``'s sender asks this host for a proof: send it now."""
        period = self.timing.period
        if self.freshness.asked(hb.host_id, hb.incarnation, hb.seq, now, period / 2):
            for heard in self.freshness.take(now):
                self.beacon.send_proof(heard)
            self._publish()

    def _on_proof(self, env: Envelope, now: float) -> Rejection | None:
        """A peer proves it is alive now, if the proof names this host's incarnation."""
        proof = parse(env)
        if isinstance(proof, Rejection):
            return self._reject(proof)
        assert isinstance(proof, Proof)
        h = env.host_id
        mine = [s for x, inc, s in proof.heard if x == self.me and inc == self.incarnation]
        if not mine or not self.freshness.answers(h, max(mine)):
            return None  # for another host, an earlier run of this one, or not asked since
        if h == self.me:
            if env.incarnation != self.incarnation:
                self._duplicate_self(now)
            return self._reject(Rejection.OWN)
        self._heard(now)
        p = self.peers.get(h)
        if p is not None and env.incarnation < p.incarnation:
            if self.roster.duplicate(p, now, self.timing.detect):
                self._emit(EventId.DUPLICATE_HOST_ID, now, peer=h)
            self._step(now, timers=False)
            return None
        why = self.roster.admit(env, now, proof=True)
        if why is not None:
            return self._reject(why)
        if self.freshness.proven(h):
            self.beacon.dirty = True
        self._publish()
        return None

    def _duplicate_self(self, now: float) -> None:
        """Another run of this host's id proved it is alive: take nothing for a while."""
        if self.duplicate_until < now:
            self._emit(EventId.DUPLICATE_HOST_ID, now, peer=self.me)
        self.duplicate_until = now + self.timing.detect
        self.holding.release_all("host id used twice")
        self._publish()  # heard between steps: the kernel must let go at once

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
        if roster.suspects:
            assert p.hb is not None
            self._vouched(p, p.hb.acks, lambda i: data[rep.beat_at + 1 + i], now)
        e = self.holding.epoch
        if e is not None and e.fenced:
            # as a full decode would: this host may have adopted the epoch the peer holds
            # since its heartbeat was last parsed, and its silences now bound the fence
            assert p.hb is not None
            fence_report(e, p, p.hb, now)

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
        if p.hb is not None and p.hb.acks != hb.acks:
            # its acknowledgements may keep a host's lease alive: when it dropped one, every
            # frame that still carried it was sent before this one came (the fence's bound)
            for h in p.hb.acks - hb.acks:
                p.acks_left[h] = now
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
        if self.roster.suspects:
            self._vouched(p, hb.acks, lambda i: hb.echoes[i], now)
        return True

    def _vouched(
        self, p: Peer, acks: frozenset[int], echo: Callable[[int], int], now: float
    ) -> None:
        """Read, in ``p``'s heartbeat, its echo of each peer suspected here (the ``i``-th
        echo is of its ``i``-th acknowledged host in id order): see :meth:`Roster.vouch`."""
        for s in self.roster.suspects:
            if s is not p and s.host_id in acks:
                self.roster.vouch(s, echo(sum(1 for h in acks if h < s.host_id)), now)

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
