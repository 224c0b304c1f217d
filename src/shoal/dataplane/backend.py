"""The data-plane backend: what the daemon calls (install, lease, counters).

Each :meth:`NftBackend.apply` is one libnftables transaction: the flags, and for each
``multiple`` rule only the buckets that changed (in the inet table's owned sets for rules
that carry UDP, and in the first stage: :mod:`.first_stage`). A bucket leaving this host
leaves the ``reset`` sets in the same transaction, so that they only ever hold buckets
owned here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from shoal.config import ShoalConfig
from shoal.dataplane.affinity import StickyTables
from shoal.dataplane.contract import (
    STRIDE,
    AffinityRead,
    Away,
    Install,
    RuleCounters,
    bucket_token,
)
from shoal.dataplane.first_stage import Moves, first_stage, listed_sets
from shoal.dataplane.kernel_lease import KernelLease
from shoal.dataplane.nft import Nft, NftError
from shoal.dataplane.ruleset import (
    base_ruleset,
    checks_owned,
    checks_reset,
    flags,
    moved,
    multiple_rules,
    owned_set,
    reset_set,
    set_ref,
    tables,
)

SINGLE = STRIDE - 1  # the "bucket" part of a single rule's token


def owned_by_rule(cfg: ShoalConfig, tokens: frozenset[int]) -> dict[int, set[int]]:
    """The buckets among ``tokens``, per ``multiple`` rule."""
    out: dict[int, set[int]] = {i: set() for i in multiple_rules(cfg)}
    for tok in tokens:  # (split_token inlined: an epoch may move thousands)
        if tok >= 0:
            rule, bucket = divmod(tok, STRIDE)
            into = out.get(rule)
            if into is not None and bucket != SINGLE:
                into.add(bucket)
    return out


def _table(family: str, name: str) -> dict[str, str]:
    return {"family": family, "name": name}


class NftBackend:
    """Owns one cluster's ``inet`` table (``shoal`` for the cluster named shoal; see
    :func:`~.ruleset.tables`) and its first stage in this namespace: the ``netdev``
    pre-filter table, or with ``dataplane = "xdp"`` the XDP program on the cluster interface
    in its place (:mod:`.first_stage`)."""

    def __init__(self, cfg: ShoalConfig, nft: Nft | None = None) -> None:
        self.cfg = cfg
        self.first = first_stage(cfg)
        self.names = tables(cfg.cluster.name)  # this cluster's tables (several may share a host)
        self.sticky = StickyTables(cfg, self.names.inet)
        self.nft = nft or Nft()
        self.owned: dict[int, set[int]] = {}
        self.keep: dict[int, set[int]] = {}
        self.resets: dict[int, set[int]] = {}  # per rule carrying TCP: see ruleset.reset_set
        self.flags: dict[str, list[dict[str, Any]]] = {}
        self.tokens: frozenset[int] = frozenset()
        self.installed = False
        self.lease: KernelLease | None = None

    def create(self) -> None:
        """(Re)create both tables, owning nothing and serving nothing."""
        self.remove()
        self.nft.run(base_ruleset(self.cfg) + self.first.ruleset())
        self.first.created()
        self.owned = owned_by_rule(self.cfg, frozenset())
        self.keep = {i: set() for i in self.owned}
        self.resets = self._no_resets()
        self.sticky = StickyTables(self.cfg, self.names.inet)
        self.flags = {}
        self.tokens = frozenset()
        self.installed = True

    def _no_resets(self) -> dict[int, set[int]]:
        return {i: set() for i, r in enumerate(self.cfg.cluster.effective_rules) if checks_reset(r)}

    def attach(self) -> None:
        """Take over tables left by an earlier run (their buckets keep their connections),
        or create them."""
        try:
            inet = self.nft.json([{"list": {"table": _table("inet", self.names.inet)}}])
            listed = listed_sets(inet)
            owned, keep = self.first.found(self.nft, listed)
        except NftError:
            self.create()
            return
        self.sticky.attach(inet)
        self.owned, self.keep = owned, keep
        self.resets = {i: listed.get(reset_set(i), set()) & owned[i] for i in self._no_resets()}
        self.tokens = frozenset(bucket_token(i, b) for i, bs in self.owned.items() for b in bs)
        self.flags = {}
        self.installed = True

    def apply(self, inst: Install) -> None:
        """Make the kernel enforce ``inst`` (one atomic transaction). Only the tokens that
        changed since the last call are looked at: an epoch moves a few buckets of many.
        What the backend knows of the kernel changes only once the kernel accepted the
        transaction: after a refusal, the same call computes the same transaction again."""
        if not self.installed:
            self.create()
        wanted = flags(self.cfg, inst)
        cmds: list[dict[str, Any]] = []
        for set_name, group in wanted.items():
            if self.flags.get(set_name) != group:
                cmds += group
        gone = owned_by_rule(self.cfg, self.tokens - inst.tokens)
        came = owned_by_rule(self.cfg, inst.tokens - self.tokens)
        rules = self.cfg.cluster.effective_rules
        owned: dict[int, set[int]] = {}
        keep: dict[int, set[int]] = {}
        moves: Moves = {}
        for i in self.owned:
            out = sorted(gone[i] & self.owned[i])
            new = sorted(came[i] - self.owned[i])
            fresh = [b for b in new if b not in self.keep[i]]
            if checks_owned(rules[i]):
                cmds += moved(set_ref(owned_set(i), self.names.inet), out, new)
            moves[i] = (out, new, fresh)
            cmds += self.first.commands(i, out, new, fresh)
            unreset = sorted(set(out) & self.resets.get(i, set()))
            if unreset:
                ref = set_ref(reset_set(i), self.names.inet)
                cmds.append({"delete": {"element": {**ref, "elem": unreset}}})
            owned[i] = (self.owned[i] - gone[i]) | came[i]
            keep[i] = self.keep[i] | set(new)
        sticky, after = self.sticky.install(inst)
        cmds += sticky
        self.first.commit(self.nft, cmds, moves)  # raises NftError having changed nothing
        self.sticky.commit(after)
        self.flags, self.owned, self.keep, self.tokens = wanted, owned, keep, inst.tokens
        for i, bs in self.resets.items():
            bs &= owned[i]
        self.first.acquired(moves)

    def affine_reader(self) -> Callable[[], AffinityRead]:
        """A read of the affinity sets as they are now (the owned buckets as of this call),
        on its own libnftables context: it may run on another thread."""
        owned = {i: set(bs) for i, bs in self.owned.items()}
        sticky = self.sticky

        def read() -> AffinityRead:
            if not sticky.rules:
                return AffinityRead({}, {})
            nft = Nft()
            try:
                items: list[Any] = []
                for cmd in sticky.list_commands():  # one at a time: a batch of lists fails
                    items += nft.json([cmd]).get("nftables", [])
            finally:
                nft.close()
            listed = {"nftables": items}
            return AffinityRead(sticky.keys(listed, owned), sticky.counts(listed))

        return read

    def away(self, entries: Away) -> None:
        """Hold these away entries (their source's sets made first if new); their buckets
        join the pre-filter's keep sets, so that their packets reach the refresh."""
        if entries.rule not in self.sticky.rules:
            raise NftError(f"rule {entries.rule} is not a sticky rule")
        cmds, held, buckets = self.sticky.away(entries)
        sets = self.sticky.new_sets(held)
        if sets:
            self.nft.run(sets)
        fresh = {i: sorted(bs - self.keep.get(i, set())) for i, bs in buckets.items()}
        self.nft.json(cmds + self.first.kept(fresh))
        self.sticky.held = held
        for i, bs in fresh.items():
            self.keep.setdefault(i, set()).update(bs)
        self.first.kept_in(fresh)

    def reset(self, tokens: frozenset[int]) -> None:
        """Answer unknown mid-stream TCP packets of these buckets with a reset, those owned
        here and of rules carrying TCP (the rest are ignored); every other bucket, not."""
        wanted = owned_by_rule(self.cfg, tokens)
        cmds: list[dict[str, Any]] = []
        after: dict[int, set[int]] = {}
        for i, now in self.resets.items():
            want = wanted.get(i, set()) & self.owned.get(i, set())
            ref = set_ref(reset_set(i), self.names.inet)
            cmds += moved(ref, sorted(now - want), sorted(want - now))
            after[i] = want
        if cmds:
            self.nft.json(cmds)
        self.resets = after

    def renew(self, ms: int) -> None:
        """The kernel takes new connections for ``ms`` more milliseconds (0: stop now)."""
        if self.lease is None:
            self.lease = KernelLease(self.names.inet)
        self.lease.renew(ms)

    def counters(self) -> list[RuleCounters]:
        values = self.nft.counters("inet", self.names.inet)
        out = []
        for i, rule in enumerate(self.cfg.cluster.effective_rules):
            acc = values.get(f"accepted_{i}", {})
            drop = values.get(f"dropped_{i}", {})
            reset = values.get(f"reset_{i}", {})
            out.append(
                RuleCounters(
                    rule.key,
                    int(acc.get("packets", 0)),
                    int(drop.get("packets", 0)),
                    int(drop.get("bytes", 0)),
                    int(reset.get("packets", 0)),
                )
            )
        return out

    def describe(self) -> dict[str, Any]:
        return self.first.describe()

    def remove(self) -> None:
        if self.lease is not None:
            self.lease.close()
            self.lease = None
        self.first.remove()
        # both tables whatever the first stage: an earlier run may have had the other one
        for table, family in ((self.names.inet, "inet"), (self.names.pre, "netdev")):
            with contextlib.suppress(NftError):
                self.nft.run(f"delete table {family} {table}")
        self.installed = False
