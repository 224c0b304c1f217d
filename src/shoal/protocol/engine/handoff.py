"""Client affinity across convergence: the handoffs of the sticky rules.

A *sticky* rule is a ``multiple`` TCP rule with affinity single or network and
``affinity_timeout_s > 0``. Each host's kernel keeps the key (address, or prefix) of every
client it took a new connection from, while that client stays active: its *affinity
entries*. When a bucket moves, its earlier owners go on taking their affine clients' new
connections there, and its new owner must refuse exactly those. So in every epoch each host
sends the owner of each bucket it does not own the keys it keeps there (its *handoff*), and
the owners hold them as *away* entries before they acquire:

* a host composes its handoff for the epoch it holds once its release is in the kernel (the
  keys are the kernel's: the runtime reads them and hands them in, :meth:`Handoffs.compose`),
  announces in its heartbeat to whom it hands clients over, and sends each of them its
  pieces until that host reports that it holds every handoff addressed to it;
* a host is *handed in* once every other member announced its handoff for the epoch they
  hold, each one addressed to it arrived whole, and it was given to the runtime, which puts
  the away entries in the kernel before any frame saying so leaves;
* the leader declares READY only once every member is handed in (:func:`.ready.blocker`);
* a host's affinity entries have a *generation*: whenever it loses its tokens other than by
  an epoch (its lease lapsed, it stopped, it restarted) its entries are flushed and the
  generation moves, and the away entries of an older generation are dropped wherever they
  are held: their host no longer serves those clients;
* a heartbeat says handed in only for the epoch and composition that were checked (never
  a flag left from the epoch before);
* a handoff sends only what its receiver does not hold yet: the keys of a bucket are
  *delivered* once the bucket's owner (in that run) was handed in for the epoch they were
  sent in, this host being a member of it (a bystander's handoff is not waited for), and
  are not sent to it again while this host keeps its generation and does not own the
  bucket again. The away entries stay where they are until then: a host drops a
  source's entries only once that source left its membership, which ended the source's
  lease and moved its generation. A bucket that had no key when composed gets none while
  it is not owned (only an owned bucket adds keys), so it needs no read either: when no
  bucket this host ever held in this generation has a new owner, the kernel is not read;
* keys wanted for longer than :data:`WAIT` periods are given up (:meth:`Handoffs.overdue`):
  a kernel slow to list a large set never holds an epoch longer than that.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from shoal.dataplane.contract import Away, split_token
from shoal.protocol.engine.peers import NEVER, Peer
from shoal.protocol.epoch import EpochState
from shoal.protocol.frames import MAX_HANDOFF_KEYS, Affinity, EpochKey, Handoff

NEVER_AGAIN = float("inf")
WAIT = 2.0  # periods a handoff waits for the kernel's keys; then the entries are given up
KEEP = (-1, -1)  # a source whose identity is not known here: its away entries stay as they are


@dataclass
class Stream:
    """This host's handoff to one host: its pieces (rule, keys), and when last sent."""

    pieces: list[tuple[int, tuple[bytes, ...]]] = field(default_factory=list)
    sent_at: float = NEVER
    taken: bool = False  # its host (in the run last heard) holds every handoff addressed to it
    tokens: tuple[int, ...] = ()  # the buckets whose keys it carries
    incarnation: int | None = None  # its host's run when composed (None: not known)


def pieces_of(keys: Sequence[bytes]) -> list[tuple[bytes, ...]]:
    """Keys in frames' worth: IPv4 and IPv6 keys never share a piece."""
    out: list[tuple[bytes, ...]] = []
    for size in (4, 16):
        same = [k for k in keys if len(k) == size]
        per = MAX_HANDOFF_KEYS * 4 // size
        out += [tuple(same[i : i + per]) for i in range(0, len(same), per)]
    return out


def _run(peers: Mapping[int, Peer], host: int) -> int | None:
    """The incarnation host ``host`` last reported (None: not heard)."""
    p = peers.get(host)
    return p.hb.incarnation if p is not None and p.hb is not None else None


class Handoffs:
    """Both sides of one host's handoffs, for the epoch it holds."""

    def __init__(self, me: int, incarnation: int, sticky: tuple[int, ...]) -> None:
        self.me = me
        self.incarnation = incarnation
        self.sticky = sticky  # the indexes of the sticky rules (none: nothing to do)
        self.generation = 0
        self.composed: tuple[EpochKey, int] | None = None  # (epoch, generation) composed for
        self.out: dict[int, Stream] = {}
        self.epoch: EpochKey | None = None  # what the incoming side is for
        self.pieces: dict[tuple[int, int, int], dict[int, Handoff]] = {}
        self.whole: dict[int, tuple[int, int]] = {}  # source -> (incarnation, generation)
        self.away: list[Away] = []  # for the runtime, oldest first
        self.handed_in = False
        self.summary: dict[tuple[int, int], tuple[int, int]] = {}  # (to, rule): clients, buckets
        self.delivered: dict[int, tuple[int, int]] = {}  # token -> (host, run) holding its keys
        self.empty: set[int] = set()  # tokens with no key, not owned since they were read so
        self.ever: set[int] = set()  # tokens held in this generation: only these have keys
        self._installed: frozenset[int] = frozenset()
        self.waiting: tuple[EpochKey, int, float] | None = None  # (epoch, generation, since)
        self.taken: dict[tuple[int, int], int] = {}  # (from, rule): clients, in this epoch

    # ------------------------------------------------------------ this host

    def lost(self) -> None:
        """This host's tokens went other than by an epoch: its affinity entries go (the
        runtime flushes them at the next install) and its handoff is composed anew."""
        if self.sticky:
            self.generation = (self.generation + 1) & 0xFFFF
            self.composed = None
            self.out = {}
            self.delivered, self.empty, self.ever = {}, set(), set(self._installed)
            self.waiting = None

    def installed(self, tokens: frozenset[int]) -> None:
        """The tokens the kernel is given: a bucket owned again may gain keys, so what was
        delivered or read empty of it no longer holds."""
        if not self.sticky or tokens is self._installed:
            return
        new = tokens - self._installed
        self._installed = tokens
        self.ever |= new
        for t in new:
            self.delivered.pop(t, None)
        self.empty -= new

    @property
    def identity(self) -> tuple[int, int]:
        """Whose affinity entries the kernel holds: this run, this generation."""
        return (self.incarnation, self.generation)

    def wanted(self, e: EpochState | None) -> EpochKey | None:
        """The epoch whose handoff waits for the kernel's keys (None: none does)."""
        if not self.sticky or e is None or self.composed == (e.key, self.generation):
            return None
        return e.key

    def overdue(self, e: EpochState, now: float, period: float) -> bool:
        """The keys for ``e`` were wanted for longer than :data:`WAIT` periods (a kernel
        slow to list them must not hold a READY, a failover's above all): this host then
        gives its affinity entries up (:meth:`lost`) and hands over nothing."""
        mark = (e.key, self.generation)
        if self.waiting is None or self.waiting[:2] != mark:
            self.waiting = (*mark, now)
        return now - self.waiting[2] >= WAIT * period

    def wait_deadline(self, period: float) -> float:
        """When :meth:`overdue` turns true for the keys wanted now."""
        w = self.waiting
        return NEVER_AGAIN if w is None else w[2] + WAIT * period

    def _owner(self, e: EpochState, tok: int) -> int:
        rule, bucket = split_token(tok)
        owners = e.maps[rule] if rule in self.sticky else None
        return owners[bucket] if owners is not None and bucket is not None else 0

    def needs_read(self, e: EpochState, peers: Mapping[int, Peer]) -> bool:
        """Whether a bucket held in this generation may keep keys its owner in ``e`` does
        not hold yet (else the handoff is composed without reading the kernel)."""
        for tok in self.ever:
            dest = self._owner(e, tok)
            if dest in (0, self.me) or tok in self.empty:
                continue
            if self.delivered.get(tok) != (dest, _run(peers, dest)):
                return True
        return False

    def compose(
        self,
        e: EpochState,
        keys: Mapping[int, Sequence[bytes]] | None,
        peers: Mapping[int, Peer],
    ) -> None:
        """This host's handoff for ``e``, from the keys its kernel keeps per bucket token
        (of the sticky rules' buckets it does not own): to each bucket's owner in ``e``,
        but what that owner holds already. ``keys`` None: nothing was read, as nothing new
        is to be sent (:meth:`needs_read`)."""
        per: dict[tuple[int, int], list[bytes]] = defaultdict(list)
        buckets: dict[tuple[int, int], int] = defaultdict(int)
        tokens: dict[int, list[int]] = defaultdict(list)
        if keys is None:
            keys = {}
        else:
            for tok in self.ever:
                if tok not in keys and self._owner(e, tok) not in (0, self.me):
                    self.empty.add(tok)
        for tok, ks in keys.items():
            rule, _ = split_token(tok)
            dest = self._owner(e, tok)
            if dest in (0, self.me) or not ks:
                continue
            if self.delivered.get(tok) == (dest, _run(peers, dest)):
                continue
            per[(dest, rule)].extend(ks)
            buckets[(dest, rule)] += 1
            tokens[dest].append(tok)
        self.out = {}
        for (dest, rule), ks in sorted(per.items()):
            stream = self.out.setdefault(dest, Stream())
            stream.pieces += [(rule, piece) for piece in pieces_of(ks)]
            stream.tokens = tuple(tokens[dest])
            stream.incarnation = _run(peers, dest)
        self.composed = (e.key, self.generation)
        self.waiting = None
        self.summary = {k: (len(ks), buckets[k]) for k, ks in per.items()}

    def announce(self, e: EpochState | None, leaving: bool) -> Affinity | None:
        """What this host's heartbeat says of affinity (None without sticky rules);
        ``leaving``: it drains, a member only while its affine clients stay."""
        if not self.sticky:
            return None
        ready = e is not None and self.composed == (e.key, self.generation)
        to = frozenset(self.out) if ready else frozenset()
        return Affinity(self.generation, ready, to, self.handed_in_for(e), leaving)

    def handed_in_for(self, e: EpochState | None) -> bool:
        """Handed in, as last checked, for this very epoch and composition: an epoch
        adopted or a generation moved since that check is not (a READY, this host's or the
        leader's from its heartbeat, must never count on it)."""
        return (
            self.handed_in
            and e is not None
            and self.epoch == e.key
            and self.composed == (e.key, self.generation)
        )

    def send(
        self, e: EpochState, peers: Mapping[int, Peer], now: float, every: float
    ) -> list[Handoff]:
        """The pieces due: to each host not yet handed in, all of them every ``every``."""
        if self.composed != (e.key, self.generation):
            return []
        out = []
        for dest, stream in self.out.items():
            p = peers.get(dest)
            hb = p.hb if p is not None else None
            # a host that restarts forgets what it was handed: asked afresh at each step
            taken = bool(
                hb is not None and hb.epoch == e.key and hb.affinity and hb.affinity.handed_in
            )
            # handed in says it holds what each member of ``e`` addressed to it: what this
            # host sent counts only if it is one (a bystander's handoff is not waited for)
            now_held = taken and not stream.taken and self.me in e.members
            if now_held and hb is not None and stream.incarnation == hb.incarnation:
                for tok in stream.tokens:  # its host holds them now
                    self.delivered[tok] = (dest, hb.incarnation)
            stream.taken = taken
            if stream.taken or now - stream.sent_at < every:
                continue
            stream.sent_at = now
            n = len(stream.pieces)
            for i, (rule, keys) in enumerate(stream.pieces):
                out.append(
                    Handoff(self.me, self.incarnation, 0, e.key, self.generation, dest, i, n,
                            rule, keys)
                )  # fmt: skip
        return out

    def next_send(self, e: EpochState | None, every: float) -> float:
        """When :meth:`send` may have something again."""
        if e is None or self.composed != (e.key, self.generation):
            return float("inf")
        return min(
            (s.sent_at + every for s in self.out.values() if not s.taken), default=NEVER_AGAIN
        )

    # ------------------------------------------------------------- the others

    def _reset_for(self, e: EpochState | None) -> None:
        key = e.key if e is not None else None
        if key != self.epoch:
            self.epoch = key
            self.pieces, self.whole, self.taken = {}, {}, {}
            self.handed_in = False

    def on_piece(self, h: Handoff, e: EpochState | None) -> bool:
        """A piece of another host's handoff; True when it completed one for this host."""
        self._reset_for(e)
        if not self.sticky or e is None or h.to != self.me or h.epoch != e.key:
            return False
        if h.rule not in self.sticky:
            return False
        run = (h.host_id, h.incarnation, h.generation)
        got = self.pieces.setdefault(run, {})
        if got and next(iter(got.values())).count != h.count:
            got.clear()  # another composition of the same run: start again
        got[h.index] = h
        if len(got) < h.count or self.whole.get(h.host_id) == run[1:]:
            return False
        self.whole[h.host_id] = run[1:]
        self.taken = {k: n for k, n in self.taken.items() if k[0] != h.host_id}
        for piece in sorted(got.values(), key=lambda x: x.index):
            self.away.append(Away(*run, piece.rule, piece.keys))
            key = (h.host_id, piece.rule)
            self.taken[key] = self.taken.get(key, 0) + len(piece.keys)
        return True

    def check_in(self, e: EpochState | None, peers: Mapping[int, Peer]) -> bool:
        """Whether this host is handed in now (see the module's docstring); True when that
        changed."""
        self._reset_for(e)
        was = self.handed_in
        self.handed_in = self._all_in(e, peers)
        return was != self.handed_in

    def _all_in(self, e: EpochState | None, peers: Mapping[int, Peer]) -> bool:
        if not self.sticky or e is None or self.composed != (e.key, self.generation):
            return False
        for m in e.members:
            if m == self.me:
                continue
            p = peers.get(m)
            hb = p.hb if p is not None else None
            if hb is None or hb.epoch != e.key or hb.affinity is None or not hb.affinity.ready:
                return False
            if self.me in hb.affinity.to and self.whole.get(m) != (
                hb.incarnation,
                hb.affinity.generation,
            ):
                return False
        return True

    def take_away(self) -> list[Away]:
        out, self.away = self.away, []
        return out

    def report(self) -> dict[int, dict[str, list[dict[str, int]]]]:
        """Per sticky rule, the clients handed over to each host and taken from each, in
        the epoch held (for ``params`` and ``display``)."""
        out: dict[int, dict[str, list[dict[str, int]]]] = {
            i: {"handed_over": [], "taken": []} for i in self.sticky
        }
        for (to, rule), (clients, buckets) in sorted(self.summary.items()):
            out[rule]["handed_over"].append({"to": to, "clients": clients, "buckets": buckets})
        for (src, rule), clients in sorted(self.taken.items()):
            out[rule]["taken"].append({"from": src, "clients": clients})
        return out

    def sources(
        self, hosts: frozenset[int], peers: Mapping[int, Peer]
    ) -> frozenset[tuple[int, int, int]]:
        """The hosts whose away entries stand here, each with the run and generation they
        stand for (:data:`KEEP` where not known yet): every other's go."""
        out = set()
        for h in hosts:
            if h == self.me:
                continue
            p = peers.get(h)
            hb = p.hb if p is not None else None
            if hb is None or hb.affinity is None:
                out.add((h, *KEEP))
            else:
                out.add((h, hb.incarnation, hb.affinity.generation))
        return frozenset(out)
