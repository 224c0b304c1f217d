"""Client affinity across convergence, proven in the simulator: random fault scenarios with
clients connecting through every host's affinity and away tables all along (see
:mod:`shoal.sim.affinity`), deterministic runs of the events operators meet, and one broken
variant per rule of the handoff, each caught. Any breach names its seed:
``run_scenario(seed, sticky=True)``."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.config import ShoalConfig
from shoal.dataplane.contract import Away
from shoal.protocol.codec import Keys
from shoal.protocol.engine import Command, Engine, ready
from shoal.protocol.engine.agreement import Agreement
from shoal.protocol.engine.holding import Holding
from shoal.protocol.engine.leader import supersedes
from shoal.protocol.engine.peers import Peer, Roster
from shoal.protocol.engine.timing import Timing
from shoal.protocol.epoch import EpochState
from shoal.protocol.events import EventId
from shoal.protocol.frames import EpochKey, Flag, HostState
from shoal.runtime import HostRuntime, Output
from shoal.sim.affinity import MARGIN
from shoal.sim.checkers import InvariantViolation
from shoal.sim.cluster import SimCluster
from shoal.sim.scenario import KEY, cluster_configs, reweighted, run_scenario
from tests.test_frames import steady as steady_heartbeat
from tests.test_simulation import scenarios

TIMEOUT = 3  # seconds of affinity in the deterministic runs


@scenarios(60)
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


def test_drainstop_keeps_its_affine_clients_until_they_go_idle() -> None:
    """Host 1 (the leader and default host) drainstops: it stays a member with every rule
    draining, so its active clients keep it and nobody new reaches it; once they are idle
    for the timeout it leaves, and stops with its connections. The default host moves."""
    sim, _ = steady()
    clients = sim.start_clients(40, every=0.25)
    sim.run_until(5.0)
    mine = {c.key for c in clients.clients if c.last_host == 1}
    sim.set_connections(1, 0)
    sim.command(1, Command.DRAINSTOP)
    sim.run_until(9.0)
    e = sim.hosts[1].engine
    assert e is not None and e.state is HostState.DRAINING and e.drain_affine
    assert e.epoch is not None and 1 in e.epoch.members and not e.installed
    assert e.snapshot(sim.now).default_host == 2
    other = sim.hosts[2].engine
    assert other is not None
    assert {p.host_id: p.state for p in other.snapshot(sim.now).peers}[1] is HostState.DRAINING
    assert mine and clients.moved == 0  # its clients kept it ...
    assert {c.key for c in clients.clients if c.last_host == 1} <= mine  # ... and no other
    sim.clients_on = False
    sim.run_until(sim.now + TIMEOUT + MARGIN + 1)
    assert e.snapshot(sim.now).state is HostState.STOPPED
    ids = [ev.id for h, ev in sim.events if h == 1]
    assert ids.index(EventId.DRAIN_AFFINE_IDLE) < ids.index(EventId.DRAIN_FINISHED)
    clients.settled(sim.now)


def test_a_failing_application_lets_the_affine_clients_go_at_once() -> None:
    """The host-wide check fails, before a drainstop or during one: its affine clients
    go to the owners of their buckets within the failover."""
    for drainstop_first in (False, True):
        sim, _ = steady()
        clients = sim.start_clients(40, every=0.25)
        sim.run_until(5.0)
        if drainstop_first:
            sim.command(3, Command.DRAINSTOP)
            sim.run_until(6.0)
        sim.health(3, None, False)
        sim.run_until(sim.now + 1.5)
        e = sim.hosts[3].engine
        assert e is not None and e.state is HostState.DRAINING and not e.drain_affine
        assert e.epoch is None or 3 not in e.epoch.members
        assert clients.moved > 0, drainstop_first  # its clients went to the others


class NeverReads(HostRuntime):
    """The kernel's keys never come back (a listing slower than any wait)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.defer_reads = True


def test_a_slow_kernel_read_holds_no_failover() -> None:
    """Hosts whose kernel never lists its affinity keys: each epoch that needs them waits
    two periods, then the host gives its affine clients up (event 119, a new generation)
    and hands nothing over, so weight changes and a crash converge as fast as without
    affinity, and no client is ever taken twice."""
    configs = cluster_configs(4, 64, sticky=TIMEOUT, weights={2: 1})
    sim = SimCluster(configs, KEY, 7, runtime=NeverReads)
    sim.run_until(2.0)
    clients = sim.start_clients(80, every=0.25)
    sim.run_until(5.0)
    sim.reload(2, reweighted(configs[1], 100))  # a third of the web buckets move to host 2
    sim.run_until(7.0)
    assert sim.converged({1, 2, 3, 4})
    given_up = [h for h, ev in sim.events if ev.id is EventId.HANDOFF_GIVEN_UP]
    assert given_up and clients.moved > 0  # affinity lost, never exclusivity
    crashed = sim.now
    sim.crash_host(3)
    e = sim.hosts[1].engine
    assert e is not None
    detect = e.timing.detect
    sim.run_until(crashed + detect + 0.5)
    assert sim.converged({1, 2, 4})
    sim.clients_on = False
    sim.run_until(sim.now + TIMEOUT + MARGIN + 1)
    clients.settled(sim.now)


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


class DeliveredForever(Engine):
    """Broken: a bucket owned again keeps counting as delivered (and read empty), so the
    keys it gains then are never handed over."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        hs = self.handoffs

        def installed(tokens: frozenset[int]) -> None:
            hs.ever |= tokens
            hs._installed = tokens

        hs.installed = installed  # type: ignore[method-assign]


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


def swinging(engine: type[Engine]) -> SimCluster:
    """Host 2's weight swings, moving buckets to it and back, and new clients arrive after
    each move: a bucket handed over once gains clients while owned again."""
    configs = cluster_configs(2, 64, sticky=TIMEOUT)
    sim = SimCluster(configs, KEY, 7, engine=engine)
    sim.run_until(2.0)
    sim.start_clients(40)
    for i, w in enumerate((100, 1, 100, 1, 100)):
        sim.reload(2, reweighted(configs[1], w))
        sim.run_until(sim.now + 1.5)
        sim.start_clients(40, salt=i + 1)
        sim.run_until(sim.now + 1.5)
    return sim


def test_a_bucket_owned_again_hands_over_what_it_gained() -> None:
    """A handoff sends only what the owner does not hold yet, but a bucket this host owned
    again since may hold new clients: they are sent (with the variant that keeps counting
    such a bucket as delivered, two hosts take a client)."""
    sim = swinging(Engine)
    assert sim.clients is not None and sim.clients.moved == 0
    with pytest.raises(InvariantViolation, match="affinity"):
        swinging(DeliveredForever)


def lenient(self: Holding, state: EpochState, quorum: bool) -> bool:
    """The adoption rule before: a host holding no epoch adopted any."""
    if not quorum or self.epoch is None or not self.phase.seen_ready:
        return True
    return supersedes(state, self.epoch.key, self.epoch.members, self.record, self.vote)


def _epoch(members: set[int], bases: tuple[frozenset[int], ...] = ()) -> EpochState:
    return EpochState(
        key=EpochKey(7, min(members), 1), parent=None, members=frozenset(members),
        fenced=frozenset(), bases=bases, lineage=(), reports={}, maps=(), handlers=(),
        default_host=min(members),
    )  # fmt: skip


def test_a_host_holding_no_epoch_adopts_only_one_that_outvotes_its_vote() -> None:
    """Found by a sticky sweep (``run_scenario(5090, sticky=True)`` when it was found,
    before the scenarios drew new clients): host 5, READY with 2 and 4, drainstopped (they
    carried on with its vote), started again cut off with 1 and 3 and adopted their older
    epoch {1, 3, 5}, which became READY beside {2, 4}. A host holding no epoch now adopts
    only an epoch that outvotes its record and vote (the rule before took any)."""
    five = Engine(cluster_configs(5)[4], Keys(KEY), 2, 0.0, frozenset({2, 4, 5}))
    h = five.holding
    assert h.epoch is None and h.vote == frozenset({2, 4, 5})
    older = _epoch({1, 3, 5})
    assert not h.may_adopt(older, quorum=True)
    assert lenient(h, older, True)  # what let it through
    assert h.may_adopt(_epoch({1, 2, 3, 4, 5}), True)  # a quorum of {2, 4, 5}
    assert h.may_adopt(_epoch({1, 3, 5}, bases=(frozenset({2, 4, 5}),)), True)  # outvoted


def test_a_member_that_left_counts_toward_no_ready() -> None:
    """Found by a sticky sweep (``run_scenario(3083, sticky=True)`` then): host 2, READY on
    one side, stopped (lending the others its vote), then followed an older epoch of the
    other side as a bystander member, and its report made that epoch READY beside the
    newer one. A member whose heartbeat says it left (stopped, draining, suspended) now
    holds READY back: an epoch without it must replace it."""
    roster = Roster(detect=1.0, now=0.0, period=0.1)
    e = _epoch({1, 2})
    timing = Timing(0.1, 4)

    def blocked(state: HostState) -> float | None:
        hb = replace(
            steady_heartbeat(2), epoch=e.key, state=state, flags=Flag.HAS_EPOCH | Flag.RELEASED
        )
        roster.peers[2] = Peer(2, 1, 1, 1, 0.0, 0.5, proven=True, hb=hb, ack_at=0.4)
        return ready.blocker(e, 1, roster, {}, 0.0, hb.config_digest, timing, 0.6)

    assert blocked(HostState.CONVERGING) is None  # READY
    assert blocked(HostState.STOPPED) == float("inf")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ready, "left", lambda hb: False)  # the rule before
        assert blocked(HostState.STOPPED) is None


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
