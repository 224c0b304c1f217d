"""The nftables data-plane backend: what the daemon calls (install, lease, counters).

Each :meth:`NftBackend.apply` is one libnftables transaction: the flags, and for each
``multiple`` rule only the buckets that changed (deleted from and added to the owned sets
of the pre-filter, and of the inet table for rules that carry UDP), plus newly owned
buckets into the pre-filter's ``keep`` sets. A bucket leaving this host leaves the
``reset`` sets in the same transaction, so that they only ever hold buckets owned here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from shoal.config import Dataplane, FilteringMode, ShoalConfig
from shoal.dataplane.affinity import StickyTables
from shoal.dataplane.contract import (
    STRIDE,
    AffinityRead,
    Away,
    Install,
    RuleCounters,
    bucket_token,
)
from shoal.dataplane.kernel_lease import KernelLease
from shoal.dataplane.nft import Nft, NftError
from shoal.dataplane.ruleset import (
    base_ruleset,
    checks_owned,
    checks_reset,
    flags,
    keep_set,
    owned_set,
    prefilter,
    reset_set,
    set_ref,
    tables,
)
from shoal.dataplane.xdp import XdpScreen

SINGLE = STRIDE - 1  # the "bucket" part of a single rule's token


def owned_by_rule(cfg: ShoalConfig, tokens: frozenset[int]) -> dict[int, set[int]]:
    """The buckets among ``tokens``, per ``multiple`` rule."""
    out: dict[int, set[int]] = {
        i: set()
        for i, r in enumerate(cfg.cluster.effective_rules)
        if r.mode is FilteringMode.MULTIPLE
    }
    for tok in tokens:  # (split_token inlined: an epoch may move thousands)
        if tok >= 0:
            rule, bucket = divmod(tok, STRIDE)
            into = out.get(rule)
            if into is not None and bucket != SINGLE:
                into.add(bucket)
    return out


def _table(family: str, name: str) -> dict[str, str]:
    return {"family": family, "name": name}


def _sets(doc: dict[str, Any]) -> dict[str, set[int]]:
    """The integer sets of a listed table, by name."""
    out: dict[str, set[int]] = {}
    for item in doc.get("nftables", []):
        st = item.get("set")
        if st:
            out[st["name"]] = {int(e) for e in st.get("elem", []) if isinstance(e, int)}
    return out


class NftBackend:
    """Owns one cluster's ``inet`` table and its first stage in this namespace: the
    ``netdev`` pre-filter table (``shoal`` and ``shoal_pre`` for the cluster named shoal; see
    :func:`~.ruleset.tables`), or with ``dataplane = "xdp"`` the XDP program on the cluster
    interface (:class:`~.xdp.XdpScreen`) in the pre-filter's place.

    With XDP, a change that releases buckets is made in three steps, each atomic for a
    packet: the XDP bitmaps lose the released buckets, the nftables transaction runs, the
    bitmaps gain the acquired ones. A packet meets both stages, and at every moment each
    stage enforces the change's before or after, and never more than either allows."""

    def __init__(self, cfg: ShoalConfig, nft: Nft | None = None) -> None:
        self.cfg = cfg
        self.xdp = XdpScreen(cfg) if cfg.host.dataplane is Dataplane.XDP else None
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
        self.nft.run(base_ruleset(self.cfg) + ("" if self.xdp else prefilter(self.cfg)))
        if self.xdp:
            self.xdp.attach()  # (nothing of an earlier run is left: remove() detached it)
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
            doc: dict[str, Any] = {}
            if not self.xdp:
                doc = self.nft.json([{"list": {"table": _table("netdev", self.names.pre)}}])
            inet = self.nft.json([{"list": {"table": _table("inet", self.names.inet)}}])
        except NftError:
            self.create()
            return
        listed = _sets(inet)
        if self.xdp:
            owned, keep = self._screen_found(listed)
        else:
            pre = _sets(doc)  # the pre-filter's owned and keep sets
            owned = {i: pre.get(owned_set(i), set()) for i in owned_by_rule(self.cfg, frozenset())}
            keep = {i: pre.get(keep_set(i), set()) | bs for i, bs in owned.items()}
        self.sticky.attach(inet)
        self.owned, self.keep = owned, keep
        self.resets = {i: listed.get(reset_set(i), set()) & owned[i] for i in self._no_resets()}
        self.tokens = frozenset(bucket_token(i, b) for i, bs in self.owned.items() for b in bs)
        self.flags = {}
        self.installed = True

    def _screen_found(
        self, listed: dict[str, set[int]]
    ) -> tuple[dict[int, set[int]], dict[int, set[int]]]:
        """The owned and ever-owned buckets the XDP program held, taken over; or, if it held
        none for this configuration, the inet table's owned sets (``listed``), loaded into a
        new program."""
        assert self.xdp is not None
        found = self.xdp.attach()
        if found is not None:
            return found
        owned = {i: listed.get(owned_set(i), set()) for i in self.xdp.owned}
        self.xdp.change({i: ([], sorted(bs)) for i, bs in owned.items()},
                        {i: sorted(bs) for i, bs in owned.items()})  # fmt: skip
        return owned, {i: set(bs) for i, bs in owned.items()}

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
        moves: dict[int, tuple[list[int], list[int], list[int]]] = {}
        for i in self.owned:
            out = sorted(gone[i] & self.owned[i])
            new = sorted(came[i] - self.owned[i])
            fresh = [b for b in new if b not in self.keep[i]]
            inet = [(self.names.inet, "inet")] if checks_owned(rules[i]) else []
            pre = [] if self.xdp else [(self.names.pre, "netdev")]
            for table, family in [*inet, *pre]:
                name = set_ref(owned_set(i), table, family)
                if out:
                    cmds.append({"delete": {"element": {**name, "elem": out}}})
                if new:
                    cmds.append({"add": {"element": {**name, "elem": new}}})
            moves[i] = (out, new, fresh)
            cmds += self._kept(i, fresh)
            unreset = sorted(set(out) & self.resets.get(i, set()))
            if unreset:
                ref = set_ref(reset_set(i), self.names.inet)
                cmds.append({"delete": {"element": {**ref, "elem": unreset}}})
            owned[i] = (self.owned[i] - gone[i]) | came[i]
            keep[i] = self.keep[i] | set(new)
        sticky, after = self.sticky.install(inst)
        cmds += sticky
        if self.xdp is None:
            if cmds:
                self.nft.json(cmds)  # raises NftError having changed nothing
        else:
            self._staged(cmds, moves)
        self.sticky.commit(after)
        self.flags, self.owned, self.keep, self.tokens = wanted, owned, keep, inst.tokens
        for i, bs in self.resets.items():
            bs &= owned[i]
        if self.xdp is not None:  # the buckets acquired, into the XDP program last
            came_in: dict[int, tuple[list[int], list[int]]]
            came_in = {i: ([], new) for i, (_, new, _) in moves.items() if new}
            fresh_in = {i: fresh for i, (_, _, fresh) in moves.items() if fresh}
            if came_in or fresh_in or self.xdp.dirty:
                self.xdp.change(came_in, fresh_in)

    def _kept(self, i: int, buckets: list[int]) -> list[dict[str, Any]]:
        """The commands adding buckets to the pre-filter's keep set of rule ``i`` (none
        with XDP: the caller gives them to the program after the transaction)."""
        if not buckets or self.xdp is not None:
            return []
        ref = set_ref(keep_set(i), self.names.pre, "netdev")
        return [{"add": {"element": {**ref, "elem": buckets}}}]

    def _staged(
        self, cmds: list[dict[str, Any]], moves: dict[int, tuple[list[int], list[int], list[int]]]
    ) -> None:
        """The XDP program's released buckets out first, then the nftables transaction; if
        the kernel refuses that, the released buckets go back (as if nothing happened)."""
        assert self.xdp is not None
        gone: dict[int, tuple[list[int], list[int]]]
        gone = {i: (out, []) for i, (out, _, _) in moves.items() if out}
        if gone or self.xdp.dirty:
            self.xdp.change(gone, {})
        if not cmds:
            return
        try:
            self.nft.json(cmds)
        except NftError:
            if gone:
                self.xdp.change({i: ([], out) for i, (out, _) in gone.items()}, {})
            raise

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
        for i, bs in fresh.items():
            cmds += self._kept(i, bs)
        self.nft.json(cmds)
        self.sticky.held = held
        for i, bs in fresh.items():
            self.keep.setdefault(i, set()).update(bs)
        if self.xdp is not None and any(fresh.values()):
            self.xdp.change({}, {i: bs for i, bs in fresh.items() if bs})

    def reset(self, tokens: frozenset[int]) -> None:
        """Answer unknown mid-stream TCP packets of these buckets with a reset, those owned
        here and of rules carrying TCP (the rest are ignored); every other bucket, not."""
        wanted = owned_by_rule(self.cfg, tokens)
        cmds: list[dict[str, Any]] = []
        after: dict[int, set[int]] = {}
        for i, now in self.resets.items():
            want = wanted.get(i, set()) & self.owned.get(i, set())
            ref = set_ref(reset_set(i), self.names.inet)
            if now - want:
                cmds.append({"delete": {"element": {**ref, "elem": sorted(now - want)}}})
            if want - now:
                cmds.append({"add": {"element": {**ref, "elem": sorted(want - now)}}})
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
        if self.xdp is None:
            return {"dataplane": "nftables"}
        return {
            "dataplane": f"xdp ({self.xdp.mode or 'not attached'})",
            "screen": self.xdp.counters(),
        }

    def remove(self) -> None:
        if self.xdp is not None:
            self.xdp.remove()
        if self.lease is not None:
            self.lease.close()
            self.lease = None
        for table, family in ((self.names.inet, "inet"), (self.names.pre, "netdev")):
            with contextlib.suppress(NftError):
                self.nft.run(f"delete table {family} {table}")
        self.installed = False
