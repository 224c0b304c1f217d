"""A hostile neighbour on the simulated segment: it records every frame sent and replays
what it recorded, at any later time, to every host.

It cannot forge a frame (it has no key) and cannot stop one: it only sends again, in order,
what a host once sent. What it may not achieve is the ``ghosts`` invariant
(:func:`shoal.sim.checkers.ghosts`): a host that is down counts as live nowhere.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shoal.sim.cluster import SimCluster


class Recorder:
    """Every frame sent so far, by sender, in order (at most ``keep`` per sender)."""

    def __init__(self, keep: int = 4000) -> None:
        self.keep = keep
        self.frames: dict[int, list[bytes]] = defaultdict(list)
        self.replayed = 0

    def record(self, host: int, frame: bytes) -> None:
        kept = self.frames[host]
        kept.append(frame)
        if len(kept) > self.keep:
            del kept[: len(kept) - self.keep]

    def replay(
        self, sim: SimCluster, host: int, start: float, seconds: float, rng: random.Random
    ) -> int:
        """Send ``host``'s recorded frames again from ``start`` for ``seconds``, spread
        evenly and in order (a random stretch of them when there are more than fit in one
        period each), to every host; returns how many were scheduled."""
        kept = list(self.frames.get(host, ()))
        if not kept:
            return 0
        count = min(len(kept), max(1, int(seconds / sim.period * 3)))
        first = rng.randrange(0, len(kept) - count + 1)
        for i, frame in enumerate(kept[first : first + count]):
            at = start + seconds * i / count
            sim.inject(at, frame)
        self.replayed += count
        return count
