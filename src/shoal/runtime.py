"""One host's runtime: the convergence engine driven against a data-plane backend.

It owns the rules between the engine's outputs and the kernel, which the daemon and the
simulator both run (so what the simulator proves is what the daemon does):

* **install before sending**: the kernel enforces an install before any heartbeat that
  reports it leaves (a release must be in the kernel before the leader can hear of it);
* **silence on refusal**: when the backend refuses an install, the frames of that step are
  withheld and the same install is tried again at the next step, until the kernel takes it;
* **the lease renewal rule**: the kernel's lease never outruns the engine's, and is renewed
  once less than half of it and a period are left;
* **the record and the vote** are saved (through ``save``) whenever they change;
* **affinity** (sticky rules): away entries are in the kernel before any frame that says so,
  and the kernel's affinity keys are read for a handoff only once the release they follow
  is in the kernel.

It does no I/O of its own: time is passed in, the backend and ``save`` are injected, and
frames, events and problems are returned for the caller to send and log.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from shoal.dataplane.contract import Away, Backend, DataplaneError, Install
from shoal.protocol.engine import Engine
from shoal.protocol.events import Event, EventId
from shoal.protocol.frames import EpochKey

# after these, established connections to the VIPs are closed (stop, suspend, a drain that
# ran out of time): the kernel stops serving them, and the client gets a reset
CLOSES_CONNECTIONS = frozenset({EventId.CLUSTER_STOPPED, EventId.DRAIN_TIMEOUT, EventId.SUSPENDED})

Save = Callable[[frozenset[int], frozenset[int]], None]


@dataclass
class Output:
    """What one :meth:`HostRuntime.after` leaves to the caller."""

    frames: list[bytes] = field(default_factory=list)  # to broadcast, in order
    events: list[Event] = field(default_factory=list)  # to log
    problems: list[dict[str, str]] = field(default_factory=list)  # refusals, to log
    close_connections: bool = False  # established VIP connections must be reset
    withheld: int = 0  # frames kept from the wire: the kernel refused what they report


class HostRuntime:
    """Carries out what one engine asks of one backend."""

    def __init__(
        self, engine: Engine, backend: Backend, save: Save, defer_reads: bool = False
    ) -> None:
        """``defer_reads``: the kernel's affinity keys are not read here but left in
        :attr:`read_due` for the caller to read (on another thread) and hand to
        :meth:`Engine.handoff_keys`."""
        self.engine = engine
        self.defer_reads = defer_reads
        self.read_due: tuple[EpochKey, int] | None = None
        self.backend = backend
        self.save = save
        self.installed: Install | None = None  # what the kernel enforces, as far as known
        self.outputs_seen = -1  # the engine's outputs counter when they were last read
        self.lease_sent = float("-inf")  # the engine lease the kernel's was last set from
        self.record, self.vote = engine.record, engine.vote  # as saved
        self.away: list[Away] = []  # away entries the kernel refused, tried again first

    def replace_backend(self, backend: Backend) -> None:
        """A new backend (a reload changed the cluster's rules): it enforces nothing yet."""
        self.backend = backend
        self.installed = None
        self.lease_sent = float("-inf")

    def after(self, now: float) -> Output:
        """Call after every input the engine took: install, collect frames and events,
        save the record, renew the kernel lease."""
        out = Output()
        # twice at most: a handoff composed in the first pass is sent in the second
        for _ in range(2):
            if self.engine.outputs == self.outputs_seen:
                break
            self._carry(now, out)
        self._renew(now, out)
        return out

    def _carry(self, now: float, out: Output) -> None:
        e = self.engine
        self.outputs_seen = e.outputs
        inst = e.install
        frames = e.take_frames()
        self.away += e.take_away()
        done = self._put_away(out) and (inst == self.installed or self._install(inst, out))
        if not done:
            # a host that cannot enforce what its heartbeats say stays silent
            frames, n = [], len(frames)
            out.withheld += n
        out.frames += frames
        events = e.take_events()
        out.events += events
        out.close_connections |= any(ev.id in CLOSES_CONNECTIONS for ev in events)
        if (e.record, e.vote) != (self.record, self.vote):
            self.record, self.vote = e.record, e.vote
            self.save(self.record, self.vote)
        wanted = e.handoff_wanted()
        if done and wanted is not None and self.defer_reads:
            self.read_due = wanted  # the release is in the kernel: see below
        elif done and wanted is not None:
            # the release is in the kernel: no key can join the buckets given away now
            try:
                keys = self.backend.affine_reader()().keys
            except DataplaneError as err:
                out.problems.append({"name": "affinity_read_failed", "error": str(err)})
            else:
                e.handoff_keys(wanted, keys, now)

    @property
    def counting(self) -> bool:
        """A drainstop keeps its affine clients, and the kernel drains every rule: no entry
        can be added, so a count of the entries read from now on that finds none stays
        true."""
        return self.engine.drain_affine and self.installed == self.engine.install

    def count_affine(self, now: float) -> None:
        """While :attr:`counting`, tell the engine how many affinity entries the kernel
        holds (inline: the simulator's kernel). Call :meth:`after` next."""
        if not self.counting:
            return
        try:
            n = sum(self.backend.affine_reader()().counts.values())
        except DataplaneError:
            return  # read again at the next call
        self.engine.set_affine(n, now)

    def _put_away(self, out: Output) -> bool:
        """Away entries into the kernel, in order, before any frame that says they are."""
        while self.away:
            try:
                self.backend.away(self.away[0])
            except DataplaneError as err:
                out.problems.append({"name": "away_failed", "error": str(err)})
                return False
            self.away.pop(0)
        return True

    def _install(self, inst: Install, out: Output) -> bool:
        try:
            self.backend.apply(inst)
        except DataplaneError as err:
            out.problems.append({"name": "install_failed", "error": str(err)})
            return False
        self.installed = inst
        return True

    def _renew(self, now: float, out: Output) -> None:
        """Each renewal is a kernel transaction, and echoes extend the engine's lease many
        times a period: renew only once less than half of it and a period are left. A
        refused renewal leaves the kernel's lease to run out on its own; the next input
        tries again."""
        e = self.engine
        lease = e.lease_until
        low = self.lease_sent - now < e.timing.lease / 2 + e.timing.period
        if lease is None or lease <= self.lease_sent or not low:
            return
        ms = int((lease - now) * 1000)
        if ms <= 0:
            return
        try:
            self.backend.renew(ms)
        except DataplaneError as err:
            out.problems.append({"name": "lease_renewal_failed", "error": str(err)})
            return
        self.lease_sent = lease
