"""The convergence engine: one host's membership and map agreement, without I/O.

:class:`Engine` (in :mod:`.core`) is the public object: it takes the inputs, runs a step in
a fixed order and publishes the outputs; :meth:`Engine.snapshot` is its read-only picture.
Each part owns one kind of state or one rule, and none reaches back into the engine:

* :mod:`.host_state` — the host state and the operator verbs, as one table;
* :mod:`.verbs` — a verb or a reload, carried out;
* :mod:`.intake` — frames in: authentication, replay, repeats, what a heartbeat says;
* :mod:`.agreement` — lead or follow: the epoch decided, created, adopted, READY;
* :mod:`.sending` — frames out: the heartbeat composed, map chunks;
* :mod:`.phase` and :mod:`.holding` — the epoch held, its phase, the tokens, record, vote;
* :mod:`.peers` — the peers, liveness, replay, and what is derived from them;
* :mod:`.freshness` — proofs that a peer is alive now: what this host asks and owes;
* :mod:`.epochs` — the epochs known and arriving in map chunks;
* :mod:`.leader` — the election, forming a cluster, the next epoch;
* :mod:`.ready` — the READY rule and the fence;
* :mod:`.tenure` — the rules that set the lease;
* :mod:`.beacon` — what is sent, numbered and when;
* :mod:`.timing` — every delay; :mod:`.snapshot` — the read-only picture.

docs/architecture.md says where each kind of change goes.
"""

from shoal.protocol.engine.core import Engine
from shoal.protocol.engine.host_state import Command
from shoal.protocol.engine.leader import MAX_BASES
from shoal.protocol.engine.phase import Phase
from shoal.protocol.engine.timing import Timing
from shoal.protocol.engine.verbs import CommandResult

__all__ = ["MAX_BASES", "Command", "CommandResult", "Engine", "Phase", "Timing"]
