"""The reference model of the per-packet verdict (docs/mapping.md), in pure Python.

Every data-plane backend must agree with it packet for packet: tests send real packets
through the kernel and compare which hosts accepted them with :func:`decide`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from shoal.choices import Affinity, FilteringMode
from shoal.config import ClusterConfig, PortRule
from shoal.hashing import IPAddress, affinity_address, bucket_of


@dataclass(frozen=True)
class Packet:
    """What the verdict looks at in a client packet."""

    src: IPAddress
    dst: IPAddress
    protocol: str  # "tcp", "udp" or another protocol name
    sport: int = 0
    dport: int = 0


@dataclass(frozen=True)
class ClusterView:
    """The agreed cluster state a host's kernel filters with.

    ``maps`` holds the bucket → owner map of each ``multiple`` rule; ``single_owner`` the
    host handling each ``single`` rule (best live handling priority) or None.
    """

    default_host: int | None
    maps: Mapping[str, Sequence[int]] = field(default_factory=dict)
    single_owner: Mapping[str, int | None] = field(default_factory=dict)


class Outcome(StrEnum):
    PASS = "pass"  # not cluster traffic: every host's stack sees it
    OWNER = "owner"  # exactly the host in ``host`` accepts a new connection
    DROP = "drop"  # nobody accepts


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    host: int | None = None
    rule: str | None = None
    bucket: int | None = None


def find_rule(cluster: ClusterConfig, dst: IPAddress, protocol: str, dport: int) -> PortRule | None:
    """The port rule covering a destination: a rule for that VIP wins over an ``all`` rule."""
    best: PortRule | None = None
    for rule in cluster.effective_rules:
        if not rule.protocol.covers(protocol) or not rule.start <= dport <= rule.last:
            continue
        if rule.vip == "all":
            best = best or rule
        elif rule.vip == dst:
            return rule
    return best


def hash_input(rule: PortRule, src: IPAddress, sport: int) -> tuple[IPAddress, int | None]:
    """The client key a ``multiple`` rule hashes: address (maybe masked) and maybe port."""
    if rule.affinity is Affinity.NONE:
        return src, sport
    if rule.affinity is Affinity.SINGLE:
        return src, None
    prefix = rule.ipv4_prefix if isinstance(src, ipaddress.IPv4Address) else rule.ipv6_prefix
    return affinity_address(src, prefix), None


def rule_bucket(cluster: ClusterConfig, rule: PortRule, src: IPAddress, sport: int) -> int:
    addr, port = hash_input(rule, src, sport)
    return bucket_of(addr, port, cluster.seed, cluster.buckets)


def decide(cluster: ClusterConfig, view: ClusterView, pkt: Packet) -> Decision:
    """Which host accepts a new connection (pure SYN or new UDP flow) described by ``pkt``."""
    if pkt.dst not in cluster.all_vips or pkt.protocol not in ("tcp", "udp"):
        return Decision(Outcome.PASS)
    rule = find_rule(cluster, pkt.dst, pkt.protocol, pkt.dport)
    if rule is None:
        return _owner(view.default_host, None, None)
    if rule.mode is FilteringMode.DISABLED:
        return Decision(Outcome.DROP, rule=rule.key)
    if rule.mode is FilteringMode.SINGLE:
        return _owner(view.single_owner.get(rule.key), rule.key, None)
    bucket = rule_bucket(cluster, rule, pkt.src, pkt.sport)
    owners = view.maps.get(rule.key)
    host = owners[bucket] if owners is not None else 0
    return _owner(host or None, rule.key, bucket)


def _owner(host: int | None, rule: str | None, bucket: int | None) -> Decision:
    if host is None:
        return Decision(Outcome.DROP, rule=rule, bucket=bucket)
    return Decision(Outcome.OWNER, host=host, rule=rule, bucket=bucket)
