"""What the event loop publishes for the threads that serve metrics and the web view.

A :class:`Reading` is plain values taken at one instant (one engine snapshot, the kernel's
counters, the recent events). The loop replaces the :class:`Board`'s reading whole, at most
every :data:`PUBLISH_EVERY` seconds; a reader takes the latest one in a single attribute
read. Nothing that serves a request ever touches the engine or waits for the loop, so no
request can delay a heartbeat.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shoal.config import ShoalConfig
from shoal.dataplane.contract import STRIDE, RuleCounters
from shoal.protocol.engine.snapshot import Snapshot

PUBLISH_EVERY = 0.5  # seconds between two readings the loop publishes


@dataclass(frozen=True)
class Reading:
    """What a scrape or a page shows, as plain values."""

    snapshot: Snapshot
    cfg: ShoalConfig  # the configuration in force (never changed in place: a reload replaces it)
    owned: tuple[int, ...]  # buckets (or a single rule's handling) owned, per rule
    counters: dict[str, int]  # the daemon's counters (the kernel's screen included)
    rule_counters: tuple[RuleCounters, ...]
    # an XDP screen's packets and bytes per rule ("" for none) and verdict; empty without
    screen: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    socket_drops: dict[str, int] = field(default_factory=dict)
    events: tuple[dict[str, Any], ...] = ()  # the most recent, oldest first
    checks: tuple[dict[str, Any], ...] = ()  # this host's health checks, as params shows them

    @property
    def rules(self) -> tuple[str, ...]:
        """Rule names, in configuration order."""
        return tuple(r.key for r in self.cfg.cluster.effective_rules)


def owned_per_rule(tokens: frozenset[int], rules: int) -> tuple[int, ...]:
    """How many of ``tokens`` belong to each rule (the default token to none)."""
    out = [0] * rules
    for t in tokens:
        if t >= 0 and t // STRIDE < rules:
            out[t // STRIDE] += 1
    return tuple(out)


class Board:
    """The latest reading, and when it was published."""

    def __init__(self) -> None:
        self.reading: Reading | None = None
        self.published = float("-inf")

    def due(self, now: float) -> bool:
        return now - self.published >= PUBLISH_EVERY

    def publish(self, reading: Reading, now: float) -> None:
        self.reading = reading
        self.published = now
