"""An epoch: the agreed membership, maps and handlers, and how the next one is computed.

An epoch holds everything that decides which host accepts what: the members, their rule
parameters, each ``multiple`` rule's bucket map, each ``single`` rule's handler and the
default host. It travels compressed in map chunks (zlib, then 1200-byte pieces) and is
checked against the 8-byte digest the leader's heartbeats announce.

Ownership is expressed as *tokens* (ints) so that release and acquire are set operations:
``rule * 65537 + bucket`` for a bucket of a ``multiple`` rule, ``rule * 65537 + 65536`` for
the handling of a ``single`` rule, and ``-1`` for uncovered traffic (the default host).
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import compress

from shoal.bucket_map import rebalance
from shoal.choices import AllUnhealthy, FilteringMode
from shoal.config import PortRule
from shoal.dataplane.contract import DEFAULT_TOKEN, STRIDE, RuleState, single_token
from shoal.protocol.frames import EPOCH_KEY, MAX_HOST, NO_KEY, EpochKey, Health, RuleReport
from shoal.protocol.heartbeat_layout import host_bitmap, hosts_from_bitmap


@dataclass(frozen=True)
class EpochState:
    key: EpochKey
    parent: EpochKey | None
    members: frozenset[int]
    fenced: frozenset[int]  # hosts removed without saying so: wait for their lease first
    bases: tuple[frozenset[int], ...]  # memberships this epoch had to be a quorum of
    lineage: tuple[EpochKey, ...]  # ancestors back to the last READY one (oldest first)
    reports: Mapping[int, tuple[RuleReport, ...]]  # each member's rule parameters
    maps: tuple[tuple[int, ...] | None, ...]  # per rule: bucket → owner, for multiple rules
    handlers: tuple[int, ...]  # per rule: host handling a single rule, 0 for none
    default_host: int  # 0 for none

    def tokens_of(self, host: int) -> frozenset[int]:
        """What ``host`` may accept new connections for in this epoch."""
        out: set[int] = set()
        for i, owners in enumerate(self.maps):
            if owners is not None:
                base = i * STRIDE
                out.update(compress(range(base, base + len(owners)), map(host.__eq__, owners)))
        for i, h in enumerate(self.handlers):
            if h == host:
                out.add(single_token(i))
        if self.default_host == host:
            out.add(DEFAULT_TOKEN)
        return frozenset(out)

    def all_tokens(self) -> frozenset[int]:
        """Every token some member owns."""
        out: set[int] = set()
        for i, owners in enumerate(self.maps):
            if owners is not None:
                base = i * STRIDE
                out.update(compress(range(base, base + len(owners)), owners))
        out.update(single_token(i) for i, h in enumerate(self.handlers) if h)
        if self.default_host:
            out.add(DEFAULT_TOKEN)
        return frozenset(out)

    def encode(self) -> bytes:
        parent = self.parent or NO_KEY
        out = [
            EPOCH_KEY.pack(self.key.number, self.key.leader, self.key.origin),
            EPOCH_KEY.pack(parent.number, parent.leader, parent.origin),
            struct.pack(
                "!HH",
                self.default_host,
                len(self.maps),
            ),
        ]
        out.append(host_bitmap(self.members))
        out.append(host_bitmap(self.fenced))
        out.append(struct.pack("!B", len(self.bases)))
        out += [host_bitmap(b) for b in self.bases]
        out.append(struct.pack("!B", len(self.lineage)))
        out += [EPOCH_KEY.pack(*k) for k in self.lineage]
        for h in sorted(self.members):
            reps = self.reports.get(h, ())
            out.append(struct.pack("!HB", h, len(reps)))
            out += [struct.pack("!BBH", r.weight, r.byte, r.priority) for r in reps]
        for owners, handler in zip(self.maps, self.handlers, strict=True):
            if owners is None:
                out.append(struct.pack("!BH", 0, handler))
            else:
                out.append(struct.pack("!BI", 1, len(owners)))
                out.append(struct.pack(f"!{len(owners)}H", *owners))
        return b"".join(out)

    @cached_property
    def encoded(self) -> bytes:
        return self.encode()

    def digest(self) -> bytes:
        return self._digest

    @cached_property
    def _digest(self) -> bytes:
        return hashlib.sha256(self.encoded).digest()[:8]

    def compressed(self) -> bytes:
        return zlib.compress(self.encoded, 6)


class EpochDecodeError(Exception):
    pass


def decode_epoch(blob: bytes, rules: Sequence[PortRule], buckets: int) -> EpochState:
    """Inflate and parse an epoch; refuse anything that does not fit this configuration."""
    limit = 128 + 32 * 260 + 14 * 260 + MAX_HOST * (3 + 4 * 32) + len(rules) * (5 + 2 * buckets)
    try:
        d = zlib.decompressobj()
        raw = d.decompress(blob, limit)
        if d.unconsumed_tail or not d.eof:
            raise EpochDecodeError("epoch too large or truncated")
        key = EpochKey(*EPOCH_KEY.unpack_from(raw))
        parent = EpochKey(*EPOCH_KEY.unpack_from(raw, EPOCH_KEY.size))
        off = 2 * EPOCH_KEY.size
        default, nrules = struct.unpack_from("!HH", raw, off)
        off += 4
        members = hosts_from_bitmap(raw[off : off + 32])
        fenced = hosts_from_bitmap(raw[off + 32 : off + 64])
        off += 64
        (nbases,) = struct.unpack_from("!B", raw, off)
        off += 1
        bases = tuple(
            hosts_from_bitmap(raw[off + 32 * i : off + 32 * (i + 1)]) for i in range(nbases)
        )
        off += 32 * nbases
        if len(raw) < off:
            raise EpochDecodeError("truncated quorum bases")
        (nlin,) = struct.unpack_from("!B", raw, off)
        off += 1
        lineage = []
        for _ in range(nlin):
            lineage.append(EpochKey(*EPOCH_KEY.unpack_from(raw, off)))
            off += EPOCH_KEY.size
        reports: dict[int, tuple[RuleReport, ...]] = {}
        for _ in range(len(members)):
            h, n = struct.unpack_from("!HB", raw, off)
            off += 3
            reps = []
            for _ in range(n):
                w, s, p = struct.unpack_from("!BBH", raw, off)
                off += 4
                reps.append(RuleReport.unpack(w, s, p))
            reports[h] = tuple(reps)
        if nrules != len(rules) or set(reports) != set(members):
            raise EpochDecodeError("epoch does not match the configured rules")
        maps: list[tuple[int, ...] | None] = []
        handlers: list[int] = []
        for rule in rules:
            (kind,) = struct.unpack_from("!B", raw, off)
            off += 1
            if kind == 0:
                (h,) = struct.unpack_from("!H", raw, off)
                off += 2
                maps.append(None)
                handlers.append(h)
            else:
                (n,) = struct.unpack_from("!I", raw, off)
                off += 4
                if n != buckets or rule.mode is not FilteringMode.MULTIPLE:
                    raise EpochDecodeError("map size or rule mode mismatch")
                owners = struct.unpack_from(f"!{n}H", raw, off)
                off += 2 * n
                if not set(owners) <= members | {0}:
                    raise EpochDecodeError("map names a host that is not a member")
                maps.append(tuple(owners))
                handlers.append(0)
        if off != len(raw) or (default and default not in members):
            raise EpochDecodeError("trailing bytes or bad default host")
        return EpochState(
            key=key,
            parent=parent if parent.number else None,
            members=members,
            fenced=fenced,
            bases=bases,
            lineage=tuple(lineage),
            reports=reports,
            maps=tuple(maps),
            handlers=tuple(handlers),
            default_host=default,
        )
    except (struct.error, zlib.error, ValueError) as e:
        raise EpochDecodeError(str(e)) from None


def serving_hosts(rule: PortRule, reports: Sequence[tuple[int, RuleReport]]) -> frozenset[int]:
    """The hosts that take a share of ``rule``: enabled there, and not failing its health
    check, unless every enabled host fails it and the rule says to serve then
    (``all_unhealthy = "serve"``: a check failing everywhere more likely measures the check
    than the service, and dropping every client helps nobody)."""
    enabled = {h for h, r in reports if r.state is RuleState.ENABLED}
    healthy = {h for h, r in reports if h in enabled and r.health is not Health.FAILING}
    if not healthy and rule.all_unhealthy is AllUnhealthy.SERVE:
        return frozenset(enabled)
    return frozenset(healthy)


def next_epoch(
    prev: EpochState | None,
    key: EpochKey,
    members: frozenset[int],
    fenced: frozenset[int],
    bases: tuple[frozenset[int], ...],
    lineage: tuple[EpochKey, ...],
    reports: Mapping[int, tuple[RuleReport, ...]],
    rules: Sequence[PortRule],
    buckets: int,
) -> EpochState:
    """The epoch after ``prev`` for these members: minimal moves, exact balance."""
    maps: list[tuple[int, ...] | None] = []
    handlers: list[int] = []
    for i, rule in enumerate(rules):
        serving = serving_hosts(rule, [(h, reports[h][i]) for h in members])
        if rule.mode is FilteringMode.MULTIPLE:
            weights = {h: (reports[h][i].weight if h in serving else 0) for h in members}
            old = prev.maps[i] if prev is not None else None
            maps.append(tuple(rebalance(old, weights, buckets)))
            handlers.append(0)
        else:
            maps.append(None)
            candidates = sorted(serving)
            if rule.mode is FilteringMode.SINGLE and candidates:
                handlers.append(min(candidates, key=lambda h: (reports[h][i].priority, h)))
            else:
                handlers.append(0)
    return EpochState(
        key=key,
        parent=prev.key if prev is not None else None,
        members=members,
        fenced=fenced - members,
        bases=bases,
        lineage=lineage,
        reports={h: reports[h] for h in members},
        maps=tuple(maps),
        handlers=tuple(handlers),
        default_host=default_of(members, reports),
    )


def default_of(members: frozenset[int], reports: Mapping[int, tuple[RuleReport, ...]]) -> int:
    """The default host (traffic no rule covers): the lowest member with a rule enabled (a
    host draining every rule, as a drainstop does, takes no new traffic), else the lowest
    member (0: none)."""
    taking = [h for h in members if any(r.state is RuleState.ENABLED for r in reports[h])]
    return min(taking or members, default=0)


def same_assignment(a: EpochState, b: EpochState) -> bool:
    """True when two epochs give every host the same tokens and members."""
    return (a.members, a.maps, a.handlers, a.default_host) == (
        b.members,
        b.maps,
        b.handlers,
        b.default_host,
    )
