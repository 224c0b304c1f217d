"""``shoal daemon``: the thin asyncio shell around the convergence engine.

It owns the I/O the engine must not do: an AF_PACKET socket for EtherType 0x886F on the
cluster interface, the clock, the cluster adapter (set up at start, restored at stop), the
local control socket, the file that keeps the record and the vote, and the event log (one
JSON object per line on stderr, journald-friendly). What goes to the kernel and when is the
host runtime's (:mod:`shoal.runtime`), against a backend made by the injected factory
(nftables unless told otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shoal.cluster_mac import ClusterMode, cluster_mac_bytes
from shoal.config import ShoalConfig, load_host
from shoal.config_errors import ConfigError
from shoal.daemon import wire
from shoal.daemon.affinity_reads import AffinityReads
from shoal.daemon.control import MAX_REQUEST, answer, dispatch
from shoal.daemon.health import HealthChecks
from shoal.daemon.local import Established
from shoal.daemon.metrics import Metrics
from shoal.daemon.notify import notify
from shoal.daemon.orphans import Orphans
from shoal.daemon.reading import Board, Reading, owned_per_rule
from shoal.daemon.remote import Remote
from shoal.daemon.web import Numbers, Web
from shoal.dataplane import adapter, sockets
from shoal.dataplane.backend import NftBackend
from shoal.dataplane.contract import Backend
from shoal.protocol.engine import Command, Engine
from shoal.protocol.events import Event, EventId
from shoal.protocol.frames import HostState, Request, cluster_id
from shoal.runtime import HostRuntime, Output

KNOWN_BUDGET = 4096  # frames read from the known socket per batch (a burst, not a flood)
BROADCAST = b"\xff" * 6
RECENT_EVENTS = 200
BackendFactory = Callable[[ShoalConfig], Backend]


def default_control(cfg: ShoalConfig) -> Path:
    return Path(f"/run/shoal/{cfg.cluster.name}-h{cfg.host.host_id}.sock")


class Daemon:
    def __init__(
        self,
        config_path: Path,
        control: Path | None,
        state_dir: Path,
        setup_adapter: bool = True,
        rt_priority: int = 0,
        backend_factory: BackendFactory = NftBackend,
    ) -> None:
        self.config_path = config_path
        self.rt_priority = rt_priority
        self.cfg, keys = load_host(config_path)
        self.control = control or default_control(self.cfg)
        self.state_file = state_dir / f"{self.cfg.cluster.name}-h{self.cfg.host.host_id}.json"
        self.setup_adapter = setup_adapter
        self.saved: adapter.Saved | None = None
        self.backend_factory = backend_factory
        self.events: list[dict[str, Any]] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0  # the engine deadline the timer is armed for
        self.last_wake = 0.0
        self.held: asyncio.TimerHandle | None = None  # the next batch, reader off meanwhile
        self.reads = {"wakeups": 0, "batches": 0}  # socket reads: one per frame, or batched
        self.wire: wire.Wire  # opened by run()
        self.board = Board()  # what the metrics and web threads read
        self.established = Established(lambda: self.cfg.cluster)
        self.metrics = Metrics(self.board, self.established.get)
        web = self.cfg.host.web_endpoint
        self.numbers = Numbers(self.established.get, web[1] if web else None)
        self.web: Web | None = None
        self.health = HealthChecks(self)
        self.remote = Remote(self)
        self.orphans = Orphans(self)
        self.stop_event = asyncio.Event()
        self.handover = False  # exit leaving the kernel as it is, for a restart
        self.started = time.monotonic()
        self.supervised = bool(os.environ.get("NOTIFY_SOCKET"))  # systemd waits for READY=1
        record: frozenset[int] = frozenset()
        vote: frozenset[int] | None = None
        if self.state_file.exists():
            with contextlib.suppress(ValueError, KeyError, TypeError, OSError):
                saved = json.loads(self.state_file.read_text())
                record = frozenset(saved["record"])
                vote = frozenset(saved.get("vote", saved["record"]))
        self.engine = Engine(
            self.cfg,
            keys,
            time.time_ns(),
            self.now(),
            record=record,
            vote=vote,
        )
        self.runtime = HostRuntime(
            self.engine, backend_factory(self.cfg), self.save_record, defer_reads=True
        )
        self.affinity_reads = AffinityReads(self)

    # -------------------------------------------------------------- helpers

    @staticmethod
    def now() -> float:
        return time.monotonic()

    def log(self, ev: Event) -> None:
        self.metrics.saw(ev)
        doc = ev.as_dict()
        doc["at"] = round(time.time(), 3)
        self.events.append(doc)
        del self.events[:-RECENT_EVENTS]
        sys.stderr.write(json.dumps(doc) + "\n")
        sys.stderr.flush()

    # ------------------------------------------------------------- the wire

    def open_wire(self) -> None:
        """The screen and the two sockets (see :mod:`shoal.daemon.wire`); heartbeats go to
        every host: broadcast in unicast mode, else the cluster's multicast MAC."""
        cl = self.cfg.cluster
        multicast = cl.mode is not ClusterMode.UNICAST
        dest = cluster_mac_bytes(cl.primary_vip, cl.mode) if multicast else BROADCAST
        self.wire = wire.Wire.open(self.cfg.interface, cluster_id(cl.primary_vip), dest, multicast)

    def refilter(self) -> None:
        """Both filters anew when the known runs (or the cluster id) changed."""
        version, runs = self.engine.known_runs()
        problem = self.wire.refilter(version, runs, self.engine.codec.cluster)
        if problem is not None:
            doc = {"name": "filter_refused", "runs": len(runs), "error": problem}
            sys.stderr.write(json.dumps(doc) + "\n")

    def counters(self) -> dict[str, int]:
        """The engine's counters, with the frames the kernel screened out added to their
        reasons."""
        out = dict(self.engine.counters)
        for name, n in self.wire.screened().items():
            out[name] = out.get(name, 0) + n
        return out

    @property
    def hold(self) -> float:
        """Frames closer together than this are taken in batches, at most this late: a
        tenth of the period in force (a reload may change it), 10 ms at most. Each drain
        is a wake-up, and wake-ups are most of what a daemon costs; a frame read 10 ms late
        costs the lease a tenth of a period of headroom, of two or more. Zero while this
        host converges: then each frame may be a step of a failover, read at once."""
        if self.engine.state is HostState.CONVERGING:
            return 0.0
        return min(0.010, self.engine.timing.period / 10)

    def on_readable(self) -> None:
        self.reads["wakeups"] += 1
        self.receive()
        self.after()
        now = self.now()
        if now - self.last_wake < self.hold:
            # frames come faster than one per hold (a large cluster): stop waking for each
            # and take them in batches, one every hold, while they keep coming
            assert self.loop is not None
            for sock in self.wire.sockets:
                self.loop.remove_reader(sock.fileno())
            self.held = self.loop.call_later(self.hold, self.drain)
        self.last_wake = now

    def drain(self) -> None:
        """A batch: what came during the hold. Listen for each frame again once a hold
        went by without one."""
        assert self.loop is not None
        self.reads["batches"] += 1
        busy = self.receive() > 0
        self.after()
        if busy and self.hold:
            self.held = self.loop.call_later(self.hold, self.drain)
        else:
            self.held = None
            self.listen()

    def receive(self) -> int:
        """Hand the engine what the known socket holds, then at most a budget of what the
        other one holds; how many."""
        known, other = self.wire.sockets
        n = self._read(known, KNOWN_BUDGET) + self._read(other, wire.OTHER_BUDGET)
        if n:
            self.refilter()
            if self.engine.remote:
                for frame in self.engine.take_remote():
                    if isinstance(frame, Request):
                        self.remote.on_request(frame)
                    else:
                        self.remote.on_answer(frame)
        return n

    def _read(self, sock: socket.socket, budget: int) -> int:
        n = 0
        receive, now = self.engine.receive, self.now
        for _ in range(budget):
            try:
                data = sock.recv(2048)
            except (BlockingIOError, InterruptedError):
                break
            receive(data, now())
            n += 1
        return n

    def listen(self) -> None:
        """Wake for each frame (see :meth:`on_readable`)."""
        assert self.loop is not None
        for sock in self.wire.sockets:
            self.loop.add_reader(sock.fileno(), self.on_readable)

    def send(self, frames: list[bytes]) -> None:
        for frame in frames:
            try:
                self.wire.send(frame)
            except OSError as e:
                sys.stderr.write(json.dumps({"name": "send_failed", "error": str(e)}) + "\n")

    # ------------------------------------------------------------ the engine

    def on_timer(self) -> None:
        self.timer = None
        # frames that arrived while this process waited for the CPU come first: judging
        # silences and the lease by the clock alone would evict hosts that did speak
        self.receive()
        self.count_connections()
        self.engine.tick(self.now())
        self.after()
        if self.serving and self.board.due(self.now()):
            self.publish()

    @property
    def serving(self) -> bool:
        """Whether a thread serves metrics or the web view (and so reads the board)."""
        host = self.cfg.host
        return host.metrics_address is not None or host.web_address is not None

    def reading(self) -> Reading:
        """This host's state as plain values, for the serving threads and ``view``."""
        e = self.engine
        rules = len(self.cfg.cluster.effective_rules)
        return Reading(
            snapshot=e.snapshot(self.now()),
            cfg=self.cfg,
            owned=owned_per_rule(e.install.tokens, rules),
            counters=self.counters(),
            rule_counters=tuple(self.backend.counters()),
            screen=self.backend.describe().get("screen", {}),
            socket_drops=self.wire.drops(),
            events=tuple(self.events[-RECENT_EVENTS:]),
            checks=tuple(self.health.checks.docs()),
        )

    def publish(self) -> None:
        """A new reading on the board (see :mod:`shoal.daemon.reading`)."""
        self.board.publish(self.reading(), self.now())

    @property
    def backend(self) -> Backend:
        return self.runtime.backend

    def after(self) -> None:
        """Carry out what the engine asked for (through the runtime); arm the next timer."""
        e = self.engine
        now = self.now()
        self.carry_out(self.runtime.after(now))
        self.orphans.observe()
        assert self.loop is not None
        self.affinity_reads.observe(self.loop)
        deadline = e.next_deadline()
        if self.timer is not None and self.timer_at == deadline:
            return  # most frames leave the deadline where it was: no new timer each time
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(max(0.0, deadline - now), self.on_timer)
        self.timer_at = deadline

    def carry_out(self, out: Output) -> None:
        """Send and log what the runtime handed over."""
        for problem in out.problems:
            sys.stderr.write(json.dumps(problem) + "\n")
        self.send(out.frames)
        for ev in out.events:
            self.log(ev)
        if out.events and self.supervised:
            notify(f"STATUS={self.status()}")
        if out.close_connections:
            sockets.destroy(sockets.vip_connections(self.cfg.cluster.all_vips, sockets.OPEN))

    def status(self) -> str:
        """One line for systemd's status: the host state and the epoch."""
        snap = self.engine.snapshot(self.now())
        return f"{snap.state_name}, epoch {snap.epoch or 'none'}, {len(snap.peers)} peers heard"

    def save_record(self, record: frozenset[int], vote: frozenset[int]) -> None:
        """Keep the record and the vote on disk: the next run must not lend its vote twice."""
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        doc = {"record": sorted(record), "vote": sorted(vote)}
        self.state_file.write_text(json.dumps(doc))

    # ---------------------------------------------------------------- control

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        out = dispatch(self, req)
        self.count_connections()
        self.after()
        return out

    def reload(self) -> dict[str, Any]:
        try:
            cfg, keys = load_host(self.config_path)
        except ConfigError as e:
            return {"ok": False, "error": "; ".join(e.problems), "kept": "running configuration"}
        if cfg.host.host_id != self.cfg.host.host_id or cfg.interface != self.cfg.interface:
            return {"ok": False, "error": "host.host_id and the interface need a restart"}
        if cfg.host.dataplane != self.cfg.host.dataplane:
            return {"ok": False, "error": "host.dataplane needs a restart"}
        for key in ("metrics_address", "web_address"):
            if getattr(cfg.host, key) != getattr(self.cfg.host, key):
                return {"ok": False, "error": f"host.{key} needs a restart"}
        what = self.engine.reload(cfg, self.now(), keys)
        if cfg.cluster.digest() != self.cfg.cluster.digest():
            self.backend.remove()
            self.runtime.replace_backend(self.backend_factory(cfg))
        self.cfg = cfg
        self.health.reload(cfg)
        return {"ok": True, "message": what}

    # ------------------------------------------------------------------ run

    @property
    def adapter_file(self) -> Path:
        return self.state_file.with_suffix(".adapter.json")

    def prepare(self) -> None:
        """Set the cluster interface up (see :func:`adapter.set_up_recorded`); before the
        event loop (pyroute2 runs its own)."""
        if self.setup_adapter:
            self.saved = adapter.set_up_recorded(self.cfg, self.adapter_file)

    def restore(self) -> None:
        """Give the interface back as it was; after the event loop. On a handover the
        interface stays as it is, and the next run sets up in place from the same record."""
        if self.saved is not None and not self.handover:
            adapter.give_back(self.saved, self.adapter_file)
            self.saved = None

    def realtime(self) -> None:
        """Heartbeats ahead of everything else on the host (as cluster engines such as
        corosync do): a daemon that waits for the CPU behind the load it balances misses
        its own heartbeats, loses its lease and looks dead to the others."""
        if self.rt_priority <= 0:
            return
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(self.rt_priority))
        except OSError as e:
            msg = {"name": "realtime_refused", "priority": self.rt_priority, "error": str(e)}
            sys.stderr.write(json.dumps(msg) + "\n")

    def serve(self) -> None:
        """Start the metrics and web threads; before :meth:`realtime`, so that they and the
        threads they start keep ordinary scheduling."""
        if not self.serving:
            return
        self.publish()
        host = self.cfg.host
        if host.metrics_endpoint is not None:
            self.metrics.serve(*host.metrics_endpoint)
        if host.web_endpoint is not None:
            self.web = Web(self.board, self.numbers)
            self.web.serve(*host.web_endpoint)

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.backend.attach()
        said = self.backend.describe()["dataplane"]
        self.log(
            Event(
                EventId.DATAPLANE_ATTACHED,
                self.now(),
                {"host": self.cfg.host.host_id, "dataplane": said, "interface": self.cfg.interface},
            )
        )
        self.open_wire()
        self.control.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.control.unlink()
        server = await asyncio.start_unix_server(
            functools.partial(answer, self), path=str(self.control), limit=MAX_REQUEST
        )
        os.chmod(self.control, 0o600)
        self.listen()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stop_event.set)
        self.loop.add_signal_handler(signal.SIGUSR2, self.hand_over)
        self.loop.add_signal_handler(signal.SIGHUP, lambda: self.log_reload())
        self.after()
        try:
            self.serve()
            self.realtime()
            self.health.start()
            notify("READY=1", f"STATUS={self.status()}")
            await self.stop_event.wait()
        finally:
            notify("STOPPING=1")
            self.health.stop()
            self.metrics.stop()
            if self.web is not None:
                self.web.stop()
            server.close()
            if self.held is not None:
                self.held.cancel()
            for sock in self.wire.sockets:
                self.loop.remove_reader(sock.fileno())
            if not self.handover:
                self.engine.command(Command.STOP, self.now())
                self.send(self.engine.take_frames())
                self.backend.remove()
            with contextlib.suppress(FileNotFoundError):
                self.control.unlink()
            self.wire.close()

    def hand_over(self) -> None:
        """SIGUSR2: exit for a restart or an upgrade, leaving the kernel's rules, lease and
        interface in place. Established connections keep flowing; new ones stop when the
        lease runs out; the next run takes the tables over and rejoins."""
        self.handover = True
        sys.stderr.write(
            json.dumps({"name": "handover", "lease_left": "kept in the kernel"}) + "\n"
        )
        self.stop_event.set()

    def count_connections(self) -> None:
        """While draining, tell the engine how many VIP connections are still open."""
        if self.engine.state is HostState.DRAINING:
            vips = self.cfg.cluster.all_vips
            self.engine.set_connections(len(sockets.vip_connections(vips)), self.now())

    def log_reload(self) -> None:
        res = self.reload()
        sys.stderr.write(json.dumps({"name": "sighup_reload", **res}) + "\n")
        self.after()
