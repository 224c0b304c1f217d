"""The daemon's control protocol and its wiring to the kernel, without root: a real
``Daemon`` around a real engine and runtime, with a recording backend and socket in place of
nftables and AF_PACKET."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal.config import ShoalConfig
from shoal.daemon.shell import Daemon
from shoal.dataplane.contract import Install, RuleCounters, RuleState
from shoal.protocol.frames import HostState
from tests.conftest import EXAMPLES


class RecordingBackend:
    """The data-plane contract, remembering what it was asked."""

    def __init__(self, cfg: ShoalConfig) -> None:
        self.cfg = cfg
        self.installs: list[Install] = []
        self.renewals: list[int] = []
        self.removed = False

    def attach(self) -> None:
        pass

    def apply(self, inst: Install) -> None:
        self.installs.append(inst)

    def renew(self, ms: int) -> None:
        self.renewals.append(ms)

    def counters(self) -> list[RuleCounters]:
        return [RuleCounters(r.key, 0, 0, 0) for r in self.cfg.cluster.effective_rules]

    def remove(self) -> None:
        self.removed = True


class RecordingSocket:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, frame: bytes, address: object) -> None:
        self.sent.append(frame)

    def recv(self, size: int) -> bytes:
        raise BlockingIOError


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    config = tmp_path / "host1.toml"
    config.write_text((EXAMPLES / "host1.toml").read_text())
    d = Daemon(
        config,
        tmp_path / "control.sock",
        tmp_path / "state",
        setup_adapter=False,
        backend_factory=RecordingBackend,
    )
    d.loop = asyncio.new_event_loop()
    d.sock = RecordingSocket()  # type: ignore[assignment]
    d.dest = b"\xff" * 6
    try:
        yield d
    finally:
        d.loop.close()


def backend(d: Daemon) -> RecordingBackend:
    b = d.backend
    assert isinstance(b, RecordingBackend)
    return b


def run(d: Daemon, seconds: float) -> None:
    """Let the daemon's engine step on its own clock, as the event loop would."""
    end = d.now() + seconds
    while d.now() < end:
        d.on_timer()


def test_a_verb_reaches_the_kernel_and_the_wire(daemon: Daemon) -> None:
    """disable: the next install says the rule is off, a heartbeat went out after it."""
    run(daemon, 0.6)  # alone, the host forms a cluster after the detection time
    assert daemon.engine.state is HostState.CONVERGED
    sent = len(daemon.sock.sent)  # type: ignore[attr-defined]
    resp = daemon.handle({"cmd": "disable", "port": "80"})
    assert resp == {"ok": True, "message": "rule web: disabled"}
    assert backend(daemon).installs[-1].rule_states[0] is RuleState.DISABLED
    assert len(daemon.sock.sent) > sent  # type: ignore[attr-defined]
    assert backend(daemon).renewals  # the kernel lease was set


@pytest.mark.parametrize(
    ("req", "error"),
    [
        ({"cmd": "drainstop", "timeout": math.nan}, "timeout: nan is not a number of seconds"),
        ({"cmd": "drainstop", "timeout": math.inf}, "timeout: inf is not a number of seconds"),
        ({"cmd": "drainstop", "timeout": True}, "timeout: True is not a number of seconds"),
        ({"cmd": "drainstop", "timeout": -1}, "timeout: -1 is not a number of seconds"),
        ({"cmd": "disable", "port": "80", "vip": "not-an-ip"}, "vip: 'not-an-ip' is not an IP"),
        ({"cmd": "disable", "port": "all", "vip": "198.18.9.9"}, "vip: 198.18.9.9 is not a VIP"),
        ({"cmd": "drain", "port": "eighty"}, "port: 'eighty' is neither a port number nor"),
        ({"cmd": "frobnicate"}, "cmd: unknown command 'frobnicate'"),
    ],
)
def test_bad_requests_are_refused_by_name_and_change_nothing(
    daemon: Daemon, req: dict[str, Any], error: str
) -> None:
    run(daemon, 0.6)
    installs = len(backend(daemon).installs)
    state = daemon.engine.state
    resp = daemon.handle(req)
    assert not resp["ok"] and error in resp["error"], resp
    assert daemon.engine.state is state and len(backend(daemon).installs) == installs


def test_all_rules_on_one_vip(daemon: Daemon) -> None:
    """``drain all --vip V`` drains the rules that cover V, and only them."""
    run(daemon, 0.6)
    rules = daemon.cfg.cluster.effective_rules
    vip = str(daemon.cfg.cluster.primary_vip)
    resp = daemon.handle({"cmd": "drain", "port": "all", "vip": vip})
    assert resp["ok"], resp
    states = backend(daemon).installs[-1].rule_states
    for rule, st in zip(rules, states, strict=True):
        covers = rule.vip == "all" or str(rule.vip) == vip
        assert (st is RuleState.DRAINING) is covers


def test_query_params_and_display(daemon: Daemon) -> None:
    run(daemon, 0.6)
    q = daemon.handle({"cmd": "query"})
    assert q["hosts"] == [
        {
            "host_id": 1,
            "state": "converged (default)",
            "dedicated_ip": q["hosts"][0]["dedicated_ip"],
            "this_host": True,
        }
    ]
    p = daemon.handle({"cmd": "params"})
    assert p["state"] == "converged (default)" and p["leader"] == 1
    assert p["owned_tokens"] > 0 and 0 < p["lease_left_ms"] <= p["lease_ms"]
    assert set(p["reads"]) == {"wakeups", "batches"}
    shown = daemon.handle({"cmd": "display"})
    assert shown["ok"] and any("converged as default host" in e["text"] for e in shown["events"])
    json.dumps(p), json.dumps(shown)  # what the socket sends


def test_reload_refuses_a_new_host_id_and_a_bad_file(daemon: Daemon) -> None:
    run(daemon, 0.6)
    good = daemon.config_path.read_text()
    daemon.config_path.write_text(good.replace("host_id = 1", "host_id = 5"))
    resp = daemon.reload()
    assert not resp["ok"] and "host.host_id and the interface need a restart" in resp["error"]
    daemon.config_path.write_text(good.replace("load_weight = 50", "load_weight = 101"))
    resp = daemon.reload()
    assert not resp["ok"] and "load_weight" in resp["error"]
    assert resp["kept"] == "running configuration" and daemon.engine.me == 1
    daemon.config_path.write_text(good)
    assert daemon.reload() == {"ok": True, "message": "host parameters applied"}
