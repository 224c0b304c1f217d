"""The host state × operator verb, as a table: every pair driven on a real engine.

The expected outcomes are written out here, as an operator reads them in NLB's manual and
ours, independently of the engine's own table: a change to either shows up as a failure.
"""

from __future__ import annotations

import pytest

from shoal.protocol.codec import Keys
from shoal.protocol.engine import Command, Engine, Phase
from shoal.protocol.engine.host_state import (
    MOVES,
    HostStateMachine,
    IllegalMove,
    Observed,
)
from shoal.protocol.engine.phase import MOVES as PHASE_MOVES
from shoal.protocol.engine.phase import IllegalStep, Step, moved
from shoal.protocol.frames import HostState
from shoal.sim.scenario import KEY, cluster_configs

S = HostState
C = Command
REFUSED_SUSPENDED = "host is suspended: only resume and query are accepted"

# (state before, verb) -> (state after, accepted, what the operator reads)
EXPECTED: dict[tuple[HostState, Command], tuple[HostState, bool, str]] = {
    (S.STOPPED, C.START): (S.CONVERGING, True, "cluster operations started"),
    (S.STOPPED, C.STOP): (S.STOPPED, True, "cluster operations already stopped"),
    (S.STOPPED, C.DRAINSTOP): (
        S.STOPPED,
        False,
        "cluster operations are stopped: nothing to drain",
    ),
    (S.STOPPED, C.SUSPEND): (S.SUSPENDED, True, "cluster operations suspended"),
    (S.STOPPED, C.RESUME): (S.STOPPED, False, "host is not suspended"),
    (S.STOPPED, C.ENABLE): (S.STOPPED, True, "all rules: enabled"),
    (S.STOPPED, C.DISABLE): (S.STOPPED, True, "all rules: disabled"),
    (S.STOPPED, C.DRAIN): (S.STOPPED, True, "all rules: draining"),
    (S.CONVERGING, C.START): (S.CONVERGING, True, "cluster operations already started"),
    (S.CONVERGING, C.STOP): (S.STOPPED, True, "cluster operations stopped"),
    (S.CONVERGING, C.DRAINSTOP): (S.DRAINING, True, "connection draining started"),
    (S.CONVERGING, C.SUSPEND): (S.SUSPENDED, True, "cluster operations suspended"),
    (S.CONVERGING, C.RESUME): (S.CONVERGING, False, "host is not suspended"),
    (S.CONVERGING, C.ENABLE): (S.CONVERGING, True, "all rules: enabled"),
    (S.CONVERGING, C.DISABLE): (S.CONVERGING, True, "all rules: disabled"),
    (S.CONVERGING, C.DRAIN): (S.CONVERGING, True, "all rules: draining"),
    (S.CONVERGED, C.START): (S.CONVERGED, True, "cluster operations already started"),
    (S.CONVERGED, C.STOP): (S.STOPPED, True, "cluster operations stopped"),
    (S.CONVERGED, C.DRAINSTOP): (S.DRAINING, True, "connection draining started"),
    (S.CONVERGED, C.SUSPEND): (S.SUSPENDED, True, "cluster operations suspended"),
    (S.CONVERGED, C.RESUME): (S.CONVERGED, False, "host is not suspended"),
    (S.CONVERGED, C.ENABLE): (S.CONVERGED, True, "all rules: enabled"),
    # a host alone that disables or drains every rule still holds its (empty) share
    (S.CONVERGED, C.DISABLE): (S.CONVERGED, True, "all rules: disabled"),
    (S.CONVERGED, C.DRAIN): (S.CONVERGED, True, "all rules: draining"),
    (S.DRAINING, C.START): (S.CONVERGING, True, "cluster operations started"),
    (S.DRAINING, C.STOP): (S.STOPPED, True, "cluster operations stopped"),
    (S.DRAINING, C.DRAINSTOP): (S.DRAINING, True, "already draining"),
    (S.DRAINING, C.SUSPEND): (S.SUSPENDED, True, "cluster operations suspended"),
    (S.DRAINING, C.RESUME): (S.DRAINING, False, "host is not suspended"),
    (S.DRAINING, C.ENABLE): (S.DRAINING, True, "all rules: enabled"),
    (S.DRAINING, C.DISABLE): (S.DRAINING, True, "all rules: disabled"),
    (S.DRAINING, C.DRAIN): (S.DRAINING, True, "all rules: draining"),
    (S.SUSPENDED, C.RESUME): (
        S.STOPPED,
        True,
        "cluster control resumed; host is stopped (use start)",
    ),
    **{
        (S.SUSPENDED, c): (S.SUSPENDED, False, REFUSED_SUSPENDED)
        for c in Command
        if c is not Command.RESUME
    },
}


def engine_in(state: HostState) -> tuple[Engine, float]:
    """A one-host cluster's engine brought into ``state`` through its inputs."""
    cfg = cluster_configs(1)[0]
    now = 0.0
    e = Engine(cfg, Keys(KEY), 1, now)

    def run(until: float) -> None:
        nonlocal now
        while now < until:
            now = min(until, max(now + 1e-3, e.next_deadline()))
            e.tick(now)

    if state is S.CONVERGING:
        return e, now
    run(2.0)  # alone, it forms a cluster once it listened for the detection time
    assert e.state is S.CONVERGED
    if state is S.DRAINING:
        e.set_connections(3, now)
        assert e.command(C.DRAINSTOP, now).ok
    elif state is S.STOPPED:
        assert e.command(C.STOP, now).ok
    elif state is S.SUSPENDED:
        assert e.command(C.SUSPEND, now).ok
    assert e.state is state
    return e, now


@pytest.mark.parametrize(("before", "verb"), sorted(EXPECTED, key=str))
def test_every_verb_in_every_state(before: HostState, verb: Command) -> None:
    after, ok, message = EXPECTED[(before, verb)]
    e, now = engine_in(before)
    e.take_events()
    res = e.command(verb, now)
    events = [ev.id.name for ev in e.take_events()]
    state = e.state
    if after is S.CONVERGING and state is S.CONVERGED:
        # a host alone needs nobody's word: the step the verb ran converged it at once
        assert "CONVERGED_DEFAULT" in events
        state = S.CONVERGING
    assert (state, res.ok, res.message) == (after, ok, message)
    if not ok and verb in (C.ENABLE, C.DISABLE, C.DRAIN):
        assert events[-1] == "RULE_COMMAND_REFUSED"


def test_the_table_is_complete_and_nothing_else_moves() -> None:
    """Every state has a move for every verb; no verb has a move the table above lacks."""
    verbs = {(s, c) for s in HostState for c in Command}
    assert verbs == set(EXPECTED) == {k for k in MOVES if isinstance(k[1], Command)}


def test_a_move_missing_from_the_table_is_an_error() -> None:
    machine = HostStateMachine(S.STOPPED)
    with pytest.raises(IllegalMove, match="STOPPED"):
        machine.move(Observed.CONVERGED)  # a stopped host cannot converge
    assert machine.state is S.STOPPED
    assert machine.move(Command.START).to is S.CONVERGING
    assert machine.move(Observed.CONVERGED).to is S.CONVERGED
    with pytest.raises(IllegalMove):
        machine.move(Observed.DRAIN_ENDED)  # only a draining host ends a drain


def test_a_rule_index_out_of_range_is_refused_and_reported() -> None:
    e, now = engine_in(S.CONVERGED)
    res = e.command(C.DISABLE, now, rule=7)
    assert not res.ok and res.message == "no rule with index 7"
    assert e.take_events()[-1].text.startswith("rule command disable refused on host 1")


def test_epoch_phase_moves() -> None:
    """Adopting always starts over; READY comes only from adopted or lapsed; a lapse keeps
    an epoch that was READY counting as seen READY (the host does not vote again)."""
    assert moved(Phase.NONE, Step.ADOPT) is Phase.ADOPTED
    assert moved(Phase.ADOPTED, Step.READY) is Phase.READY
    assert moved(Phase.READY, Step.LAPSE) is Phase.LAPSED
    assert Phase.LAPSED.seen_ready and not Phase.LAPSED.ready
    assert moved(Phase.LAPSED, Step.READY) is Phase.READY
    assert all(moved(p, Step.DROP) is Phase.NONE for p in Phase)
    for bad in ((Phase.NONE, Step.READY), (Phase.READY, Step.READY), (Phase.NONE, Step.LAPSE)):
        assert bad not in PHASE_MOVES
        with pytest.raises(IllegalStep):
            moved(*bad)
