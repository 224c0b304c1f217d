"""Client affinity across convergence, measured with real clients in the lab.

``python bench/affinity.py --json [--timeout S] [--affinity single|network] [--family 4|6]``
(root). A 4-host lab (with IPv6) whose "app" rule (TCP 8443, affinity single) and "net"
rule (TCP 8444, affinity network, a /28 or /124 of clients per key) keep a client's host
for ``--timeout`` seconds (30 by default), and the same lab with ``affinity_timeout_s = 0``
beside it; for each affinity and family asked (both of each by default). 300 clients (100
addresses in each of the three client namespaces) each make a new connection every half
second through the VIP; host 4 starts stopped. In turn, 8 s apart:

* ``join``: host 4 starts and takes its share of the buckets;
* ``rule_drain``: host 2 drains the rule (its buckets go to the others);
* ``drainstop``: host 1 drainstops (its buckets go to the others; with a timeout it stays a
  member, every rule draining, while its affine clients are active);
* ``weight``: host 3's load weight for the rule goes from 50 to 10.

Per event, over the 3 s before it and the 5 s after: ``clients_active`` (clients with a
connection in that window), ``clients_kept_host`` (every connection of theirs on one host),
``kept_fraction``, ``double_accepts`` (SYNs two hosts answered, counted on the clients for
the whole run), ``broken_connections`` (connections that failed), ``handoff_ms`` (from the
event to the last host converged again), ``entries_moved`` (the affinity entries handed over
in the epochs the event made: the clients counted by the ``handoff_sent`` events). Last,
``idle``: every client stops for the timeout and 3 s more, then connects once:
``moved_after_idle`` is how many went to another host than before (the owners of their
buckets now).
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections import Counter, defaultdict
from typing import Any

from shoal.daemon.control import call
from shoal.lab import clients as C
from shoal.lab.topology import Lab

EVENTS = ("join", "rule_drain", "drainstop", "weight")
PORTS = {"single": 8443, "network": 8444}
RULES = {8443: "app", 8444: "net"}
GAP = 8.0  # seconds between events
BEFORE, AFTER = 3.0, 5.0  # the window judged around each event


def _weight(lab: Lab, host: int, rule: str, weight: int) -> None:
    path = lab.config_path(host)
    extra = f'\n[[host.rules]]\nrule = "{rule}"\nload_weight = {weight}\n'
    path.write_text(path.read_text() + extra)
    res = call(lab.control(host), {"cmd": "reload"})
    assert res["ok"], res


def _pass(clients: C.Clients, seconds: float) -> None:
    """Let ``seconds`` pass, reading the clients meanwhile (a full pipe stalls them)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        clients.collect()
        time.sleep(0.1)


def _converged_ms(lab: Lab, since: float) -> float | None:
    """From ``since`` to the last host's first convergence after it (within the gap)."""
    firsts = []
    for h in range(1, lab.hosts + 1):
        done = [
            e["at"]
            for e in C.daemon_events(lab, h, since)
            if e["name"] in ("converged", "converged_default") and e["at"] < since + GAP
        ]
        if done:
            firsts.append(min(done))
    return round(1000 * (max(firsts) - since)) if firsts else None


def _moved_entries(lab: Lab, since: float, rule: str) -> int:
    """Affinity entries handed over from ``since`` to the next event."""
    return sum(
        int(e.get("clients", 0))
        for h in range(1, lab.hosts + 1)
        for e in C.daemon_events(lab, h, since)
        if e["name"] == "handoff_sent" and e.get("rule") == rule and e["at"] < since + GAP
    )


def _window(events: list[dict[str, Any]], t: float) -> dict[str, Any]:
    hosts: dict[str, set[str]] = defaultdict(set)
    broken = 0
    for e in events:
        if e["kind"] != "affine" or not t - BEFORE <= e["t"] <= t + AFTER:
            continue
        if e["host"]:
            hosts[e["src"]].add(e["host"])
        else:
            broken += 1
    kept = sum(1 for hs in hosts.values() if len(hs) == 1)
    return {
        "clients_active": len(hosts),
        "clients_kept_host": kept,
        "kept_fraction": round(kept / len(hosts), 4) if hosts else None,
        "broken_connections": broken,
    }


def run(timeout: int, port: int, v6: bool) -> dict[str, Any]:
    lab = Lab(name="b" + uuid.uuid4().hex[:6], hosts=4, affinity_timeout=timeout, ipv6=True)
    rule = RULES[port]
    out: dict[str, Any] = {"affinity_timeout_s": timeout, "events": []}
    try:
        lab.up()
        assert C.wait_states(lab, C.converged([1, 2, 3, 4]), 1, 30)
        assert call(lab.control(4), {"cmd": "stop"})["ok"]
        assert C.wait_states(lab, {**C.converged([1, 2, 3]), 4: "stopped"}, 1, 15)
        clients = C.Clients(lab)
        seconds = GAP * (len(EVENTS) + 1) + 2
        for k in (1, 2, 3):
            clients.start(k, seconds, affine=100, port=port, sniff=True, v6=v6)
        times = {}
        _pass(clients, GAP)
        for name in EVENTS:
            times[name] = time.time()
            if name == "join":
                assert call(lab.control(4), {"cmd": "start"})["ok"]
            elif name == "rule_drain":
                assert call(lab.control(2), {"cmd": "drain", "port": port})["ok"]
            elif name == "drainstop":
                assert call(lab.control(1), {"cmd": "drainstop"})["ok"]
            else:
                _weight(lab, 3, rule, 10)
            _pass(clients, GAP)
        events = clients.wait(seconds + 30)
        kinds: dict[str, int] = defaultdict(int)
        for e in events:
            kinds[e["kind"]] += 1
        out["client_events"] = dict(kinds)
        doubles = sum(int(e["doubles"]) for e in events if e["kind"] == "synacks")
        last: dict[str, str] = {}
        for e in sorted(events, key=lambda e: e["t"]):
            if e["kind"] == "affine" and e["host"]:
                last[e["src"]] = e["host"]
        for name in EVENTS:
            w = _window(events, times[name])
            w |= {"event": name, "double_accepts": doubles,
                  "handoff_ms": _converged_ms(lab, times[name]),
                  "entries_moved": _moved_entries(lab, times[name], rule)}  # fmt: skip
            out["events"].append(w)
        time.sleep(timeout + 3)  # every client idle past the timeout
        again = C.Clients(lab)
        for k in (1, 2, 3):
            again.start(k, 1.5, affine=100, port=port, v6=v6)
        after = again.wait(30)
        moved = len({
            e["src"] for e in after if e["kind"] == "affine" and e["host"]
            and last.get(e["src"]) not in (None, e["host"])
        })  # fmt: skip
        hosts_after: dict[str, int] = defaultdict(int)
        for e in after:
            if e["kind"] == "affine" and e["host"]:
                hosts_after[e["host"]] += 1
        out["idle"] = {"clients": len({e["src"] for e in after if e["kind"] == "affine"}),
                       "moved_after_idle": moved, "hosts_before": dict(Counter(last.values())),
                       "connections_after": dict(hosts_after)}  # fmt: skip
    finally:
        lab.down()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--timeout", type=int, default=30)
    ap.add_argument("--affinity", choices=["single", "network"], action="append")
    ap.add_argument("--family", choices=["4", "6"], action="append")
    args = ap.parse_args()
    runs = []
    for affinity in args.affinity or ["single", "network"]:
        for family in args.family or ["4", "6"]:
            port, v6 = PORTS[affinity], family == "6"
            sticky, plain = run(args.timeout, port, v6), run(0, port, v6)
            runs.append(
                {"affinity": affinity, "family": int(family), "sticky": sticky, "timeout_0": plain}
            )
    doc: dict[str, Any] = {"bench": "affinity", "runs": runs}
    if args.json:
        print(json.dumps(doc))
        return
    for r in runs:
        for key in ("sticky", "timeout_0"):
            for e in r[key]["events"]:
                print(r["affinity"], r["family"], key, e)
            print(r["affinity"], r["family"], key, "idle", r[key].get("idle"))


if __name__ == "__main__":
    main()
