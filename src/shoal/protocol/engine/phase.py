"""Where this host stands with the epoch it holds, and every move between phases.

* ``NONE`` — no epoch.
* ``ADOPTED`` — the epoch is held and what it takes away is released; new tokens wait for
  READY.
* ``READY`` — the leader declared it READY (releases reported, fences passed): this host
  holds its share while its lease runs.
* ``LAPSED`` — it was READY here, but the lease ran out: the share is given up until a
  later READY. It still counts as seen READY: the host never lends its vote to a branch that
  neither descends from it nor outvoted it.

:data:`MOVES` is every allowed move; a missing one is an error.
"""

from __future__ import annotations

from enum import Enum


class Phase(Enum):
    NONE = "none"
    ADOPTED = "adopted"
    READY = "ready"
    LAPSED = "lapsed"

    @property
    def ready(self) -> bool:
        """The epoch is READY now: this host may hold its share."""
        return self is Phase.READY

    @property
    def seen_ready(self) -> bool:
        """The epoch was READY here, even if the lease has lapsed since."""
        return self is Phase.READY or self is Phase.LAPSED


class Step(Enum):
    ADOPT = "adopt"  # a new epoch
    READY = "ready"  # declared or heard READY
    LAPSE = "lapse"  # the lease ran out, or there was none to acquire under
    DROP = "drop"  # the epoch is forgotten (stop, start, a new configuration)


_P = Phase
MOVES: dict[tuple[Phase, Step], Phase] = {
    **{(p, Step.ADOPT): _P.ADOPTED for p in Phase},
    **{(p, Step.DROP): _P.NONE for p in Phase},
    (_P.ADOPTED, Step.READY): _P.READY,
    (_P.LAPSED, Step.READY): _P.READY,
    (_P.READY, Step.LAPSE): _P.LAPSED,
    (_P.ADOPTED, Step.LAPSE): _P.ADOPTED,  # not READY yet: nothing to lapse from
    (_P.LAPSED, Step.LAPSE): _P.LAPSED,
}


class IllegalStep(RuntimeError):
    """A phase move the table does not have: a bug in the engine."""


def moved(phase: Phase, step: Step) -> Phase:
    nxt = MOVES.get((phase, step))
    if nxt is None:
        raise IllegalStep(f"no move from {phase.name} on {step.name}")
    return nxt
