"""Client affinity across convergence, proven in the simulator: random fault scenarios with
clients connecting through every host's affinity and away tables all along (see
:mod:`shoal.sim.affinity`), deterministic runs of the events operators meet, and one broken
variant per rule of the handoff, each caught. Any breach names its seed:
``run_scenario(seed, sticky=True)``."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.config import ShoalConfig
from shoal.dataplane.contract import Away
from shoal.protocol.engine import Command, Engine, ready
from shoal.protocol.engine.agreement import Agreement
from shoal.protocol.engine.holding import Holding
from shoal.protocol.engine.leader import supersedes
from shoal.protocol.epoch import EpochState
from shoal.runtime import HostRuntime, Output
from shoal.sim.affinity import MARGIN
from shoal.sim.checkers import InvariantViolation
from shoal.sim.cluster import SimCluster
from shoal.sim.scenario import KEY, cluster_configs, reweighted, run_scenario
from tests.test_simulation import scenarios

TIMEOUT = 3  # seconds of affinity in the deterministic runs


@scenarios(40)
@given(seed=st.integers(0, 2**31 - 1))
def test_random_scenarios_with_sticky_rules_keep_the_contract(seed: int) -> None:
    """Crashes, daemon-only crashes, partitions, loss, restarts, verbs, weight changes, with
    clients throughout: no client is ever taken by two hosts, nor by another host while one
    serves it by affinity; once idle, every client is taken by exactly one host."""
    assert run_scenario(seed, sticky=True).steps


def steady(n: int = 4) -> tuple[SimCluster, list[ShoalConfig]]:
    configs = cluster_configs(n, 64, sticky=TIMEOUT)
    sim = SimCluster(configs, KEY, 7)
    sim.run_until(2.0)
    assert sim.converged(set(range(1, n + 1)))
    return sim, configs


def test_affine_clients_keep_their_host_when_buckets_move() -> None:
    """A weight change, a host leaving and coming back: every client that keeps connecting
    keeps its host (the clients' SYNs are checked against every host's tables), and one
    that went idle for longer than the timeout is taken by its bucket's owner."""
    sim, configs = steady()
    clients = sim.start_clients(40, every=0.25)
    sim.run_until(5.0)
    sim.reload(2, reweighted(configs[1], 100))  # host 2 takes more buckets
    sim.run_until(9.0)
    assert sim.converged({1, 2, 3, 4})
    assert clients.kept > 50 and clients.moved == 0  # no affine client moved
    sim.command(3, Command.STOP)
    sim.run_until(13.0)
    sim.command(3, Command.START)
    sim.run_until(17.0)
    assert sim.converged({1, 2, 3, 4})
    assert clients.taken > 200 and clients.kept > 150
    # the clients of host 3 moved when it stopped (its affinity went with it), and no other
    assert 0 < clients.moved <= 20
    before = clients.moved
    sim.reload(2, reweighted(configs[1], 10))
    sim.run_until(21.0)
    assert clients.moved == before  # the weight change moved no affine client
    sim.clients_on = False
    sim.run_until(sim.now + TIMEOUT + MARGIN + 1)
    clients.settled(sim.now)


def test_a_crashed_hosts_clients_go_to_the_owners() -> None:
    """Power off: its affinity is gone with it; its clients go to their buckets' owners
    within the failover, and nobody else's move."""
    sim, _ = steady()
    clients = sim.start_clients(40, every=0.25)
    sim.run_until(5.0)
    on3 = {c.key for c in clients.clients if c.last_host == 3}
    sim.crash_host(3)
    sim.run_until(9.0)
    assert sim.converged({1, 2, 4}) and on3
    moved = {c.key for c in clients.clients if c.last_host not in (3, None)}
    assert on3 & moved  # they were taken again, by others
    assert not [c for c in clients.clients if c.last_host == 3 and c.unanswered > 8]


class KeepsNoAway(HostRuntime):
    """Broken: the away entries never reach the kernel (the handoff is ignored)."""

    def _put_away(self, out: Output) -> bool:
        self.away.clear()
        return True


class ReadyWithoutHandoffs(Engine):
    """Broken: the leader declares READY without waiting for the handoffs."""

    def _declare_ready(self, now: float) -> None:
        hs = self.handoffs
        sticky, hs.sticky = hs.sticky, ()
        try:
            Agreement._declare_ready(self, now)
        finally:
            hs.sticky = sticky


class KeepsEntriesOnLapse(Engine):
    """Broken: a host that loses its tokens keeps its affinity entries (no new generation)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.handoffs.lost = lambda: None  # type: ignore[method-assign]
        self.holding._lost = self.handoffs.lost


def variant(runtime: type[HostRuntime] = HostRuntime, engine: type[Engine] = Engine) -> type:
    class Sim(SimCluster):
        def __init__(self, configs: list[ShoalConfig], key: bytes, seed: int) -> None:
            super().__init__(configs, key, seed, runtime=runtime, engine=engine)

    return Sim


@pytest.mark.parametrize(
    ("name", "sim"),
    [
        ("no away entries", variant(runtime=KeepsNoAway)),
        ("READY without handoffs", variant(engine=ReadyWithoutHandoffs)),
        ("entries kept after a lapse", variant(engine=KeepsEntriesOnLapse)),
    ],
)
def test_each_rule_of_the_handoff_is_needed(name: str, sim: type[SimCluster]) -> None:
    """Each broken variant breaks affinity's contract within 60 scenarios (the same seeds
    every run; the right protocol passes them all: the random scenarios above)."""
    for seed in range(60):
        try:
            run_scenario(seed, sticky=True, cluster=sim)
        except InvariantViolation as e:
            assert "affinity" in str(e), e
            return
    raise AssertionError(f"{name}: not caught")


def lenient(self: Holding, state: EpochState, quorum: bool) -> bool:
    """The adoption rule before: a host holding no epoch adopted any."""
    if not quorum or self.epoch is None or not self.phase.seen_ready:
        return True
    return supersedes(state, self.epoch.key, self.epoch.members, self.record, self.vote)


@pytest.mark.parametrize("seed", [3083, 5090])
def test_a_host_that_left_lends_no_vote_to_a_stale_epoch(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by 6,000 sticky scenarios (any configuration can meet them). A host READY in
    one epoch leaves (it stops, or drainstops: the others carry on with its vote), then
    follows an older competing epoch that counts it as a member: as a stopped bystander
    (3083), or started again, holding no epoch (5090). Its report made that epoch READY
    beside the other, and two hosts took the same tokens. Now a member that left counts for
    no READY (``ready.left``), and a host holding no epoch adopts only one that outvotes
    its record and vote (``Holding.may_adopt``); without them, each seed is caught."""
    run_scenario(seed, sticky=True)
    monkeypatch.setattr(ready, "left", lambda hb: False)
    monkeypatch.setattr(Holding, "may_adopt", lenient)
    with pytest.raises(InvariantViolation, match="exclusive"):
        run_scenario(seed, sticky=True)


def test_away_entries_never_outlive_their_source() -> None:
    """The away entries of a host that left the membership (or restarted) are dropped
    where they are held, and only then."""
    sim, _ = steady(3)
    sim.start_clients(40, every=0.25)
    sim.run_until(4.0)
    sim.reload(1, reweighted(cluster_configs(3, 64, sticky=TIMEOUT)[0], 100))
    sim.run_until(7.0)
    holders = {
        h: set(k.affinity.away_of)
        for h, sh in sim.hosts.items()
        if (k := sh.kernel).affinity is not None
    }
    assert any(holders.values()), holders  # handoffs were held
    sim.crash_host(2)
    sim.run_until(11.0)
    for h in (1, 3):
        tables = sim.hosts[h].kernel.affinity
        assert tables is not None and 2 not in tables.away_of


def test_an_away_entry_is_only_added_never_extended_by_a_handoff() -> None:
    """The kernel model's add: an entry already there keeps its expiry (as nftables'
    ``add element`` does); packets other than SYNs refresh it."""
    sim, _ = steady(2)
    k = sim.hosts[1].kernel.affinity
    assert k is not None
    k.away(Away(2, 1, 0, 0, (b"\x00\x05\x00\x00",)), 10.0)
    k.away(Away(2, 1, 0, 0, (b"\x00\x05\x00\x00",)), 11.0)
    assert k.away_of[2][1][0][b"\x00\x05\x00\x00"] == 10.0 + TIMEOUT + MARGIN
    k.packet(0, b"\x00\x05\x00\x00", False, 12.0)
    assert k.away_of[2][1][0][b"\x00\x05\x00\x00"] == 12.0 + TIMEOUT + MARGIN
