"""The clients of a dead host are told at once, in a 4-host lab with real connections: a host
crash resets its clients within a second of the failover and no one else's; a daemon-only
crash (the kernel still serves) resets nothing; connections a live host still holds in the
dead host's buckets are never reset."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import pytest

from shoal.daemon.control import call
from shoal.dataplane.ruleset import tables
from shoal.lab import clients as C
from shoal.lab.topology import Lab, sh
from tests.conftest import needs_root, revived, settle, until
from tests.test_e2e import answers

pytestmark = [needs_root(), pytest.mark.root]

CONNS = 60  # long-lived connections, about 15 a host


SURVIVORS = (1, 2, 4)  # when host 3 is crashed


@pytest.fixture
def lab(settled: Lab) -> Lab:
    return settled


def _hold(lab: Lab) -> tuple[C.Clients, dict[int, str]]:
    """CONNS long-lived connections that wait 30 s for each echo (so a silent black hole
    shows as a timeout long after the failover); where each one landed."""
    clients = C.Clients(lab)
    clients.start(1, 60, long=CONNS, patience=30)
    deadline = time.monotonic() + 10
    opened: dict[int, str] = {}
    while len(opened) < CONNS and time.monotonic() < deadline:
        time.sleep(0.1)
        opened = {e["idx"]: e["host"] for e in clients.collect() if e.get("event") == "open"}
    assert len(opened) == CONNS and set(opened.values()) == {"h1", "h2", "h3", "h4"}, opened
    return clients, opened


def _errors(clients: C.Clients) -> dict[int, dict[str, Any]]:
    return {e["idx"]: e for e in clients.collect() if e["kind"] == "long" and e["error"]}


def _events(
    lab: Lab, since: float, name: str, hosts: tuple[int, ...] = SURVIVORS
) -> list[dict[str, Any]]:
    return [e for h in hosts for e in C.daemon_events(lab, h, since) if e["name"] == name]


def _failover(lab: Lab, since: float) -> float:
    """When the last survivor converged without host 3 (wall time)."""
    done: list[float] = [
        e["at"]
        for e in _events(lab, since, "converged") + _events(lab, since, "converged_default")
        if 3 not in e["members"]
    ]
    assert len(done) >= len(SURVIVORS), done
    return max(done)


def test_a_dead_hosts_clients_are_reset_within_a_second_of_the_failover(lab: Lab) -> None:
    clients, opened = _hold(lab)
    try:
        killed = C.crash(lab, 3)  # the daemon killed and the switch port cut: a dead host
        time.sleep(4)
        errors = _errors(clients)
        failover = _failover(lab, killed)
    finally:
        clients.kill()
        revived(lab, 3)
    on3 = {i for i, h in opened.items() if h == "h3"}
    assert set(errors) == on3, f"broken: {sorted(errors)}, on host 3: {sorted(on3)}"
    late = {i: round(e["t"] - failover, 3) for i, e in errors.items() if e["t"] > failover + 1}
    kinds = {e["error"] for e in errors.values()}
    assert kinds == {"ConnectionResetError"} and not late, (kinds, late)
    told = _events(lab, killed, "dead_host_clients")
    assert len(told) == 3 and all(e["peer"] == 3 and e["reset"] > 0 for e in told), told


def test_a_daemon_only_crash_resets_nothing(lab: Lab) -> None:
    """The kernel of a host whose daemon died keeps serving its connections and answers
    for its address: the new owners of its buckets leave its clients alone. Nor does that
    kernel reset anything itself: it keeps the buckets it was resetting in, but its lease
    ran out and they are others' now (new connections there are answered and stay up)."""
    C.crash(lab, 1)  # the others take host 1's buckets, and reset in them
    assert C.wait_states(lab, C.converged([2, 3, 4]), 2, 10), C.states(lab, 2)
    until("resets in place", lambda: all(_kernel_set(lab, h, "reset_0") for h in (2, 3, 4)))
    revived(lab, 1)  # host 1 takes back as many buckets, not all the same ones
    stale = {h: _kernel_set(lab, h, "reset_0") for h in (2, 3, 4)}
    victim = max(stale, key=lambda h: len(stale[h]))
    assert stale[victim], stale
    others = [h for h in (1, 2, 3, 4) if h != victim]
    clients, opened = _hold(lab)
    try:
        killed = C.crash(lab, victim, cut=False)
        assert C.wait_states(lab, C.converged(others), others[0], 10), C.states(lab, 1)
        time.sleep(1)
        rng = random.Random(5)
        flows = [("tcp", s, p, 80) for s, p in C.targets(lab, 2, stale[victim], 24, rng)]
        got = answers(lab, 2, flows)
        time.sleep(2)
        errors = _errors(clients)
    finally:
        clients.kill()
        revived(lab, victim)
    assert not errors, errors
    assert set(got) <= {f"h{h}" for h in others} and len(got) == len(flows) > 0, got
    assert sum(1 for h in opened.values() if h == f"h{victim}") > 0
    spared = _events(lab, killed, "dead_host_spared", tuple(others))
    address = f"198.18.0.{10 + victim} answers"
    assert len(spared) == 3 and all(address in e["why"] for e in spared), spared
    assert not _events(lab, killed, "dead_host_clients", tuple(others))


def _kernel_set(lab: Lab, host: int, name: str) -> set[int]:
    out = sh(
        "nft", "-j", "list", "set", "inet", tables(lab.cluster).inet, name, ns=lab.ns(f"h{host}")
    )
    items = [x["set"] for x in json.loads(out)["nftables"] if "set" in x]
    return {e for e in items[0].get("elem", []) if isinstance(e, int)}


def test_connections_a_live_host_still_holds_are_never_reset(lab: Lab) -> None:
    """Host 1 drains the web rule: its buckets go to the others and its connections stay.
    Host 3 then dies and hosts 2 and 4 take its buckets, among them buckets where host 1
    still serves connections: they ask, host 1 answers, and those buckets are left alone
    (resetting every bucket taken over broke some of host 1's connections)."""
    clients, opened = _hold(lab)
    try:
        res = call(lab.control(1), {"cmd": "drain", "port": 80})
        assert res["ok"], res
        time.sleep(1.5)
        killed = C.crash(lab, 3)
        time.sleep(4)
        errors = _errors(clients)
    finally:
        clients.kill()
        call(lab.control(1), {"cmd": "enable", "port": 80})
        revived(lab, 3)
        settle(lab)
    on3 = {i for i, h in opened.items() if h == "h3"}
    assert set(errors) == on3, f"broken: {sorted(errors)}, on host 3: {sorted(on3)}"
    told = [e for e in _events(lab, killed, "dead_host_clients") if e["host"] != 1]
    assert len(told) == 2, told
    assert sum(e["reset"] for e in told) < sum(e["buckets"] for e in told), told  # kept some
