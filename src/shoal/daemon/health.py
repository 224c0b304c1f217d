"""The host's health checks, run off the heartbeat loop.

:class:`Runner` runs every check in a thread of its own, on an asyncio loop of its own, at
most :data:`CONCURRENT` probes at a time, each cut at its timeout (a hang counts as a
failure). The thread drops the real-time priority the heartbeat loop may have, so checks
never compete with heartbeats for the CPU. Each result is handed to the daemon's loop,
where :class:`Checks` keeps the verdicts (:mod:`shoal.health.verdict`) and what ``params``
shows, and :class:`HealthChecks` tells the engine when a verdict changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shoal.config import ShoalConfig
from shoal.health.probes import probe
from shoal.health.spec import Check
from shoal.health.verdict import Verdict
from shoal.protocol.events import Event, EventId
from shoal.protocol.frames import Health

if TYPE_CHECKING:
    from shoal.daemon.shell import Daemon

CONCURRENT = 8  # probes in flight at once


@dataclass(frozen=True)
class Result:
    check: str
    ok: bool
    detail: str
    latency_ms: float
    at: float  # wall time


@dataclass
class State:
    """One check as ``params`` shows it."""

    check: Check
    rule: int | None  # the rule's index (None: host-wide)
    target: str
    verdict: Verdict
    last: Result | None = None
    last_error: str | None = None
    changes: int = 0
    held_noted: bool = False

    def doc(self) -> dict[str, Any]:
        v, last = self.verdict, self.last
        return {
            "name": self.check.key,
            "rule": self.check.rule,
            "kind": self.check.kind.value,
            "target": self.target,
            "healthy": v.healthy,
            "held": v.held,
            "last_ok": None if last is None else last.ok,
            "last_detail": None if last is None else last.detail,
            "last_latency_ms": None if last is None else last.latency_ms,
            "last_at": None if last is None else last.at,
            "last_error": self.last_error,
            "successes": v.successes,
            "failures": v.failures,
            "in_a_row": v.streak,
            "verdict_changes": self.changes,
            "interval_ms": self.check.interval_ms,
            "timeout_ms": self.check.timeout_ms,
            "rise": self.check.rise,
            "fall": self.check.fall,
        }


def _endpoint(address: object, port: int) -> str:
    text = str(address)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


@dataclass
class Checks:
    """Every check's verdict and counts, on the daemon's loop."""

    states: dict[str, State] = field(default_factory=dict)

    @classmethod
    def of(cls, cfg: ShoalConfig) -> Checks:
        keys = [r.key for r in cfg.cluster.effective_rules]
        out = cls()
        for c in cfg.host.checks:
            v = Verdict(c.rise, c.fall, c.flap_limit, float(c.flap_window_s))
            target = c.command[0] if c.command else _endpoint(*cfg.check_target(c))
            rule = keys.index(c.rule) if c.rule is not None else None
            out.states[c.key] = State(c, rule, target, v)
        return out

    def observe(self, r: Result, now: float) -> tuple[State, bool | None]:
        """Count a result; the check and its new verdict if it changed."""
        st = self.states[r.check]
        st.last = r
        if not r.ok:
            st.last_error = r.detail
        change = st.verdict.observe(r.ok, now)
        if change is not None:
            st.changes += 1
        return st, change

    def docs(self) -> list[dict[str, Any]]:
        return [s.doc() for s in self.states.values()]


class Runner:
    """The checks' thread: results go to ``deliver`` on the daemon's loop."""

    def __init__(
        self,
        cfg: ShoalConfig,
        deliver: Callable[[Result], None],
        main: asyncio.AbstractEventLoop,
    ) -> None:
        self.cfg = cfg
        self.deliver = deliver
        self.main = main
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None

    def start(self) -> None:
        if not self.cfg.host.checks:
            return
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), name="checks", daemon=True)
        self.thread.start()
        ready.wait(5)

    def _run(self, ready: threading.Event) -> None:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))  # this thread only
        self.loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        ready.set()
        try:
            self.loop.run_until_complete(self._all())
        finally:
            self.loop.close()

    async def _all(self) -> None:
        assert self._stop is not None
        gate = asyncio.Semaphore(CONCURRENT)
        tasks = [asyncio.create_task(self._one(c, gate)) for c in self.cfg.host.checks]
        await self._stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, check: Check, gate: asyncio.Semaphore) -> None:
        address, port = self.cfg.check_target(check) if check.command is None else (None, 0)
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            async with gate:
                t0 = loop.time()
                try:
                    ok, detail = await asyncio.wait_for(
                        probe(check, address, port),
                        check.timeout_ms / 1000,
                    )
                except TimeoutError:
                    ok, detail = False, f"no answer within {check.timeout_ms} ms"
                except Exception as e:  # a check's bug fails the check, not the thread
                    ok, detail = False, f"the check failed inside: {e!r}"
                took = round(1000 * (loop.time() - t0), 2)
            result = Result(check.key, ok, detail, took, time.time())
            try:
                self.main.call_soon_threadsafe(self.deliver, result)
            except RuntimeError:
                return  # the daemon's loop is closed: it is stopping
            await asyncio.sleep(max(0.0, started + check.interval_ms / 1000 - loop.time()))

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None and self.thread is not None:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._stop.set)
            self.thread.join(5)
        self.thread = None


class HealthChecks:
    """The daemon's side of its checks: the verdicts (:class:`Checks`), the thread running
    them (:class:`Runner`), a changed verdict told to the engine, and what a reload keeps."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.checks = Checks.of(daemon.cfg)
        self.config = daemon.cfg.host.checks  # the definitions these verdicts are of
        self.runner: Runner | None = None

    def on_result(self, r: Result) -> None:
        """A check's result (from the checks' thread): a changed verdict goes to the engine."""
        if r.check not in self.checks.states:
            return  # a check a reload removed
        d = self.d
        now = d.now()
        st, change = self.checks.observe(r, now)
        if change is not None:
            st.held_noted = False
            c = st.check
            why = r.detail if change else f"{c.fall} in a row, the last: {r.detail}"
            d.engine.health(st.rule, change, now, check=c.key, reason=why)
            d.after()
        elif st.verdict.held and not st.held_noted:
            st.held_noted = True
            until = st.verdict.held_until() or now
            wait = round(max(0.0, until - now), 1)
            doc = {"host": d.engine.me, "check": st.check.key, "wait_s": wait}
            d.log(Event(EventId.HEALTH_HELD, now, doc))

    def start(self) -> None:
        assert self.d.loop is not None
        self.runner = Runner(self.d.cfg, self.on_result, self.d.loop)
        self.runner.start()

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop()
            self.runner = None

    def reload(self, cfg: ShoalConfig) -> None:
        """The checks of a reloaded file, if they differ: a check whose definition is the
        same keeps its verdict; the engine is told of every verdict that differs from what
        it holds."""
        if cfg.host.checks == self.config:
            return
        old = self.checks.states
        fresh = Checks.of(cfg)
        for key, st in fresh.states.items():
            if key in old and old[key].check == st.check:
                fresh.states[key] = old[key]
        self.stop()
        self.checks, self.config = fresh, cfg.host.checks
        e, now = self.d.engine, self.d.now()
        for st in fresh.states.values():
            held = e.host_health if st.rule is None else e.rule_health[st.rule]
            if (held is Health.OK) != st.verdict.healthy:
                e.health(st.rule, st.verdict.healthy, now, check=st.check.key,
                         reason="configuration reloaded")  # fmt: skip
        if self.d.loop is not None:
            self.start()
