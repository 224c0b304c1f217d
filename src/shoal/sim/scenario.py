"""Random fault scenarios for the simulator, replayable from a seed.

``python -m shoal.sim --seed 1234`` replays one scenario and prints its steps.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from shoal.config import ShoalConfig, parse_config
from shoal.protocol.engine import Command
from shoal.sim.adversary import Recorder
from shoal.sim.affinity import MARGIN
from shoal.sim.checkers import InvariantViolation
from shoal.sim.cluster import SimCluster

KEY = b"simulation-key-0123456789abcdef"


def cluster_configs(
    n: int,
    buckets: int = 64,
    profile: str = "default",
    weights: dict[int, int] | None = None,
    policy: str = "quorum",
    extra_rule: bool = False,
    checks: list[dict[str, Any]] | None = None,
    all_unhealthy: str = "serve",
    sticky: int = 0,
) -> list[ShoalConfig]:
    """N host configurations sharing one cluster section (``checks``: every host's
    ``[[host.checks]]``; their verdicts are injected, see :meth:`SimCluster.health`;
    ``sticky``: the web rule keeps a client's host for that many seconds of affinity, and
    an "app" rule with network affinity does too)."""
    rules: list[dict[str, Any]] = [
        {
            "name": "web",
            "start": 80,
            "end": 443,
            "protocol": "tcp",
            "affinity": "none",
            "all_unhealthy": all_unhealthy,
        },
        {"name": "ssh", "start": 22, "protocol": "tcp", "mode": "single"},
        {"name": "telnet", "start": 23, "mode": "disabled"},
    ]
    if extra_rule:
        rules.append({"name": "dns", "start": 53, "protocol": "udp", "affinity": "network"})
    if sticky:
        rules[0].update(affinity="single", affinity_timeout_s=sticky)
        rules.append(
            {"name": "app", "start": 8443, "protocol": "tcp", "affinity": "network",
             "affinity_timeout_s": sticky}
        )  # fmt: skip
    out = []
    for h in range(1, n + 1):
        w = (weights or {}).get(h, 50)
        doc = {
            "cluster": {
                "primary_vip": "198.18.0.100",
                "key": KEY.decode(),
                "hash_seed": 7,
                "buckets": buckets,
                "profile": profile,
                "partition_policy": policy,
                "rules": rules,
            },
            "host": {
                "host_id": h,
                "rules": [
                    {"rule": "web", "load_weight": w},
                    {"rule": "ssh", "handling_priority": (h * 7) % 257 or 1},
                ],
                "checks": checks or [],
            },
        }
        out.append(parse_config(doc))
    return out


def reweighted(cfg: ShoalConfig, weight: int) -> ShoalConfig:
    doc = cfg.model_dump(mode="json")
    doc["cluster"]["key"] = KEY.decode()
    for hr in doc["host"]["rules"]:
        if hr["rule"] == "web":
            hr["load_weight"] = weight
    return parse_config(doc)


def mismatched(cfg: ShoalConfig) -> ShoalConfig:
    doc = cfg.model_dump(mode="json")
    doc["cluster"]["key"] = KEY.decode()
    rule = doc["cluster"]["rules"][0]
    rule["affinity"] = "network" if rule["affinity"] == "single" else "single"
    return parse_config(doc)


FAULTS = [
    "crash",
    "restart",
    "daemon",
    "daemon_restart",
    "partition",
    "heal",
    "loss",
    "stop",
    "start",
    "drainstop",
    "suspend",
    "resume",
    "rule",
    "weight",
    "mismatch",
    "match",
]
ODDS = [3, 3, 3, 3, 2, 3, 1, 1, 2, 2, 1, 1, 2, 2, 1, 1]


@dataclass
class Scenario:
    seed: int
    hosts: int
    buckets: int
    duration: float
    steps: list[tuple[float, str]] = field(default_factory=list)
    wire: str = ""  # a digest of every frame sent, with when and by whom
    events: list[tuple[int, float, str]] = field(default_factory=list)  # (host, at, text)
    frames: int = 0


def run_scenario(
    seed: int,
    hosts: int | None = None,
    duration_periods: int = 120,
    verbose: bool = False,
    max_hosts: int = 7,
    observers: Iterable[Callable[[SimCluster], None]] = (),
    policy: str = "quorum",
    cluster: type[SimCluster] = SimCluster,
    replay: bool = False,
    health: bool = False,
    sticky: bool = False,
) -> Scenario:
    """Run one random scenario; raises InvariantViolation naming the seed on a breach.
    ``observers`` are called after every input an engine handled. With ``policy``
    "available" (NLB's: every side of a partition serves on) no token is accepted twice
    until a partition, a mismatched configuration or a burst of loss splits the cluster
    (see :meth:`SimCluster._cut_off`); from then on both sides may, by design, until the
    repaired cluster converged (at most 60 periods after the repair), and from then on
    exclusivity is checked again for 20 more periods. ``cluster``: a subclass of the
    simulator, to look at each input or run another engine. ``replay``: a neighbour records
    every frame and, as one more kind of fault, replays a host's recorded frames to every host
    for a while (most often a host that is down); no host down may then count as live
    anywhere (the ``ghosts`` checker, after every input). ``health``: health-check verdicts
    are one more kind of fault (a rule's check or the host-wide one failing or passing
    again, on any host), under an ``all_unhealthy`` policy drawn for the run. ``sticky``: the
    rules keep their clients' hosts for an affinity timeout drawn for the run, and clients
    connect throughout (see :mod:`shoal.sim.affinity`): none is ever taken by two hosts, or
    by another host while one serves it by affinity, and once idle every one is taken by
    exactly one host."""
    rng = random.Random(seed)
    n = hosts or rng.randint(2, max_hosts)
    buckets = rng.choice([16, 60, 64, 256])
    weights = {h: rng.randint(1, 100) for h in range(1, n + 1)}
    unhealthy = rng.choice(["serve", "drop"]) if health else "serve"
    affinity_s = rng.choice([1, 2, 4]) if sticky else 0
    configs = cluster_configs(
        n, buckets, weights=weights, policy=policy, all_unhealthy=unhealthy, sticky=affinity_s
    )
    sim = cluster(configs, KEY, seed)
    sim.observers.extend(observers)
    if replay:
        sim.recorder = Recorder()
        sim.observers.append(SimCluster.check_ghosts)
    p = sim.period
    sc = Scenario(seed, n, buckets, duration_periods * p)
    sim.faults.loss = rng.choice([0.0, 0.0, 0.01, 0.05, 0.2])
    sim.faults.duplicate = rng.choice([0.0, 0.02])

    def log(text: str) -> None:
        sc.steps.append((sim.now, text))
        if verbose:
            print(f"{sim.now:8.3f}  {text}")

    def act(t: float, text: str, fn: Callable[[], None]) -> None:
        def run() -> None:
            log(text)
            fn()

        sim.at(t, run)

    def cluster_split() -> None:
        """Two clusters from here on: with the available policy both serve."""
        if policy != "quorum":
            sim.check_exclusive = False

    ids = list(range(1, n + 1))
    t = 12 * p  # let the cluster form first
    crowd = random.Random(seed ^ 0xC11E)
    if sticky:
        count = rng.choice([10, 40])

        def clients() -> None:
            sim.start_clients(count)

        sim.at(t, clients)
    end = sc.duration
    while True:
        t += rng.uniform(0.5, 15) * p
        if t >= end - 10 * p:
            break
        h = rng.choice(ids)
        kinds, odds = FAULTS, ODDS
        if replay:
            kinds, odds = [*kinds, "replay"], [*odds, 6]
        if health:
            kinds, odds = [*kinds, "health"], [*odds, 6]
        if sticky and crowd.random() < 0.1:
            # others come, in buckets that may have moved and come back (drawn apart: the
            # faults of a seed are the same with or without them)

            def fresh(salt: int = int(t * 1000)) -> None:
                sim.start_clients(count, salt=salt)

            act(t, f"{count} new clients take over from the others", fresh)
        kind = rng.choices(kinds, weights=odds)[0]
        if kind == "health":
            which = rng.choice([0, 1, None])  # the web rule, the single ssh rule, the host
            ok = rng.random() < 0.4
            what = "the host" if which is None else f"rule {which}"
            verdict = "passes again" if ok else "fails"
            act(t, f"host {h}'s check of {what} {verdict}", partial(sim.health, h, which, ok))
            continue
        if kind == "replay":
            down = [i for i in ids if sim.hosts[i].down_since is not None]
            who = rng.choice(down) if down and rng.random() < 0.8 else h
            seconds = rng.uniform(2, 30) * p

            def replay_now(who: int = who, seconds: float = seconds) -> None:
                assert sim.recorder is not None
                sim.recorder.replay(sim, who, sim.now, seconds, rng)

            act(t, f"replay host {who}'s frames for {seconds:.2f} s", replay_now)
        elif kind == "crash":
            act(t, f"crash host {h}", partial(sim.crash_host, h))
        elif kind == "restart":
            act(t, f"restart host {h}", partial(sim.restart_host, h))
        elif kind == "daemon":
            act(t, f"kill -9 daemon {h}", partial(sim.crash_daemon, h))
        elif kind == "daemon_restart":
            act(t, f"restart daemon {h}", partial(sim.restart_daemon, h))
        elif kind == "partition":
            groups = {i: rng.randint(0, 1) for i in ids}

            def split(g: dict[int, int] = groups) -> None:
                sim.faults.groups = g
                cluster_split()

            act(t, f"partition {groups}", split)
        elif kind == "heal":
            act(t, "heal partition", partial(setattr, sim.faults, "groups", {}))
        elif kind == "loss":
            rate = rng.choice([0.0, 0.05, 0.3])
            act(t, f"loss {rate}", partial(setattr, sim.faults, "loss", rate))
        elif kind in ("stop", "start", "suspend", "resume"):
            cmd = Command(kind)
            act(t, f"{kind} host {h}", partial(sim.command, h, cmd))
        elif kind == "drainstop":
            conns = rng.choice([0, 5])
            timeout = rng.choice([None, 2.0])

            def drain(h: int = h, c: int = conns, to: float | None = timeout) -> None:
                sim.set_connections(h, c)
                sim.command(h, Command.DRAINSTOP, timeout=to)

            act(t, f"drainstop host {h} ({conns} conns, timeout {timeout})", drain)
            if conns:
                act(
                    min(t + rng.uniform(1, 20) * p, end),
                    f"connections on host {h} finish",
                    partial(sim.set_connections, h, 0),
                )
        elif kind == "rule":
            cmd = rng.choice([Command.ENABLE, Command.DISABLE, Command.DRAIN])
            rule = rng.choice([0, 1, None])
            act(
                t,
                f"{cmd.value} rule {rule} on host {h}",
                partial(sim.command, h, cmd, rule),
            )
        elif kind == "weight":
            w = rng.randint(0, 100)
            act(
                t,
                f"reload host {h} with web weight {w}",
                partial(sim.reload, h, reweighted(configs[h - 1], w)),
            )
        elif kind == "mismatch":

            def mismatch(h: int = h) -> None:
                sim.reload(h, mismatched(configs[h - 1]))
                cluster_split()  # a cluster of its own

            act(t, f"reload host {h} with a mismatched rule", mismatch)
        else:
            act(
                t,
                f"reload host {h} with the cluster's configuration",
                partial(sim.reload, h, configs[h - 1]),
            )
    sim.run_until(end)
    # settle: every fault repaired, every host started with the common configuration
    log("repair everything")
    sim.faults.groups = {}
    sim.faults.loss = 0.0
    for h in ids:
        sim.restart_host(h)
        sim.restart_daemon(h)
        sim.reload(h, configs[h - 1])
        sim.set_connections(h, 0)
        sim.command(h, Command.RESUME)
        sim.command(h, Command.START)
        sim.command(h, Command.ENABLE)
        if health:
            for which in (0, 1, None):
                sim.health(h, which, True)
    deadline = sim.now + 60 * p
    while sim.now < deadline:
        sim.run_until(sim.now + p)
        if sim.converged(set(ids)) and sim.covered():
            break
    else:
        states = {
            h: (
                sh.engine.state.name if sh.engine else "down",
                str(sh.engine.epoch.key) if sh.engine and sh.engine.epoch else None,
            )
            for h, sh in sim.hosts.items()
        }
        raise sim.fail(f"covered/agreed: not converged 60 periods after repair: {states}")
    if not sim.check_exclusive:
        # the sides of a split may both have served until the repair converged (the
        # available policy, by design): from then on nothing is accepted twice again
        sim.check_exclusive_again()
        sim.run_until(sim.now + 20 * p)
        if not (sim.converged(set(ids)) and sim.covered()):
            raise sim.fail("covered/agreed: not converged 20 periods after a split healed")
    if sim.clients is not None:
        sim.clients_on = False  # every client idle until no affinity is left, then each once
        sim.run_until(sim.now + affinity_s + MARGIN + 1.0)
        sim.clients.settled(sim.now)
    sc.wire = sim.wire.hexdigest()
    sc.events = [(h, e.at, e.text) for h, e in sim.events]
    sc.frames = sim.frames_sent
    return sc


def main() -> None:
    ap = argparse.ArgumentParser(description="Replay one simulator scenario.")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--hosts", type=int)
    ap.add_argument("--policy", choices=["quorum", "available"], default="quorum")
    args = ap.parse_args()
    try:
        sc = run_scenario(args.seed, args.hosts, verbose=True, policy=args.policy)
    except InvariantViolation as e:
        print(f"VIOLATION: {e}")
        raise SystemExit(1) from None
    print(f"ok: {sc.hosts} hosts, {sc.buckets} buckets, {len(sc.steps)} steps")


if __name__ == "__main__":
    main()
