"""The nftables side of client affinity (see :mod:`shoal.protocol.engine.handoff`): each
sticky rule's affinity sets, the away sets of each source and chain ``away_<i>`` that looks
them up; what :class:`~shoal.dataplane.backend.NftBackend` adds to its transactions for an
install, an away entry or a read of the keys kept.

The away sets are named after their source, its run and its generation
(:func:`~.ruleset.away_set`), so a daemon that takes the tables over knows whose they are;
the affinity sets' own identity is not in the kernel: the first install of a daemon flushes
them (its run is new, and so are the entries it may keep).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from shoal.config import ShoalConfig
from shoal.dataplane.contract import AFFINITY_MARGIN_S, Away, Install, bucket_token
from shoal.dataplane.ruleset import (
    FAMILIES,
    affinity_set,
    away_commands,
    away_set,
    away_set_deletes,
    away_sets_text,
    set_ref,
)
from shoal.hashing import bucket_of

AWAY_NAME = re.compile(r"^aw[46]_(\d+)_(\d+)_(\d+)_(\d+)$")
KEEP = (-1, -1)

Cmds = list[dict[str, Any]]
Held = dict[int, tuple[int, int]]


class StickyTables:
    """What the kernel holds of the sticky rules, as far as this backend knows."""

    def __init__(self, cfg: ShoalConfig, table: str) -> None:
        self.cfg = cfg
        self.table = table
        self.rules = {i: r for i, r in enumerate(cfg.cluster.effective_rules) if r.sticky}
        self.identity: tuple[int, int] | None = None  # unknown: the first install flushes
        self.held: Held = {}  # source -> (incarnation, generation) of its away sets

    def attach(self, inet: dict[str, Any]) -> None:
        """Whose away sets the listed inet table holds."""
        self.identity = None
        self.held = {}
        for item in inet.get("nftables", []):
            st = item.get("set")
            m = AWAY_NAME.match(st["name"]) if st else None
            if m:
                self.held[int(m[2])] = (int(m[3]), int(m[4]))

    def install(self, inst: Install) -> tuple[Cmds, tuple[tuple[int, int], Held]]:
        """The commands making the kernel hold what ``inst`` says, and the state after."""
        if not self.rules:
            return [], (inst.affinity, {})
        cmds: Cmds = []
        if inst.affinity != self.identity:
            for i in self.rules:
                for fam in FAMILIES:
                    cmds.append({"flush": {"set": set_ref(affinity_set(fam, i), self.table)}})
        wanted = {h: (inc, gen) for h, inc, gen in inst.sources}
        held = {
            h: ident for h, ident in self.held.items() if h in wanted and wanted[h] in (KEEP, ident)
        }
        if held != self.held:
            cmds += self._rebuild(held, self.held)
        return cmds, (inst.affinity, held)

    def commit(self, state: tuple[tuple[int, int], Held]) -> None:
        self.identity, self.held = state

    def new_sets(self, held: Held) -> str:
        """nft syntax creating the away sets of ``held``'s sources not held yet (empty sets:
        harmless ahead of the transaction that puts them to use)."""
        out = ""
        for i, rule in self.rules.items():
            for h, ident in held.items():
                if self.held.get(h) != ident:
                    out += away_sets_text(self.table, i, rule, h, *ident)
        return out

    def _rebuild(self, held: Held, before: Held) -> Cmds:
        """Chains ``away_<i>`` for ``held`` (whose sets exist: :meth:`new_sets`); the sets of
        sources no longer held deleted."""
        cmds: Cmds = []
        sources = sorted((h, *ident) for h, ident in held.items())
        for i, rule in self.rules.items():
            cmds += away_commands(self.table, i, rule, sources)
            for h, ident in before.items():
                if held.get(h) != ident:
                    cmds += away_set_deletes(self.table, i, h, *ident)
        return cmds

    def away(self, a: Away) -> tuple[Cmds, Held, dict[int, set[int]]]:
        """The commands holding ``a``'s entries (the source's sets made first if new), the
        state after, and the buckets they lie in per rule (the pre-filter must pass their
        packets, which refresh them)."""
        ident = (a.incarnation, a.generation)
        held = dict(self.held)
        cmds: Cmds = []
        if held.get(a.source) != ident:
            held[a.source] = ident
            cmds += self._rebuild(held, self.held)
        rule = self.rules[a.rule]
        cl = self.cfg.cluster
        timeout = rule.affinity_timeout_s + AFFINITY_MARGIN_S
        buckets: dict[int, set[int]] = {a.rule: set()}
        by_family: dict[str, list[dict[str, Any]]] = {"ipv4": [], "ipv6": []}
        for k in a.keys:
            addr = ipaddress.ip_address(k)
            fam = "ipv4" if addr.version == 4 else "ipv6"
            by_family[fam].append({"elem": {"val": str(addr), "timeout": timeout}})
            buckets[a.rule].add(bucket_of(addr, None, cl.seed, cl.buckets))
        for fam, elems in by_family.items():
            if elems:
                name = set_ref(away_set(fam, a.rule, a.source, *ident), self.table)
                cmds.append({"add": {"element": {**name, "elem": elems}}})
        return cmds, held, buckets

    def keys(self, listed: dict[str, Any], owned: dict[int, set[int]]) -> dict[int, list[bytes]]:
        """The affinity keys of a listing of the affinity sets, by bucket token, in the
        buckets not owned here."""
        cl = self.cfg.cluster
        names = {
            affinity_set(fam, i): i for i in self.rules for fam in FAMILIES
        }  # fmt: skip
        out: dict[int, list[bytes]] = {}
        for item in listed.get("nftables", []):
            st = item.get("set")
            if not st or st["name"] not in names:
                continue
            i = names[st["name"]]
            for e in st.get("elem", []):
                val = e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e
                addr = ipaddress.ip_address(val)
                b = bucket_of(addr, None, cl.seed, cl.buckets)
                if b not in owned.get(i, set()):
                    out.setdefault(bucket_token(i, b), []).append(addr.packed)
        return out

    def counts(self, listed: dict[str, Any]) -> dict[int, int]:
        """The entries of a listing of the affinity sets, per rule."""
        names = {affinity_set(fam, i): i for i in self.rules for fam in FAMILIES}
        out = dict.fromkeys(self.rules, 0)
        for item in listed.get("nftables", []):
            name = item.get("set", {}).get("name")
            if name in names:
                out[names[name]] += len(item["set"].get("elem", []))
        return out

    def list_commands(self) -> Cmds:
        return [
            {"list": {"set": set_ref(affinity_set(fam, i), self.table)}}
            for i in self.rules
            for fam in FAMILIES
        ]
