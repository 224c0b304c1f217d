"""One checker per invariant of the contract, run by the simulator after every input.

* **exclusive** — no token (a bucket, a single rule's handling, uncovered traffic) is
  accepted for new connections by two kernels at once: not while converged, not during a
  convergence, not when a daemon died and its kernel runs on, not when a partition heals;
* **agreed** — two epochs of one configuration with the same key are the same epoch;
* **balanced** — every epoch gives each member its weighted share of each rule's buckets,
  within one bucket;
* **minimal** — every epoch moves the fewest buckets its parent allows;
* **ghosts** — a host whose daemon is down counts as live at no host that started, or
  began to hear it afresh, after it went down: whatever a neighbour replays;
* **covered** — after the faults are repaired, every token has an owner and every host
  converged (checked by the scenario, which knows when that is).

Each raises :class:`InvariantViolation`, whose message starts with the invariant's name and
names the seed that replays it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from shoal.bucket_map import counts, ideal_bounds, minimum_moves
from shoal.choices import AllUnhealthy, FilteringMode
from shoal.config import ShoalConfig
from shoal.dataplane.contract import RuleState
from shoal.protocol.engine import Engine
from shoal.protocol.epoch import EpochState
from shoal.protocol.frames import EpochKey, Health


class Host(Protocol):
    @property
    def engine(self) -> Engine | None: ...
    @property
    def down_since(self) -> float | None: ...
    @property
    def booted_at(self) -> float: ...


def ghosts(hosts: Mapping[int, Host], now: float, in_flight: float) -> str:
    """A host that is down and live at an engine that knew nothing of it when it went
    down: one started since, or one whose record of it began since (it had forgotten it, or
    it was another run of that host), later than its frames can be in flight. Only a replay
    can have made it live there."""
    for x, g in hosts.items():
        if g.down_since is None:
            continue
        since = g.down_since + in_flight
        for y, h in hosts.items():
            e = h.engine
            p = e.peers.get(x) if e is not None and y != x else None
            if p is None or e is None:
                continue
            fresh = h.booted_at > since or p.first_heard > since
            if fresh and e.roster.alive(p, now):
                return (
                    f"ghosts: host {x}, down since {g.down_since:.3f}, is live at host {y} "
                    f"(last heard {p.last_heard:.3f})"
                )
    return ""


class InvariantViolation(AssertionError):
    def __init__(self, seed: int, at: float, message: str) -> None:
        super().__init__(f"seed {seed} at t={at:.4f}s: {message}")
        self.seed = seed
        self.at = at


class Kernels(Protocol):
    def accepting(self, now: float) -> frozenset[int]: ...


def exclusive(host: int, mine: frozenset[int], kernels: Mapping[int, Kernels], now: float) -> str:
    """Empty, or why ``host`` accepting ``mine`` breaks exclusivity."""
    for other, k in kernels.items():
        if other == host:
            continue
        both = mine & k.accepting(now)
        if both:
            return (
                f"exclusive: hosts {host} and {other} both accept new connections "
                f"for {len(both)} tokens (e.g. {min(both)})"
            )
    return ""


def exclusive_all(kernels: Mapping[int, Kernels], now: float) -> str:
    """:func:`exclusive` over every pair of kernels."""
    for host, k in kernels.items():
        why = exclusive(host, k.accepting(now), kernels, now)
        if why:
            return why
    return ""


class EpochLedger:
    """Every epoch seen, by configuration and key: checks agreed, balanced and minimal."""

    def __init__(self) -> None:
        self.epochs: dict[tuple[bytes, EpochKey], EpochState] = {}

    def note(self, st: EpochState, cfg: ShoalConfig, digest: bytes) -> str:
        """Empty, or the first invariant ``st`` breaks."""
        seen = self.epochs.get((digest, st.key))
        if seen is not None:
            if seen.digest() != st.digest():
                return f"agreed: two different epochs are both called {st.key}"
            return ""
        self.epochs[(digest, st.key)] = st
        parent = self.epochs.get((digest, st.parent)) if st.parent else None
        return balanced(st, cfg) or minimal(st, parent, cfg)


def _weights(st: EpochState, rule: int, policy: AllUnhealthy) -> dict[int, int]:
    """Each member's weight in ``rule``: its own when enabled and healthy; 0 otherwise,
    except that with every enabled member failing, the "serve" policy counts them healthy."""
    enabled = {h for h, r in st.reports.items() if r[rule].state is RuleState.ENABLED}
    failing = {h for h in enabled if st.reports[h][rule].health is Health.FAILING}
    panic = failing == enabled and policy is AllUnhealthy.SERVE
    return {
        h: (r[rule].weight if h in enabled and (panic or h not in failing) else 0)
        for h, r in st.reports.items()
    }


def _multiple(st: EpochState, cfg: ShoalConfig) -> Iterable[tuple[int, str, tuple[int, ...]]]:
    for i, rule in enumerate(cfg.cluster.effective_rules):
        owners = st.maps[i]
        if rule.mode is FilteringMode.MULTIPLE and owners is not None:
            yield i, rule.key, owners


def balanced(st: EpochState, cfg: ShoalConfig) -> str:
    b = cfg.cluster.buckets
    for i, key, owners in _multiple(st, cfg):
        held = counts(owners)
        policy = cfg.cluster.effective_rules[i].all_unhealthy
        for h, (lo, hi) in ideal_bounds(_weights(st, i, policy), b).items():
            if not lo <= held.get(h, 0) <= hi:
                return (
                    f"balanced: epoch {st.key} rule {key} gives host {h} "
                    f"{held.get(h, 0)} buckets, outside [{lo}, {hi}]"
                )
    return ""


def minimal(st: EpochState, parent: EpochState | None, cfg: ShoalConfig) -> str:
    if parent is None:
        return ""
    for i, key, owners in _multiple(st, cfg):
        old = parent.maps[i]
        if old is None:
            continue
        moved = sum(1 for x, y in zip(old, owners, strict=True) if x != y)
        policy = cfg.cluster.effective_rules[i].all_unhealthy
        least = minimum_moves(old, _weights(st, i, policy), cfg.cluster.buckets)
        if moved != least:
            return (
                f"minimal: epoch {st.key} rule {key} moved {moved} buckets, "
                f"the least possible is {least}"
            )
    return ""
