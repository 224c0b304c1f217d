"""The configuration's vocabulary: every enumerated choice, preset and limit a host file
may name, on their own so that modules needing a word (a rule's mode, a data plane) need not
import the models that validate whole files."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

MAX_HOSTS = 256
MAX_PORT = 65535
EQUAL: Literal["equal"] = "equal"
EQUAL_WEIGHT = 50  # NLB's LoadWeight default; what "equal" means beside numeric weights


class Protocol(StrEnum):
    TCP = "tcp"
    UDP = "udp"
    BOTH = "both"

    def covers(self, l4: str) -> bool:
        return self is Protocol.BOTH or self.value == l4


class FilteringMode(StrEnum):
    MULTIPLE = "multiple"
    SINGLE = "single"
    DISABLED = "disabled"


class Affinity(StrEnum):
    NONE = "none"
    SINGLE = "single"
    NETWORK = "network"


class AllUnhealthy(StrEnum):
    """What a rule does when every host enabled for it fails its health check."""

    SERVE = "serve"  # every enabled host serves, as if healthy (a panic threshold)
    DROP = "drop"  # nobody takes new connections of the rule


class InitialState(StrEnum):
    STARTED = "started"
    STOPPED = "stopped"
    SUSPENDED = "suspended"


XDP_MAX_RULES = 32  # what the XDP program's rule table holds (bpf/screen.c)
XDP_MAX_VIPS = 64


class Dataplane(StrEnum):
    """What drops the packets that are not this host's: nftables alone, or an XDP program
    in front of the same nftables table (see docs/operations.md, "Choosing a data plane")."""

    NFTABLES = "nftables"
    XDP = "xdp"


class Profile(StrEnum):
    """Heartbeat timing presets.

    ``nlb`` is NLB's own (1000 ms, 5 missed: about 5.25 s to notice a dead host).
    ``default`` (100 ms, 4 missed) notices a crash in 425 ms and has moved its traffic within
    half a second, for 10 small frames/s per host: a host is gone only when no host heard it
    for that long (the others' echoes vouch for beats one host missed), and lost heartbeats
    rarely cost a lease (it lasts 4.15 periods from the heartbeat a quorum echoed). With 4
    hosts or more, ``loss_tolerance = 3`` notices in 325 ms (docs/performance.md: what
    loss then costs).
    ``fast`` (20 ms, 4 missed) notices in 85 ms, for small clusters on a quiet segment.
    """

    DEFAULT = "default"
    FAST = "fast"
    NLB = "nlb"


PROFILE_TIMING: dict[Profile, tuple[int, int]] = {
    Profile.DEFAULT: (100, 4),
    Profile.FAST: (20, 4),
    Profile.NLB: (1000, 5),
}


class PartitionPolicy(StrEnum):
    """What a host does when it can no longer hear part of the last agreed membership.

    ``quorum``: only a side holding a majority of that membership (or exactly half of it
    including its lowest host id) takes over the missing hosts' buckets; the other side stops
    taking new connections, so no connection is ever accepted twice, even when the partition
    heals. ``available``: every side keeps serving, as NLB does; when the partition heals the
    sides briefly accept the same new connections until they converge.
    """

    QUORUM = "quorum"
    AVAILABLE = "available"


MAX_AFFINITY_TIMEOUT = 86400  # seconds: a day
