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
follow, lease, tokens, host state, send. Six of its parts are bases of the class rather
than objects, each declaring what of the engine it reads: the receive path
(:class:`~.intake.FrameIntake`, which runs for every frame), the verbs
(:class:`~.verbs.OperatorInputs`), the health checks' verdicts
(:class:`~.health.HealthInputs`), lead or follow (:class:`~.agreement.Agreement`), what is
sent (:class:`~.sending.Sending`) and client affinity (:class:`~.sticky.StickyRules`).
"""

from __future__ import annotations

import ipaddress

from shoal.choices import InitialState, PartitionPolicy
from shoal.config import ShoalConfig
from shoal.dataplane.contract import Install, RuleState
from shoal.protocol.codec import Codec, Keys
from shoal.protocol.engine.agreement import Agreement
from shoal.protocol.engine.beacon import Beacon
from shoal.protocol.engine.epochs import EpochStore
from shoal.protocol.engine.handoff import Handoffs
from shoal.protocol.engine.health import HealthInputs
from shoal.protocol.engine.holding import Holding
from shoal.protocol.engine.host_state import (
    ELIGIBLE,
    SERVING,
    HostStateMachine,
    Observed,
)
from shoal.protocol.engine.intake import FrameIntake
from shoal.protocol.engine.leader import Leader, elect
from shoal.protocol.engine.peers import NEVER, Roster
from shoal.protocol.engine.phase import Phase
from shoal.protocol.engine.sending import Sending
from shoal.protocol.engine.snapshot import PeerView, Snapshot
from shoal.protocol.engine.sticky import StickyRules
from shoal.protocol.engine.tenure import Tenure
from shoal.protocol.engine.timing import Timing
from shoal.protocol.engine.verbs import OperatorInputs
from shoal.protocol.epoch import EpochState
from shoal.protocol.events import Event, EventId
from shoal.protocol.frames import (
    Answer,
    EpochKey,
    Health,
    HostState,
    Request,
    RuleReport,
    cluster_id,
)

INITIAL = {
    InitialState.STARTED: HostState.CONVERGING,
    InitialState.STOPPED: HostState.STOPPED,
    InitialState.SUSPENDED: HostState.SUSPENDED,
}


class Engine(FrameIntake, OperatorInputs, HealthInputs, Agreement, Sending, StickyRules):
    """One host's convergence state machine."""

    def __init__(
        self,
        config: ShoalConfig,
        keys: Keys,
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
        self.codec = Codec(cluster_id(cl.primary_vip), keys)
        self.digest = cl.heartbeat_digest()
        self.quorum = cl.partition_policy is PartitionPolicy.QUORUM
        dips = config.host.dedicated_ips
        self.dedicated_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = (
            dips[0].ip if dips else None
        )
        self.host = HostStateMachine(INITIAL[config.host.initial_state])
        self.rule_states = (RuleState.ENABLED,) * len(self.rules)
        self._start_health()
        self.roster = Roster(self.detect, now, self.timing.period)
        self.peers = self.roster.peers  # the roster's, read here for speed
        self.leader = Leader()
        self.epochs = EpochStore()
        self.tenure = Tenure(self.me)
        self.lease_until: float | None = None  # new connections taken until then (None: not)
        self.beacon = Beacon(self.codec, self.me, incarnation, now)
        self.beat_sent = self.beacon.beat_sent  # the beacon's, read here for every echo
        sticky = tuple(i for i, r in enumerate(self.rules) if r.sticky)
        self.handoffs = Handoffs(self.me, incarnation, sticky)
        self.holding = Holding(
            self.me,
            record,
            record if vote is None else vote,
            self.roster,
            self.beacon,
            self._emit,
            self.handoffs.lost,
        )
        self._sources_memo: tuple[object, frozenset[tuple[int, int, int]]] | None = None
        self._lease_ran = False  # a lease ran at the last step
        self._sticky_off: frozenset[int] = frozenset()  # sticky rules the kernel disables
        self._send_memo: tuple[int, tuple[object, ...], bool] | None = None
        self._reports_memo: (
            tuple[ShoalConfig, tuple[RuleState, ...], tuple[Health, ...], tuple[RuleReport, ...]]
            | None
        ) = None
        self._runs_memo: tuple[int, frozenset[tuple[int, int]]] | None = None
        self.started_at = now
        self.eligible_since = now  # the last start: a READY must be fresher than this
        self.leading = False
        self.leader_id: int | None = None
        self.wake = float("inf")
        self._ready_told = False  # READY sent, this host's own share not taken yet
        self.connections: int | None = None  # unknown until the shell reports them
        self.drain_deadline: float | None = None
        self.drain_started = NEVER
        self.drain_affine = False  # draining, a member until its affine clients went idle
        self.affine_left: int | None = None  # the kernel's affinity entries, as last reported
        self._offered_memo: tuple[tuple[RuleState, ...], tuple[RuleState, ...]] | None = None
        self.heal_reported: set[EpochKey] = set()
        self._start_intake()
        self.epochs_created = 0
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
        """Frames sent and received, epochs created, frames dropped by reason, and frames
        only an accepted (not the signing) key opened since the keys last changed."""
        return {
            **self.rejected,
            "frames_sent": self.beacon.frames_sent,
            "frames_received": self.frames_received,
            "epochs_created": self.epochs_created,
            "opened_by_accepted_key": self.codec.by_accepted,
        }

    def known_runs(self) -> tuple[int, frozenset[tuple[int, int]]]:
        """The runs (host id, incarnation) of the peers proven alive, and a version that
        moves whenever they change."""
        roster = self.roster
        memo = self._runs_memo
        if memo is None or memo[0] != roster.runs:
            memo = self._runs_memo = (roster.runs, roster.known_runs())
        return memo

    def snapshot(self, now: float) -> Snapshot:
        e = self.epoch
        live = []
        for p in sorted(self.roster.live(now), key=lambda p: p.host_id):
            hb = p.hb
            assert hb is not None
            default = bool(e and e.default_host == p.host_id and hb.epoch == e.key)
            leaving = hb.affinity is not None and hb.affinity.leaving
            view = PeerView(
                p.host_id,
                HostState.DRAINING if leaving else hb.state,
                hb.dedicated_ip,
                hb.epoch,
                default,
                now - p.last_heard,
                hb.rules,
                hb.health,
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
            rules=self._reports(),
            epoch_state=e,
            health=self.host_health,
        )

    # -------------------------------------------------------------- outputs

    def take_frames(self) -> list[bytes]:
        out, self.beacon.frames = self.beacon.frames, []
        return out

    def take_remote(self) -> list[Request | Answer]:
        """Remote-control requests for this host and answers to its own, received from
        proven runs since the last call (the shell carries them out)."""
        out, self.remote = self.remote, []
        return out

    def request(self, target: int, request_id: int, body: bytes) -> None:
        """Send an operator's request to host ``target`` (0: every host); see take_frames."""
        self.beacon.send_remote(Request, target, request_id, body)
        self._publish()  # a frame to take

    def answer(self, to: int, request_id: int, body: bytes) -> None:
        """Answer host ``to``'s request ``request_id``; see take_frames."""
        self.beacon.send_remote(Answer, to, request_id, body)
        self._publish()

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
        states = self._offered_states()
        if Health.FAILING in self.rule_health:
            states = self._kernel_rule_states()
        serving = self.host.state in SERVING
        sticky = bool(self.handoffs.sticky)
        if sticky:
            self.install = self._sticky_install(serving, states)
        else:
            self.install = Install(self.holding.installed, serving, states)
        t = min(self.beacon.deadline(self.timing.period), self.wake, self.roster.expiry_check)
        lease = self.lease_until
        if self.holding.installed and lease is not None:
            # the tokens go when the lease runs out; read afresh, not kept as a timer: a
            # lease is extended long before it ends, and a timer would fire for nothing
            t = min(t, lease)
        if self.drain_deadline is not None:
            t = min(t, self.drain_deadline)
        if sticky:
            t = min(t, self._sticky_deadline())
        self._deadline = t

    def _emit(self, eid: EventId, now: float, **fields: object) -> None:
        self._events.append(Event(eid, now, {"host": self.me, **fields}))
        self.outputs += 1

    # --------------------------------------------------------------- inputs

    def tick(self, now: float) -> None:
        self._step(now)

    def set_connections(self, count: int, now: float) -> None:
        """Established connections still open on this host (drainstop waits for 0)."""
        self.connections = max(0, count)
        self._step(now)

    # ------------------------------------------------------------- the step

    def _started(self) -> bool:
        """A member by its own will: started, or draining while its affine clients stay."""
        return self.host.state in ELIGIBLE or self.drain_affine

    def _eligible_self(self, now: float) -> bool:
        return self._started() and self.duplicate_until < now

    def _step(self, now: float, timers: bool = True) -> None:
        if timers:
            self._expire(now)
        self._check_drain(now)
        hs = self.handoffs
        if hs.sticky:
            self._hand_off(now)
        leader = self._leader(now)
        self.leading = leader == self.me
        self.leader_id = leader
        if leader == self.me:
            self._lead(now)
        elif leader is not None:
            self._follow(self.peers[leader], now)
        self._update_lease(now)
        if self.holding.acquiring and self.leading and not self._ready_told and self._told():
            # the leader's READY goes out before its own share goes in: the members take
            # theirs while it installs, one kernel update less on the way of a failover
            # (its share comes at the next step, at once, under the same lease rule)
            self._ready_told = True
            self.beacon.dirty = True
            self.wake = now
        else:
            self._ready_told = False
            if self.holding.take_tokens(self._eligible_self(now), self.lease_until, now):
                # the count was built for the READY regime just left: echoes arriving
                # before the next step would not be tallied, and that READY regime would
                # find the same stale count again
                self.tenure.count = None
        self._refresh_state(now)
        if hs.sticky and hs.check_in(self.holding.epoch, self.peers):
            self.beacon.dirty = True  # (an epoch adopted in this step is checked at once)
        self._maybe_send(now, leader)
        self._publish()

    def _told(self) -> bool:
        """Whether other members of this host's epoch take a share on its READY."""
        e = self.holding.epoch
        return e is not None and not e.members <= {self.me}

    def _expire(self, now: float) -> None:
        if now >= self.wake:
            self.wake = float("inf")
        if not self.roster.due(now):
            return  # no deadline has passed: hearing a host only ever moves its own later
        for p in self.roster.sweep(now):
            if self.holding.epoch and p.host_id in self.holding.epoch.members:
                why = f"not heard for {self.detect:.3g} s"
                silent = round(now - p.seen(self.detect), 3)
                self._emit(EventId.HOST_LEFT, now, peer=p.host_id, reason=why, silent_s=silent)

    def _check_drain(self, now: float) -> None:
        if self.host.state is not HostState.DRAINING:
            return
        e = self.holding.epoch
        if self.drain_deadline is not None and now >= self.drain_deadline:
            self.host.move(Observed.DRAIN_ENDED)
            self._stop(now, announce=False)
            self._emit(EventId.DRAIN_TIMEOUT, now)
        elif self.drain_affine:
            # its affine clients went idle, or its lease ran out (their entries went then)
            if self.affine_left == 0 or self.lease_until is None:
                self._let_affine_go(now)
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
            self._lease_ended(now)
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
        self._lease_ended(now)

    def _lease_regime(self) -> tuple[object, ...]:
        """What a lease count is only good for (the epoch by identity: this is compared
        for every echo)."""
        h = self.holding
        return (h.epoch, h.ready, self.roster.generation)
