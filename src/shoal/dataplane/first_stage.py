"""The first stage of the data plane: what drops a packet before conntrack sees it.

Two kinds, one contract (:class:`FirstStage`): the ``netdev`` pre-filter table
(:class:`PreFilter`, ``dataplane = "nftables"``) and the XDP program (:class:`XdpStage`,
``dataplane = "xdp"``). Each keeps, per ``multiple`` rule, the buckets owned now and those
ever owned since it was made (``keep``): a packet of a bucket never owned here, or a pure
SYN of one not owned now, goes no further. The backend owns the ``inet`` table (the second
stage) and calls the first stage at fixed points of each change; what the first stage holds
is the backend's ``owned`` and ``keep``, so it is told buckets, never asked for them.
"""

from __future__ import annotations

from typing import Any, Protocol

from shoal.choices import Dataplane
from shoal.config import ShoalConfig
from shoal.dataplane.nft import Nft, NftError
from shoal.dataplane.ruleset import (
    keep_set,
    moved,
    multiple_rules,
    owned_set,
    prefilter,
    set_ref,
    tables,
)
from shoal.dataplane.xdp import XdpScreen

Cmds = list[dict[str, Any]]
Buckets = dict[int, set[int]]  # per rule
Sets = dict[str, set[int]]  # per set name
# per multiple rule: (buckets released, acquired, acquired for the first time)
Moves = dict[int, tuple[list[int], list[int], list[int]]]


def listed_sets(doc: dict[str, Any]) -> Sets:
    """The integer sets of a listed table, by name."""
    out: Sets = {}
    for item in doc.get("nftables", []):
        st = item.get("set")
        if st:
            out[st["name"]] = {int(e) for e in st.get("elem", []) if isinstance(e, int)}
    return out


class FirstStage(Protocol):
    """The points at which the backend involves its first stage."""

    def ruleset(self) -> str:
        """nft syntax created with the inet table (empty when the stage is not nftables)."""
        ...

    def created(self) -> None:
        """The tables were created anew, owning nothing."""

    def found(self, nft: Nft, inet: Sets) -> tuple[Buckets, Buckets]:
        """The owned and kept buckets an earlier run left, taken over (``inet``: the inet
        table's sets); raises :class:`NftError` when there is nothing to take over."""
        ...

    def commands(self, rule: int, out: list[int], new: list[int], fresh: list[int]) -> Cmds:
        """What joins the backend's transaction for a move of ``rule``'s buckets."""
        ...

    def commit(self, nft: Nft, cmds: Cmds, moves: Moves) -> None:
        """Run the transaction ``cmds``: the released buckets are out of this stage before
        it, and no more is in it if the kernel refuses (:class:`NftError` raised)."""

    def acquired(self, moves: Moves) -> None:
        """The transaction is in: the acquired buckets go in (last, so that this stage never
        lets through what the inet table does not expect yet)."""

    def kept(self, fresh: dict[int, list[int]]) -> Cmds:
        """What joins a transaction after which ``fresh`` (per rule, buckets never owned
        here: away entries') must reach the inet table."""
        ...

    def kept_in(self, fresh: dict[int, list[int]]) -> None:
        """The transaction of :meth:`kept` is in."""

    def describe(self) -> dict[str, Any]:
        """What filters, for ``params``."""
        ...

    def remove(self) -> None:
        """What the stage holds outside the nftables tables is gone (the backend deletes
        the tables)."""


class PreFilter:
    """The ``netdev`` ingress table: its owned and keep sets change inside the backend's
    transaction, so both stages move together."""

    def __init__(self, cfg: ShoalConfig) -> None:
        self.cfg = cfg
        self.table = tables(cfg.cluster.name).pre

    def _ref(self, name: str) -> dict[str, str]:
        return set_ref(name, self.table, "netdev")

    def ruleset(self) -> str:
        return prefilter(self.cfg)

    def created(self) -> None:
        pass

    def found(self, nft: Nft, inet: Sets) -> tuple[Buckets, Buckets]:
        table = {"family": "netdev", "name": self.table}
        listed = listed_sets(nft.json([{"list": {"table": table}}]))
        owned = {i: listed.get(owned_set(i), set()) for i in multiple_rules(self.cfg)}
        return owned, {i: listed.get(keep_set(i), set()) | bs for i, bs in owned.items()}

    def commands(self, rule: int, out: list[int], new: list[int], fresh: list[int]) -> Cmds:
        return moved(self._ref(owned_set(rule)), out, new) + self.kept({rule: fresh})

    def commit(self, nft: Nft, cmds: Cmds, moves: Moves) -> None:
        if cmds:
            nft.json(cmds)  # raises NftError having changed nothing

    def acquired(self, moves: Moves) -> None:
        pass

    def kept(self, fresh: dict[int, list[int]]) -> Cmds:
        ref = self._ref
        return [{"add": {"element": {**ref(keep_set(i)), "elem": bs}}}
                for i, bs in fresh.items() if bs]  # fmt: skip

    def kept_in(self, fresh: dict[int, list[int]]) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"dataplane": "nftables"}

    def remove(self) -> None:
        pass


class XdpStage:
    """The XDP program: its bitmaps change outside the nftables transaction, in three steps
    each atomic for a packet (released out, the transaction, acquired in), so that at every
    moment it enforces the change's before or after and never more than either allows."""

    def __init__(self, cfg: ShoalConfig) -> None:
        self.screen = XdpScreen(cfg)

    def ruleset(self) -> str:
        return ""

    def created(self) -> None:
        self.screen.attach()  # (nothing of an earlier run is left: remove() detached it)

    def found(self, nft: Nft, inet: Sets) -> tuple[Buckets, Buckets]:
        """The buckets the attached program held, taken over; or, if it held none for this
        configuration, the inet table's owned sets, loaded into a new program."""
        found = self.screen.attach()
        if found is not None:
            return found
        owned = {i: inet.get(owned_set(i), set()) for i in self.screen.owned}
        self.screen.change({i: ([], sorted(bs)) for i, bs in owned.items()},
                           {i: sorted(bs) for i, bs in owned.items()})  # fmt: skip
        return owned, {i: set(bs) for i, bs in owned.items()}

    def commands(self, rule: int, out: list[int], new: list[int], fresh: list[int]) -> Cmds:
        return []

    def commit(self, nft: Nft, cmds: Cmds, moves: Moves) -> None:
        gone: dict[int, tuple[list[int], list[int]]]
        gone = {i: (out, []) for i, (out, _, _) in moves.items() if out}
        if gone or self.screen.dirty:
            self.screen.change(gone, {})
        if not cmds:
            return
        try:
            nft.json(cmds)
        except NftError:
            if gone:
                self.screen.change({i: ([], out) for i, (out, _) in gone.items()}, {})
            raise

    def acquired(self, moves: Moves) -> None:
        came: dict[int, tuple[list[int], list[int]]]
        came = {i: ([], new) for i, (_, new, _) in moves.items() if new}
        fresh = {i: f for i, (_, _, f) in moves.items() if f}
        if came or fresh or self.screen.dirty:
            self.screen.change(came, fresh)

    def kept(self, fresh: dict[int, list[int]]) -> Cmds:
        return []

    def kept_in(self, fresh: dict[int, list[int]]) -> None:
        fresh = {i: bs for i, bs in fresh.items() if bs}
        if fresh:
            self.screen.change({}, fresh)

    def describe(self) -> dict[str, Any]:
        return {
            "dataplane": f"xdp ({self.screen.mode or 'not attached'})",
            "screen": self.screen.counters(),
        }

    def remove(self) -> None:
        self.screen.remove()


def first_stage(cfg: ShoalConfig) -> FirstStage:
    """The first stage ``host.dataplane`` names."""
    return XdpStage(cfg) if cfg.host.dataplane is Dataplane.XDP else PreFilter(cfg)
