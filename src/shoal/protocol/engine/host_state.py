"""The host state (NLB's ``query`` states) and every move it can make, in one table.

A host moves on an operator verb (:class:`Command`) or on what the engine observes
(:class:`Observed`). :data:`MOVES` lists every allowed (state, input) pair with the state
it leads to, whether a verb succeeds, what it answers and what the engine must do besides
(:class:`Act`); a pair missing from it is an error (:class:`IllegalMove`), never a silent
no-op. :class:`HostStateMachine` is the only writer of the state.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum

from shoal.protocol.frames import HostState

ELIGIBLE = (HostState.CONVERGING, HostState.CONVERGED)  # may own buckets
SERVING = (*ELIGIBLE, HostState.DRAINING)  # established connections kept


class Command(StrEnum):
    START = "start"
    STOP = "stop"
    DRAINSTOP = "drainstop"
    SUSPEND = "suspend"
    RESUME = "resume"
    ENABLE = "enable"
    DISABLE = "disable"
    DRAIN = "drain"


RULE_COMMANDS = frozenset({Command.ENABLE, Command.DISABLE, Command.DRAIN})


class Observed(StrEnum):
    """Moves the engine makes on its own."""

    CONVERGED = "converged"  # a member of a READY epoch, holding exactly its share
    UNCONVERGED = "unconverged"  # no longer so
    DRAIN_ENDED = "drain_ended"  # its connections finished, or the drain timed out
    UNHEALTHY = "unhealthy"  # the host-wide health check failed
    HEALTHY = "healthy"  # it passes again, and had taken the host out


class Act(Enum):
    """What the engine does besides moving the state."""

    NOTHING = "nothing"
    START = "start"  # forget the old epoch, listen afresh
    RESTART = "restart"  # a drain interrupted by start: keep the epoch
    STOP = "stop"  # let go of everything, leave the cluster
    INTERRUPT_AND_STOP = "interrupt_and_stop"  # a drain interrupted by stop
    DRAIN = "drain"  # no new connections but from affine clients, then none at all
    DRAIN_NOW = "drain_now"  # no new connections at all: the application failed
    AFFINE_GO = "affine_go"  # a draining host's affine clients go: the application failed
    SUSPEND = "suspend"  # stop, and take no command but resume
    RESUME = "resume"
    RULES = "rules"  # per-rule verbs: the host state does not move


@dataclass(frozen=True)
class Move:
    to: HostState | None  # None: the state stays
    act: Act
    ok: bool = True
    message: str = ""


_S = HostState
_SUSPENDED_ONLY = Move(
    None, Act.NOTHING, False, "host is suspended: only resume and query are accepted"
)
_STARTED = "cluster operations started"
_ALREADY = "cluster operations already started"

MOVES: dict[tuple[HostState, Command | Observed], Move] = {
    # start
    (_S.STOPPED, Command.START): Move(_S.CONVERGING, Act.START, True, _STARTED),
    (_S.CONVERGING, Command.START): Move(None, Act.NOTHING, True, _ALREADY),
    (_S.CONVERGED, Command.START): Move(None, Act.NOTHING, True, _ALREADY),
    (_S.DRAINING, Command.START): Move(_S.CONVERGING, Act.RESTART, True, _STARTED),
    (_S.SUSPENDED, Command.START): _SUSPENDED_ONLY,
    # stop
    (_S.STOPPED, Command.STOP): Move(None, Act.NOTHING, True, "cluster operations already stopped"),
    (_S.CONVERGING, Command.STOP): Move(_S.STOPPED, Act.STOP, True, "cluster operations stopped"),
    (_S.CONVERGED, Command.STOP): Move(_S.STOPPED, Act.STOP, True, "cluster operations stopped"),
    (_S.DRAINING, Command.STOP): Move(
        _S.STOPPED, Act.INTERRUPT_AND_STOP, True, "cluster operations stopped"
    ),
    (_S.SUSPENDED, Command.STOP): _SUSPENDED_ONLY,
    # drainstop
    (_S.STOPPED, Command.DRAINSTOP): Move(
        None, Act.NOTHING, False, "cluster operations are stopped: nothing to drain"
    ),
    (_S.CONVERGING, Command.DRAINSTOP): Move(
        _S.DRAINING, Act.DRAIN, True, "connection draining started"
    ),
    (_S.CONVERGED, Command.DRAINSTOP): Move(
        _S.DRAINING, Act.DRAIN, True, "connection draining started"
    ),
    (_S.DRAINING, Command.DRAINSTOP): Move(None, Act.NOTHING, True, "already draining"),
    (_S.SUSPENDED, Command.DRAINSTOP): _SUSPENDED_ONLY,
    # suspend
    **{
        (s, Command.SUSPEND): Move(_S.SUSPENDED, Act.SUSPEND, True, "cluster operations suspended")
        for s in (_S.STOPPED, _S.CONVERGING, _S.CONVERGED, _S.DRAINING)
    },
    (_S.SUSPENDED, Command.SUSPEND): _SUSPENDED_ONLY,
    # resume
    **{
        (s, Command.RESUME): Move(None, Act.NOTHING, False, "host is not suspended")
        for s in (_S.STOPPED, _S.CONVERGING, _S.CONVERGED, _S.DRAINING)
    },
    (_S.SUSPENDED, Command.RESUME): Move(
        _S.STOPPED, Act.RESUME, True, "cluster control resumed; host is stopped (use start)"
    ),
    # enable, disable, drain (a port rule)
    **{
        (s, c): Move(None, Act.RULES)
        for s in (_S.STOPPED, _S.CONVERGING, _S.CONVERGED, _S.DRAINING)
        for c in RULE_COMMANDS
    },
    **{(_S.SUSPENDED, c): _SUSPENDED_ONLY for c in RULE_COMMANDS},
    # what the engine observes
    (_S.CONVERGING, Observed.CONVERGED): Move(_S.CONVERGED, Act.NOTHING),
    (_S.CONVERGED, Observed.UNCONVERGED): Move(_S.CONVERGING, Act.NOTHING),
    (_S.DRAINING, Observed.DRAIN_ENDED): Move(_S.STOPPED, Act.STOP),
    # the host-wide health check: failing drains as drainstop does; passing again undoes
    # that (the engine feeds HEALTHY only to a host the check took out)
    (_S.CONVERGING, Observed.UNHEALTHY): Move(_S.DRAINING, Act.DRAIN_NOW),
    (_S.CONVERGED, Observed.UNHEALTHY): Move(_S.DRAINING, Act.DRAIN_NOW),
    (_S.DRAINING, Observed.UNHEALTHY): Move(None, Act.AFFINE_GO),
    **{(s, Observed.UNHEALTHY): Move(None, Act.NOTHING) for s in (_S.STOPPED, _S.SUSPENDED)},
    (_S.DRAINING, Observed.HEALTHY): Move(_S.CONVERGING, Act.RESTART),
    (_S.STOPPED, Observed.HEALTHY): Move(_S.CONVERGING, Act.START),
    **{
        (s, Observed.HEALTHY): Move(None, Act.NOTHING)
        for s in (_S.CONVERGING, _S.CONVERGED, _S.SUSPENDED)
    },
}


class IllegalMove(RuntimeError):
    """An input the table has no move for, in this state: a bug in the engine."""


class HostStateMachine:
    """Holds the host state; :meth:`move` is its only writer."""

    __slots__ = ("state",)

    def __init__(self, state: HostState) -> None:
        self.state = state

    def move(self, what: Command | Observed) -> Move:
        m = MOVES.get((self.state, what))
        if m is None:
            raise IllegalMove(f"no move from {self.state.name} on {what!r}")
        if m.to is not None:
            self.state = m.to
        return m
