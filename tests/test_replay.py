"""Replayed heartbeats: a neighbour records every frame and sends them again later. Since
frames are authentic, only proof that a sender is alive *now* keeps a dead host dead at a
host that restarted, or one that forgot it."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.protocol.engine import Engine
from shoal.protocol.engine.peers import FORGET_AFTER
from shoal.protocol.frames import Rejection
from shoal.sim.adversary import Recorder
from shoal.sim.checkers import InvariantViolation
from shoal.sim.cluster import SimCluster
from shoal.sim.scenario import KEY, cluster_configs, run_scenario
from tests.test_simulation import scenarios, with_engine


class TrustsAnyRun(Engine):
    """The engine without proofs: any authentic frame of a run it does not know is taken
    as the peer's (as before proofs existed)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        admit = self.roster.admit
        self.roster.admit = lambda frame, now, proof: admit(frame, now, True)  # type: ignore[method-assign]


def _crash_and_replay(cluster: type[SimCluster], forget: bool) -> tuple[SimCluster, int]:
    """Three hosts converge while a neighbour records; host 3 crashes; host 1's daemon
    restarts (or, with ``forget``, every host goes ten minutes without hearing host 3);
    then host 3's frames are replayed to every host for 30 periods, over and over.
    Returns the cluster and how many frames were replayed."""
    sim = cluster(cluster_configs(3), KEY, 11)
    sim.recorder = Recorder()
    sim.observers.append(SimCluster.check_ghosts)
    p = sim.period
    sim.run_until(20 * p)
    assert sim.converged({1, 2, 3})
    sim.crash_host(3)
    sim.run_until(sim.now + 20 * p)
    assert sim.converged({1, 2})
    if forget:
        sim.run_until(sim.now + FORGET_AFTER + 60)
        assert all(3 not in h.engine.peers for h in list(sim.hosts.values())[:2] if h.engine)
    else:
        sim.crash_daemon(1)
        sim.restart_daemon(1)
    sent = 0
    rng = random.Random(5)
    for _ in range(3):
        sent += sim.recorder.replay(sim, 3, sim.now, 10 * p, rng)
        sim.run_until(sim.now + 10 * p)
    return sim, sent


@pytest.mark.parametrize("forget", [False, True], ids=["restarted", "forgotten"])
def test_a_dead_hosts_replayed_frames_make_it_live_nowhere(forget: bool) -> None:
    """The finding: a restarted daemon took a dead host's replayed heartbeats, and made it
    a member. Now nothing changes: host 3 is live nowhere (the ``ghosts`` checker after
    every input), no epoch has it, the two hosts stay converged, and the replayed frames are
    counted as unproven."""
    sim, sent = _crash_and_replay(SimCluster, forget)
    assert sent >= 60
    assert sim.converged({1, 2})
    for h in (1, 2):
        e = sim.hosts[h].engine
        assert e is not None and e.epoch is not None and 3 not in e.epoch.members
    one = sim.hosts[1].engine
    assert one is not None and one.counters[Rejection.UNPROVEN.value] >= 20


@pytest.mark.parametrize("forget", [False, True], ids=["restarted", "forgotten"])
def test_without_proofs_the_replay_makes_a_ghost(forget: bool) -> None:
    """The checker catches the engine that takes any authentic frame of an unknown run."""
    with pytest.raises(InvariantViolation, match="ghosts: host 3"):
        _crash_and_replay(with_engine(TrustsAnyRun), forget)


@scenarios(60)
@given(seed=st.integers(0, 2**31 - 1))
def test_random_scenarios_with_a_replaying_neighbour_keep_the_contract(seed: int) -> None:
    """Every fault, plus replays of any host's recorded frames (mostly a host that is
    down) to every host: no ghost, and every other invariant holds."""
    assert run_scenario(seed, replay=True).steps
