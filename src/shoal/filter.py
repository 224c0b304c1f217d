"""``shoal filter``: where one client flow goes now (NLB's ``wlbs filter``): the rule that
covers it, the key its rule hashes, its bucket, the host that takes it, and why.

From a daemon's held epoch (:func:`view_of`), or offline from the host files alone
(:func:`fresh_view`: the maps a cluster of those members forms when it starts together;
a running cluster's maps also depend on the order hosts came and went, so only the daemon
knows them for sure).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from shoal.bucket_map import rebalance
from shoal.choices import FilteringMode
from shoal.config import ClusterConfig, PortRule, ShoalConfig
from shoal.hashing import IPAddress
from shoal.plan import weights_for
from shoal.protocol.epoch import EpochState
from shoal.verdict import ClusterView, Outcome, Packet, decide, find_rule, hash_input

PROTOCOLS = ("tcp", "udp")


def endpoint(text: str, what: str, port_needed: bool) -> tuple[IPAddress, int | None]:
    """``ADDRESS``, ``ADDRESS:PORT`` or ``[ADDRESS]:PORT`` (IPv6); ValueError names
    ``what`` and the text."""
    host, port = text, None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{what}: {text!r} is not [ADDRESS]:PORT")
        port = rest[1:] or None
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{what}: {host!r} is not an IP address") from None
    if port is None:
        if port_needed:
            raise ValueError(f"{what}: {text!r} has no port (ADDRESS:PORT)")
        return address, None
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what}: port {port!r} is not 0..65535")
    return address, int(port)


def view_of(epoch: EpochState | None, rules: Sequence[PortRule]) -> ClusterView:
    """What an epoch says of every rule (nobody, without an epoch)."""
    if epoch is None:
        return ClusterView(default_host=None)
    return ClusterView(
        default_host=epoch.default_host or None,
        maps={r.key: m for r, m in zip(rules, epoch.maps, strict=True) if m is not None},
        single_owner={r.key: epoch.handlers[i] or None for i, r in enumerate(rules)},
    )


def fresh_view(configs: list[ShoalConfig], members: set[int]) -> ClusterView:
    """The maps ``members`` form when they start together, from their host files."""
    cluster = configs[0].cluster
    maps: dict[str, Sequence[int]] = {}
    single: dict[str, int | None] = {}
    live = [c for c in configs if c.host.host_id in members]
    for rule in cluster.effective_rules:
        if rule.mode is FilteringMode.MULTIPLE:
            maps[rule.key] = rebalance(
                None, weights_for(configs, rule.key, members), cluster.buckets
            )
        elif rule.mode is FilteringMode.SINGLE and live:
            single[rule.key] = min(
                live, key=lambda c: (c.priority(rule.key), c.host.host_id)
            ).host.host_id
    return ClusterView(
        default_host=min(members) if members else None, maps=maps, single_owner=single
    )


def where(
    cluster: ClusterConfig, view: ClusterView, client: IPAddress, sport: int,
    vip: IPAddress, port: int, protocol: str,
) -> dict[str, Any]:  # fmt: skip
    """The verdict for a new connection of this flow, as a JSON document."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: {protocol!r} is neither tcp nor udp")
    if vip not in cluster.all_vips:
        known = ", ".join(str(v) for v in cluster.all_vips)
        raise ValueError(f"vip: {vip} is not a VIP of cluster {cluster.name} ({known})")
    if client.version != vip.version:
        raise ValueError(f"client: {client} and the VIP {vip} are not of one IP version")
    d = decide(cluster, view, Packet(client, vip, protocol, sport, port))
    rule = find_rule(cluster, vip, protocol, port)
    out: dict[str, Any] = {
        "client": str(client),
        "client_port": sport,
        "vip": str(vip),
        "port": port,
        "protocol": protocol,
        "rule": d.rule,
        "mode": rule.mode.value if rule else None,
        "affinity": rule.affinity.value if rule else None,
        "hash_key": None,
        "bucket": d.bucket,
        "host": d.host if d.outcome is Outcome.OWNER else None,
        "why": "",
    }
    if rule is None:
        out["why"] = "no port rule covers it: the default host takes it"
    elif rule.mode is FilteringMode.DISABLED:
        out["why"] = f"rule {rule.key} is disabled: every host drops it"
    elif rule.mode is FilteringMode.SINGLE:
        out["why"] = f"rule {rule.key} is handled by one host, by handling priority"
    else:
        addr, hport = hash_input(rule, client, sport)
        out["hash_key"] = str(addr) if hport is None else f"{addr}:{hport}"
        out["why"] = f"rule {rule.key} hashes {out['hash_key']} (affinity {rule.affinity.value})"
    if d.outcome is not Outcome.OWNER:
        out["why"] += "; no host takes it now"
    return out
