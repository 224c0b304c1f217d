"""Operator inputs: the NLB verbs and a reload of the configuration.

:class:`OperatorInputs` is the part of :class:`~shoal.protocol.engine.core.Engine` that
carries out a verb: the host-state table (:mod:`.host_state`) says where the host goes and
what to do, and this does it (forget or keep the epoch, lend no vote, start a drain, set a
rule's state). A base of the engine: what it reads is declared below, and it calls back
only :meth:`_step`, :meth:`_emit` and :meth:`_could_join`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from shoal.choices import FilteringMode, PartitionPolicy
from shoal.config import PortRule, ShoalConfig
from shoal.dataplane.contract import RuleState
from shoal.protocol.codec import Codec, Keys
from shoal.protocol.engine.beacon import Beacon
from shoal.protocol.engine.handoff import Handoffs
from shoal.protocol.engine.holding import Holding
from shoal.protocol.engine.host_state import RULE_COMMANDS, Act, Command, HostStateMachine
from shoal.protocol.engine.leader import Leader
from shoal.protocol.engine.peers import Peer, Roster
from shoal.protocol.engine.timing import Timing
from shoal.protocol.events import EventId
from shoal.protocol.frames import Heartbeat, cluster_id

RULE_TARGETS = {
    Command.ENABLE: (RuleState.ENABLED, EventId.RULE_ENABLED),
    Command.DISABLE: (RuleState.DISABLED, EventId.RULE_DISABLED),
    Command.DRAIN: (RuleState.DRAINING, EventId.RULE_DRAINING),
}


@dataclass(frozen=True)
class CommandResult:
    ok: bool
    message: str


def _keys_text(keys: Keys) -> str:
    n = len(keys.accepted)
    return "signing with the new key" + (f", {n} more accepted" if n else ", no other accepted")


class OperatorInputs:
    """Verbs and reloads, carried out."""

    me: int
    cfg: ShoalConfig
    rules: list[PortRule]
    rule_states: tuple[RuleState, ...]
    digest: bytes
    quorum: bool
    detect: float
    timing: Timing
    host: HostStateMachine
    holding: Holding
    handoffs: Handoffs
    leader: Leader
    roster: Roster
    peers: dict[int, Peer]
    beacon: Beacon
    codec: Codec
    started_at: float
    eligible_since: float
    drain_deadline: float | None
    drain_started: float
    drain_affine: bool
    affine_left: int | None
    lease_until: float | None
    health_out: bool

    if TYPE_CHECKING:

        def _step(self, now: float, timers: bool = True) -> None: ...
        def _emit(self, eid: EventId, now: float, **fields: object) -> None: ...
        def _could_join(self, hb: Heartbeat) -> bool: ...
        def _use_timing(self, timing: Timing) -> None: ...
        def _reset_health(self, old_rules: list[PortRule]) -> None: ...

    def command(
        self, cmd: Command, now: float, rule: int | None = None, timeout: float | None = None
    ) -> CommandResult:
        """An operator verb; ``rule`` is a rule index for enable/disable/drain (None: all)."""
        if cmd in RULE_COMMANDS and rule is not None and not 0 <= rule < len(self.rules):
            result = CommandResult(False, f"no rule with index {rule}")
        else:
            result = self._command(cmd, now, rule, timeout)
        if result.ok and cmd not in RULE_COMMANDS:
            self.health_out = False  # the operator decides where the host is now
        if result.ok:
            self.beacon.dirty = True
            self._step(now)
        elif cmd in RULE_COMMANDS:
            self._emit(EventId.RULE_COMMAND_REFUSED, now, command=cmd.value, reason=result.message)
        return result

    def reload(self, config: ShoalConfig, now: float, keys: Keys | None = None) -> str:
        """Apply a new configuration of this host (and ``keys``, when given); returns what
        changed. The cluster id and the keys are applied with it: nothing the file says is
        reported applied and left out."""
        if config.host.host_id != self.me:
            raise ValueError("host.host_id cannot change on reload; restart the daemon")
        keys = self.codec.keys if keys is None else keys
        rekeyed = keys != self.codec.keys
        cid = cluster_id(config.cluster.primary_vip)
        if rekeyed or cid != self.codec.cluster:
            self.codec.rekey(cid, keys)
        new_digest = config.cluster.heartbeat_digest()
        old_rules = self.rules
        self.cfg = config
        self.leader.forget_plan()
        if new_digest != self.digest:
            cl = config.cluster
            self.digest = new_digest
            self._use_timing(Timing(cl.period_ms / 1000.0, cl.tolerance))
            self.roster.detect, self.roster.period = self.detect, self.timing.period
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
        self._reset_health(old_rules)
        if rekeyed:
            what += f"; cluster key changed ({_keys_text(keys)})"
        self._emit(EventId.RELOADED, now, what=what)
        self.beacon.dirty = True
        self._step(now)
        return what

    def _command(
        self, cmd: Command, now: float, rule: int | None, timeout: float | None
    ) -> CommandResult:
        """Move the host state by the table, then do what the move asks."""
        m = self.host.move(cmd)
        if m.act is Act.RULES:
            return self._rule_command(cmd, now, rule)
        self._carry_out(m.act, now, timeout, by=cmd.value)
        return CommandResult(m.ok, m.message)

    def _carry_out(self, act: Act, now: float, timeout: float | None, by: str) -> None:
        """What a move of the host state asks besides the move (``by``: the verb or the
        check that made it)."""
        if act is Act.START:
            self._drop_epoch()
        elif act is Act.RESTART:
            self._emit(EventId.DRAIN_INTERRUPTED, now, command=by)
            self.drain_deadline = None
            self.drain_affine = False  # a member still, if it was one: its rules come back
        elif act is Act.INTERRUPT_AND_STOP:
            self._emit(EventId.DRAIN_INTERRUPTED, now, command=by)
        if act in (Act.START, Act.RESTART):
            self.eligible_since = now
            self._emit(EventId.CLUSTER_STARTED, now)
        elif act in (Act.STOP, Act.INTERRUPT_AND_STOP):
            self._stop(now)
        elif act in (Act.DRAIN, Act.DRAIN_NOW):
            self.drain_deadline = now + timeout if timeout is not None else None
            self._emit(EventId.DRAIN_STARTED, now)
            # a member under a lease may serve affine clients: on drainstop it stays one,
            # every rule draining, until they went idle (see :meth:`_let_affine_go`)
            keep = act is Act.DRAIN and self.lease_until is not None
            self.drain_affine = bool(self.handoffs.sticky) and keep
            self.drain_started = now
            self.affine_left = None
            if not self.drain_affine:
                self._let_affine_go(now, announce=False)
        elif act is Act.AFFINE_GO and self.drain_affine:
            self._let_affine_go(now)
        elif act is Act.SUSPEND:
            self._stop(now, announce=False)
            self._emit(EventId.SUSPENDED, now)
        elif act is Act.RESUME:
            self._emit(EventId.RESUMED, now)

    def _rule_command(self, cmd: Command, now: float, rule: int | None) -> CommandResult:
        target, ev = RULE_TARGETS[cmd]
        for i in range(len(self.rules)) if rule is None else [rule]:
            self.rule_states = (*self.rule_states[:i], target, *self.rule_states[i + 1 :])
            if self.rules[i].mode is not FilteringMode.DISABLED:
                self._emit(ev, now, rule=self.rules[i].key)
        which = "all rules" if rule is None else f"rule {self.rules[rule].key}"
        return CommandResult(True, f"{which}: {target.name.lower()}")

    def _let_affine_go(self, now: float, announce: bool = True) -> None:
        """A draining host leaves the cluster: the others carry on without it, and its
        affine clients go to the owners of their buckets."""
        self.drain_affine = False
        self.drain_started = now  # its connections are counted from here
        self.holding.lend_no_vote()
        self.handoffs.lost()
        self.beacon.dirty = True
        if announce:
            self._emit(EventId.DRAIN_AFFINE_IDLE, now)

    def _stop(self, now: float, announce: bool = True) -> None:
        """Let go of everything and leave (the host state moved already)."""
        self.drain_deadline = None
        self.drain_affine = False
        self._leave()
        if announce:
            self._emit(EventId.CLUSTER_STOPPED, now)

    def _leave(self) -> None:
        self.holding.lend_no_vote()
        self._drop_epoch()

    def _drop_epoch(self) -> None:
        self.holding.drop()
        self.leader.forget()
