"""The data-plane contract: the one place where the control plane and a kernel backend meet.

The convergence engine decides *what* this host accepts and says it as an :class:`Install`
of tokens and flags; a backend (nftables today) makes the kernel enforce it. Neither side
knows the other's internals: the engine never names a table or a set, a backend never reads
protocol state. A new backend implements :class:`Backend` and nothing else changes.

Tokens are ints, so that release and acquire are set operations:

* ``rule * 65537 + bucket`` — a bucket of a ``multiple`` rule (:func:`bucket_token`);
* ``rule * 65537 + 65536`` — the handling of a ``single`` rule (:func:`single_token`);
* ``-1`` — traffic no rule covers, taken by the default host (:data:`DEFAULT_TOKEN`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple, Protocol

DEFAULT_TOKEN = -1
STRIDE = 65537
AFFINITY_MARGIN_S = 2  # seconds an away entry outlives the affinity entry it mirrors


def bucket_token(rule: int, bucket: int) -> int:
    return rule * STRIDE + bucket


def single_token(rule: int) -> int:
    return rule * STRIDE + 65536


def split_token(token: int) -> tuple[int, int | None]:
    """(rule index, bucket) for a bucket; (rule index, None) for a single rule; (-1, None)."""
    if token == DEFAULT_TOKEN:
        return -1, None
    rule, rest = divmod(token, STRIDE)
    return rule, (None if rest == 65536 else rest)


class RuleState(IntEnum):
    """A port rule's state on one host (``enable``, ``drain``, ``disable``); also on the
    wire, in heartbeats."""

    ENABLED = 0
    DRAINING = 1
    DISABLED = 2


class Install(NamedTuple):
    """What this host's data plane enforces, as a whole (a backend applies it atomically)."""

    tokens: frozenset[int]  # new connections accepted for these, while the lease runs
    serving: bool  # established connections to VIPs kept (False when stopped or suspended)
    rule_states: tuple[RuleState, ...]  # per rule: disabled drops all, draining drops new
    # sticky rules (see shoal.protocol.engine.handoff): whose affinity entries the kernel
    # keeps (this run and generation: another one flushes them), and the hosts whose away
    # entries stand, each with its run and generation ((-1, -1): as they are)
    affinity: tuple[int, int] = (0, 0)
    sources: frozenset[tuple[int, int, int]] = frozenset()


@dataclass(frozen=True)
class Away:
    """Keys (4 or 16 bytes) of sticky rule ``rule`` whose clients host ``source`` (in its run
    ``incarnation``, affinity ``generation``) serves: their new connections are refused
    here until they have been idle for the rule's affinity timeout and a margin."""

    source: int
    incarnation: int
    generation: int
    rule: int
    keys: tuple[bytes, ...]


class AffinityRead(NamedTuple):
    """What a read of the sticky rules' affinity entries found."""

    # the keys kept in the buckets not owned, by bucket token (read after a release: none
    # can be added there)
    keys: dict[int, list[bytes]]
    counts: dict[int, int]  # the entries per sticky rule (by index), in every bucket


class DataplaneError(RuntimeError):
    """The kernel refused a change; nothing of it was applied, and the backend's view of
    the kernel is what it was before the call."""


@dataclass(frozen=True)
class RuleCounters:
    rule: str
    accepted: int  # new connections accepted
    dropped: int  # packets dropped by the rule's chain
    dropped_bytes: int
    reset: int = 0  # mid-stream packets of a dead host's connections answered with a reset


class Backend(Protocol):
    """A kernel data plane for one host and one cluster configuration.

    Every method either does all it says or raises :class:`DataplaneError` having done
    nothing: the runtime retries a refused :meth:`apply` with the same install, and the
    retry must change the kernel as the first attempt would have.
    """

    def attach(self) -> None:
        """Take over what an earlier run left in the kernel (its connections keep their
        buckets until the first :meth:`apply`), or create it empty."""

    def apply(self, inst: Install) -> None:
        """Make the kernel enforce ``inst``, in one atomic change."""

    def renew(self, ms: int) -> None:
        """The kernel takes new connections for ``ms`` more milliseconds and then stops on
        its own, whatever happens to the daemon (0: stop now)."""

    def affine_reader(self) -> Callable[[], AffinityRead]:
        """A read of the affinity entries this kernel keeps, as it is now (the buckets owned
        as of this call), that may run on another thread: a listing of a million entries
        takes tens of seconds."""

    def away(self, entries: Away) -> None:
        """Refuse the new connections of these clients (see :class:`Away`); entries of
        another run or generation of that source are replaced."""

    def reset(self, tokens: frozenset[int]) -> None:
        """Answer mid-stream TCP packets that no connection of this host tracks, in these
        buckets, with a reset (the clients of a host known dead); only buckets owned now
        count, and a bucket leaving this host in an :meth:`apply` leaves this set with it."""

    def counters(self) -> list[RuleCounters]:
        """Per rule: new connections accepted and packets dropped, since attach."""

    def describe(self) -> dict[str, Any]:
        """What filters (``dataplane``: "nftables", or "xdp (native)" / "xdp (generic)"
        once attached) and, for an XDP screen, its counts per rule and verdict."""

    def remove(self) -> None:
        """Take everything out of the kernel: the host filters nothing any more."""
