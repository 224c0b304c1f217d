"""Client affinity across convergence with real clients, in a 3-host lab whose "app" rule
(TCP 8443, affinity single) keeps a client's host for 5 s of idleness: 40 clients, each
from an address of its own, make a new connection every half second while buckets move.
Every connection is answered by the host that served the client before, no SYN gets two
answers, and a client idle for longer than the timeout goes to its bucket's owner."""

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

TIMEOUT = 5  # the app rule's affinity_timeout_s
MARGIN = 2  # how much longer a new owner refuses an affine client


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(name="f" + uuid.uuid4().hex[:6], hosts=3, affinity_timeout=TIMEOUT)
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


def _run(lab: Lab, seconds: float, client: int = 1) -> C.Clients:
    clients = C.Clients(lab)
    clients.start(client, seconds, affine=40, port=8443, sniff=True)
    return clients


def _checked(clients: C.Clients) -> list[dict[str, Any]]:
    events = clients.wait(30)
    errors = [e for e in events if e["kind"] == "affine" and e["error"]]
    [synacks] = [e for e in events if e["kind"] == "synacks"]
    assert synacks["synacks"] > 200 and synacks["doubles"] == 0, synacks
    assert not errors, errors[:5]
    return events


def test_affine_clients_keep_their_host_when_a_rule_drains(lab: Lab) -> None:
    """Host 1 drains the app rule: its buckets go to hosts 2 and 3, and every client it
    served keeps coming to it; after an idle spell longer than the timeout they go to the
    new owners."""
    clients = _run(lab, 10)
    time.sleep(3)
    t = time.time()
    try:
        assert call(lab.control(1), {"cmd": "drain", "port": 8443})["ok"]
        events = _checked(clients)
        hosts = _hosts(events, t)
        on1 = {s for s, hs in hosts.items() if any(h == "h1" for tt, h in hs if tt < 0)}
        assert len(hosts) == 40 and on1
        moved = {s: {h for _, h in hs} for s, hs in hosts.items() if len({h for _, h in hs}) > 1}
        assert not moved, moved  # kept_fraction 1.0
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
    buckets: the clients active meanwhile keep their hosts; new clients reach host 3."""
    assert call(lab.control(3), {"cmd": "stop"})["ok"]
    assert C.wait_states(lab, {1: "converged (default)", 2: "converged", 3: "stopped"}, 1, 10)
    clients = _run(lab, 9)
    time.sleep(3)
    t = time.time()
    try:
        assert call(lab.control(3), {"cmd": "start"})["ok"]
        assert C.wait_states(lab, C.converged([1, 2, 3]), 1, 10)
        fresh = _run(lab, 3, client=2)  # clients never seen before
        events = _checked(clients)
        hosts = _hosts(events, t)
        assert not [s for s, hs in hosts.items() if len({h for _, h in hs}) > 1]
        assert not any(h == "h3" for hs in hosts.values() for _, h in hs)
        new = _hosts(_checked(fresh), t)
        assert any(h == "h3" for hs in new.values() for _, h in hs)
    finally:
        clients.kill()
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
