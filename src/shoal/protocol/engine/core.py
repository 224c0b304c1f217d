"""The engine: one host's inputs, outputs and the order of a step.

Inputs: :meth:`Engine.receive` (a frame's bytes), :meth:`Engine.tick` (time passes),
:meth:`Engine.command` (operator verbs), :meth:`Engine.reload`, :meth:`Engine.set_connections`.
Outputs: :meth:`Engine.take_frames` (to broadcast), :meth:`Engine.take_events`,
:attr:`Engine.install` (what the data plane must enforce), :attr:`Engine.lease_until` (the
kernel stops taking new connections after it) and :meth:`Engine.next_deadline`; all but
the lease can only have changed when :attr:`Engine.outputs` moved. :meth:`Engine.snapshot`
is a read-only picture for the control protocol and the views. Time is always passed in
(seconds, any origin, one clock per engine).

The engine owns no protocol rule itself: it wires the parts that do (see the package's
docstring) and runs them in one order at every step: silences, drain, election, lead or
follow, lease, tokens, host state, send.
"""

from __future__ import annotations

import ipaddress
import operator
from dataclasses import dataclass

from shoal.config import FilteringMode, InitialState, PartitionPolicy, ShoalConfig
from shoal.dataplane.contract import Install, RuleState
from shoal.protocol.engine.beacon import Beacon, acknowledged, silences
from shoal.protocol.engine.epochs import EpochStore
from shoal.protocol.engine.holding import Holding
from shoal.protocol.engine.host_state import (
    ELIGIBLE,
    RULE_COMMANDS,
    SERVING,
    Act,
    Command,
    HostStateMachine,
    Observed,
)
from shoal.protocol.engine.leader import Create, Leader, Seat, elect, votes
from shoal.protocol.engine.peers import NEVER, Peer, Roster, behind_on, other_cluster
from shoal.protocol.engine.phase import Phase
from shoal.protocol.engine.ready import blocker, fence_report
from shoal.protocol.engine.snapshot import PeerView, Snapshot
from shoal.protocol.engine.tenure import Tenure, later
from shoal.protocol.engine.timing import Timing
from shoal.protocol.epoch import EpochState, next_epoch
from shoal.protocol.events import Event, EventId
from shoal.protocol.frames import (
    HEADER_LEN,
    Codec,
    Envelope,
    EpochKey,
    Flag,
    Heartbeat,
    HostState,
    MapChunk,
    Rejection,
    Repeat,
    RuleReport,
    cluster_id,
    parse,
    repeat_of,
)

INITIAL = {
    InitialState.STARTED: HostState.CONVERGING,
    InitialState.STOPPED: HostState.STOPPED,
    InitialState.SUSPENDED: HostState.SUSPENDED,
}
RULE_TARGETS = {
    Command.ENABLE: (RuleState.ENABLED, EventId.RULE_ENABLED),
    Command.DISABLE: (RuleState.DISABLED, EventId.RULE_DISABLED),
    Command.DRAIN: (RuleState.DRAINING, EventId.RULE_DRAINING),
}


@dataclass(frozen=True)
class CommandResult:
    ok: bool
    message: str


class Engine:
    """One host's convergence state machine."""

    def __init__(
        self,
        config: ShoalConfig,
        key: bytes,
        incarnation: int,
        now: float,
        record: frozenset[int] = frozenset(),
        vote: frozenset[int] | None = None,
    ) -> None:
        """``record``: the members of the newest READY epoch this host knew in an earlier
        run, ``vote``: those of the epoch it adopted last (the daemon keeps both on disk); a
        new cluster is only formed with a quorum of each."""
        self.cfg = config
        cl = config.cluster
        self.me = config.host.host_id
        self.incarnation = incarnation
        self._use_timing(Timing(cl.period_ms / 1000.0, cl.tolerance))
        self.rules = cl.effective_rules
        self.codec = Codec(cluster_id(cl.primary_vip), key)
        self.digest = cl.heartbeat_digest()
        self.quorum = cl.partition_policy is PartitionPolicy.QUORUM
        dips = config.host.dedicated_ips
        self.dedicated_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = (
            dips[0].ip if dips else None
        )
        self.host = HostStateMachine(INITIAL[config.host.initial_state])
        self.rule_states = (RuleState.ENABLED,) * len(self.rules)
        self.roster = Roster(self.detect, now)
        self.peers = self.roster.peers  # the roster's, read here for speed
        self.leader = Leader()
        self.epochs = EpochStore()
        self.tenure = Tenure(self.me)
        self.lease_until: float | None = None  # new connections taken until then (None: not)
        self.beacon = Beacon(self.codec, self.me, incarnation, now)
        self.beat_sent = self.beacon.beat_sent  # the beacon's, read here for every echo
        self.holding = Holding(
            self.me,
            record,
            record if vote is None else vote,
            self.roster,
            self.beacon,
            self._emit,
        )
        self._send_memo: tuple[int, tuple[object, ...], bool] | None = None
        self._reports_memo: (
            tuple[ShoalConfig, tuple[RuleState, ...], tuple[RuleReport, ...]] | None
        ) = None
        self.started_at = now
        self.eligible_since = now  # the last start: a READY must be fresher than this
        self.leading = False
        self.leader_id: int | None = None
        self.duplicate_until = NEVER
        self.own_id_seen: list[float] = []
        self.wake = float("inf")
        self.connections: int | None = None  # unknown until the shell reports them
        self.drain_deadline: float | None = None
        self.drain_started = NEVER
        self.heal_reported: set[EpochKey] = set()
        self.rejected: dict[str, int] = {r.value: 0 for r in Rejection}
        self.frames_received = self.epochs_created = 0
        self._events: list[Event] = []
        # moves whenever install, frames, events or the deadline may have: after an input
        # that left it alone (most received frames) only lease_until needs reading
        self.outputs = 0
        self._emit(EventId.ENGINE_STARTED, now, incarnation=incarnation)
        if self.state is HostState.CONVERGING:
            self._emit(EventId.CLUSTER_STARTED, now)
        self.install: Install
        self._deadline = now
        self._publish()

    def _use_timing(self, timing: Timing) -> None:
        """The protocol's delays, and the two the receive path reads for every frame."""
        self.timing = timing
        self.detect = timing.detect
        self.ack_window = timing.ack_window

    # -------------------------------------------------------------- reading

    @property
    def state(self) -> HostState:
        return self.host.state

    @property
    def epoch(self) -> EpochState | None:
        return self.holding.epoch

    @property
    def phase(self) -> Phase:
        return self.holding.phase

    @property
    def epoch_ready(self) -> bool:
        return self.holding.ready

    @property
    def installed(self) -> frozenset[int]:
        return self.holding.installed

    @property
    def record(self) -> frozenset[int]:
        return self.holding.record

    @property
    def vote(self) -> frozenset[int]:
        return self.holding.vote

    @property
    def is_default(self) -> bool:
        return bool(
            self.epoch and self.epoch.default_host == self.me and self.state is HostState.CONVERGED
        )

    @property
    def counters(self) -> dict[str, int]:
        """Frames sent and received, epochs created, and frames dropped by reason."""
        return {
            **self.rejected,
            "frames_sent": self.beacon.frames_sent,
            "frames_received": self.frames_received,
            "epochs_created": self.epochs_created,
        }

    def snapshot(self, now: float) -> Snapshot:
        e = self.epoch
        live = []
        for p in sorted(self.roster.live(now), key=lambda p: p.host_id):
            hb = p.hb
            assert hb is not None
            default = bool(e and e.default_host == p.host_id and hb.epoch == e.key)
            view = PeerView(
                p.host_id, hb.state, hb.dedicated_ip, hb.epoch, default, now - p.last_heard
            )
            live.append(view)
        lease = self.lease_until
        return Snapshot(
            host_id=self.me,
            incarnation=self.incarnation,
            state=self.state,
            default=self.is_default,
            leader=self.leader_id,
            epoch=e.key if e else None,
            phase=self.phase,
            members=e.members if e else frozenset(),
            default_host=e.default_host if e else None,
            owned_tokens=len(self.installed),
            lease_left=None if lease is None else max(0.0, lease - now),
            dedicated_ip=self.dedicated_ip,
            peers=tuple(live),
            counters=self.counters,
        )

    # -------------------------------------------------------------- outputs

    def take_frames(self) -> list[bytes]:
        out, self.beacon.frames = self.beacon.frames, []
        return out

    def take_events(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    def next_deadline(self) -> float:
        """When :meth:`tick` must run next at the latest."""
        return self._deadline

    def _publish(self) -> None:
        """Set what the daemon reads after an input that moved :attr:`outputs`
        (:attr:`install`, the deadline): both change only in a step, and frames that
        repeat what a peer said never step."""
        self.outputs += 1
        self.install = Install(self.holding.installed, self.host.state in SERVING, self.rule_states)
        t = min(self.beacon.deadline(self.timing.period), self.wake, self.roster.expiry_check)
        lease = self.lease_until
        if self.holding.installed and lease is not None:
            # the tokens go when the lease runs out; read afresh, not kept as a timer: a
            # lease is extended long before it ends, and a timer would fire for nothing
            t = min(t, lease)
        if self.drain_deadline is not None:
            t = min(t, self.drain_deadline)
        self._deadline = t

    def _emit(self, eid: EventId, now: float, **fields: object) -> None:
        self._events.append(Event(eid, now, {"host": self.me, **fields}))
        self.outputs += 1

    # --------------------------------------------------------------- inputs

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

    def tick(self, now: float) -> None:
        self._step(now)

    def set_connections(self, count: int, now: float) -> None:
        """Established connections still open on this host (drainstop waits for 0)."""
        self.connections = max(0, count)
        self._step(now)

    def command(
        self, cmd: Command, now: float, rule: int | None = None, timeout: float | None = None
    ) -> CommandResult:
        """An operator verb; ``rule`` is a rule index for enable/disable/drain (None: all)."""
        if cmd in RULE_COMMANDS and rule is not None and not 0 <= rule < len(self.rules):
            result = CommandResult(False, f"no rule with index {rule}")
        else:
            result = self._command(cmd, now, rule, timeout)
        if result.ok:
            self.beacon.dirty = True
            self._step(now)
        elif cmd in RULE_COMMANDS:
            self._emit(EventId.RULE_COMMAND_REFUSED, now, command=cmd.value, reason=result.message)
        return result

    def reload(self, config: ShoalConfig, now: float) -> str:
        """Apply a new configuration of this host; returns what changed."""
        if config.host.host_id != self.me:
            raise ValueError("host.host_id cannot change on reload; restart the daemon")
        new_digest = config.cluster.heartbeat_digest()
        old_rules = self.rules
        self.cfg = config
        self.leader.forget_plan()
        if new_digest != self.digest:
            cl = config.cluster
            self.digest = new_digest
            self._use_timing(Timing(cl.period_ms / 1000.0, cl.tolerance))
            self.roster.detect = self.detect
            self.rules = cl.effective_rules
            self.quorum = cl.partition_policy is PartitionPolicy.QUORUM
            if len(self.rules) != len(old_rules):
                self.rule_states = (RuleState.ENABLED,) * len(self.rules)
            self._leave()
            for p in self.peers.values():
                if p.hb is not None:
                    p.eligible = self._could_join(p.hb)
                    p.repeat = None
            self.roster.view += 1
            self.started_at = now
            self.eligible_since = now
            self.holding.why_converging = "cluster parameters changed"
            what = "cluster parameters changed: reconverging"
        else:
            what = "host parameters applied"
        self._emit(EventId.RELOADED, now, what=what)
        self.beacon.dirty = True
        self._step(now)
        return what

    # ------------------------------------------------------------- commands

    def _command(
        self, cmd: Command, now: float, rule: int | None, timeout: float | None
    ) -> CommandResult:
        """Move the host state by the table, then do what the move asks."""
        m = self.host.move(cmd)
        act = m.act
        if act is Act.START:
            self._drop_epoch()
        elif act is Act.RESTART:
            self._emit(EventId.DRAIN_INTERRUPTED, now, command="start")
            self.drain_deadline = None
        elif act is Act.INTERRUPT_AND_STOP:
            self._emit(EventId.DRAIN_INTERRUPTED, now, command="stop")
        if act in (Act.START, Act.RESTART):
            self.eligible_since = now
            self._emit(EventId.CLUSTER_STARTED, now)
        elif act in (Act.STOP, Act.INTERRUPT_AND_STOP):
            self._stop(now)
        elif act is Act.DRAIN:
            self.holding.lend_no_vote()  # the others carry on without this host
            self.drain_deadline = now + timeout if timeout is not None else None
            self.drain_started = now
            self._emit(EventId.DRAIN_STARTED, now)
        elif act is Act.SUSPEND:
            self._stop(now, announce=False)
            self._emit(EventId.SUSPENDED, now)
        elif act is Act.RESUME:
            self._emit(EventId.RESUMED, now)
        elif act is Act.RULES:
            return self._rule_command(cmd, now, rule)
        return CommandResult(m.ok, m.message)

    def _rule_command(self, cmd: Command, now: float, rule: int | None) -> CommandResult:
        target, ev = RULE_TARGETS[cmd]
        for i in range(len(self.rules)) if rule is None else [rule]:
            self.rule_states = (*self.rule_states[:i], target, *self.rule_states[i + 1 :])
            if self.rules[i].mode is not FilteringMode.DISABLED:
                self._emit(ev, now, rule=self.rules[i].key)
        which = "all rules" if rule is None else f"rule {self.rules[rule].key}"
        return CommandResult(True, f"{which}: {target.name.lower()}")

    def _stop(self, now: float, announce: bool = True) -> None:
        """Let go of everything and leave (the host state moved already)."""
        self.drain_deadline = None
        self._leave()
        if announce:
            self._emit(EventId.CLUSTER_STOPPED, now)

    def _leave(self) -> None:
        self.holding.lend_no_vote()
        self._drop_epoch()

    def _drop_epoch(self) -> None:
        self.holding.drop()
        self.leader.forget()

    # --------------------------------------------------------------- frames

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

    # ------------------------------------------------------------- the step

    def _eligible_self(self, now: float) -> bool:
        return self.host.state in ELIGIBLE and self.duplicate_until < now

    def _step(self, now: float, timers: bool = True) -> None:
        if timers:
            self._expire(now)
        self._check_drain(now)
        leader = self._leader(now)
        self.leading = leader == self.me
        self.leader_id = leader
        if leader == self.me:
            self._lead(now)
        elif leader is not None:
            self._follow(self.peers[leader], now)
        self._update_lease(now)
        if self.holding.take_tokens(self._eligible_self(now), self.lease_until, now):
            # the count was built for the READY regime just left: echoes arriving before
            # the next step would not be tallied, and that READY regime would find the
            # same stale count again
            self.tenure.count = None
        self._refresh_state(now)
        self._maybe_send(now, leader)
        self._publish()

    def _expire(self, now: float) -> None:
        if now >= self.wake:
            self.wake = float("inf")
        if not self.roster.due(now):
            return  # no deadline has passed: hearing a host only ever moves its own later
        for p in self.roster.sweep(now):
            if self.holding.epoch and p.host_id in self.holding.epoch.members:
                why = f"not heard for {self.detect:.3g} s"
                self._emit(EventId.HOST_LEFT, now, peer=p.host_id, reason=why)

    def _check_drain(self, now: float) -> None:
        if self.host.state is not HostState.DRAINING:
            return
        e = self.holding.epoch
        if self.drain_deadline is not None and now >= self.drain_deadline:
            self.host.move(Observed.DRAIN_ENDED)
            self._stop(now, announce=False)
            self._emit(EventId.DRAIN_TIMEOUT, now)
        elif self.connections == 0 and (
            (not self.holding.installed and (e is None or self.me not in e.members))
            # nobody took its buckets over: no started host is left (every host drained),
            # or none could make an epoch without it in the detection time (no quorum). It
            # takes no new connections either way: it stops with them, as on a stop
            or self._leader(now) is None
            or now >= self.drain_started + self.detect
        ):
            self.host.move(Observed.DRAIN_ENDED)
            self._stop(now, announce=False)
            self._emit(EventId.DRAIN_FINISHED, now)

    def _leader(self, now: float) -> int | None:
        mine = self.holding.epoch.key if self.holding.epoch is not None else None
        return elect(self.roster.candidates(now), self.me, self._eligible_self(now), mine)

    def _reports(self) -> tuple[RuleReport, ...]:
        """This host's parameters per rule (the same tuple until they change: every step
        and heartbeat reads them)."""
        cfg, states = self.cfg, self.rule_states
        memo = self._reports_memo
        if memo is not None and memo[0] is cfg and memo[1] is states:
            return memo[2]
        out = []
        for i, rule in enumerate(self.rules):
            hr = cfg.host_rule(rule.key)
            out.append(RuleReport(hr.weight, states[i], cfg.priority(rule.key)))
        self._reports_memo = (cfg, states, tuple(out))
        return self._reports_memo[2]

    def _lead(self, now: float) -> None:
        cur = self.holding.epoch
        key = (cur and cur.key, self.record, self.vote, self.rule_states, self.cfg)
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
        self.holding.adopt(state, self.host.state in ELIGIBLE, self._eligible_self(now), now)

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
        )
        if why is None:
            self._ready(now)
        elif why < float("inf"):
            self.wake = min(self.wake, why)

    def _ready(self, now: float) -> None:
        """The epoch is READY: the record moves, and this host acquires at the end of the
        step if its lease runs then (a lapse before this acquisition says nothing of it)."""
        self.holding.on_ready(self.host.state in ELIGIBLE, self._eligible_self(now), now)
        lease = self.lease_until
        if self.holding.acquiring and lease is not None and lease <= now:
            self.lease_until = None

    def _refresh_state(self, now: float) -> None:
        """Converged: started, a member of a READY epoch, holding exactly its share."""
        if self.host.state not in ELIGIBLE:
            return
        done = self.holding.converged(self._eligible_self(now))
        if done and self.host.state is HostState.CONVERGING:
            e = self.holding.epoch
            assert e is not None
            self.host.move(Observed.CONVERGED)
            ev = EventId.CONVERGED_DEFAULT if e.default_host == self.me else EventId.CONVERGED
            self._emit(ev, now, members=sorted(e.members), epoch=str(e.key))
            self.beacon.dirty = True
        elif not done and self.host.state is HostState.CONVERGED:
            self.host.move(Observed.UNCONVERGED)
            self._emit(EventId.CONVERGING, now, reason=self.holding.why_converging)
            self.beacon.dirty = True

    def _update_lease(self, now: float) -> None:
        self.holding.lapse_if_expired(self.lease_until, now)
        e = self.holding.epoch
        if e is None or self.me not in e.members or not self._eligible_self(now):
            self.lease_until = None
            return
        self.lease_until = self.tenure.update(
            self.lease_until,
            now,
            e,
            self.holding.ready,
            self.quorum,
            self.peers,
            self.beacon.beat_sent,
            self._lease_regime(),
            self.timing,
        )

    def _lease_regime(self) -> tuple[object, ...]:
        """What a lease count is only good for (the epoch by identity: this is compared
        for every echo)."""
        h = self.holding
        return (h.epoch, h.ready, self.roster.generation)

    # -------------------------------------------------------------- sending

    def _maybe_send(self, now: float, leader: int | None) -> None:
        if not self.beacon.due(now, self.timing.period):
            return
        self._send_heartbeat(now)
        e = self.holding.epoch
        if e is None:
            return
        memo = self._send_memo
        key = (e.key, leader == self.me, self.host.state)
        if memo is not None and memo[1] == key and self.roster.fresh(memo[0], now):
            behind = memo[2]  # and no partition to report that was not reported already
        else:
            behind = self._behind_and_heal(e, leader, now)
            self._send_memo = (self.roster.view, key, behind)
        last = self.beacon.last_map_sent.get(e.key, NEVER)
        if behind and now - last >= self.timing.period:
            self.beacon.send_map(e, now)

    def _behind_and_heal(self, e: EpochState, leader: int | None, now: float) -> bool:
        """Whether, as the leader, a live host of this configuration holds another epoch
        (it needs the map); and, converged, report every other cluster of this
        configuration heard (a partition healed)."""
        live = self.roster.live(now)
        behind = leader == self.me and any(behind_on(p.hb, e, self.digest) for p in live)
        if self.host.state is HostState.CONVERGED:
            for p in live:
                hb = p.hb
                if not other_cluster(hb, p.host_id, e, self.digest):
                    continue
                assert hb is not None and hb.epoch is not None
                if hb.epoch not in self.heal_reported:
                    self.heal_reported.add(hb.epoch)
                    self._emit(EventId.PARTITION_HEALED, now, a=e.default_host, b=p.host_id)
        return behind

    def _send_heartbeat(self, now: float) -> None:
        e = self.holding.epoch
        acks: frozenset[int] = frozenset()
        acked_peers: list[Peer] = []
        fenced: tuple[tuple[int, int], ...] = ()
        if e is not None:
            if self._eligible_self(now):
                acked = acknowledged(e, self.leader_id, self.peers)
                acks, acked_peers = self.beacon.to_acknowledge(
                    acked, self.roster, self.ack_window, now
                )
            fenced = silences(e.fenced, self.peers, now)
        said = Heartbeat(
            host_id=self.me,
            incarnation=self.incarnation,
            seq=0,
            state=self.host.state,
            flags=self.holding.flags(self.leading),
            config_digest=self.digest,
            epoch=e.key if e else None,
            epoch_digest=e.digest() if e else b"\x00" * 8,
            acks=acks,
            rules=self._reports(),
            silences=fenced,
            dedicated_ip=self.dedicated_ip,
            record=self.record,
            vote=self.vote,
        )
        self.beacon.send_heartbeat(said, acked_peers, now, self.timing.period)
        if self.tenure.count is not None:
            self.tenure.count.sent(now, now - self.timing.echo_horizon)
