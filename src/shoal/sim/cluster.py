"""A deterministic cluster of engines on a virtual clock and a faulty virtual network.

Each simulated host runs what the daemon runs, the engine inside a
:class:`~shoal.runtime.HostRuntime`, against a kernel model that implements the data-plane
contract (the tokens installed and the lease expiry, which outlive a daemon crash; it can be
told to refuse installs). The network loses, delays (below the engine's assumed bound),
duplicates and reorders frames, and can be partitioned. After every step the contract
(docs/convergence.md, "The contract") is checked; a breach raises :class:`InvariantViolation`
with the seed that replays it.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shoal.choices import FilteringMode, PartitionPolicy
from shoal.config import ShoalConfig
from shoal.dataplane.contract import (
    AffinityRead,
    Away,
    DataplaneError,
    Install,
    RuleCounters,
    bucket_token,
)
from shoal.protocol.codec import Keys
from shoal.protocol.engine import Command, Engine
from shoal.protocol.events import Event
from shoal.protocol.frames import HostState
from shoal.runtime import HostRuntime
from shoal.sim.adversary import Recorder
from shoal.sim.affinity import AffinityTables, Clients, Decider, timeouts_of
from shoal.sim.checkers import (
    EpochLedger,
    InvariantViolation,
    exclusive,
    exclusive_all,
    ghosts,
)


@dataclass
class Kernel:
    """What survives a daemon crash: installed tokens and the lease. A data-plane
    :class:`~shoal.dataplane.contract.Backend` on the simulator's clock."""

    clock: Callable[[], float] = lambda: 0.0
    alive: bool = True
    tokens: frozenset[int] = frozenset()
    lease_until: float = float("-inf")
    refuse_until: float = float("-inf")  # installs are refused until then
    refused: int = 0  # installs refused so far
    affinity: AffinityTables | None = None  # the sticky rules' tables, if any

    def accepting(self, now: float) -> frozenset[int]:
        if not self.alive or now >= self.lease_until:
            return frozenset()
        return self.tokens

    def attach(self) -> None:
        """Tables left by an earlier daemon stay as they are."""

    def apply(self, inst: Install) -> None:
        if self.clock() < self.refuse_until:
            self.refused += 1
            raise DataplaneError("refused by the simulated kernel")
        self.tokens = inst.tokens
        if self.affinity is not None:
            self.affinity.apply(inst)

    def affine_reader(self) -> Callable[[], AffinityRead]:
        t = self.affinity
        now = self.clock()
        read = AffinityRead({}, {}) if t is None else t.read(self.tokens, now)
        return lambda: read

    def away(self, entries: Away) -> None:
        if self.clock() < self.refuse_until:
            self.refused += 1
            raise DataplaneError("refused by the simulated kernel")
        if self.affinity is not None:
            self.affinity.away(entries, self.clock())

    def renew(self, ms: int) -> None:
        self.lease_until = self.clock() + ms / 1000

    def reset(self, tokens: frozenset[int]) -> None:
        """Resets concern connections, which the model does not track."""

    def counters(self) -> list[RuleCounters]:
        return []

    def describe(self) -> dict[str, Any]:
        return {"dataplane": "model"}

    def remove(self) -> None:
        self.tokens = frozenset()


@dataclass
class SimHost:
    host_id: int
    config: ShoalConfig
    kernel: Kernel = field(default_factory=Kernel)
    engine: Engine | None = None
    runtime: HostRuntime | None = None
    incarnation: int = 0
    tick_at: float = float("inf")
    connections: int = 0
    record: frozenset[int] = frozenset()  # on disk: survives crashes
    vote: frozenset[int] = frozenset()  # on disk too
    frames_withheld: int = 0  # frames an install refusal kept from the wire
    down_since: float | None = None  # its daemon is not running since then
    booted_at: float = 0.0  # its daemon's last start

    def save(self, record: frozenset[int], vote: frozenset[int]) -> None:
        self.record, self.vote = record, vote


@dataclass
class NetFaults:
    loss: float = 0.0
    duplicate: float = 0.0
    max_delay_fraction: float = 0.45  # of the period; the engine assumes < 0.5
    groups: dict[int, int] = field(default_factory=dict)  # partition: host -> group
    cut: set[tuple[int, int]] = field(default_factory=set)  # (from, to): one way lost


class SimCluster:
    """N hosts, one switch, one clock."""

    def __init__(
        self,
        configs: list[ShoalConfig],
        key: bytes,
        seed: int,
        runtime: type[HostRuntime] = HostRuntime,
        engine: type[Engine] = Engine,
    ) -> None:
        """``runtime``: what drives each engine against its kernel (the daemon's), and
        ``engine``: the engine; a broken variant of either shows that the checkers catch
        what it breaks."""
        self.seed = seed
        self.runtime = runtime
        self.engine = engine
        self.rng = random.Random(seed)
        self.key = key
        self.now = 0.0
        self.period = configs[0].cluster.period_ms / 1000.0
        self.sticky = timeouts_of(configs[0])
        self.buckets = configs[0].cluster.buckets
        self.clients: Clients | None = None
        self.clients_on = True
        self._client_every = 0.25
        self.hosts = {c.host.host_id: SimHost(c.host.host_id, c, self._kernel()) for c in configs}
        self.faults = NetFaults()
        self._queue: list[tuple[float, int, str, int, object]] = []
        self._n = 0
        self.ledger = EpochLedger()  # every epoch seen: agreed, balanced, minimal
        self.bytes_sent = 0
        self.frames_sent = 0
        self.engine_calls = 0
        self.check_exclusive = True
        # "available" (NLB's policy): a host cut off from others serves on without them
        self.sides_serve = configs[0].cluster.partition_policy is PartitionPolicy.AVAILABLE
        self.observers: list[Callable[[SimCluster], None]] = []
        self.events: list[tuple[int, Event]] = []  # (host, event), as the daemons log them
        self.wire = hashlib.sha256()  # every frame sent: when, by whom, its bytes
        self.recorder: Recorder | None = None  # a neighbour recording frames, to replay them
        for h in self.hosts.values():
            self._boot(h)

    # ------------------------------------------------------------- lifecycle

    def _kernel(self, alive: bool = True) -> Kernel:
        k = Kernel(lambda: self.now, alive)
        if self.sticky:
            k.affinity = AffinityTables(self.sticky, self.buckets)
        return k

    def _decider(self, hid: int) -> Decider:
        def tables() -> AffinityTables | None:
            k = self.hosts[hid].kernel
            return k.affinity if k.alive else None

        return Decider(
            tables,
            lambda: self.hosts[hid].kernel.tokens,
            lambda now: (
                self.hosts[hid].kernel.accepting(now) is not frozenset()
                and now < self.hosts[hid].kernel.lease_until
            ),
        )

    def start_clients(self, count: int = 40, every: float = 0.25, salt: int = 0) -> Clients:
        """Clients of the sticky rules, a moment every ``every`` seconds from now on (see
        :mod:`shoal.sim.affinity`), in place of any before; the cluster must have sticky
        rules. Another ``salt``, other clients."""
        self.clients = Clients(
            {h: self._decider(h) for h in self.hosts},
            sorted(self.sticky),
            self.buckets,
            random.Random(self.seed ^ 0xAFF1 ^ salt << 20),
            self.fail,
            count,
            self.sticky,
        )
        self._client_every = every
        self.at(self.now + every, self._client_moment)
        return self.clients

    def _client_moment(self) -> None:
        if self.clients is None or not self.clients_on:
            return
        self.clients.step(self.now)
        self.at(self.now + self._client_every, self._client_moment)

    def _boot(self, h: SimHost) -> None:
        h.incarnation += 1
        h.down_since = None
        h.booted_at = self.now
        h.tick_at = float("inf")
        h.engine = self.engine(
            h.config, Keys(self.key), h.incarnation, self.now, record=h.record, vote=h.vote
        )
        h.kernel.attach()
        h.runtime = self.runtime(h.engine, h.kernel, h.save)
        self._after(h)

    def crash_host(self, hid: int) -> None:
        """Power off: daemon and kernel both gone."""
        self.crash_daemon(hid)
        self.hosts[hid].kernel = self._kernel(alive=False)

    def restart_host(self, hid: int) -> None:
        h = self.hosts[hid]
        if h.engine is not None:
            return
        h.kernel = self._kernel()
        self._boot(h)

    def crash_daemon(self, hid: int) -> None:
        """kill -9 of the daemon: the kernel keeps its tokens and lease."""
        h = self.hosts[hid]
        if h.engine is not None:
            h.down_since = self.now
        h.engine = h.runtime = None

    def restart_daemon(self, hid: int) -> None:
        h = self.hosts[hid]
        if h.engine is None and h.kernel.alive:
            self._boot(h)

    def command(
        self, hid: int, cmd: Command, rule: int | None = None, timeout: float | None = None
    ) -> None:
        h = self.hosts[hid]
        if h.engine is None:
            return
        h.engine.command(cmd, self.now, rule=rule, timeout=timeout)
        self._after(h)

    def health(self, hid: int, rule: int | None, healthy: bool) -> None:
        """A verdict of one of the host's checks (``rule`` None: its host-wide check)."""
        h = self.hosts[hid]
        if h.engine is None:
            return
        h.engine.health(rule, healthy, self.now, check="sim", reason="injected")
        self._after(h)

    def reload(self, hid: int, config: ShoalConfig) -> None:
        h = self.hosts[hid]
        h.config = config
        if h.engine is None:
            return
        h.engine.reload(config, self.now)
        self._after(h)

    def set_connections(self, hid: int, n: int) -> None:
        h = self.hosts[hid]
        h.connections = n
        if h.engine is not None:
            h.engine.set_connections(n, self.now)
            self._after(h)

    # ------------------------------------------------------------ the clock

    def at(self, t: float, action: Callable[[], None]) -> None:
        self._push(t, "action", 0, action)

    def _push(self, t: float, kind: str, hid: int, data: object) -> None:
        self._n += 1
        heapq.heappush(self._queue, (t, self._n, kind, hid, data))

    def run_until(self, t_end: float) -> None:
        while self._queue and self._queue[0][0] <= t_end:
            t, _, kind, hid, data = heapq.heappop(self._queue)
            self.now = max(self.now, t)
            if kind == "action":
                data()  # type: ignore[operator]
                continue
            h = self.hosts[hid]
            if h.engine is None:
                continue
            if kind == "tick":
                if t != h.tick_at:
                    continue
                h.tick_at = float("inf")
                self._tick(h, h.engine)
            elif kind == "replay":
                assert isinstance(data, bytes)
                self._deliver(h, h.engine, data)
            else:
                assert isinstance(data, tuple)
                inc, frame = data
                if inc != h.incarnation:
                    continue
                self._deliver(h, h.engine, frame)
            self.engine_calls += 1
            self._after(h)
        self.now = max(self.now, t_end)

    def _tick(self, h: SimHost, engine: Engine) -> None:
        """An engine's timer fired (a subclass may look before and after); a drainstop
        keeping its affine clients hears how many the kernel holds, as the daemon's does."""
        if h.runtime is not None:
            h.runtime.count_affine(self.now)
        engine.tick(self.now)

    def _deliver(self, h: SimHost, engine: Engine, frame: bytes) -> None:
        """A frame reaches an engine (a subclass may look before and after)."""
        engine.receive(frame, self.now)

    def _after(self, h: SimHost) -> None:
        e, rt = h.engine, h.runtime
        assert e is not None and rt is not None
        before = h.kernel.accepting(self.now)
        stepped = e.outputs != rt.outputs_seen
        out = rt.after(self.now)
        if stepped and self.sides_serve and self.check_exclusive and self._cut_off(e):
            self.check_exclusive = False  # two clusters from here, both serving
        h.frames_withheld += out.withheld
        self.events.extend((h.host_id, ev) for ev in out.events)
        for frame in out.frames:
            self._broadcast(h, frame)
        self._note_epoch(e)
        after = h.kernel.accepting(self.now)
        if self.check_exclusive and after and (after - before):
            self._check_exclusive(h, after)
        d = max(e.next_deadline(), self.now + 1e-6)
        if d < h.tick_at:
            h.tick_at = d
            self._push(d, "tick", h.host_id, None)
        for obs in self.observers:
            obs(self)

    def _cut_off(self, e: Engine) -> bool:
        """Whether ``e`` is in an epoch without a host whose daemon has run for the
        detection time and which it has not heard for as long: cut off from it (a
        partition, a burst of loss), it serves on without it. (A host whose daemon died is
        still one with the others: its kernel must be fenced.)"""
        if e.epoch is None:
            return False
        for x, g in self.hosts.items():
            if x == e.me or x in e.epoch.members or g.engine is None:
                continue
            if g.engine.started_at + e.detect > self.now:
                continue  # not yet heard, perhaps: it just started
            p = e.peers.get(x)
            if p is None or not e.roster.alive(p, self.now):
                return True
        return False

    def inject(self, at: float, frame: bytes) -> None:
        """A frame from no host of the cluster (a neighbour's) reaches every host at ``at``."""
        for dst in self.hosts.values():
            self._push(at, "replay", dst.host_id, frame)

    def _broadcast(self, src: SimHost, frame: bytes) -> None:
        if self.recorder is not None:
            self.recorder.record(src.host_id, frame)
        self.frames_sent += 1
        self.wire.update(b"%.9f %d " % (self.now, src.host_id))
        self.wire.update(frame)
        self.bytes_sent += len(frame) + 14
        f = self.faults
        for dst in self.hosts.values():
            if dst.host_id == src.host_id:
                continue
            if f.groups and f.groups.get(dst.host_id, 0) != f.groups.get(src.host_id, 0):
                continue
            if f.cut and (src.host_id, dst.host_id) in f.cut:
                continue
            copies = 1 + (1 if self.rng.random() < f.duplicate else 0)
            for _ in range(copies):
                if self.rng.random() < f.loss:
                    continue
                delay = self.rng.uniform(0.0001, f.max_delay_fraction * self.period)
                self._push(self.now + delay, "deliver", dst.host_id, (dst.incarnation, frame))

    # ----------------------------------------------------------- invariants

    def fail(self, message: str) -> InvariantViolation:
        return InvariantViolation(self.seed, self.now, message)

    def _check_exclusive(self, h: SimHost, mine: frozenset[int]) -> None:
        why = exclusive(h.host_id, mine, self._kernels(), self.now)
        if why:
            raise self.fail(why)

    def _kernels(self) -> dict[int, Kernel]:
        return {x: g.kernel for x, g in self.hosts.items()}

    def check_exclusive_again(self) -> None:
        """Check exclusivity from now on again (after a split was repaired), starting
        with every pair of kernels as they are."""
        self.check_exclusive = True
        why = exclusive_all(self._kernels(), self.now)
        if why:
            raise self.fail(why)

    def check_ghosts(self) -> None:
        why = ghosts(self.hosts, self.now, self.faults.max_delay_fraction * self.period)
        if why:
            raise self.fail(why)

    def _note_epoch(self, e: Engine) -> None:
        st = e.epoch
        if st is None:
            return
        why = self.ledger.note(st, e.cfg, e.digest)
        if why:
            raise self.fail(why)

    # ------------------------------------------------------------- queries

    def accepting_union(self) -> set[int]:
        out: set[int] = set()
        for h in self.hosts.values():
            out |= h.kernel.accepting(self.now)
        return out

    def expected_tokens(self, cfg: ShoalConfig) -> set[int]:
        """Every bucket of every multiple rule, every single rule, and uncovered traffic."""
        out: set[int] = {-1}
        for i, rule in enumerate(cfg.cluster.effective_rules):
            if rule.mode is FilteringMode.MULTIPLE:
                out.update(bucket_token(i, b) for b in range(cfg.cluster.buckets))
            elif rule.mode is FilteringMode.SINGLE:
                out.add(i * 65537 + 65536)
        return out

    def covered(self) -> bool:
        cfg = next(iter(self.hosts.values())).config
        return self.expected_tokens(cfg) <= self.accepting_union()

    def converged(self, members: set[int]) -> bool:
        """Every host in ``members`` converged on one epoch whose members are exactly these."""
        keys = set()
        for hid in members:
            e = self.hosts[hid].engine
            if e is None or e.state is not HostState.CONVERGED or e.epoch is None:
                return False
            keys.add(e.epoch.key)
        if len(keys) != 1:
            return False
        e0 = self.hosts[next(iter(members))].engine
        assert e0 is not None and e0.epoch is not None
        return set(e0.epoch.members) == members

    def running(self) -> set[int]:
        return {h for h, sh in self.hosts.items() if sh.engine is not None}
