"""``shoal lab demo``: a 4-host cluster, real clients, a crash, a rejoin, an application
failure and a drainstop.

Clients in three namespaces make short HTTP requests through the VIP from many source
addresses and keep long-lived connections busy. Every host checks its web service with an
HTTP health check. The demo shows the per-host distribution live, kills one host (its
daemon with SIGKILL and its switch port down), shows the failover and the new
distribution, brings the host back, stops the web service on another host (the host and
its daemon stay up: its check takes it out of the web rule), starts the service again,
drainstops a third, tears everything down, and prints a summary measured by the clients.
Exit status 1 if anything it shows went wrong.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from shoal.daemon.control import call
from shoal.lab.clients import Clients, crash, owned_buckets, revive, states, wait_states
from shoal.lab.topology import CLIENTS, Lab

console = Console()
CHECK = """
[[host.checks]]
rule = "web"
kind = "http"
port = 80
interval_ms = 500
timeout_ms = 250
rise = 2
fall = 2
"""


@dataclass
class Run:
    lab: Lab
    clients: Clients = field(init=False)

    def __post_init__(self) -> None:
        self.clients = Clients(self.lab)

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.clients.events

    def states(self, host: int = 1) -> dict[int, str]:
        return states(self.lab, host)

    def wait(self, want: dict[int, str], host: int = 1, seconds: float = 15) -> bool:
        return wait_states(self.lab, want, host, seconds)

    def start_traffic(self, seconds: float) -> None:
        for k in range(1, CLIENTS + 1):
            self.clients.start(k, seconds, rate=60, long=10)

    def table(self, title: str, since: float) -> Group:
        """The title on a line of its own (a table wraps its title to its own width), then
        the requests per host."""
        recent = [e for e in self.events if e["kind"] == "short" and e["t"] >= since]
        per = Counter(e["host"] or "failed" for e in recent)
        t = Table()
        t.add_column("host")
        t.add_column("requests (last 2 s)", justify="right")
        t.add_column("share", justify="right")
        total = max(1, len(recent))
        for name in [*sorted(k for k in per if k != "failed"), "failed"]:
            if per.get(name):
                t.add_row(name, str(per[name]), f"{100 * per[name] / total:.0f}%")
        return Group(Text(title, style="bold"), t)

    def show(self, title: str, seconds: float) -> None:
        end = time.time() + seconds
        with Live(console=console, refresh_per_second=4) as live:
            while time.time() < end:
                self.clients.collect()
                live.update(self.table(title, time.time() - 2))
                time.sleep(0.25)
        if not console.is_terminal:
            console.print()  # off a terminal, Live leaves its last frame without a newline


def demo(hosts: int = 4) -> int:
    lab = Lab(name="demo" + uuid.uuid4().hex[:4], hosts=hosts)
    run = Run(lab)
    problems: list[str] = []
    everyone = {h: "converged" for h in range(1, hosts + 1)} | {1: "converged (default)"}
    try:
        console.rule(f"shoal lab demo: {hosts} hosts, unicast cluster MAC, VIP 198.18.0.100")
        lab.up(service=False)
        for h in range(1, hosts + 1):  # every host checks its web service
            path = lab.config_path(h)
            path.write_text(path.read_text() + CHECK)
        lab.start_services()
        if not run.wait(everyone):
            problems.append(f"the cluster did not converge: {run.states()}")
        console.print(f"converged: {run.states()}")
        # long enough that the drained host still holds sessions when it drainstops, also on
        # a loaded machine (with 32 s, one CI run found its sessions over and the host stopped)
        run.start_traffic(seconds=45)
        run.show("distribution (3 clients, 300 source addresses)", 4)
        victim = hosts - 1
        console.rule(f"crash: host {victim} (daemon SIGKILL, switch port down)")
        kill_at = crash(lab, victim)
        survivors = {h: s for h, s in everyone.items() if h != victim}
        converged = run.wait(survivors, seconds=10)
        console.print(f"cluster after the crash: {run.states()}")
        if not converged:
            problems.append("the survivors did not converge")
        run.show("distribution after the crash", 4)
        console.rule(f"host {victim} comes back")
        rejoin_at = time.time()
        revive(lab, victim)
        if not run.wait(everyone, seconds=15):
            problems.append(f"host {victim} did not rejoin: {run.states()}")
        run.show("distribution after the rejoin", 3)
        # a host that kept its sessions through the crash (the victim's died with it), and
        # not host 1: the default host moves when it stops
        drained = next(h for h in range(hosts, 1, -1) if h != victim)
        app = next((h for h in range(2, hosts + 1) if h not in (victim, drained)), 1)
        console.rule(f"application failure: the web service on host {app} stops")
        app_at, detected_at = application_failure(run, app, problems)
        console.rule(f"drainstop host {drained}")
        call(lab.control(drained), {"cmd": "drainstop"})
        drain_at = time.time()
        run.show(f"while host {drained} drains (its sessions go on, no new requests)", 3)
        if run.states().get(drained) != "draining":
            problems.append(f"host {drained} is not draining: {run.states()}")
        run.clients.wait(timeout=60)  # the clients close their sessions: the drain finishes
        want = {h: s for h, s in everyone.items() if h != drained} | {drained: "stopped"}
        if not run.wait(want, seconds=15):
            problems.append(f"host {drained} did not drain to stopped: {run.states()}")
        console.print(f"after the drain: {run.states()}")
        summary = summarize(run.events, kill_at, rejoin_at, victim, app, app_at, detected_at)
        console.rule("summary")
        console.print_json(json.dumps(summary))
        # until the others take its buckets over (one convergence), it still takes new ones
        late = [e for e in run.events if e["kind"] == "short" and e["t"] > drain_at + 1]
        if any(e["host"] == f"h{drained}" for e in late) or not late:
            problems.append(f"host {drained} took new requests while draining")
        if summary["broken_on_survivors"]:
            problems.append(f"{summary['broken_on_survivors']} connections broken on survivors")
        stray = (
            summary["failed_requests"]
            - summary["failed_during_failover"]
            - summary["failed_before_the_check_saw_it"]
        )
        if stray > summary["requests"] // 100:
            problems.append(f"{stray} requests failed outside the failover and the check")
        if summary["failover_ms"] is None or summary["failover_ms"] > 2000:
            problems.append(f"failover took {summary['failover_ms']} ms")
    finally:
        run.clients.kill()
        lab.down()
    for problem in problems:
        console.print(f"[red]problem:[/red] {problem}")
    console.print("[green]demo ok[/green]" if not problems else "[red]demo failed[/red]")
    return 1 if problems else 0


def application_failure(run: Run, app: int, problems: list[str]) -> tuple[float, float]:
    """Stop host ``app``'s web service, show its check take the host out of the web rule,
    start the service again and show it back; when it stopped and when the others had taken
    its web buckets over."""
    lab = run.lab
    os.killpg(lab.pids[f"service-h{app}"], signal.SIGTERM)
    app_at = time.time()
    detected_at = app_at + 30
    deadline = app_at + 10
    while time.time() < deadline:
        if not owned_buckets(lab, app):
            detected_at = time.time()
            break
        time.sleep(0.05)
    else:
        problems.append(f"host {app}'s check did not take it out of the web rule")
    viewer = 2 if app == 1 else 1  # another host: health travels in heartbeats
    seen = call(lab.control(viewer), {"cmd": "query"})["hosts"]
    health = next(h["health"] for h in seen if h["host_id"] == app)
    said = ", ".join(f"{rule} {verdict}" for rule, verdict in health.items())
    took = round(1000 * (detected_at - app_at))
    console.print(
        f"host {viewer} sees host {app}'s checks: {said}; its web buckets moved in {took} ms"
    )
    run.show(f"while host {app}'s service is down (it stays a converged member)", 3)
    lab.start_service(app)
    lab.save()
    deadline = time.time() + 10
    while time.time() < deadline and not owned_buckets(lab, app):
        time.sleep(0.05)
    if not owned_buckets(lab, app):
        problems.append(f"host {app} did not take its web share back")
    run.show(f"host {app}'s service is back", 2)
    return app_at, detected_at


def summarize(
    events: list[dict[str, Any]],
    kill_at: float,
    rejoin_at: float,
    victim: int,
    app: int,
    app_at: float,
    detected_at: float,
) -> dict[str, Any]:
    short = [e for e in events if e["kind"] == "short"]
    app_failed = [e for e in short if e["host"] is None and app_at <= e["t"] < detected_at]
    failed_after = [e["t"] for e in short if e["host"] is None and kill_at <= e["t"] < rejoin_at]
    ok_after = [e["t"] for e in short if e["host"] and e["t"] >= kill_at]
    # failover: from the kill to the start of the last request that failed before the host
    # came back (each failed request was sent to one of the crashed host's buckets)
    last_fail = max(failed_after, default=None)
    failover = (
        None
        if not ok_after
        else round(1000 * (last_fail - kill_at), 1)
        if last_fail is not None
        else 0.0
    )
    longs = [e for e in events if e["kind"] == "long" and e.get("event") != "open"]
    gone = {f"h{victim}", f"h{app}"}  # the crashed host, the host whose service died
    broken = [e for e in longs if e["error"] and e.get("host") not in gone]
    per = Counter(e["host"] for e in short if e["host"])
    return {
        "requests": len(short),
        "requests_per_host": dict(sorted(per.items())),
        "failed_requests": sum(1 for e in short if e["host"] is None),
        "failed_during_failover": len(failed_after),
        "failover_ms": failover,
        "application_failure_detected_ms": round(1000 * (detected_at - app_at)),
        "failed_before_the_check_saw_it": len(app_failed),
        "long_lived_connections": len({(e.get("idx"), e.get("host")) for e in longs}),
        "broken_on_survivors": len(broken),
        "broken_examples": [
            {"host": e.get("host"), "error": e["error"], "after_kill_s": round(e["t"] - kill_at, 2)}
            for e in broken[:5]
        ],
        "broken_on_crashed_host": sum(
            1 for e in longs if e["error"] and e.get("host") == f"h{victim}"
        ),
        "broken_with_the_stopped_service": sum(
            1 for e in longs if e["error"] and e.get("host") == f"h{app}"
        ),
    }
