"""The messages hosts exchange on EtherType 0x886F: heartbeats and map chunks, what their
fields mean, and why a received frame can be dropped.

Their layout on the wire and their authentication are :mod:`shoal.protocol.codec`'s.
"""

from __future__ import annotations

import hashlib
import ipaddress
import struct
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import NamedTuple

from shoal.dataplane.contract import RuleState

ETHERTYPE = 0x886F
VERSION = 8
HEADER_LEN = 32
TAG_LEN = 32
MTU_PAYLOAD = 1500
MAX_HOST = 256
MAX_RULES = 32
CHUNK_DATA = 1200  # map bytes per chunk: header + 16 + 1200 + tag stays under 1500


class FrameType(IntEnum):
    HEARTBEAT = 1
    MAP_CHUNK = 2
    PROOF = 3
    REQUEST = 4
    ANSWER = 5
    HANDOFF = 6


class HostState(IntEnum):
    """A host's state as carried in heartbeats (``query`` adds "(default)")."""

    STOPPED = 0
    CONVERGING = 1
    CONVERGED = 2
    DRAINING = 3
    SUSPENDED = 4


class Health(IntEnum):
    """What a host's health checks say of it (of one rule, or of the host as a whole); on
    the wire in the high half of the state byte it qualifies."""

    NONE = 0  # no check
    OK = 1
    FAILING = 2


def with_health(state: int, health: Health) -> int:
    """A state byte and a health, as one byte."""
    return state | health << 4


def split_health(byte: int) -> tuple[int, Health]:
    """The state and the health one byte holds (ValueError for an unknown health)."""
    return byte & 0x0F, Health(byte >> 4)


class Flag(IntEnum):
    OWNS_NOTHING = 1  # this host's kernel takes no new connections for any bucket
    RELEASED = 2  # installed ⊆ this host's share of the announced epoch
    ACQUIRED = 4  # installed == this host's share of the announced epoch
    READY = 8  # (leader) every release and fence of the epoch is done: acquire
    HAS_EPOCH = 16
    ACKS_ARE_RECORD = 32  # (encoding) acks = record less the sender: the acks are not sent
    VOTE_IS_RECORD = 64  # (encoding) vote = record: the vote is not sent
    ASKS = 128  # (encoding) the asks bitmap follows: some host is to prove it is alive


class Rejection(StrEnum):
    """Why a received frame was dropped (each is counted)."""

    TOO_SHORT = "too_short"
    BAD_MAGIC = "bad_magic"
    BAD_VERSION = "bad_version"
    FOREIGN_CLUSTER = "foreign_cluster"
    BAD_LENGTH = "bad_length"
    BAD_AUTH = "bad_auth"
    UNKNOWN_TYPE = "unknown_type"
    MALFORMED = "malformed"
    REPLAY = "replay"
    UNPROVEN = "unproven"  # its sender has not yet proven it is alive now (see Proof)
    OWN = "own"


def cluster_id(primary_vip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    return hashlib.sha256(b"shoal-cluster:" + primary_vip.packed).digest()[:8]


class EpochKey(NamedTuple):
    """An epoch's identity: its number, the host that created it and that host's incarnation
    (so a restarted leader that counts from 1 again never reuses a key).

    Newer numbers win; between equal numbers (two sides of a partition) the lower leader id.
    """

    number: int
    leader: int
    origin: int = 0

    def rank(self) -> tuple[int, int, int]:
        return (self.number, -self.leader, self.origin)

    def __str__(self) -> str:
        return f"{self.number}/{self.leader}"


EPOCH_KEY = struct.Struct("!IHQ")
NO_KEY = EpochKey(0, 0, 0)


@dataclass(frozen=True)
class RuleReport:
    """A host's parameters for one port rule, in configuration order."""

    weight: int  # 0..100
    state: RuleState
    priority: int  # handling priority 1..256
    health: Health = Health.NONE  # of the rule's check on this host

    @property
    def byte(self) -> int:
        """State and health, as they travel."""
        return with_health(self.state, self.health)

    @classmethod
    def unpack(cls, weight: int, byte: int, priority: int) -> RuleReport:
        state, health = split_health(byte)
        return cls(weight, RuleState(state), priority, health)


@dataclass(frozen=True)
class Heartbeat:
    host_id: int
    incarnation: int
    seq: int
    state: HostState
    flags: int
    config_digest: bytes  # 8 bytes
    epoch: EpochKey | None
    epoch_digest: bytes  # 8 bytes, zero without an epoch
    acks: frozenset[int]  # hosts heard within the ack window, members of the sender's epoch
    rules: tuple[RuleReport, ...]
    record: frozenset[int] = frozenset()  # members of the newest READY epoch it knew
    vote: frozenset[int] = frozenset()  # members of the epoch it adopted last
    silences: tuple[tuple[int, int], ...] = ()  # (host, ms since heard) for fenced hosts
    dedicated_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    beat: int = 0  # this heartbeat's number, modulo 256
    echoes: tuple[int, ...] = ()  # per acked host (ascending): the newest beat heard from it
    said: int = 0  # the content number (header): the sender's count of changes to the rest
    asks: frozenset[int] = frozenset()  # hosts heard that have not proven they are alive now
    health: Health = Health.NONE  # of the host-wide check
    affinity: Affinity | None = None  # where the cluster has sticky rules

    def has(self, flag: Flag) -> bool:
        return bool(self.flags & flag)


@dataclass(frozen=True)
class Affinity:
    """What a heartbeat says of client affinity (see :mod:`shoal.protocol.engine.handoff`):
    the generation of the sender's affinity entries (a new one each time it lost them:
    entries handed over under an older one no longer stand); for the epoch it reports,
    whether its handoff is ready and to whom it hands clients over, and whether it received
    every handoff addressed to it."""

    generation: int  # 0..65535, within the sender's incarnation
    ready: bool = False  # its handoff for the epoch it reports is composed
    to: frozenset[int] = frozenset()  # hosts it hands clients over to, in that epoch
    handed_in: bool = False  # it holds every handoff addressed to it in that epoch
    leaving: bool = False  # drainstopped: a member only until its affine clients go idle


MAX_HANDOFF_KEYS = 280  # IPv4 keys per handoff frame (70 IPv6): 32 + 24 + 1120 + 32 < 1500


@dataclass(frozen=True)
class Handoff:
    """One piece of a host's handoff to host ``to`` in epoch ``epoch``: the clients of
    sticky rule ``rule`` that the sender keeps serving (their keys: 4 or 16 bytes each),
    piece ``index`` of ``count``; under the sender's affinity ``generation``."""

    host_id: int
    incarnation: int
    seq: int
    epoch: EpochKey
    generation: int
    to: int
    index: int
    count: int
    rule: int
    keys: tuple[bytes, ...] = field(repr=False)


@dataclass(frozen=True)
class MapChunk:
    """One piece of an epoch's compressed state (see :mod:`shoal.protocol.epoch`)."""

    host_id: int
    incarnation: int
    seq: int
    epoch: EpochKey
    epoch_digest: bytes
    index: int
    count: int
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class Proof:
    """The sender is alive now: it heard each ``(host, incarnation, seq)`` of ``heard``, a
    heartbeat of that host asking it for this proof. Only a frame made after a host sent the
    heartbeat numbered ``seq`` in that run can name it, so a proof naming one this host sent
    since it began to ask cannot be a recording from before."""

    host_id: int
    incarnation: int
    seq: int
    heard: tuple[tuple[int, int, int], ...]


MAX_PROOFS = 100  # heartbeats answered in one proof frame: 32 + 1 + 1400 + 32 < 1500
MAX_REMOTE = 1200  # bytes of a request's or an answer's JSON: 32 + 10 + 1200 + 32 < 1500


@dataclass(frozen=True)
class Remote:
    """A remote-control frame: the sender's run, the other host (``peer``), the request's
    id and its JSON ``body``."""

    host_id: int
    incarnation: int
    seq: int
    peer: int
    request_id: int
    body: bytes = field(repr=False)


class Request(Remote):
    """An operator's verb for another host (remote control, where the cluster allows it):
    the control request in ``body`` for host ``peer`` (0: every host)."""


class Answer(Remote):
    """What host ``host_id`` answered to request ``request_id`` of host ``peer``."""


Frame = Heartbeat | MapChunk | Proof | Request | Answer | Handoff
