"""This host's established connections per rule: counted from the kernel's socket table
(sock_diag), at most once a second, by whichever serving thread asks first.

A dump costs time in proportion to the connections, so it never runs on the event loop:
the metrics and web threads share one count through :class:`Established`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from shoal.choices import Protocol
from shoal.config import ClusterConfig
from shoal.dataplane import sockets
from shoal.verdict import find_rule

EVERY = 1.0  # seconds a count is reused


def per_rule(cluster: ClusterConfig, conns: Iterable[sockets.Conn]) -> dict[str, int]:
    """Connections by the rule that covers them (every rule named, 0 when none)."""
    out = dict.fromkeys((r.key for r in cluster.effective_rules), 0)
    for c in conns:
        rule = find_rule(cluster, sockets.plain(c.local), Protocol.TCP, c.lport)
        if rule is not None:
            out[rule.key] += 1
    return out


class Established:
    """The latest count, taken anew when older than :data:`EVERY`."""

    def __init__(
        self,
        cluster: Callable[[], ClusterConfig],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cluster = cluster
        self.clock = clock
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._count: dict[str, int] = {}

    def get(self) -> dict[str, int]:
        with self._lock:
            if self.clock() - self._at >= EVERY:
                cluster = self.cluster()
                self._count = per_rule(cluster, sockets.vip_connections(cluster.all_vips))
                self._at = self.clock()
            return dict(self._count)
