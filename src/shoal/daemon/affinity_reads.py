"""The daemon's reads of the kernel's affinity sets, each on a worker thread.

A listing of the sets costs the kernel time that grows faster than the entries (about 0.1 s
for 10,000 and 40 s for 1,000,000 on a small VM: ``bench/handoff.py``), so it never runs on
the event loop, which must go on beating. Three things want one: a handoff (the keys the
runtime leaves in :attr:`~shoal.runtime.HostRuntime.read_due`, once the release is in the
kernel), a drainstop keeping its affine clients (their count each period, once every rule
drains in the kernel: none can be added then) and ``params``/``display`` (the count per rule,
at most every :data:`FRESH` seconds). One read at a time serves all three.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from shoal.dataplane.contract import AffinityRead, DataplaneError
from shoal.protocol.frames import EpochKey

FRESH = 10.0  # seconds a count serves params and display before it is read again


class AffinityReads:
    """Starts the reads that are due and hands their results over on the loop."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell  # the daemon: engine, runtime, backend, now(), after()
        self.busy = False
        self.counts: dict[int, int] | None = None  # per sticky rule, as last read
        self.counted_at = float("-inf")  # when that read started (monotonic)
        self.read_at: float | None = None  # ... in wall time (rounded), for operators
        self.count_due_at = float("-inf")  # a drainstop's next count

    def observe(self, loop: asyncio.AbstractEventLoop, wanted_counts: bool = False) -> None:
        """Start a read if one is due and none runs (call after every input)."""
        d = self.shell
        if self.busy or not d.engine.handoffs.sticky:
            return
        now = d.now()
        handoff = d.runtime.read_due
        drain = d.runtime.counting and now >= self.count_due_at
        stale = wanted_counts and now - self.counted_at >= FRESH
        if handoff is None and not drain and not stale:
            return
        d.runtime.read_due = None
        if drain:
            self.count_due_at = now + d.engine.timing.period
        read: Callable[[], AffinityRead] = d.backend.affine_reader()
        self.busy = True
        started = now
        fut = loop.run_in_executor(None, read)
        fut.add_done_callback(lambda f: self._done(f, handoff, drain, started))

    def _done(
        self,
        fut: asyncio.Future[AffinityRead],
        handoff: tuple[EpochKey, int] | None,
        drain: bool,
        started: float,
    ) -> None:
        self.busy = False
        d = self.shell
        try:
            keys, counts = fut.result()
        except DataplaneError as err:
            sys.stderr.write(json.dumps({"name": "affinity_read_failed", "error": str(err)}))
            sys.stderr.write("\n")
            if handoff is not None:
                d.runtime.read_due = handoff  # read again: the engine gives up when late
            return
        now = d.now()
        self.counts, self.counted_at, self.read_at = counts, started, round(time.time(), 3)
        if handoff is not None:
            d.engine.handoff_keys(handoff, keys, now)
        if drain and d.engine.drain_affine:
            d.engine.set_affine(sum(counts.values()), now)
        d.after()
