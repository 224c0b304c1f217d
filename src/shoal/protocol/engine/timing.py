"""Every protocol delay, derived from the heartbeat period and the loss tolerance."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class Timing:
    """The delays of one configuration (each computed once: the receive path reads them
    for every frame)."""

    period: float
    tolerance: int

    @cached_property
    def detect(self) -> float:
        """A host unheard for this long is gone: ``tolerance`` heartbeats in a row missed,
        with a quarter period for the next one's jitter (without it, one loss fewer plus a
        late frame would evict a host)."""
        return (self.tolerance + 0.25) * self.period

    @cached_property
    def ack_window(self) -> float:
        """A host heard within this window is acknowledged in heartbeats (an older echo
        could not keep a lease alive anyway)."""
        return self.lease

    @cached_property
    def echo_horizon(self) -> float:
        """How far back one of our beats may have been sent for its echo to count: beats
        are at most ten a period, so an echo older than this could be an alias."""
        return self.ack_window + self.period

    @cached_property
    def margin(self) -> float:
        """How much later than the engine's lease the kernel's may run out: the renewal's
        own latency and the kernel timer's granularity."""
        return max(0.1 * self.period, 0.005)

    @cached_property
    def lease(self) -> float:
        """How long after sending a heartbeat that a quorum acknowledged the kernel keeps
        taking new connections: as long as it can be while a crashed host's lease still
        runs out before the others detect it (then the fence never delays a failover)."""
        return max(1.5 * self.period, self.detect - self.margin)
