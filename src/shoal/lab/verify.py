"""``shoal lab verify``: install a random map directly (no daemon) and check every flow.

Flows are real TCP connections and UDP datagrams from random source addresses and ports of
the client namespaces, to every rule kind (multiple with each affinity, single, disabled,
uncovered), IPv4 and, in an IPv6 lab, IPv6. For each flow the host that answered (and every
host that logged accepting it) is compared with :func:`shoal.verdict.decide`.
"""

from __future__ import annotations

import ipaddress
import random
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from shoal.config import ShoalConfig
from shoal.dataplane.contract import RuleState
from shoal.filter import view_of
from shoal.lab.service import FLUSH
from shoal.lab.topology import CLIENTS, Lab, LabError, pyenv, run_module
from shoal.protocol.epoch import EpochState, next_epoch
from shoal.protocol.frames import EpochKey, RuleReport
from shoal.verdict import ClusterView, Outcome, Packet, decide

KINDS = [
    ("tcp", 80),
    ("tcp", 443),
    ("tcp", 22),
    ("tcp", 23),
    ("tcp", 8080),
    ("tcp", 8443),
    ("tcp", 8444),
    ("udp", 53),
    ("udp", 8080),
]


def random_map(cfgs: dict[int, ShoalConfig], rng: random.Random) -> tuple[EpochState, ClusterView]:
    """An epoch for these hosts with random weights, and the reference model's view of it."""
    cl = cfgs[min(cfgs)].cluster
    rules = cl.effective_rules
    reports = {
        h: tuple(
            RuleReport(rng.randint(1, 100), RuleState.ENABLED, c.priority(r.key)) for r in rules
        )
        for h, c in cfgs.items()
    }
    epoch = next_epoch(
        None, EpochKey(1, 1), frozenset(cfgs), frozenset(), (), (), reports, rules, cl.buckets
    )
    return epoch, view_of(epoch, rules)


def install(lab: Lab, host: int, tokens: frozenset[int], lease_ms: int | None = None) -> None:
    """Install these tokens on one host directly (no daemon)."""
    tok = lab.dir / f"h{host}.tokens"
    tok.write_text("\n".join(str(t) for t in sorted(tokens)))
    extra = [str(lease_ms)] if lease_ms is not None else []
    run_module(
        lab.ns(f"h{host}"), "shoal.lab.install", str(lab.config_path(host)), str(tok), *extra
    )


def _accepts(lab: Lab, hosts: Iterable[int]) -> dict[tuple[str, str, int], set[int]]:
    """(protocol, client, port) -> the hosts whose service logged accepting it."""
    accepted: dict[tuple[str, str, int], set[int]] = defaultdict(set)
    for h in hosts:
        for line in (lab.dir / f"h{h}.accepts").read_text().splitlines():
            kind, addr, port = line.split()
            accepted[(kind, str(ipaddress.ip_address(addr)), int(port))].add(h)
    return accepted


def verify(lab: Lab, flows: int, seed: int | None = None) -> dict[str, Any]:
    rng = random.Random(seed)
    cfgs = {h: lab.config(h) for h in range(1, lab.hosts + 1)}
    cl = cfgs[1].cluster
    epoch, view = random_map(cfgs, rng)
    for h in cfgs:
        install(lab, h, epoch.tokens_of(h))
        (lab.dir / f"h{h}.accepts").write_text("")
    # the flows, spread over the clients
    per_client: dict[int, list[tuple[Packet, int]]] = defaultdict(list)
    used: set[tuple[str, int, str]] = set()
    plan: list[Packet] = []
    for i in range(flows):
        k = rng.randint(1, CLIENTS)
        proto, dport = KINDS[i % len(KINDS)]
        v6 = lab.ipv6 and rng.random() < 0.5
        while True:
            src = rng.choice(lab.client_sources(k, v6))
            sport = rng.randint(20000, 60999)
            if (src, sport, proto) not in used:
                used.add((src, sport, proto))
                break
        dst = ipaddress.ip_address("2001:db8::100" if v6 else "198.18.0.100")
        pkt = Packet(ipaddress.ip_address(src), dst, proto, sport, dport)
        plan.append(pkt)
        per_client[k].append((pkt, i))
    answers: dict[int, str] = {}
    procs = []
    for k, items in per_client.items():
        path = lab.dir / f"c{k}.flows"
        path.write_text(
            "".join(f"{p.protocol} {p.src} {p.sport} {p.dst} {p.dport}\n" for p, _ in items)
        )
        procs.append(
            (
                k,
                items,
                subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        lab.ns(f"c{k}"),
                        sys.executable,
                        "-m",
                        "shoal.lab.probe",
                        str(path),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=pyenv(),
                ),
            )
        )
    for k, items, proc in procs:
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise LabError(f"probe in c{k} failed: {err.strip()[-400:]}")
        for line in out.splitlines():
            idx, ans = line.split()
            answers[items[int(idx)][1]] = ans
    # the services log what they accepted in batches: wait until each answered flow is in
    # a log (a double accept of it could still be on its way: give it one more flush)
    answered = {
        (plan[i].protocol, str(plan[i].src), plan[i].sport)
        for i, ans in answers.items()
        if ans.startswith("h")
    }
    deadline = time.monotonic() + 10
    accepted = _accepts(lab, cfgs)
    while not answered <= accepted.keys() and time.monotonic() < deadline:
        time.sleep(0.05)
        accepted = _accepts(lab, cfgs)
    time.sleep(FLUSH + 0.05)
    accepted = _accepts(lab, cfgs)
    mismatches = doubles = unaccepted = 0
    examples: list[dict[str, Any]] = []
    for i, pkt in enumerate(plan):
        d = decide(cl, view, pkt)
        want = d.host if d.outcome is Outcome.OWNER else None
        ans = answers.get(i, "-")
        got = int(ans[1:]) if ans.startswith("h") else None
        takers = accepted.get((pkt.protocol, str(pkt.src), pkt.sport), set())
        if len(takers) > 1:
            doubles += 1
        if want is not None and got is None:
            unaccepted += 1
        if got != want or (want is None and takers):
            mismatches += 1
            if len(examples) < 5:
                examples.append(
                    {
                        "flow": f"{pkt.protocol} {pkt.src}:{pkt.sport} -> {pkt.dst}:{pkt.dport}",
                        "expected": want,
                        "answered": got,
                        "accepted_by": sorted(takers),
                    }
                )
    return {
        "flows": len(plan),
        "mismatches": mismatches,
        "double_accepts": doubles,
        "unaccepted": unaccepted,
        "mode": lab.mode,
        "ipv6": lab.ipv6,
        "dataplane": lab.dataplane,
        "expected_dropped": sum(
            1 for p in plan if decide(cl, view, p).outcome is not Outcome.OWNER
        ),
        "examples": examples,
    }
