"""Client affinity in the simulator: a model of the kernel's sticky-rule tables, clients
that connect through them, and the checks of what clients rely on.

The model is the nftables rules' meaning, per host (see :mod:`shoal.dataplane.ruleset`):

* a new connection (SYN) of client ``k`` in bucket ``b`` of sticky rule ``r``: refused if
  the rule is disabled here or ``k`` is an away entry of any source; else, under the lease,
  taken if ``k`` is a live affinity entry (not refreshed: a SYN is no sign that anyone took
  it; also while the rule drains), or if ``b`` is owned and the rule does not drain (``k``
  becomes an affinity entry for the timeout ``T``);
* every other packet of the client refreshes its affinity entry on the host that serves the
  connection and its away entries everywhere (``T`` and ``T + margin``): every host sees
  every frame, so an away entry outlives the affinity entry it mirrors by the margin;
* an install under another affinity identity (run, generation) flushes the affinity
  entries; the away entries of a source that left the install's sources, or whose identity
  changed, are dropped.

:class:`Clients` drives client connections through every host's model at once, as the
switch floods every frame to every host, and checks after each SYN that at most one host
took it, and that no host took the SYN of a client that another host still serves by
affinity. At the end, :meth:`Clients.settled` checks that every client is taken by exactly
one host once idle for the timeout and the margin.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from shoal.config import ShoalConfig
from shoal.dataplane.contract import (
    AFFINITY_MARGIN_S,
    AffinityRead,
    Away,
    Install,
    RuleState,
    bucket_token,
)

MARGIN = float(AFFINITY_MARGIN_S)  # seconds an away entry outlives the affinity entry it mirrors


@dataclass
class AffinityTables:
    """One host's sticky-rule tables."""

    timeouts: dict[int, float]  # sticky rule -> affinity timeout T (seconds)
    buckets: int
    aff: dict[int, dict[bytes, float]] = field(default_factory=dict)  # rule -> key -> expiry
    # source -> ((incarnation, generation), rule -> key -> expiry)
    away_of: dict[int, tuple[tuple[int, int], dict[int, dict[bytes, float]]]] = field(
        default_factory=dict
    )
    identity: tuple[int, int] | None = None
    states: tuple[RuleState, ...] = ()  # per rule, as installed

    def apply(self, inst: Install) -> None:
        self.states = inst.rule_states
        if inst.affinity != self.identity:
            self.aff = {}
            self.identity = inst.affinity
        sources = {h: (inc, gen) for h, inc, gen in inst.sources}
        for h in list(self.away_of):
            if h not in sources or (sources[h] != (-1, -1) and sources[h] != self.away_of[h][0]):
                del self.away_of[h]

    def read(self, owned: frozenset[int], now: float) -> AffinityRead:
        keys: dict[int, list[bytes]] = {}
        counts: dict[int, int] = {}
        for rule, entries in self.aff.items():
            counts[rule] = 0
            for k, exp in entries.items():
                if exp <= now:
                    continue
                counts[rule] += 1
                tok = bucket_token(rule, bucket_of(k, self.buckets))
                if tok not in owned:
                    keys.setdefault(tok, []).append(k)
        return AffinityRead(keys, counts)

    def away(self, a: Away, now: float) -> None:
        ident = (a.incarnation, a.generation)
        held = self.away_of.get(a.source)
        if held is None or held[0] != ident:
            held = self.away_of[a.source] = (ident, {})
        entries = held[1].setdefault(a.rule, {})
        for k in a.keys:
            if entries.get(k, 0.0) <= now:  # an add: an entry already there is left alone
                entries[k] = now + self.timeouts[a.rule] + MARGIN

    def away_holder(self, rule: int, key: bytes, now: float) -> int | None:
        for src, (_, rules) in self.away_of.items():
            if rules.get(rule, {}).get(key, 0.0) > now:
                return src
        return None

    def syn(self, rule: int, key: bytes, owned: frozenset[int], leased: bool, now: float) -> bool:
        state = self.states[rule] if rule < len(self.states) else RuleState.ENABLED
        if state is RuleState.DISABLED:
            return False
        if self.away_holder(rule, key, now) is not None or not leased:
            return False
        entries = self.aff.setdefault(rule, {})
        if entries.get(key, 0.0) > now:
            return True  # (also while the rule drains)
        if state is RuleState.DRAINING:
            return False
        if bucket_token(rule, bucket_of(key, self.buckets)) in owned:
            entries[key] = now + self.timeouts[rule]
            return True
        return False

    def packet(self, rule: int, key: bytes, serves: bool, now: float) -> None:
        """A packet of one of the client's connections (not a SYN), seen here."""
        if serves:
            entries = self.aff.get(rule, {})
            if entries.get(key, 0.0) > now:
                entries[key] = now + self.timeouts[rule]
        for _, rules in self.away_of.values():
            entries = rules.get(rule, {})
            if entries.get(key, 0.0) > now:
                entries[key] = now + self.timeouts[rule] + MARGIN

    def holds(self, rule: int, key: bytes, now: float) -> bool:
        return self.aff.get(rule, {}).get(key, 0.0) > now


def bucket_of(key: bytes, buckets: int) -> int:
    """The simulator's clients carry their bucket in their key."""
    return int.from_bytes(key[:2], "big") % buckets


def timeouts_of(cfg: ShoalConfig) -> dict[int, float]:
    return {
        i: float(r.affinity_timeout_s)
        for i, r in enumerate(cfg.cluster.effective_rules)
        if r.sticky
    }


class Decider:
    """What one host's kernel says of a client's frames (the cluster gives it)."""

    def __init__(
        self,
        tables: Callable[[], AffinityTables | None],
        owned: Callable[[], frozenset[int]],
        leased: Callable[[float], bool],
    ) -> None:
        self.tables, self.owned, self.leased = tables, owned, leased


@dataclass
class Client:
    key: bytes
    rule: int
    host: int | None = None  # the host of its open connection
    last_host: int | None = None  # the host that took its last connection
    active_until: float = float("-inf")  # its last packet (affinity runs from there)
    unanswered: int = 0  # SYNs in a row nobody took


class Clients:
    """Client connections through every host's tables, and the checks."""

    def __init__(
        self,
        hosts: Mapping[int, Decider],
        rules: list[int],  # the sticky rules (the clients use the first two)
        buckets: int,
        rng: random.Random,
        fail: Callable[[str], Exception],
        count: int = 40,
        timeouts: Mapping[int, float] | None = None,
    ) -> None:
        self.hosts = hosts
        self.timeouts = dict(timeouts or {})
        self.rng = rng
        self.fail = fail
        keys = [rng.randrange(65536).to_bytes(2, "big") + bytes([i % 256, 0]) for i in range(count)]
        self.clients = [Client(k, rules[i % len(rules)]) for i, k in enumerate(keys)]
        self.buckets = buckets
        self.syns = 0
        self.taken = 0
        self.kept = 0  # SYNs taken by the host that took the client's previous connection
        self.moved = 0  # ...by another host, the previous one having lost its affinity
        self.expired = 0  # ...by another host, the client idle for longer than the timeout

    def syn(self, c: Client, now: float) -> None:
        """A new connection of ``c``: checked against every host's tables."""
        self.syns += 1
        takers = []
        for h, d in self.hosts.items():
            t = d.tables()
            if t is not None and t.syn(c.rule, c.key, d.owned(), d.leased(now), now):
                takers.append(h)
        if len(takers) > 1:
            raise self.fail(
                f"affinity: client {c.key.hex()} (rule {c.rule}, bucket "
                f"{bucket_of(c.key, self.buckets)}) taken by hosts {takers}"
            )
        if not takers:
            c.unanswered += 1
            return
        h = takers[0]
        prev = c.last_host
        if prev is not None and prev != h:
            d = self.hosts[prev]
            t = d.tables()
            if t is not None and t.holds(c.rule, c.key, now) and d.leased(now):
                raise self.fail(
                    f"affinity: client {c.key.hex()} taken by host {h} while host {prev} "
                    "still serves it by affinity"
                )
            if now - c.active_until > self.timeouts[c.rule]:
                self.expired += 1
            else:
                self.moved += 1
        elif prev == h:
            self.kept += 1
        self.taken += 1
        c.unanswered = 0
        c.host = c.last_host = h
        c.active_until = now

    def packet(self, c: Client, now: float) -> None:
        if c.host is None:
            return
        for h, d in self.hosts.items():
            t = d.tables()
            if t is not None:
                t.packet(c.rule, c.key, h == c.host, now)
        c.active_until = now

    def close(self, c: Client) -> None:
        c.host = None

    def step(self, now: float) -> None:
        """One moment of every client: some open, some send, some close."""
        for c in self.clients:
            r = self.rng.random()
            if c.host is None:
                if r < 0.3:
                    self.syn(c, now)
            elif r < 0.15:
                self.close(c)
            else:
                self.packet(c, now)

    def settled(self, now: float) -> None:
        """After every client was idle long enough: each one is taken by exactly one host."""
        for c in self.clients:
            c.host = None
            self.syn(c, now)
            if c.unanswered:
                raise self.fail(f"affinity: client {c.key.hex()} taken by no host when settled")
