"""Health inputs: what this host's checks say of its rules and of itself, carried out.

:class:`HealthInputs` is the part of :class:`~shoal.protocol.engine.core.Engine` that takes
a verdict from the shell (the checks run there; :mod:`shoal.health.verdict` makes their
results a verdict). A rule's health travels in the rule's report: the leader gives a
failing host no share of the rule (:func:`shoal.protocol.epoch.serving_hosts`), so its new
connections go elsewhere through the normal convergence while established ones go on; with
``on_failure = "disable"`` the kernel also drops the rule's established connections once
the host holds none of its share. The host-wide health moves the host state by the table
(:data:`~.host_state.MOVES`, ``Observed.UNHEALTHY`` and ``HEALTHY``): failing drains it as
``drainstop`` does, and only a host the check took out is put back by it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shoal.config import PortRule, ShoalConfig
from shoal.dataplane.contract import STRIDE, RuleState
from shoal.health.spec import OnFailure
from shoal.protocol.engine.beacon import Beacon
from shoal.protocol.engine.holding import Holding
from shoal.protocol.engine.host_state import Act, HostStateMachine, Observed
from shoal.protocol.events import EventId
from shoal.protocol.frames import Health


class HealthInputs:
    """Verdicts of the health checks, carried out."""

    cfg: ShoalConfig
    rules: list[PortRule]
    rule_states: tuple[RuleState, ...]
    host: HostStateMachine
    holding: Holding
    beacon: Beacon

    if TYPE_CHECKING:

        def _step(self, now: float, timers: bool = True) -> None: ...
        def _emit(self, eid: EventId, now: float, **fields: object) -> None: ...
        def _carry_out(self, act: Act, now: float, timeout: float | None, by: str) -> None: ...
        def _offered_states(self) -> tuple[RuleState, ...]: ...

    def _start_health(self) -> None:
        self.rule_health: tuple[Health, ...] = self._checked_rules()
        self.host_health = Health.OK if self._host_checked() else Health.NONE
        self.health_out = False  # the host-wide check drained (or stopped) this host

    def _checked_rules(self) -> tuple[Health, ...]:
        checked = {c.rule for c in self.cfg.host.checks if c.rule is not None}
        return tuple(Health.OK if r.key in checked else Health.NONE for r in self.rules)

    def _host_checked(self) -> bool:
        return any(c.rule is None for c in self.cfg.host.checks)

    def _reset_health(self, old_rules: list[PortRule]) -> None:
        """After a reload: checks added start healthy, checks removed report nothing."""
        old = dict(zip((r.key for r in old_rules), self.rule_health, strict=False))
        self.rule_health = tuple(
            h if h is Health.NONE else (old.get(r.key) or Health.OK)
            for r, h in zip(self.rules, self._checked_rules(), strict=True)
        )
        if not self._host_checked():
            self.host_health = Health.NONE
        elif self.host_health is Health.NONE:
            self.host_health = Health.OK

    def health(
        self, rule: int | None, healthy: bool, now: float, check: str = "", reason: str = ""
    ) -> None:
        """A check's verdict changed: ``rule`` is a rule index, or None for the host-wide
        check."""
        h = Health.OK if healthy else Health.FAILING
        if rule is None:
            self._host_verdict(h, now, check, reason)
        else:
            if not 0 <= rule < len(self.rules):
                raise ValueError(f"no rule with index {rule}")
            self.rule_health = (*self.rule_health[:rule], h, *self.rule_health[rule + 1 :])
            key = self.rules[rule].key
            eid = EventId.HEALTH_RECOVERED if healthy else EventId.HEALTH_FAILED
            effect = f"rule {key} " + ("takes its share again" if healthy else "gives its share up")
            self._emit(eid, now, check=check, rule=key, effect=effect, reason=reason)
        self.beacon.dirty = True
        self._step(now)

    def _host_verdict(self, h: Health, now: float, check: str, reason: str) -> None:
        self.host_health = h
        healthy = h is Health.OK
        if healthy:
            effect = "the host starts again" if self.health_out else "nothing to undo"
        else:
            effect = "the host drains, as drainstop does"
        eid = EventId.HEALTH_RECOVERED if healthy else EventId.HEALTH_FAILED
        self._emit(eid, now, check=check, rule="(host)", effect=effect, reason=reason)
        if healthy and not self.health_out:
            return  # the operator put the host where it is, not this check
        m = self.host.move(Observed.HEALTHY if healthy else Observed.UNHEALTHY)
        if m.act is not Act.NOTHING:
            self._carry_out(m.act, now, None, by=f"check {check}")
        self.health_out = not healthy and m.to is not None

    def _kernel_rule_states(self) -> tuple[RuleState, ...]:
        """The rule states the kernel enforces: the operator's, and a rule whose check fails
        with ``on_failure = "disable"`` off once this host holds none of its share."""
        out = list(self._offered_states())
        for i, h in enumerate(self.rule_health):
            if h is not Health.FAILING or out[i] is RuleState.DISABLED:
                continue
            if self._on_failure(self.rules[i].key) is not OnFailure.DISABLE:
                continue
            lo, hi = i * STRIDE, (i + 1) * STRIDE
            if not any(lo <= t < hi for t in self.holding.installed):
                out[i] = RuleState.DISABLED
        return tuple(out)

    def _on_failure(self, rule: str) -> OnFailure:
        for c in self.cfg.host.checks:
            if c.rule == rule:
                return c.on_failure or OnFailure.DRAIN
        return OnFailure.DRAIN
