"""A host is gone when no host has heard it for the detection time, not when one host
missed its beats: the beats a host missed and another echoed vouch for it (in the
simulator, with seeds that replay). What lets the default profile detect a crash after 3
missed periods instead of 4 without evicting hosts under heartbeat loss."""

from __future__ import annotations

from typing import Any

from shoal.config import ShoalConfig
from shoal.protocol.engine import Engine
from shoal.protocol.events import EventId
from shoal.sim.cluster import SimCluster
from shoal.sim.scenario import KEY, cluster_configs


class Deaf(Engine):
    """The engine without vouching: a host is gone once this one missed its beats (the
    broken variant each test below must catch)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.roster.vouch = lambda *a: None  # type: ignore[method-assign]


def _sim(n: int, seed: int, engine: type[Engine] = Engine) -> SimCluster:
    configs: list[ShoalConfig] = cluster_configs(n)
    sim = SimCluster(configs, KEY, seed, engine=engine)
    sim.run_until(20 * sim.period)
    assert sim.converged(set(range(1, n + 1)))
    return sim


def _left(sim: SimCluster, since: float) -> list[tuple[int, object]]:
    """(host, peer) of every host_left event since ``since``."""
    return [(h, e.fields["peer"]) for h, e in sim.events
            if e.id is EventId.HOST_LEFT and e.at >= since]  # fmt: skip


def test_a_host_one_peer_cannot_hear_stays_while_the_others_hear_it() -> None:
    """Host 1 (the leader) hears nothing of host 4 for 1.8 detection times while hosts 2
    and 3 do: nobody leaves, and the epoch stays. Without vouching, host 1 evicts it."""
    for engine, evicted in ((Engine, False), (Deaf, True)):
        sim = _sim(4, 3, engine)
        since, epoch = sim.now, sim.hosts[1].engine and sim.hosts[1].engine.epoch
        detect = sim.hosts[1].engine.timing.detect if sim.hosts[1].engine else 0.0
        sim.faults.cut = {(4, 1)}
        sim.run_until(sim.now + 1.8 * detect)
        left = _left(sim, since)
        assert bool(left) is evicted, (engine.__name__, left)
        if not evicted:
            assert sim.hosts[1].engine is not None and sim.hosts[1].engine.epoch == epoch


def test_a_host_one_peer_never_hears_again_leaves_within_two_detection_times() -> None:
    """Vouching postpones a silence by one detection time at most: a member that the
    leader cannot hear at all could never report a release, and an epoch that needs it
    would never be READY."""
    sim = _sim(4, 5)
    e1 = sim.hosts[1].engine
    assert e1 is not None
    since, detect = sim.now, e1.timing.detect
    sim.faults.cut = {(4, 1)}
    sim.run_until(sim.now + 2 * detect + 5 * sim.period)
    assert (1, 4) in _left(sim, since)
    assert sim.converged({1, 2, 3})


def test_heartbeat_loss_evicts_nobody_that_others_hear() -> None:
    """10% of every frame lost, 60 s of four hosts: 3 beats in a row lost between some
    two hosts is expected about 7 times (12 directed pairs × 600 periods × 10^-3); each
    is vouched for by the others' echoes, so no host leaves. The engine without vouching
    evicts."""
    counts = {}
    for engine in (Engine, Deaf):
        sim = _sim(4, 1, engine)
        since = sim.now
        sim.faults.loss = 0.10
        sim.run_until(sim.now + 60.0)
        counts[engine.__name__] = len(_left(sim, since))
    assert counts["Engine"] == 0 and counts["Deaf"] > 0, counts


def test_a_crash_is_timed_from_the_last_beat_any_host_heard() -> None:
    """Vouching never delays a failover: with loss, a host that missed the dead host's
    last beats learns of them from the others' echoes, and every survivor still logs the
    crash within the detection time (and a period) of its last beat."""
    sim = _sim(5, 2)
    e1 = sim.hosts[1].engine
    assert e1 is not None
    detect = e1.timing.detect
    sim.faults.loss = 0.2
    sim.run_until(sim.now + 3.0)
    crashed_at = sim.now
    sim.crash_host(5)
    sim.run_until(sim.now + 2 * detect)
    sim.faults.loss = 0.0
    sim.run_until(sim.now + 20 * sim.period)
    firsts: dict[int, float] = {}
    for h, e in sim.events:
        if e.id is EventId.HOST_LEFT and e.fields["peer"] == 5 and e.at >= crashed_at:
            firsts.setdefault(h, e.at)
    assert firsts and max(firsts.values()) <= crashed_at + detect + 2 * sim.period, firsts
    assert sim.converged({1, 2, 3, 4})
