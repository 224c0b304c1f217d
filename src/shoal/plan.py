"""``shoal plan``: the maps a set of host files would converge to, and what a change moves."""

from __future__ import annotations

from dataclasses import dataclass

from shoal.bucket_map import counts, minimum_moves, moved, rebalance
from shoal.choices import FilteringMode
from shoal.config import ShoalConfig


@dataclass(frozen=True)
class HostShare:
    host_id: int
    weight: int
    buckets: int
    share: float
    gained: int
    lost: int


@dataclass(frozen=True)
class RulePlan:
    rule: str
    mode: str
    buckets: int
    hosts: list[HostShare]
    moved: int | None
    minimum: int | None
    handler: int | None  # single rules: the host by handling priority


def weights_for(configs: list[ShoalConfig], rule: str, members: set[int]) -> dict[int, int]:
    return {c.host.host_id: c.weight(rule) for c in configs if c.host.host_id in members}


def handler_of(configs: list[ShoalConfig], rule: str, members: set[int]) -> int | None:
    """The live host handling a ``single`` rule: best handling priority, then lowest id."""
    live = [c for c in configs if c.host.host_id in members]
    if not live:
        return None
    return min(live, key=lambda c: (c.priority(rule), c.host.host_id)).host.host_id


def plan(configs: list[ShoalConfig], members: set[int], before: set[int] | None) -> list[RulePlan]:
    """Per rule: each member's buckets and share; with ``before``, the moves from it."""
    cluster = configs[0].cluster
    b = cluster.buckets
    out: list[RulePlan] = []
    for rule in cluster.effective_rules:
        if rule.mode is not FilteringMode.MULTIPLE:
            handler = None
            if rule.mode is FilteringMode.SINGLE:
                handler = handler_of(configs, rule.key, members)
            out.append(RulePlan(rule.key, rule.mode.value, b, [], None, None, handler))
            continue
        old = rebalance(None, weights_for(configs, rule.key, before), b) if before else None
        weights = weights_for(configs, rule.key, members)
        new = rebalance(old, weights, b)
        held = counts(new)
        prev = counts(old) if old else {}
        gained: dict[int, int] = {}
        lost: dict[int, int] = {}
        if old is not None:
            for o, n in zip(old, new, strict=True):
                if o != n:
                    gained[n] = gained.get(n, 0) + 1
                    lost[o] = lost.get(o, 0) + 1
        hosts = [
            HostShare(h, w, held.get(h, 0), held.get(h, 0) / b, gained.get(h, 0), lost.get(h, 0))
            for h, w in sorted(weights.items())
        ]
        for h in sorted(set(prev) - set(weights)):
            hosts.append(HostShare(h, 0, 0, 0.0, 0, lost.get(h, 0)))
        out.append(
            RulePlan(
                rule.key,
                rule.mode.value,
                b,
                hosts,
                moved(old, new) if old is not None else None,
                minimum_moves(old, weights, b) if old is not None else None,
                None,
            )
        )
    return out
