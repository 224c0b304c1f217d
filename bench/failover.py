"""Failover measured by real clients in the lab, per timing profile, and the cost of the
accept path (VIP against dedicated IP, wrk).

``python bench/failover.py --json [--quick] [--tolerance N]`` (root). For each profile
(default, fast, and NLB's own 1000 ms x 5 as "nlb"; ``--tolerance``: another loss tolerance
than the profile's) a 4-host lab runs repeated crashes: each run picks a host,
starts clients, SIGKILLs its daemon and cuts its switch port, waits for the failover, then
brings the host back. Clients during a run:

* c1 probes 24 random buckets of the victim, each from one fixed address and port (a new
  SYN every 10 ms while it fails); failover = from the SIGKILL to the moment the last of them
  accepted again. The new owners each install their share in one atomic transaction, so the
  sampled buckets time every new owner;
* c2 and c3 keep 10 long-lived sessions each busy (a ping every 100 ms) and make short
  requests; broken_on_survivors counts sessions that broke on a host that was not crashed;
* every client counts SYN-ACKs per SYN: double_answers is SYNs answered by two hosts.

vip_over_direct: wrk against the VIP and against the host's dedicated IP, same service,
alternated, median of the rounds; on a 1-host lab (the target) and on the 4-host lab
(information: four hosts share this machine's cores there).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import time
import uuid
from typing import Any

from shoal.lab import clients as C
from shoal.lab.topology import Lab

PROFILES = ("default", "fast", "nlb")
HOSTS = 4
PROBES = 24


def p99(values: list[float]) -> float:
    vals = sorted(values)
    return vals[min(len(vals) - 1, round(0.99 * (len(vals) - 1)))]


def one_run(lab: Lab, victim: int, rng: random.Random, bound_s: float) -> dict[str, Any]:
    everyone = list(range(1, HOSTS + 1))
    survivors = [h for h in everyone if h != victim]
    clients = C.Clients(lab)
    try:
        probe = C.targets(lab, 1, C.owned_buckets(lab, victim), PROBES, rng)
        seconds = bound_s + 8
        clients.start(1, seconds, probe=probe, sniff=True)
        for k in (2, 3):
            clients.start(k, seconds, rate=20, long=10, sniff=True)
        time.sleep(1.0)  # sessions open, probes succeed
        killed = C.crash(lab, victim)
        failover = None
        deadline = time.time() + bound_s + 5
        while failover is None and time.time() < deadline:
            time.sleep(0.1)
            failover = C.failover_ms(clients.collect(), killed)
        time.sleep(0.5)  # sessions on the survivors keep going after the failover
        events = clients.finish()
    finally:
        clients.kill()
    slow = failover is None or failover > 2000 * bound_s
    log = events_since(lab, survivors, killed - 0.2) if slow else []
    C.revive(lab, victim)
    rejoined = C.wait_states(lab, C.converged(everyone), survivors[0], 30)
    return {
        "victim": victim,
        "failover_ms": failover,
        "daemon_events": log,
        "broken_on_survivors": len(C.broken(events, {f"h{h}" for h in survivors})),
        "double_answers": C.double_answers(events),
        "rejoined": rejoined,
    }


def events_since(lab: Lab, hosts: list[int], since: float) -> list[str]:
    """The daemons' events from ``since`` on, as ``+ms hN text`` lines (for slow runs)."""
    out = [
        (doc["at"], f"h{h} {doc.get('text', doc.get('name'))}")
        for h in hosts
        for doc in C.daemon_events(lab, h, since)
    ]
    return [f"+{round(1000 * (t - since))} {text}" for t, text in sorted(out)]


def profile_runs(profile: str, runs: int, seed: int, tolerance: int = 0) -> dict[str, Any]:
    lab = Lab(name="bf" + uuid.uuid4().hex[:5], hosts=HOSTS, profile=profile, tolerance=tolerance)
    rng = random.Random(seed)
    try:
        lab.up()
        cl = lab.config(1).cluster
        bound_s = (cl.tolerance + 3) * cl.period_ms / 1000
        if not C.wait_states(lab, C.converged(list(range(1, HOSTS + 1))), 1, 30):
            raise RuntimeError(f"{profile}: the lab did not converge: {C.states(lab, 1)}")
        results = []
        for r in range(runs):
            victim = [2, 3, 4, 1][r % HOSTS]
            results.append(one_run(lab, victim, rng, bound_s))
        vip_4 = vip_over_direct(lab, rounds=2) if profile == "default" else None
    finally:
        lab.down()
    times = [r["failover_ms"] for r in results if r["failover_ms"] is not None]
    doc: dict[str, Any] = {
        "profile": profile,
        "period_ms": cl.period_ms,
        "tolerance": cl.tolerance,
        "failover_ms_p50": round(statistics.median(times), 1) if times else None,
        "failover_ms_p99": round(p99(times), 1) if times else None,
        "failover_ms_max": max(times) if times else None,
        "no_failover": len(results) - len(times),
        "broken_on_survivors": sum(r["broken_on_survivors"] for r in results),
        "double_answers": sum(r["double_answers"] for r in results),
        "not_rejoined": sum(1 for r in results if not r["rejoined"]),
        "runs": len(results),
        "failover_ms_runs": [r["failover_ms"] for r in results],
        "slow_runs": [
            {k: r[k] for k in ("victim", "failover_ms", "daemon_events")}
            for r in results
            if r["daemon_events"]
        ],
    }
    if vip_4 is not None:
        doc["vip_over_direct_4_hosts"] = vip_4
    return doc


def wrk_rate(lab: Lab, url: str, seconds: int) -> float:
    out = subprocess.run(
        ["ip", "netns", "exec", lab.ns("c1"), "wrk", "-t1", "-c16", f"-d{seconds}s", url],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    ).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"wrk gave no rate for {url}: {out[-300:]}")
    return float(m.group(1))


def vip_over_direct(lab: Lab, rounds: int = 3, seconds: int = 3) -> dict[str, float]:
    """Request rate through the VIP over the rate to h1's dedicated IP (alternated)."""
    vip, direct = [], []
    for _ in range(rounds):
        vip.append(wrk_rate(lab, "http://198.18.0.100/", seconds))
        direct.append(wrk_rate(lab, "http://198.18.0.11/", seconds))
    v, d = statistics.median(vip), statistics.median(direct)
    return {"vip_rps": round(v), "direct_rps": round(d), "ratio": round(v / d, 3)}


def single_host_ratio(rounds: int) -> dict[str, float]:
    lab = Lab(name="bv" + uuid.uuid4().hex[:5], hosts=1)
    try:
        lab.up()
        if not C.wait_states(lab, C.converged([1]), 1, 30):
            raise RuntimeError(f"the 1-host lab did not converge: {C.states(lab, 1)}")
        return vip_over_direct(lab, rounds)
    finally:
        lab.down()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true", help="fewer crashes per profile")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--profiles", default=",".join(PROFILES), help="comma-separated")
    ap.add_argument("--tolerance", type=int, default=0, help="loss tolerance (0: the profile's)")
    args = ap.parse_args()
    runs = {"default": 6, "fast": 6, "nlb": 2}
    if not args.quick:
        runs = {"default": 20, "fast": 20, "nlb": 4}
    profiles = [
        profile_runs(p, runs[p], args.seed, args.tolerance) for p in args.profiles.split(",")
    ]
    one = single_host_ratio(3 if args.quick else 5)
    doc = {
        "profiles": profiles,
        "vip_over_direct": one["ratio"],
        "vip_over_direct_detail": one,
    }
    print(json.dumps(doc, indent=1 if args.json else 2))


if __name__ == "__main__":
    main()
