"""A read-only picture of one engine, for the control protocol, the views and the simulator.

Nothing outside the engine reads its parts: what they need is here, copied at one instant.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from shoal.protocol.engine.phase import Phase
from shoal.protocol.epoch import EpochState
from shoal.protocol.frames import EpochKey, Health, HostState, RuleReport

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def state_name(state: HostState, default: bool) -> str:
    """As NLB's ``query`` says it: ``converged (default)`` for the default host."""
    if state is HostState.CONVERGED and default:
        return "converged (default)"
    return state.name.lower()


@dataclass(frozen=True)
class PeerView:
    """A peer heard within the detection time, as its last heartbeat describes it."""

    host_id: int
    state: HostState
    dedicated_ip: IP | None
    epoch: EpochKey | None
    default: bool  # the default host of this host's epoch, and following it
    silent_for: float  # seconds since it was last heard
    rules: tuple[RuleReport, ...]  # its weight, state, priority and health per rule
    health: Health = Health.NONE  # of its host-wide check

    @property
    def state_name(self) -> str:
        return state_name(self.state, self.default)


@dataclass(frozen=True)
class Snapshot:
    host_id: int
    incarnation: int
    state: HostState
    default: bool  # converged as the default host
    leader: int | None  # the host this one follows (itself when it leads)
    epoch: EpochKey | None
    phase: Phase
    members: frozenset[int]  # of the epoch held
    default_host: int | None  # of the epoch held
    owned_tokens: int  # what the kernel is to accept new connections for
    lease_left: float | None  # seconds of lease left (None: no lease)
    dedicated_ip: IP | None
    peers: tuple[PeerView, ...]  # live ones, by id
    counters: dict[str, int]
    rules: tuple[RuleReport, ...] = ()  # this host's weight, state and priority per rule
    epoch_state: EpochState | None = None  # the epoch held: members, maps, handlers
    health: Health = Health.NONE  # of this host's host-wide check

    @property
    def state_name(self) -> str:
        return state_name(self.state, self.default)
