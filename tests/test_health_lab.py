"""Health checks end to end, in a 3-host lab with real daemons and real servers (Debian's
nginx on every host, the lab's own service): each kind of check takes its rule out of
service when the application fails and puts it back when it recovers; a hung server is cut
at the timeout while heartbeats go on; a flapping check is damped; and both policies for a
rule every host fails."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal.daemon.control import call
from shoal.lab import clients as C
from shoal.lab import nginx
from shoal.lab.topology import Lab
from tests.conftest import converged_lab, needs_root, until

pytestmark = [needs_root(), pytest.mark.root]

ALL = [1, 2, 3]
RULE = {"web": 0, "dns": 1}
FAST = {"interval_ms": 200, "timeout_ms": 150, "rise": 2, "fall": 2}
ORIGINALS: dict[int, str] = {}  # each host's file as the lab made it


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    for lab in converged_lab("k", 3):
        for h in ALL:
            nginx.start(lab, h)
        ORIGINALS.update({h: lab.config_path(h).read_text() for h in ALL})
        yield lab


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def configure(
    lab: Lab, host: int, checks: list[dict[str, Any]], edit: Callable[[str], str] = str
) -> None:
    """Host ``host``'s file as the lab made it (``edit``ed), with these checks; reloaded."""
    text = edit(ORIGINALS[host])
    for c in checks:
        text += "\n[[host.checks]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in c.items())
    lab.config_path(host).write_text(text)
    resp = call(lab.control(host), {"cmd": "reload"})
    assert resp["ok"], resp


@pytest.fixture
def settled(lab: Lab) -> Iterator[Lab]:
    """A converged lab with no checks, every server answering; and so again afterwards."""
    yield lab
    for h in ALL:
        nginx.failing(lab, h, False)
        if f"nginx-h{h}" not in lab.pids:
            nginx.start(lab, h)
        configure(lab, h, [])
    assert C.wait_states(lab, C.converged(ALL), 1, 30), C.states(lab, 1)


def share(lab: Lab, host: int, rule: str) -> int:
    return len(C.owned_buckets(lab, host, RULE[rule]))


def health_seen_by(lab: Lab, viewer: int, host: int) -> dict[str, str]:
    hosts = call(lab.control(viewer), {"cmd": "query"})["hosts"]
    return next(h["health"] for h in hosts if h["host_id"] == host)


def check_doc(lab: Lab, host: int) -> dict[str, Any]:
    [doc] = call(lab.control(host), {"cmd": "params"})["checks"]
    assert isinstance(doc, dict)
    return doc


def _service_paused(lab: Lab, paused: bool) -> None:
    os.killpg(lab.pids["service-h2"], signal.SIGSTOP if paused else signal.SIGCONT)


def _marker(lab: Lab) -> Path:
    return lab.dir / "h2.broken"


KINDS: dict[str, tuple[str, dict[str, Any], Callable[[Lab, bool], None]]] = {
    # kind: (rule, check, break or mend the application on host 2)
    "tcp": ("web", {"kind": "tcp", "port": nginx.HTTP_PORT},
            lambda lab, bad: nginx.stop(lab, 2) if bad else nginx.start(lab, 2)),
    "http": ("web", {"kind": "http", "port": nginx.HTTP_PORT, "expect_body": "h2"},
             lambda lab, bad: nginx.failing(lab, 2, bad)),
    "https": ("web", {"kind": "https", "port": nginx.HTTPS_PORT, "expect_status": 200},
              lambda lab, bad: nginx.failing(lab, 2, bad)),
    "udp": ("dns", {"kind": "udp", "send": "health?", "expect": "h2"}, _service_paused),
    "command": ("web", {"kind": "command", "command": ["/usr/bin/test", "!", "-e", "MARKER"]},
                lambda lab, bad: _marker(lab).touch() if bad else _marker(lab).unlink()),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_of_check_takes_its_rule_out_and_back(settled: Lab, kind: str) -> None:
    """Host 2's application fails: its check fails ``fall`` times, host 2 gives up its
    share of the rule (and only that rule), and host 1's query shows it failing; the
    application recovers: host 2 takes its share again."""
    lab = settled
    rule, spec, breaks = KINDS[kind]
    spec = {k: (str(_marker(lab)) if v == "MARKER" else v) for k, v in spec.items()}
    if kind == "command":
        spec["command"] = [str(_marker(lab)) if a == "MARKER" else a for a in spec["command"]]
    configure(lab, 2, [{"rule": rule, **spec, **FAST}])
    other = "dns" if rule == "web" else "web"
    until("host 2's check passes", lambda: check_doc(lab, 2)["successes"] >= 2)
    assert share(lab, 2, rule) > 0 and health_seen_by(lab, 1, 2) == {rule: "ok"}
    before_other = share(lab, 2, other)
    breaks(lab, True)
    try:
        until(f"host 2 gives its {rule} share up", lambda: share(lab, 2, rule) == 0)
        assert health_seen_by(lab, 1, 2) == {rule: "failing"}
        assert share(lab, 2, other) == before_other  # the other rule is untouched
        assert C.wait_states(lab, C.converged(ALL), 1, 10), C.states(lab, 1)  # a member still
    finally:
        breaks(lab, False)
    until(f"host 2 takes its {rule} share again", lambda: share(lab, 2, rule) > 0)
    until("host 1 sees host 2 healthy", lambda: health_seen_by(lab, 1, 2) == {rule: "ok"})


def test_a_hung_server_is_cut_at_the_timeout_and_heartbeats_go_on(settled: Lab) -> None:
    """Host 2's nginx is frozen (connections accepted by the kernel, never answered): each
    check is cut at 150 ms and counts as a failure, the web share moves, and host 2 stays a
    converged member all along (no heartbeat was late enough to evict it)."""
    lab = settled
    configure(lab, 2, [{"rule": "web", "kind": "http", "port": nginx.HTTP_PORT, **FAST}])
    until("host 2's check passes", lambda: check_doc(lab, 2)["successes"] >= 2)
    since = time.time()
    nginx.pause(lab, 2)
    try:
        until("host 2 gives its web share up", lambda: share(lab, 2, "web") == 0)
        doc = check_doc(lab, 2)
        assert doc["last_detail"] == "no answer within 150 ms", doc
        assert doc["last_latency_ms"] < 400, doc  # cut at the timeout, not waited out
        time.sleep(1.0)
    finally:
        nginx.pause(lab, 2, False)
    until("host 2 takes its web share again", lambda: share(lab, 2, "web") > 0)
    left = [
        e for h in (1, 3) for e in C.daemon_events(lab, h, since) if e.get("name") == "host_left"
    ]
    assert left == []


def test_a_flapping_check_is_damped(settled: Lab) -> None:
    """A command check (every 100 ms, rise 1, fall 1, at most 1 return per 4 s) whose
    answer flips every 250 ms for 8 s: the check sees it flip dozens of times, host 2's
    verdict changes at most 3 times in any 4 s, and the leader creates no more epochs than
    that allows."""
    lab = settled
    marker = _marker(lab)
    configure(lab, 2, [{"rule": "web", "kind": "command",
                        "command": ["/usr/bin/test", "!", "-e", str(marker)],
                        "interval_ms": 100, "timeout_ms": 80, "rise": 1, "fall": 1,
                        "flap_limit": 1, "flap_window_s": 4}])  # fmt: skip
    until("host 2's check passes", lambda: check_doc(lab, 2)["successes"] >= 2)
    since = time.time()
    stop = threading.Event()

    def flip() -> None:
        for i in range(32):  # 8 s at most, then it stops by itself
            if stop.wait(0.25):
                break
            if i % 2 == 0:
                marker.touch()
            else:
                marker.unlink(missing_ok=True)
        marker.unlink(missing_ok=True)

    flipper = threading.Thread(target=flip)
    flipper.start()
    flipper.join(20)
    stop.set()
    doc = check_doc(lab, 2)
    assert doc["failures"] >= 20 and doc["successes"] >= 20, doc  # it did flap
    changes = [
        e["at"] for e in C.daemon_events(lab, 2, since)
        if e.get("name") in ("health_failed", "health_recovered")
    ]  # fmt: skip
    most = max((sum(1 for u in changes if t <= u < t + 4) for t in changes), default=0)
    assert 1 <= most <= 3, changes
    epochs = [e for e in C.daemon_events(lab, 1, since) if e.get("name") == "epoch_created"]
    assert len(epochs) <= len(changes) + 1, (epochs, changes)


def _policy(policy: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        marked = 'name = "web"\nstart = 80\nend = 443\nprotocol = "tcp"\n'
        assert marked in text
        return text.replace(marked, marked + f'all_unhealthy = "{policy}"\n', 1)

    return edit


@pytest.mark.parametrize(("policy", "serving"), [("serve", ALL), ("drop", [])])
def test_when_every_host_fails_the_rules_policy_decides(
    settled: Lab, policy: str, serving: list[int]
) -> None:
    """Every host's web check fails (nginx answers 500 everywhere). With "serve" each host
    keeps its web share (failing everywhere more likely means the check is wrong than that
    every server is); with "drop" no host takes a new web connection. dns is untouched."""
    lab = settled
    for h in ALL:
        check = {"rule": "web", "kind": "http", "port": nginx.HTTP_PORT, **FAST}
        configure(lab, h, [check], _policy(policy))
    assert C.wait_states(lab, C.converged(ALL), 1, 30), C.states(lab, 1)
    until("every check passes", lambda: all(check_doc(lab, h)["successes"] >= 2 for h in ALL))
    for h in ALL:
        nginx.failing(lab, h, True)
    until(
        "every host reports web failing",
        lambda: all(health_seen_by(lab, 1, h) == {"web": "failing"} for h in ALL),
    )
    time.sleep(1.0)  # and the cluster converged on it
    assert C.wait_states(lab, C.converged(ALL), 1, 30), C.states(lab, 1)
    assert [h for h in ALL if share(lab, h, "web") > 0] == serving
    assert all(share(lab, h, "dns") > 0 for h in ALL)
