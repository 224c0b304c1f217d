"""Client affinity across convergence with real clients, in a 3-host lab (with IPv6) whose
"app" rule (TCP 8443, affinity single) and "net" rule (TCP 8444, affinity network: a /28 or
/124 of clients) keep a client's host for 3 s of idleness: 40 clients, each from an address
of its own, make a new connection every half second while buckets move (a rule drains, a
host joins, drainstops, changes its weight, crashes). Every connection is answered by the
host that served the client before, no SYN gets two answers, and a client idle for longer
than the timeout goes to its bucket's owner."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest

from shoal.daemon.control import call
from shoal.lab import clients as C
from shoal.lab.topology import Lab
from tests.conftest import needs_root, settle

pytestmark = [needs_root(), pytest.mark.root]

TIMEOUT = 3  # the app rule's affinity_timeout_s
MARGIN = 2  # how much longer a new owner refuses an affine client


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(name="f" + uuid.uuid4().hex[:6], hosts=3, affinity_timeout=TIMEOUT, ipv6=True)
    try:
        lab.up()
        yield settle(lab)
    finally:
        lab.down()


def _hosts(events: list[dict[str, Any]], since: float) -> dict[str, list[tuple[float, str]]]:
    out: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for e in events:
        if e["kind"] == "affine" and e["host"]:
            out[e["src"]].append((e["t"] - since, e["host"]))
    return out


def _run(
    lab: Lab, seconds: float, client: int = 1, port: int = 8443, v6: bool = False
) -> C.Clients:
    clients = C.Clients(lab)
    clients.start(client, seconds, affine=40, port=port, sniff=True, v6=v6)
    return clients


def _checked(clients: C.Clients) -> list[dict[str, Any]]:
    """The clients' events: every connection answered, no SYN answered twice."""
    events = clients.wait(30)
    errors = [e for e in events if e["kind"] == "affine" and e["error"]]
    [synacks] = [e for e in events if e["kind"] == "synacks"]
    assert synacks["synacks"] > 150 and synacks["doubles"] == 0, synacks
    assert not errors, errors[:5]
    return events


def _kept(hosts: dict[str, list[tuple[float, str]]]) -> None:
    """kept_fraction 1.0: every client's connections on one host."""
    moved = {s: {h for _, h in hs} for s, hs in hosts.items() if len({h for _, h in hs}) > 1}
    assert not moved, moved


def _served_by(hosts: dict[str, list[tuple[float, str]]], host: str) -> set[str]:
    """The clients ``host`` served before the event."""
    return {s for s, hs in hosts.items() if any(h == host for tt, h in hs if tt < 0)}


def test_affine_clients_keep_their_host_when_a_rule_drains(lab: Lab) -> None:
    """Host 1 drains the app rule: its buckets go to hosts 2 and 3, and every client it
    served keeps coming to it; after an idle spell longer than the timeout they go to the
    new owners."""
    clients = _run(lab, 8)
    time.sleep(3)
    t = time.time()
    try:
        assert call(lab.control(1), {"cmd": "drain", "port": 8443})["ok"]
        events = _checked(clients)
        hosts = _hosts(events, t)
        on1 = _served_by(hosts, "h1")
        assert len(hosts) == 40 and on1
        _kept(hosts)
        assert all(any(h == "h1" and tt > 2 for tt, h in hosts[s]) for s in on1)
        time.sleep(TIMEOUT + MARGIN + 1)  # every client idle past the timeout
        again = _checked(_run(lab, 3))
        assert not any(h == "h1" for hs in _hosts(again, t).values() for _, h in hs)
    finally:
        clients.kill()
        call(lab.control(1), {"cmd": "enable", "port": 8443})
        settle(lab)


def test_a_joining_host_takes_new_clients_only(lab: Lab) -> None:
    """Host 3 stops (its clients go to the others), then joins again and takes its share of
    buckets: the IPv6 clients of the network-affinity rule active meanwhile keep their
    hosts; new clients (of the app rule: 40 keys, where the net rule's are 4 prefixes)
    reach host 3."""
    assert call(lab.control(3), {"cmd": "stop"})["ok"]
    assert C.wait_states(lab, {1: "converged (default)", 2: "converged", 3: "stopped"}, 1, 10)
    clients = _run(lab, 9, port=8444, v6=True)
    time.sleep(3)
    t = time.time()
    try:
        assert call(lab.control(3), {"cmd": "start"})["ok"]
        assert C.wait_states(lab, C.converged([1, 2, 3]), 1, 10)
        fresh = _run(lab, 3, client=2, v6=True)  # clients never seen before, app rule
        events = _checked(clients)
        hosts = _hosts(events, t)
        assert len(hosts) == 40 and all(":" in s for s in hosts)
        _kept(hosts)
        assert not any(h == "h3" for hs in hosts.values() for _, h in hs)
        new = _hosts(_checked(fresh), t)
        assert any(h == "h3" for hs in new.values() for _, h in hs)
    finally:
        clients.kill()
        settle(lab)


def test_a_drainstopping_host_keeps_its_affine_clients_until_they_are_idle(lab: Lab) -> None:
    """Host 2 drainstops while the clients of the app rule connect: it stays a member,
    draining, and every client it served keeps it; clients it never served do not reach it;
    once all are idle past the timeout it leaves and stops. (The app rule's 40 keys: the net
    rule's 40 clients are 4 prefixes, and host 2 holds none of them one run in five.)"""
    clients = _run(lab, 8)
    time.sleep(3)
    t = time.time()
    try:
        assert call(lab.control(2), {"cmd": "drainstop"})["ok"]
        fresh = _run(lab, 4, client=2)  # clients never seen before
        time.sleep(1)
        assert C.states(lab, 1)[2] == "draining"
        hosts = _hosts(_checked(clients), t)
        on2 = _served_by(hosts, "h2")
        assert len(hosts) == 40 and on2
        _kept(hosts)
        assert all(any(h == "h2" and tt > 2 for tt, h in hosts[s]) for s in on2)
        new = _hosts(_checked(fresh), t)
        assert new and not any(h == "h2" for hs in new.values() for _, h in hs)
        idle = {1: "converged (default)", 2: "stopped", 3: "converged"}
        assert C.wait_states(lab, idle, 1, TIMEOUT + MARGIN + 5), C.states(lab, 1)
    finally:
        clients.kill()
        call(lab.control(2), {"cmd": "start"})
        settle(lab)


def test_a_weight_change_moves_no_affine_client(lab: Lab) -> None:
    """Host 3's load weight for the app rule goes from 50 to 10 (IPv6 clients): buckets
    move to hosts 1 and 2, and every client keeps its host."""
    path = lab.config_path(3)
    before = path.read_text()
    clients = _run(lab, 8, v6=True)
    time.sleep(3)
    t = time.time()
    try:
        path.write_text(before + '\n[[host.rules]]\nrule = "app"\nload_weight = 10\n')
        assert call(lab.control(3), {"cmd": "reload"})["ok"]
        hosts = _hosts(_checked(clients), t)
        assert len(hosts) == 40 and _served_by(hosts, "h3")
        _kept(hosts)
        moved = [e for e in C.daemon_events(lab, 3, t) if e["name"] == "handoff_sent"]
        assert moved and all(e["rule"] == "app" for e in moved), moved
        # params says it too: entries held, handed over by host 3, taken by the others
        mine = {r["rule"]: r for r in call(lab.control(3), {"cmd": "params"})["affinity"]}
        assert mine["app"]["entries"] > 0 and mine["app"]["handed_over"], mine
        assert {r["to"] for r in mine["app"]["handed_over"]} <= {1, 2}
        taken = [
            t["from"]
            for h in (1, 2)
            for r in call(lab.control(h), {"cmd": "params"})["affinity"]
            if r["rule"] == "app"
            for t in r["taken"]
        ]
        assert 3 in taken, taken
    finally:
        clients.kill()
        path.write_text(before)
        call(lab.control(3), {"cmd": "reload"})
        settle(lab)


def test_a_crashed_hosts_affine_clients_go_to_the_owners(lab: Lab) -> None:
    """Host 2's daemon is killed and its port cut: nothing waits for its affinity; its
    clients are answered by the others once the failover is done."""
    clients = _run(lab, 10)
    time.sleep(3)
    try:
        killed = C.crash(lab, 2)
        assert C.wait_states(lab, C.converged([1, 3]), 1, 10)
        time.sleep(5)
        events = clients.wait(30)
    finally:
        clients.kill()
        C.revive(lab, 2)
        settle(lab)
    hosts = _hosts(events, killed)
    on2 = {s for s, hs in hosts.items() if any(h == "h2" for tt, h in hs if tt < 0)}
    assert on2
    for s in on2:
        late = [h for tt, h in hosts[s] if tt > 3]
        assert late and set(late) <= {"h1", "h3"}, (s, hosts[s])
