"""The nftables backend: one ``inet`` table generated from the configuration.

The chains are static; everything that changes at run time lives in sets, so that every
change the engine asks for is one atomic JSON transaction of set flushes and element adds:

* ``owned_<i>`` — the buckets of ``multiple`` rule *i* this host takes new UDP flows for (a
  rule for TCP alone has none here: the pre-filter below already dropped every SYN of a
  bucket this host does not own, and a new TCP connection is a pure SYN);
* ``lease`` — holds ``ipv4`` and ``ipv6`` with a timeout: when it runs out (the daemon stopped
  renewing it), ``meta nfproto != @lease`` refuses every new connection;
* ``serving``, ``default_host``, ``handle_<i>``, ``off_<i>``, ``drain_<i>`` — flags, tested
  the same way with ``meta nfproto``: an empty set means no;
* ``reset_<i>`` — buckets of a ``multiple`` rule carrying TCP, owned here, taken over from a
  host known dead, in which no live host holds a connection: a mid-stream TCP packet this
  host does not track there belongs to a connection that died with that host, and is
  answered with a reset so that its client reconnects at once. Only while the lease runs:
  the kernel of a host whose daemon died keeps its sets, and its buckets are others' by then.

Connection awareness: established and related packets are accepted before any bucket check
(a connection stays where it is); a new TCP connection must be a pure SYN, so a mid-stream
packet this host does not track is dropped (a live host may be serving it), outside the
``reset_<i>`` buckets.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from typing import Any, NamedTuple

from shoal.choices import Affinity, FilteringMode, Protocol
from shoal.config import PortRule, ShoalConfig
from shoal.dataplane.contract import (
    AFFINITY_MARGIN_S,
    DEFAULT_TOKEN,
    Install,
    RuleState,
    single_token,
)


class Tables(NamedTuple):
    """The nftables tables of one cluster on this host."""

    inet: str  # connection-aware filter, flags, lease
    pre: str  # netdev pre-filter: never-owned and unowned-SYN drops
    l2: str  # netdev: the cluster MAC's rewrite or acceptance (the adapter's)


def tables(cluster: str) -> Tables:
    """The tables of the cluster named ``cluster``: ``shoal``, ``shoal_pre``, ``shoal_l2``
    for the one named "shoal" (the default); ``shoal_<name>_<hash>...`` for any other, so
    that several clusters run side by side on one host (the hash keeps two names that read
    alike apart)."""
    if cluster == "shoal":
        base = "shoal"
    else:
        tag = re.sub(r"[^a-z0-9]", "_", cluster.lower())[:24]
        base = f"shoal_{tag}_{hashlib.sha256(cluster.encode()).hexdigest()[:6]}"
    return Tables(base, f"{base}_pre", f"{base}_l2")


def owned_set(rule: int) -> str:
    """The set of buckets of ``multiple`` rule ``rule`` this host takes new connections for
    (in the pre-filter, and in the inet table when the rule carries UDP)."""
    return f"owned_{rule}"


def reset_set(rule: int) -> str:
    """The inet table's set of buckets of rule ``rule`` whose unknown mid-stream TCP packets
    are answered with a reset (see the module's docstring)."""
    return f"reset_{rule}"


def checks_reset(rule: PortRule) -> bool:
    """Whether a rule's chain answers unknown mid-stream packets of ``reset_<i>`` buckets."""
    return rule.mode is FilteringMode.MULTIPLE and rule.protocol is not Protocol.UDP


def keep_set(rule: int) -> str:
    """The pre-filter's set of every bucket of rule ``rule`` owned since the table was made."""
    return f"keep_{rule}"


FAMILIES = ("ipv4", "ipv6")


def checks_owned(rule: PortRule) -> bool:
    """Whether the inet table looks a new connection of this rule up in ``owned_<i>`` (a
    sticky rule's SYNs of buckets given away pass the pre-filter: their affine clients')."""
    return rule.mode is FilteringMode.MULTIPLE and (
        rule.protocol is not Protocol.TCP or rule.sticky
    )


AFFINITY_SIZE = 1 << 20  # affinity entries a sticky rule's set holds, per address family
SADDR = (("ipv4", "ip saddr"), ("ipv6", "ip6 saddr"))  # each family and its key's type


def client_set(typ: str, timeout: int) -> str:
    """The body of a set of client keys that the packet path adds and refreshes."""
    return f"{{ typeof {typ}; flags dynamic,timeout; timeout {timeout}s; size {AFFINITY_SIZE}; }}"


def affinity_set(family: str, rule: int) -> str:
    """A sticky rule's affinity entries (``ipv4`` or ``ipv6`` keys)."""
    return f"aff{family[-1]}_{rule}"


def away_set(family: str, rule: int, source: int, incarnation: int, generation: int) -> str:
    """The away entries of sticky rule ``rule`` that host ``source`` (that run, that
    generation: the name says whose they are, for a daemon that takes the table over)."""
    return f"aw{family[-1]}_{rule}_{source}_{incarnation}_{generation}"


def key_exprs(rule: PortRule) -> tuple[str, str]:
    """The client key a sticky rule keeps, for IPv4 and IPv6 (the address, or its prefix)."""
    if rule.affinity is Affinity.NETWORK:
        return (f"ip saddr & {_mask4(rule.ipv4_prefix)}", f"ip6 saddr & {_mask6(rule.ipv6_prefix)}")
    return "ip saddr", "ip6 saddr"


def _key_json(family: str, rule: PortRule) -> dict[str, Any]:
    proto = "ip" if family == "ipv4" else "ip6"
    addr = {"payload": {"protocol": proto, "field": "saddr"}}
    if rule.affinity is not Affinity.NETWORK:
        return addr
    mask = _mask4(rule.ipv4_prefix) if family == "ipv4" else _mask6(rule.ipv6_prefix)
    return {"&": [addr, mask]}


def away_commands(
    table: str, index: int, rule: PortRule, sources: list[tuple[int, int, int]]
) -> list[dict[str, Any]]:
    """Chain ``away_<i>`` whole, for these sources (libnftables JSON): a packet of one of
    their clients that is not a SYN refreshes its entry (the client is active on that host);
    any packet of theirs is dropped."""
    chain = {"family": "inet", "table": table, "name": f"away_{index}"}
    cmds: list[dict[str, Any]] = [{"flush": {"chain": chain}}]
    syn = {"payload": {"protocol": "tcp", "field": "flags"}}
    for src, inc, gen in sources:
        for fam in FAMILIES:
            key = _key_json(fam, rule)
            ref = "@" + away_set(fam, index, src, inc, gen)
            held = {"match": {"op": "==", "left": key, "right": ref}}
            refresh = [
                held,
                {"match": {"op": "!", "left": syn, "right": "syn"}},
                {"set": {"op": "update", "elem": key, "set": ref}},
                {"drop": None},
            ]
            for expr in (refresh, [held, {"drop": None}]):
                rule_ref = {"family": "inet", "table": table, "chain": f"away_{index}"}
                cmds.append({"add": {"rule": {**rule_ref, "expr": expr}}})
    return cmds


def away_set_deletes(table: str, index: int, src: int, inc: int, gen: int) -> list[dict[str, Any]]:
    """The two away sets of one source deleted (libnftables JSON; their creation is
    :func:`away_sets_text`: the JSON of this libnftables has no flag for a set updated from
    the packet path)."""
    return [
        {"delete": {"set": {"family": "inet", "table": table, "name": n}}}
        for n in (away_set(fam, index, src, inc, gen) for fam in FAMILIES)
    ]


def away_sets_text(table: str, index: int, rule: PortRule, src: int, inc: int, gen: int) -> str:
    """The two away sets of one source, created if missing (nft syntax)."""
    t = rule.affinity_timeout_s + AFFINITY_MARGIN_S
    return "".join(
        f"add set inet {table} {away_set(fam, index, src, inc, gen)} {client_set(typ, t)}\n"
        for fam, typ in SADDR
    )


def _mask6(prefix: int) -> str:
    return str(ipaddress.IPv6Network(f"::/{prefix}").netmask)


def _mask4(prefix: int) -> str:
    return str(ipaddress.IPv4Network(f"0.0.0.0/{prefix}").netmask)


def _hash_exprs(rule: PortRule) -> tuple[str, str]:
    if rule.affinity is Affinity.NONE:
        return "ip saddr . th sport", "ip6 saddr . th sport"
    if rule.affinity is Affinity.SINGLE:
        return "ip saddr", "ip6 saddr"
    return (f"ip saddr & {_mask4(rule.ipv4_prefix)}", f"ip6 saddr & {_mask6(rule.ipv6_prefix)}")


def _l4(rule: PortRule, only: Protocol | None = None) -> str:
    """The protocol (or just ``only``) and port-range match of a rule."""
    proto = only or rule.protocol
    protos = {Protocol.TCP: "tcp", Protocol.UDP: "udp"}.get(proto, "{ tcp, udp }")
    ports = f"{rule.start}-{rule.last}" if rule.last != rule.start else str(rule.start)
    return f"meta l4proto {protos} th dport {ports}"


def _match(rule: PortRule) -> str:
    """The nft match selecting a rule's traffic in the inet table."""
    if rule.vip == "all":
        return _l4(rule)
    fam = "ip" if isinstance(rule.vip, ipaddress.IPv4Address) else "ip6"
    return f"{fam} daddr {rule.vip} {_l4(rule)}"


NEW_ONLY = "meta l4proto tcp tcp flags & (fin|syn|rst|ack) != syn drop"
LEASE = "meta nfproto != @lease drop"


def base_ruleset(cfg: ShoalConfig) -> str:
    """The whole table, in nft syntax (loaded once; updates go through :func:`update`)."""
    cl = cfg.cluster
    rules = cl.effective_rules
    v4 = [str(v) for v in cl.all_vips if v.version == 4]
    v6 = [str(v) for v in cl.all_vips if v.version == 6]
    lines = [f"table inet {tables(cl.name).inet} {{"]
    lines.append("  set lease { type nf_proto; flags timeout; }")
    for i in range(len(rules)):
        lines.append(f"  counter accepted_{i} {{ }}")
        lines.append(f"  counter dropped_{i} {{ }}")
        lines.append(f"  counter reset_{i} {{ }}")
    lines.append("  set serving { type nf_proto; }")
    lines.append("  set default_host { type nf_proto; }")
    for i, rule in enumerate(rules):
        lines.append(f"  set off_{i} {{ type nf_proto; }}")
        lines.append(f"  set drain_{i} {{ type nf_proto; }}")
        lines.append(f"  set handle_{i} {{ type nf_proto; }}")
        if checks_owned(rule):
            lines.append(f"  set {owned_set(i)} {{ typeof jhash ip saddr mod {cl.buckets}; }}")
        if checks_reset(rule):
            lines.append(f"  set {reset_set(i)} {{ typeof jhash ip saddr mod {cl.buckets}; }}")
        if rule.sticky:
            for fam, typ in SADDR:
                body = client_set(typ, rule.affinity_timeout_s)
                lines.append(f"  set {affinity_set(fam, i)} {body}")
    lines.append("  chain pre {")
    lines.append("    type filter hook prerouting priority -150; policy accept;")
    if v4:
        lines.append(f"    ip daddr {{ {', '.join(v4)} }} jump vip")
    if v6:
        lines.append(f"    ip6 daddr {{ {', '.join(v6)} }} jump vip")
    lines.append("  }")
    lines.append("  chain vip {")
    lines.append("    meta nfproto != @serving drop")
    lines.append("    meta l4proto != { tcp, udp } accept")
    # rules for one VIP take precedence over rules for all VIPs
    ordered = sorted(range(len(rules)), key=lambda i: rules[i].vip == "all")
    for i in ordered:
        lines.append(f"    {_match(rules[i])} jump r{i}")
    lines.append("    jump r_default")
    lines.append("  }")
    seed = f"{cl.seed:#x}"
    for i, rule in enumerate(rules):
        dropped = f'counter name "dropped_{i}" drop'
        lines.append(f"  chain r{i} {{")
        if rule.mode is FilteringMode.DISABLED:
            lines.append(f"    {dropped}")
        elif rule.sticky:
            lines += _sticky_chain(i, rule, cl.buckets, seed, dropped)
        else:
            lines += [
                f"    meta nfproto @off_{i} {dropped}",
                "    ct state established,related accept",
            ]
            if checks_reset(rule):
                e4, e6 = _hash_exprs(rule)
                for fam, e in (("ipv4", e4), ("ipv6", e6)):
                    lines.append(
                        f"    meta nfproto {fam} meta nfproto @lease "
                        "meta l4proto tcp tcp flags & (syn|rst) == 0 "
                        f"jhash {e} mod {cl.buckets} seed {seed} == @{reset_set(i)} "
                        f'counter name "reset_{i}" reject with tcp reset'
                    )
            lines += [
                f"    meta nfproto @drain_{i} {dropped}",
                f"    {NEW_ONLY.removesuffix('drop')}{dropped}",
                f"    {LEASE.removesuffix('drop')}{dropped}",
            ]
            if rule.mode is FilteringMode.SINGLE:
                lines.append(f"    meta nfproto != @handle_{i} {dropped}")
            elif checks_owned(rule):
                e4, e6 = _hash_exprs(rule)
                lines.append(
                    f"    meta nfproto ipv4 jhash {e4} mod {cl.buckets} seed {seed} "
                    f"!= @{owned_set(i)} {dropped}"
                )
                lines.append(
                    f"    meta nfproto ipv6 jhash {e6} mod {cl.buckets} seed {seed} "
                    f"!= @{owned_set(i)} {dropped}"
                )
            lines.append(f'    counter name "accepted_{i}" accept')
        lines.append("  }")
    for i, rule in enumerate(rules):
        if rule.sticky:
            lines.append(f"  chain away_{i} {{")
            lines.append("  }")
    lines.append("  chain r_default {")
    lines += [
        "    ct state established,related accept",
        f"    {NEW_ONLY}",
        f"    {LEASE}",
        "    meta nfproto != @default_host drop",
        "    accept",
    ]
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _sticky_chain(i: int, rule: PortRule, buckets: int, seed: str, dropped: str) -> list[str]:
    """Chain ``r<i>`` of a sticky rule (see :mod:`shoal.protocol.engine.handoff`): every
    packet of a connection refreshes its client's affinity entry, if it has one; the away
    entries (refreshed and dropped in ``away_<i>``) come before the resets of a dead host's
    clients, since a live host may serve an affine client in a bucket taken over; a new
    connection is taken from a client that is an affinity entry (not refreshed: a SYN is no
    sign that anyone took it; also while the rule drains), or in an owned bucket (the client
    becomes one)."""
    k4, k6 = key_exprs(rule)
    e4, e6 = _hash_exprs(rule)
    aff4, aff6 = affinity_set("ipv4", i), affinity_set("ipv6", i)
    accepted = f'counter name "accepted_{i}" accept'
    out = [f"    meta nfproto @off_{i} {dropped}"]
    for nfp, k, aff in (("ipv4", k4, aff4), ("ipv6", k6, aff6)):
        out.append(
            f"    ct state established,related meta nfproto {nfp} {k} @{aff} "
            f"update @{aff} {{ {k} }} accept"
        )
    out += ["    ct state established,related accept", f"    jump away_{i}"]
    for nfp, e in (("ipv4", e4), ("ipv6", e6)):
        out.append(
            f"    meta nfproto {nfp} meta nfproto @lease meta l4proto tcp "
            f"tcp flags & (syn|rst) == 0 jhash {e} mod {buckets} seed {seed} == "
            f'@{reset_set(i)} counter name "reset_{i}" reject with tcp reset'
        )
    out += [
        f"    {NEW_ONLY.removesuffix('drop')}{dropped}",
        f"    {LEASE.removesuffix('drop')}{dropped}",
    ]
    # a draining rule takes no new client, and keeps its affine ones until they are idle
    out += [f"    meta nfproto {nfp} {k} @{aff} {accepted}" for nfp, k, aff in
            (("ipv4", k4, aff4), ("ipv6", k6, aff6))]  # fmt: skip
    out.append(f"    meta nfproto @drain_{i} {dropped}")
    for nfp, e, k, aff in (("ipv4", e4, k4, aff4), ("ipv6", e6, k6, aff6)):
        out.append(
            f"    meta nfproto {nfp} jhash {e} mod {buckets} seed {seed} @{owned_set(i)} "
            f"update @{aff} {{ {k} }} {accepted}"
        )
    out.append(f"    {dropped}")
    return out


def multiple_rules(cfg: ShoalConfig) -> list[int]:
    """The indexes of the rules whose traffic is shared by buckets."""
    return [
        i for i, r in enumerate(cfg.cluster.effective_rules) if r.mode is FilteringMode.MULTIPLE
    ]


def prefilter(cfg: ShoalConfig) -> str:
    """A netdev ingress table that drops, before conntrack sees them, any packet whose
    bucket was never owned here (no connection of this host can live in it) and a pure SYN
    whose bucket is not owned here; ``keep_<i>`` holds every bucket owned since the table
    was made."""
    cl = cfg.cluster
    rules = cl.effective_rules
    lines = [f"table netdev {tables(cl.name).pre} {{"]
    multiple = multiple_rules(cfg)
    for i in multiple:
        lines.append(f"  set {owned_set(i)} {{ typeof jhash ip saddr mod {cl.buckets}; }}")
        lines.append(f"  set {keep_set(i)} {{ typeof jhash ip saddr mod {cl.buckets}; }}")
    lines.append("  chain ingress {")
    lines.append(
        f'    type filter hook ingress device "{cfg.interface}" priority 0; policy accept;'
    )
    ordered = sorted(range(len(rules)), key=lambda i: rules[i].vip == "all")
    seed = f"{cl.seed:#x}"
    for fam, fam_vips in (
        ("ip", [v for v in cl.all_vips if v.version == 4]),
        ("ip6", [v for v in cl.all_vips if v.version == 6]),
    ):
        for i in ordered:
            rule = rules[i]
            if not fam_vips or (rule.vip != "all" and rule.vip not in fam_vips):
                continue
            vips = [rule.vip] if rule.vip != "all" else fam_vips
            # one VIP: a plain comparison, cheaper per packet than a set lookup
            targets = str(vips[0]) if len(vips) == 1 else f"{{ {', '.join(map(str, vips))} }}"
            match = f"{fam} daddr {targets} {_l4(rule)}"
            if rule.mode is FilteringMode.MULTIPLE:
                e4, e6 = _hash_exprs(rule)
                h = f"jhash {e4 if fam == 'ip' else e6} mod {cl.buckets} seed {seed}"
                # never owned first: most buckets of a large cluster never were, and a
                # packet in one, SYN or not, then meets one rule only
                lines.append(f"    {match} {h} != @{keep_set(i)} drop")
                if rule.protocol is not Protocol.UDP and not rule.sticky:
                    # (a sticky rule's SYN in a bucket given away may be an affine client's)
                    tcp = f"{fam} daddr {targets} {_l4(rule, Protocol.TCP)}"
                    syn = "tcp flags & (fin|syn|rst|ack) == syn"
                    lines.append(f"    {tcp} {syn} {h} != @{owned_set(i)} drop")
            lines.append(f"    {match} accept")
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def set_ref(name: str, table: str, family: str = "inet") -> dict[str, Any]:
    return {"family": family, "table": table, "name": name}


def moved(ref: dict[str, Any], out: list[int], new: list[int]) -> list[dict[str, Any]]:
    """The commands taking ``out`` from the set ``ref`` and putting ``new`` in."""
    cmds: list[dict[str, Any]] = []
    if out:
        cmds.append({"delete": {"element": {**ref, "elem": out}}})
    if new:
        cmds.append({"add": {"element": {**ref, "elem": new}}})
    return cmds


def _flag(table: str, name: str, on: bool) -> list[dict[str, Any]]:
    ref = set_ref(name, table)
    cmds: list[dict[str, Any]] = [{"flush": {"set": ref}}]
    if on:
        cmds.append({"add": {"element": {**ref, "elem": list(FAMILIES)}}})
    return cmds


def flags(cfg: ShoalConfig, inst: Install) -> dict[str, list[dict[str, Any]]]:
    """For each flag set, the commands making it say what ``inst`` says (the owned bucket
    sets are the backend's business: it updates them by difference)."""
    rules = cfg.cluster.effective_rules
    table = tables(cfg.cluster.name).inet
    handled = {i for i in range(len(rules)) if single_token(i) in inst.tokens}
    out = {
        "serving": _flag(table, "serving", inst.serving),
        "default_host": _flag(table, "default_host", DEFAULT_TOKEN in inst.tokens),
    }
    for i in range(len(cfg.cluster.effective_rules)):
        state = inst.rule_states[i] if i < len(inst.rule_states) else RuleState.ENABLED
        out[f"off_{i}"] = _flag(table, f"off_{i}", state is RuleState.DISABLED)
        out[f"drain_{i}"] = _flag(table, f"drain_{i}", state is RuleState.DRAINING)
        out[f"handle_{i}"] = _flag(table, f"handle_{i}", i in handled)
    return out
