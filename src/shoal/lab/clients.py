"""Drive real clients and real failures in a lab, from outside it.

:class:`Clients` runs :mod:`shoal.lab.traffic` in client namespaces and gathers its events;
the functions here crash and revive hosts, pick client addresses and ports that land in a
given host's buckets, and read failover times and double answers off the clients' events.
The demo, the end-to-end tests and ``bench/failover.py`` share them.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from shoal.daemon.control import call
from shoal.dataplane.ruleset import owned_set, tables
from shoal.lab.topology import Lab, LabError, alive, pyenv, run_module, sh
from shoal.verdict import rule_bucket

WEB_RULE = 0  # the lab's "web" rule (TCP 80-443, no affinity) comes first


@dataclass
class Clients:
    lab: Lab
    procs: list[tuple[int, subprocess.Popen[bytes]]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    _n: int = 0
    _partial: dict[int, bytes] = field(default_factory=dict)

    def start(
        self,
        client: int,
        seconds: float,
        *,
        rate: int = 0,
        long: int = 0,
        probe: list[tuple[str, int]] | None = None,
        sniff: bool = False,
        port: int = 80,
        patience: float = 2.0,
        affine: int = 0,
        v6: bool = False,
    ) -> None:
        """Start one traffic process in client namespace ``client`` (its own sources, IPv6
        ones with ``v6``: the lab must have IPv6)."""
        self._n += 1
        base = self.lab.dir / f"c{client}.{self._n}"
        args = ["--seconds", str(seconds)]
        if rate or long or affine:
            src = base.with_suffix(".sources")
            src.write_text("\n".join(self.lab.client_sources(client, v6)))
            args += ["--sources", str(src), "--rate", str(rate), "--long", str(long)]
            args += ["--affine", str(affine)]
            args += ["--port", str(port), "--patience", str(patience)]
        if probe:
            path = base.with_suffix(".probe")
            path.write_text("".join(f"{a} {p}\n" for a, p in probe))
            args += ["--probe", str(path)]
        if sniff:
            args.append("--sniff")
        ns = self.lab.ns(f"c{client}")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "shoal.lab.traffic", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=pyenv(),
        )
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        self.procs.append((self._n, proc))
        deadline = time.monotonic() + 10
        while not any(e["kind"] == "ready" and e["run"] == self._n for e in self.collect()):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise LabError(f"traffic in c{client} did not start")
            time.sleep(0.05)

    def collect(self) -> list[dict[str, Any]]:
        """Read what the processes printed so far; returns all events."""
        for n, p in self.procs:
            assert p.stdout is not None
            data = self._partial.pop(n, b"")
            while True:
                try:
                    chunk = os.read(p.stdout.fileno(), 1 << 16)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                data += chunk
            *lines, rest = data.split(b"\n")
            self._partial[n] = rest
            self.events += [json.loads(line) | {"run": n} for line in lines if line]
        return self.events

    def finish(self, timeout: float = 60) -> list[dict[str, Any]]:
        """Stop every process early (SIGTERM), wait for their last words."""
        for _, p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 60) -> list[dict[str, Any]]:
        """Until every process ended (at most ``timeout`` seconds), reading what they print
        meanwhile: a process whose pipe is full waits for its reader."""
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for _, p in self.procs) and time.monotonic() < deadline:
            self.collect()
            time.sleep(0.05)
        for _, p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.collect()
        for _, p in self.procs:
            assert p.stdout is not None
            p.stdout.close()
        self.procs.clear()
        return self.events

    def kill(self) -> None:
        for _, p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.procs.clear()


# ------------------------------------------------------------------ failures


def signal_daemon(lab: Lab, host: int, sig: signal.Signals, wait: float = 10) -> None:
    """Send a signal to the host's daemon and wait until it is gone."""
    pid = lab.pids[f"daemon-h{host}"]
    os.killpg(pid, sig)
    _wait_gone(pid, host, sig, wait)


def _wait_gone(pid: int, host: int, sig: signal.Signals, wait: float) -> None:
    deadline = time.monotonic() + wait
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    if alive(pid):
        raise LabError(f"daemon h{host} still runs {wait} s after {sig.name}")


def crash(lab: Lab, host: int, cut: bool = True) -> float:
    """SIGKILL the host's daemon (and cut its switch port at once); returns the wall time of
    the kill."""
    pid = lab.pids[f"daemon-h{host}"]
    t = time.time()
    os.killpg(pid, signal.SIGKILL)
    if cut:
        sh("ip", "-n", lab.ns("sw"), "link", "set", f"p-h{host}", "down")
    _wait_gone(pid, host, signal.SIGKILL, 10)
    return t


def crash_and_fail_over(
    lab: Lab, clients: Clients, host: int, limit_s: float
) -> tuple[float, float | None]:
    """:func:`crash` ``host`` while ``clients`` probe its buckets; the kill's wall time and
    the failover (:func:`failover_ms`; None if not within ``limit_s``), then a second more
    of traffic."""
    killed = crash(lab, host)
    failover = None
    while failover is None and time.time() < killed + limit_s:
        time.sleep(0.1)
        failover = failover_ms(clients.collect(), killed)
    time.sleep(1.0)
    return killed, failover


def revive(lab: Lab, host: int) -> None:
    """Port up, daemon started again (it takes over what its predecessor left)."""
    sh("ip", "-n", lab.ns("sw"), "link", "set", f"p-h{host}", "up")
    lab.restart_daemon(host)


def heartbeat_loss(lab: Lab, host: int, percent: int) -> None:
    """Drop that share of the cluster frames a host receives (nftables, netdev ingress)."""
    ns = lab.ns(f"h{host}")
    sh(
        "nft",
        "add table netdev shoal_loss; "
        "add chain netdev shoal_loss in { type filter hook ingress device eth0 priority -500; }; "
        f"add rule netdev shoal_loss in ether type 0x886f numgen random mod 100 < {percent} "
        "counter drop",
        ns=ns,
    )


def states(lab: Lab, host: int) -> dict[int, str]:
    """What ``query`` on a host says of every host it hears ({} if no daemon answers)."""
    try:
        resp = call(lab.control(host), {"cmd": "query"}, timeout=2)
    except (OSError, ValueError):
        return {}
    return {h["host_id"]: h["state"] for h in resp.get("hosts", [])}


def converged(hosts: list[int], default: int | None = None) -> dict[int, str]:
    """The query answer of a converged cluster of ``hosts``."""
    first = min(hosts) if default is None else default
    return {h: "converged (default)" if h == first else "converged" for h in hosts}


def wait_states(lab: Lab, want: dict[int, str], host: int, seconds: float = 15) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if states(lab, host) == want:
            return True
        time.sleep(0.05)
    return False


# ------------------------------------------------------------------- buckets


def owned_buckets(lab: Lab, host: int, rule: int = WEB_RULE) -> set[int]:
    """The buckets of a rule the host's kernel accepts new connections for (the pre-filter's
    owned set, or the XDP program's bitmap)."""
    if lab.dataplane == "xdp":
        name = lab.config(host).cluster.effective_rules[rule].key
        text = run_module(
            lab.ns(f"h{host}"), "shoal.dataplane.xdp", "held", str(lab.config_path(host))
        )
        return set(json.loads(text).get(name, []))
    out = sh(
        "nft",
        "-j",
        "list",
        "set",
        "netdev",
        tables(lab.cluster).pre,
        owned_set(rule),
        ns=lab.ns(f"h{host}"),
    )
    for item in json.loads(out)["nftables"]:
        if "set" in item:
            return {int(e) for e in item["set"].get("elem", []) if isinstance(e, int)}
    return set()


def targets(
    lab: Lab, client: int, buckets: set[int], n: int, rng: random.Random, rule: int = WEB_RULE
) -> list[tuple[str, int]]:
    """``n`` (source, port) pairs of one client, each hashing into a different bucket of
    ``buckets`` under the rule (or fewer, if there are fewer buckets)."""
    cl = lab.config(1).cluster
    pr = cl.effective_rules[rule]
    sources = lab.client_sources(client, False)
    found: dict[int, tuple[str, int]] = {}
    for _ in range(200 * max(n, 1)):
        if len(found) >= min(n, len(buckets)):
            break
        src, sport = rng.choice(sources), rng.randint(20000, 60999)
        b = rule_bucket(cl, pr, ipaddress.ip_address(src), sport)
        if b in buckets and b not in found:
            found[b] = (src, sport)
    return list(found.values())


# ------------------------------------------------------------------ readings


def failover_ms(events: list[dict[str, Any]], since: float, run: int | None = None) -> float | None:
    """From ``since`` to the moment every probed bucket accepted again: for each probe, the
    start of its first successful attempt after ``since``; the latest of those. None if some
    probe never succeeded."""
    probes = [e for e in events if e["kind"] == "probe" and (run is None or e["run"] == run)]
    idxs = {e["idx"] for e in probes}
    firsts = []
    for i in idxs:
        ok = [e["t"] for e in probes if e["idx"] == i and e["ok"] and e["t"] >= since]
        if not ok:
            return None
        firsts.append(min(ok))
    return round(1000 * (max(firsts) - since), 1) if firsts else None


def broken(events: list[dict[str, Any]], hosts: set[str] | None = None) -> list[dict[str, Any]]:
    """Long-lived connections that broke (on ``hosts``, if given)."""
    return [
        e
        for e in events
        if e["kind"] == "long"
        and e["error"]
        and e.get("event") != "open"
        and (hosts is None or e.get("host") in hosts)
    ]


def daemon_events(lab: Lab, host: int, since: float) -> list[dict[str, Any]]:
    """A host daemon's events (JSON lines of its log) from wall time ``since`` on."""
    out = []
    for line in (lab.dir / f"h{host}.daemon.log").read_text().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("at"), int | float) and doc["at"] >= since:
            out.append(doc)
    return out


def double_answers(events: list[dict[str, Any]]) -> int:
    return sum(int(e["doubles"]) for e in events if e["kind"] == "synacks")
