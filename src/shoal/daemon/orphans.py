"""The clients of a dead host, told at once: which buckets this host took over from a host
that left, whether that host is dead, and which of those buckets no live host serves a
connection in; the data plane answers unknown mid-stream TCP packets there with a reset.

Why each condition is needed:

* a host that left may have lost only its daemon: its kernel keeps serving its connections
  (and answers for its dedicated address), so it must answer neither heartbeats nor
  :mod:`~shoal.daemon.neighbour` probes before its buckets' clients are reset;
* a bucket's earlier owner may still serve connections in it (it handed the bucket over
  and kept what it had): every live member is asked which of this host's buckets it holds
  connections in (the ``held`` question, answered from its socket table), and those buckets
  are left alone; an answer missing, or given in another epoch, resets nothing;
* a live host can only gain connections in a bucket it owns: the answers hold as long as
  this host keeps the bucket, and the backend takes a bucket out of the reset set in the
  same transaction that gives it away.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shoal.choices import FilteringMode
from shoal.config import ClusterConfig
from shoal.daemon import neighbour, remote
from shoal.daemon.remote import HELD
from shoal.dataplane import sockets
from shoal.dataplane.contract import DataplaneError, bucket_token, split_token
from shoal.dataplane.ruleset import checks_reset
from shoal.protocol.epoch import EpochState
from shoal.protocol.events import Event, EventId
from shoal.verdict import find_rule, rule_bucket

if TYPE_CHECKING:
    from shoal.daemon.shell import Daemon

ASK = 3  # times the held question is asked before giving up (answers from another epoch)
MAX_HELD = 150  # tokens an answer carries; more, and the asker resets nothing in that rule


def reset_tokens(cluster: ClusterConfig, tokens: frozenset[int]) -> frozenset[int]:
    """The tokens that are buckets of the rules whose chains reset (``multiple``, TCP)."""
    rules = cluster.effective_rules
    return frozenset(
        t
        for t in tokens
        if (rb := split_token(t))[1] is not None and rb[0] >= 0 and checks_reset(rules[rb[0]])
    )


def inherited(old: EpochState, new: EpochState, gone: int, me: int) -> frozenset[int]:
    """The buckets host ``gone`` owned in ``old`` that host ``me`` owns in ``new``."""
    return old.tokens_of(gone) & new.tokens_of(me)


def orphaned(candidates: frozenset[int], held: list[frozenset[int] | None]) -> frozenset[int]:
    """The candidates no live host holds a connection in (``None``: a host that may hold
    connections anywhere, so none is orphaned)."""
    if any(h is None for h in held):
        return frozenset()
    out = set(candidates)
    for h in held:
        assert h is not None
        out -= h
    return frozenset(out)


def held_tokens(
    cluster: ClusterConfig, conns: list[sockets.Conn], among: frozenset[int]
) -> frozenset[int]:
    """The bucket tokens in ``among`` that one of ``conns`` lies in."""
    rules = cluster.effective_rules
    out = set()
    for c in conns:
        rule = find_rule(cluster, sockets.plain(c.local), "tcp", c.lport)
        if rule is None or rule.mode is not FilteringMode.MULTIPLE:
            continue
        bucket = rule_bucket(cluster, rule, sockets.plain(c.remote), c.rport)
        tok = bucket_token(rules.index(rule), bucket)
        if tok in among:
            out.add(tok)
    return frozenset(out)


@dataclass
class Burial:
    """What the last dead host's buckets came to (for ``params``)."""

    host: int
    buckets: int  # taken over from it
    reset: int  # of which answered with resets
    kept: int  # held by a live host: left alone


class Orphans:
    """Watches the epochs this host adopts; buries the hosts that leave them dead."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.epoch: EpochState | None = None  # the last epoch seen
        self.addresses: dict[int, neighbour.IP] = {}  # each member's dedicated address
        self.resetting: frozenset[int] = frozenset()  # as given to the backend
        self.last: Burial | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.seen: frozenset[int] = frozenset()  # the installed tokens last looked at

    def observe(self) -> None:
        """After each step: an epoch that lost members starts their probes; the buckets
        this host gave away are no longer reset (the backend dropped them already)."""
        d = self.d
        new = d.engine.epoch
        old = self.epoch
        if new is not None and (old is None or new.key != old.key):
            self.epoch = new
            snap = d.engine.snapshot(d.now())
            for p in snap.peers:
                if p.dedicated_ip is not None:
                    self.addresses[p.host_id] = p.dedicated_ip
            if old is not None and d.cfg.cluster.reset_dead_clients:
                me = d.engine.me
                for gone in sorted(old.members - new.members - {me}):
                    mine = reset_tokens(d.cfg.cluster, inherited(old, new, gone, me))
                    if mine:
                        self._spawn(gone, mine, new)
        installed = d.engine.installed
        if self.resetting and installed is not self.seen:
            self.resetting &= installed
        self.seen = installed

    def _spawn(self, gone: int, candidates: frozenset[int], epoch: EpochState) -> None:
        task = asyncio.get_running_loop().create_task(self._bury(gone, candidates, epoch))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _bury(self, gone: int, candidates: frozenset[int], epoch: EpochState) -> None:
        try:
            await self.bury(gone, candidates, epoch)
        except Exception as e:  # a fault here must not end the daemon, nor go unsaid
            self._note(gone, candidates, frozenset(), f"{type(e).__name__}: {e}")

    async def bury(self, gone: int, candidates: frozenset[int], epoch: EpochState) -> None:
        """Probe host ``gone``; when it is dead, reset its orphaned buckets' strays."""
        d = self.d
        address = self.addresses.get(gone)
        if address is None:
            return self._note(gone, candidates, frozenset(), "its address is not known")
        try:
            alive = await neighbour.answers(d.cfg.interface, address)
        except OSError as e:
            return self._note(gone, candidates, frozenset(), f"probing {address}: {e}")
        if alive:
            return self._note(gone, candidates, frozenset(), f"{address} answers probes")
        for _ in range(int(remote.WAIT / neighbour.INTERVAL)):  # the takeover may still run
            if candidates <= d.engine.installed or d.engine.epoch is not epoch:
                break
            await asyncio.sleep(neighbour.INTERVAL)
        tokens = await self.ask(candidates, epoch)
        if tokens is None:
            return self._note(gone, candidates, frozenset(), "live hosts did not all answer")
        if d.engine.epoch is None or d.engine.epoch.key != epoch.key:
            return self._note(gone, candidates, frozenset(), "a newer epoch came first")
        want = (self.resetting | tokens) & d.engine.installed
        try:
            d.backend.reset(want)
        except DataplaneError as e:
            return self._note(gone, candidates, frozenset(), f"the kernel refused: {e}")
        self.resetting = want
        self._note(gone, candidates, tokens & want, "")

    async def ask(self, candidates: frozenset[int], epoch: EpochState) -> frozenset[int] | None:
        """The candidates no live member holds a connection in, or None if unknown."""
        d = self.d
        hosts = set(epoch.members) - {d.engine.me}
        body = json.dumps({"cmd": HELD, "epoch": str(epoch.key)}).encode()
        for _ in range(ASK):
            answers = await d.remote.exchange(hosts, 0, body)
            if all(a.get("epoch") == str(epoch.key) for a in answers.values()):
                held = [_parse(a.get("held")) for a in answers.values()]
                return orphaned(candidates, held)
            await asyncio.sleep(neighbour.INTERVAL)
        return None

    async def held(self, doc: dict[str, Any], asker: int) -> dict[str, Any]:
        """The held question, from ``asker``: which of its buckets (in this host's epoch)
        this host holds connections in. Answered with this host's epoch, so that an asker
        in another epoch asks again."""
        d = self.d
        epoch = d.engine.epoch
        if epoch is None:
            return {"ok": True, "epoch": None, "held": None}
        theirs = reset_tokens(d.cfg.cluster, epoch.tokens_of(asker))
        cluster = d.cfg.cluster
        conns = await asyncio.to_thread(sockets.vip_connections, cluster.all_vips, sockets.OPEN)
        tokens = held_tokens(cluster, conns, theirs)
        listed: list[int] | None = sorted(tokens) if len(tokens) <= MAX_HELD else None
        return {"ok": True, "epoch": str(epoch.key), "held": listed}

    def _note(self, gone: int, candidates: frozenset[int], reset: frozenset[int], why: str) -> None:
        d = self.d
        self.last = Burial(gone, len(candidates), len(reset), len(candidates) - len(reset))
        fields = {"host": d.engine.me, "peer": gone, "buckets": len(candidates),
                  "reset": len(reset), "why": why or "dead"}  # fmt: skip
        kind = EventId.DEAD_HOST_CLIENTS if reset else EventId.DEAD_HOST_SPARED
        d.log(Event(kind, d.now(), fields))

    def docs(self) -> dict[str, Any]:
        """For ``params``: the buckets reset now, and the last host buried."""
        last = self.last
        return {
            "buckets_reset": len(self.resetting),
            "last": None if last is None else vars(last),
        }


def _parse(held: object) -> frozenset[int] | None:
    if not isinstance(held, list) or not all(isinstance(t, int) for t in held):
        return None
    return frozenset(held)
