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
from shoal.config import ConfigError, ShoalConfig, load_host
from shoal.daemon import wire
from shoal.daemon.affinity_reads import AffinityReads
from shoal.daemon.control import MAX_REQUEST, dispatch, parse_request
from shoal.daemon.health import Checks, Result, Runner
from shoal.daemon.local import Established
from shoal.daemon.metrics import Metrics
from shoal.daemon.notify import notify
from shoal.daemon.orphans import Orphans
from shoal.daemon.picture import picture
from shoal.daemon.reading import Board, Reading, owned_per_rule
from shoal.daemon.remote import Remote
from shoal.daemon.web import Numbers, Web
from shoal.dataplane import adapter, sockets
from shoal.dataplane.backend import NftBackend
from shoal.dataplane.contract import Backend, DataplaneError
from shoal.protocol.engine import Command, Engine
from shoal.protocol.events import Event, EventId
from shoal.protocol.frames import ETHERTYPE, Health, HostState, Request, cluster_id
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
        self.dropped = {"known": 0, "other": 0}  # frames the sockets' queues had no room for
        self.screen: wire.Screen | None = None  # junk dropped and counted in the kernel
        self.board = Board()  # what the metrics and web threads read
        self.established = Established(lambda: self.cfg.cluster)
        self.metrics = Metrics(self.board, self.established.get)
        web = self.cfg.host.web_endpoint
        self.numbers = Numbers(self.established.get, web[1] if web else None)
        self.web: Web | None = None
        self.checks = Checks.of(self.cfg)
        self.remote = Remote(self)
        self.orphans = Orphans(self)
        self.checks_config = self.cfg.host.checks
        self.runner: Runner | None = None
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

    def open_sockets(self) -> None:
        """The known and the other socket (see :mod:`shoal.daemon.wire`); heartbeats go
        out on the known one."""
        cl = self.cfg.cluster
        if cl.mode is ClusterMode.UNICAST:
            self.dest = BROADCAST
        else:
            self.dest = cluster_mac_bytes(cl.primary_vip, cl.mode)
        group = None if cl.mode is ClusterMode.UNICAST else self.dest
        cid = cluster_id(cl.primary_vip)
        self.screen = wire.Screen(self.cfg.interface)
        self.screen.install(cid)
        self.sock = wire.open_socket(self.cfg.interface, cid, True, group)
        try:
            self.other = wire.open_socket(self.cfg.interface, cid, False, group)
        except OSError:
            self.sock.close()
            self.screen.remove()
            raise
        self.filtered = (-1, cid)

    def refilter(self) -> None:
        """Program both filters anew when the known runs (or the cluster id) changed."""
        version, runs = self.engine.known_runs()
        cid = self.engine.codec.cluster
        if (version, cid) == self.filtered:
            return
        try:
            if cid != self.filtered[1] and self.screen is not None:
                self.screen.install(cid)
            wire.attach(self.sock, wire.program(cid, runs, True))
            wire.attach(self.other, wire.program(cid, runs, False))
        except (OSError, DataplaneError) as e:
            # the filters in place stay (new runs are read from the other socket): worse
            # under a flood, never wrong; tried again when the runs change
            problem = {"name": "filter_refused", "runs": len(runs), "error": str(e)}
            sys.stderr.write(json.dumps(problem) + "\n")
        self.filtered = (version, cid)

    def counters(self) -> dict[str, int]:
        """The engine's counters, with the frames the kernel screened out added to their
        reasons."""
        out = dict(self.engine.counters)
        if self.screen is not None:
            for name, n in self.screen.counts().items():
                out[name] = out.get(name, 0) + n
        return out

    def socket_drops(self) -> dict[str, int]:
        """Frames each socket's queue had no room for, since the start."""
        self.dropped["known"] += wire.drops(self.sock)
        self.dropped["other"] += wire.drops(self.other)
        return dict(self.dropped)

    @property
    def hold(self) -> float:
        """Frames closer together than this are taken in batches, at most this late: a
        tenth of the period in force (a reload may change it), 10 ms at most. Each drain
        is a wake-up, and wake-ups are most of what a daemon costs; a frame read 10 ms late
        costs the lease a tenth of a period of headroom, of two or more."""
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
            self.loop.remove_reader(self.sock.fileno())
            self.loop.remove_reader(self.other.fileno())
            self.held = self.loop.call_later(self.hold, self.drain)
        self.last_wake = now

    def drain(self) -> None:
        """A batch: what came during the hold. Listen for each frame again once a hold
        went by without one."""
        assert self.loop is not None
        self.reads["batches"] += 1
        busy = self.receive() > 0
        self.after()
        if busy:
            self.held = self.loop.call_later(self.hold, self.drain)
        else:
            self.held = None
            self.loop.add_reader(self.sock.fileno(), self.on_readable)
            self.loop.add_reader(self.other.fileno(), self.on_readable)

    def receive(self) -> int:
        """Hand the engine what the known socket holds, then at most a budget of what the
        other one holds; how many."""
        n = self._read(self.sock, KNOWN_BUDGET) + self._read(self.other, wire.OTHER_BUDGET)
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

    def send(self, frames: list[bytes]) -> None:
        for frame in frames:
            try:
                self.sock.sendto(frame, (self.cfg.interface, ETHERTYPE, 0, 0, self.dest))
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
            socket_drops=self.socket_drops(),
            events=tuple(self.events[-RECENT_EVENTS:]),
            checks=tuple(self.checks.docs()),
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

    # ----------------------------------------------------------------- health

    def on_check(self, r: Result) -> None:
        """A check's result (from the checks' thread): a changed verdict goes to the engine."""
        if r.check not in self.checks.states:
            return  # a check a reload removed
        now = self.now()
        st, change = self.checks.observe(r, now)
        if change is not None:
            st.held_noted = False
            c = st.check
            why = r.detail if change else f"{c.fall} in a row, the last: {r.detail}"
            self.engine.health(st.rule, change, now, check=c.key, reason=why)
            self.after()
        elif st.verdict.held and not st.held_noted:
            st.held_noted = True
            until = st.verdict.held_until() or now
            ev = Event(
                EventId.HEALTH_HELD,
                now,
                {
                    "host": self.engine.me,
                    "check": st.check.key,
                    "wait_s": round(max(0.0, until - now), 1),
                },
            )
            self.log(ev)

    def start_checks(self) -> None:
        assert self.loop is not None
        self.runner = Runner(self.cfg, self.on_check, self.loop)
        self.runner.start()

    def stop_checks(self) -> None:
        if self.runner is not None:
            self.runner.stop()
            self.runner = None

    def reload_checks(self, cfg: ShoalConfig) -> None:
        """New checks from a reloaded file: a check whose definition is the same keeps its
        verdict; the engine is told of every verdict that differs from what it holds."""
        old = self.checks.states
        fresh = Checks.of(cfg)
        for key, st in fresh.states.items():
            if key in old and old[key].check == st.check:
                fresh.states[key] = old[key]
        self.stop_checks()
        self.checks = fresh
        now = self.now()
        e = self.engine
        for st in fresh.states.values():
            held = e.host_health if st.rule is None else e.rule_health[st.rule]
            if (held is Health.OK) != st.verdict.healthy:
                e.health(st.rule, st.verdict.healthy, now, check=st.check.key,
                         reason="configuration reloaded")  # fmt: skip
        if self.loop is not None:
            self.start_checks()

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

    async def on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request, one answer. Bad input is answered, never raised: a request too
        long, cut short, malformed or failing inside gets an error and an event, no traceback."""
        try:
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), 5)
                req = parse_request(line)
            except asyncio.LimitOverrunError:
                req = f"request: over the limit of {MAX_REQUEST} bytes"
            except asyncio.IncompleteReadError as e:
                if not e.partial:
                    return
                req = "request: cut short (no newline)"
            if isinstance(req, str):
                resp: dict[str, Any] = {"ok": False, "error": req}
            elif req.get("cmd") == "view":
                resp = await self.view()
            elif req.get("cmd") == "remote":
                resp = await self.remote.ask(req)
            else:
                resp = self.guarded(req)
            writer.write((json.dumps(resp) + "\n").encode())
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def view(self) -> dict[str, Any]:
        """The picture ``shoal top`` draws: read on the loop, the hosts' own numbers counted
        and asked for in a worker thread while the loop goes on."""
        assert self.loop is not None
        try:
            r = self.reading()
            numbers = await self.loop.run_in_executor(None, self.numbers.of, r)
            return {"ok": True, **picture(r, numbers)}
        except Exception as e:  # the daemon outlives any one request
            return self.failed("view", e)

    def guarded(self, req: dict[str, Any]) -> dict[str, Any]:
        """:meth:`handle`, with a failure inside answered and logged in one line."""
        try:
            return self.handle(req)
        except Exception as e:  # the daemon outlives any one request
            return self.failed(str(req.get("cmd")), e)

    @staticmethod
    def failed(cmd: str, e: Exception) -> dict[str, Any]:
        problem = {"name": "control_failed", "cmd": cmd, "error": repr(e)}
        sys.stderr.write(json.dumps(problem) + "\n")
        return {"ok": False, "error": f"{cmd}: failed inside the daemon ({e!r})"}

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
        if cfg.host.checks != self.checks_config:
            self.reload_checks(cfg)
            self.checks_config = cfg.host.checks
        return {"ok": True, "message": what}

    # ------------------------------------------------------------------ run

    @property
    def adapter_file(self) -> Path:
        return self.state_file.with_suffix(".adapter.json")

    def prepare(self) -> None:
        """Set the cluster interface up; before the event loop (pyroute2 runs its own).

        The interface's original state is kept on disk: after a crash, the next run sets
        up again in place (no address or route comes and goes) and keeps that record, so what
        it restores at the end is the host's own state, not a crashed run's set-up.
        """
        if not self.setup_adapter:
            return
        previous = None
        if self.adapter_file.exists():
            with contextlib.suppress(ValueError, TypeError, OSError):
                previous = adapter.load(self.adapter_file)
        self.saved = adapter.setup(self.cfg, previous)
        self.adapter_file.parent.mkdir(parents=True, exist_ok=True)
        adapter.save(self.saved, self.adapter_file)

    def restore(self) -> None:
        """Give the interface back as it was; after the event loop. On a handover the
        interface stays as it is, and the next run sets up in place from the same record."""
        if self.saved is not None and not self.handover:
            adapter.teardown(self.saved)
            self.saved = None
            self.adapter_file.unlink(missing_ok=True)

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
        self.open_sockets()
        self.control.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.control.unlink()
        server = await asyncio.start_unix_server(
            self.on_client, path=str(self.control), limit=MAX_REQUEST
        )
        os.chmod(self.control, 0o600)
        self.loop.add_reader(self.sock.fileno(), self.on_readable)
        self.loop.add_reader(self.other.fileno(), self.on_readable)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stop_event.set)
        self.loop.add_signal_handler(signal.SIGUSR2, self.hand_over)
        self.loop.add_signal_handler(signal.SIGHUP, lambda: self.log_reload())
        self.after()
        try:
            self.serve()
            self.realtime()
            self.start_checks()
            notify("READY=1", f"STATUS={self.status()}")
            await self.stop_event.wait()
        finally:
            notify("STOPPING=1")
            self.stop_checks()
            self.metrics.stop()
            if self.web is not None:
                self.web.stop()
            server.close()
            if self.held is not None:
                self.held.cancel()
            self.loop.remove_reader(self.sock.fileno())
            self.loop.remove_reader(self.other.fileno())
            if not self.handover:
                self.engine.command(Command.STOP, self.now())
                self.send(self.engine.take_frames())
                self.backend.remove()
            with contextlib.suppress(FileNotFoundError):
                self.control.unlink()
            self.sock.close()
            self.other.close()
            if self.screen is not None:
                self.screen.remove()

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
