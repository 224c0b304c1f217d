"""The convergence engine: one host's membership and map agreement, without I/O.

:class:`Engine` (in :mod:`.core`) is the public object; its parts each own one kind of
state: :mod:`.host_state` (the host state and the operator verbs, as a table),
:mod:`.phase` (where the host stands with its epoch), :mod:`.timing` (every delay).
"""

from shoal.protocol.engine.core import CommandResult, Engine
from shoal.protocol.engine.host_state import Command
from shoal.protocol.engine.leader import MAX_BASES
from shoal.protocol.engine.phase import Phase
from shoal.protocol.engine.timing import Timing

__all__ = ["MAX_BASES", "Command", "CommandResult", "Engine", "Phase", "Timing"]
