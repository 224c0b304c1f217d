"""The protocol's rules, one scripted scenario each, and for each safety rule a broken
engine that the simulator must catch (a check that cannot fail proves nothing).

Every scenario is scripted (no random faults): what it exercises does not move when the
random draws of the simulator do.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from shoal.protocol.engine import Command, Engine
from shoal.protocol.engine.ready import blocker
from shoal.protocol.engine.timing import Timing
from shoal.protocol.events import EventId
from shoal.protocol.frames import Heartbeat
from shoal.sim.checkers import InvariantViolation
from shoal.sim.cluster import SimCluster
from shoal.sim.scenario import KEY, cluster_configs

P = 0.1  # the default profile's period


def cluster(n: int, policy: str = "quorum", engine: type[Engine] = Engine) -> SimCluster:
    """``n`` hosts, no loss, converged."""
    sim = SimCluster(cluster_configs(n, buckets=64, policy=policy), KEY, 1, engine=engine)
    sim.run_until(20 * P)
    assert sim.converged(set(range(1, n + 1)))
    return sim


def events(sim: SimCluster, host: int) -> list[EventId]:
    return [e.id for h, e in sim.events if h == host]


# ------------------------------------------------------------ release before acquire


def test_a_bucket_is_taken_only_after_its_old_owner_let_go() -> None:
    """Host 3 joins: every bucket it gets, its kernel accepts only after the kernel that
    owned it stopped accepting it (checked at every input), and the join completes."""
    sim = SimCluster(cluster_configs(3, buckets=64), KEY, 2)
    sim.crash_host(3)
    sim.run_until(20 * P)
    before = {h: sim.hosts[h].kernel.accepting(sim.now) for h in (1, 2)}
    dropped: dict[int, float] = {}
    taken: dict[int, float] = {}

    def watch(s: SimCluster) -> None:
        for h in (1, 2):
            for tok in before[h] - s.hosts[h].kernel.accepting(s.now):
                dropped.setdefault(tok, s.now)
        for tok in s.hosts[3].kernel.accepting(s.now):
            taken.setdefault(tok, s.now)

    sim.observers.append(watch)
    sim.restart_host(3)
    sim.run_until(sim.now + 20 * P)
    assert sim.converged({1, 2, 3})
    moved = set(taken) & (before[1] | before[2])
    assert len(moved) >= 20  # about a third of the 64 buckets
    assert all(dropped[t] <= taken[t] for t in moved)


# --------------------------------------------------------------------------- lease


def test_a_dead_daemons_kernel_stops_before_its_buckets_move() -> None:
    """kill -9 of host 3's daemon: its kernel keeps accepting until the lease the daemon
    last renewed runs out, and the others take its buckets only after that, within the
    detection time and a few periods."""
    sim = cluster(3)
    crashed = sim.now
    tokens = sim.hosts[3].kernel.accepting(sim.now)
    lease_end = sim.hosts[3].kernel.lease_until
    sim.crash_daemon(3)
    taken: list[float] = []

    def watch(s: SimCluster) -> None:
        if not taken and tokens & (
            s.hosts[1].kernel.accepting(s.now) | s.hosts[2].kernel.accepting(s.now)
        ):
            taken.append(s.now)

    sim.observers.append(watch)
    sim.run_until(sim.now + 15 * P)
    assert taken and lease_end <= taken[0]
    timing = Timing(P, 4)
    assert taken[0] - crashed <= timing.detect + timing.lease + 3 * P


# --------------------------------------------------------------------------- fence


@dataclass(frozen=True)
class NoWait(Timing):
    """Delays with a fence that is over at once."""

    @property
    def lease(self) -> float:
        return -1e9

    @property
    def margin(self) -> float:
        return 0.0


class NoFence(Engine):
    """A broken leader: READY as soon as the members reported their releases, without
    waiting for the leases of the hosts it fenced out to run out."""

    def _declare_ready(self, now: float) -> None:
        e = self.epoch
        if e is None or self.epoch_ready:
            return
        nowait = NoWait(self.timing.period, 0)
        why = blocker(e, self.me, self.roster, {}, self.eligible_since, self.digest, nowait, now)
        if why is None or why < float("inf"):
            self._ready(now)


def silent_while_heard(engine: type[Engine]) -> SimCluster:
    """Host 1 (the leader) stops hearing host 3 while host 2 still does, acknowledges it
    and vouches for it; just before the vouching runs out (two detection times after host 1
    last heard host 3), host 3's daemon dies. The leader detects host 3 first, while host
    3's kernel still runs on a lease that host 2's acknowledgements kept alive."""
    sim = cluster(3, engine=engine)
    sim.faults.cut = {(3, 1)}
    first = sim.hosts[1].engine
    assert first is not None
    sim.run_until(sim.now + 1.9 * first.timing.detect)
    sim.crash_daemon(3)
    sim.run_until(sim.now + 20 * P)
    return sim


def test_the_fence_waits_for_a_silent_hosts_lease() -> None:
    """The leader declares the epoch without host 3 READY only once no acknowledgement can
    still keep host 3's lease alive: a lease and a margin after host 2 last heard it.
    Without the fence (a broken leader), host 3's buckets are taken while its kernel still
    accepts, and the simulator catches the double accept."""
    sim = silent_while_heard(Engine)
    assert sim.converged({1, 2}) and sim.covered()
    with pytest.raises(InvariantViolation, match="exclusive"):
        silent_while_heard(NoFence)


class ForgetsWhoLeft(Engine):
    """A broken leader: it forgets when a host outside its epoch stopped acknowledging
    another (as every engine did before the rule below)."""

    def _on_heartbeat(self, hb: Heartbeat, now: float) -> bool:
        out = super()._on_heartbeat(hb, now)
        self.peers[hb.host_id].acks_left.clear()
        return out


def leaves_as_the_leader_fences(engine: type[Engine], verb: Command) -> SimCluster:
    """Host 1 (the leader) stops hearing host 3 while host 2 still does and acknowledges
    it; the moment host 1 makes an epoch without host 3, host 2 leaves it (``verb``). Host
    2 is then no member whose silence the fence waits on, yet its acknowledgements kept host
    3's lease alive until it left."""
    sim = cluster(3, engine=engine)
    first = sim.hosts[1].engine
    assert first is not None and first.epoch is not None
    before = first.epoch.key
    sim.faults.cut = {(3, 1)}
    left: list[float] = []

    def watch(s: SimCluster) -> None:
        e = s.hosts[1].engine
        if not left and e is not None and e.epoch is not None and e.epoch.key != before:
            left.append(s.now)
            s.command(2, verb)

    sim.observers.append(watch)
    sim.run_until(sim.now + 30 * P)
    assert left
    return sim


@pytest.mark.parametrize("verb", [Command.SUSPEND, Command.STOP])
def test_the_fence_waits_for_a_host_that_left_while_acknowledging(verb: Command) -> None:
    """Found by the simulator: the fence counted only the new epoch's members, so host 1
    took host 3's buckets while host 3's kernel still accepted on a lease host 2 had just
    renewed. The fence now also waits a lease after host 2's heartbeats stopped
    acknowledging host 3; the leader that forgets it is caught."""
    sim = leaves_as_the_leader_fences(Engine, verb)
    assert sim.converged({1})
    with pytest.raises(InvariantViolation, match="exclusive"):
        leaves_as_the_leader_fences(ForgetsWhoLeft, verb)


# -------------------------------------------------------------------------- quorum


def test_only_the_side_with_a_quorum_takes_over() -> None:
    """Four hosts split 2 | 2: the side with the lowest id (exactly half, with host 1) takes
    every bucket; the other reports no quorum and takes nothing. Healed, all four converge."""
    sim = cluster(4)
    sim.faults.groups = {1: 0, 2: 0, 3: 1, 4: 1}
    sim.run_until(sim.now + 20 * P)
    assert sim.converged({1, 2}) and sim.covered()
    assert not sim.hosts[3].kernel.accepting(sim.now)
    assert not sim.hosts[4].kernel.accepting(sim.now)
    assert EventId.NO_QUORUM in events(sim, 3)
    sim.faults.groups = {}
    sim.run_until(sim.now + 20 * P)
    assert sim.converged({1, 2, 3, 4})


def test_with_the_available_policy_both_sides_serve_and_heal() -> None:
    """NLB's policy: each side of a 2 | 2 split takes every bucket (by design); once healed,
    they converge and nothing is accepted twice from then on."""
    sim = cluster(4, policy="available")
    sim.faults.groups = {1: 0, 2: 0, 3: 1, 4: 1}
    sim.check_exclusive = False  # two clusters, both serving, by design
    sim.run_until(sim.now + 20 * P)
    assert sim.converged({1, 2}) and sim.converged({3, 4})
    sim.faults.groups = {}
    sim.run_until(sim.now + 30 * P)
    assert sim.converged({1, 2, 3, 4})
    sim.check_exclusive_again()
    sim.run_until(sim.now + 20 * P)
