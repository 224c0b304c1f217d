"""The lab and the nftables data plane in real namespaces: kernel verdicts against the
reference for every cluster mode, labs side by side, clean teardown."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from shoal.lab.topology import STATE, Lab, LabError, list_namespaces
from shoal.lab.verify import install, verify
from tests.conftest import needs_root

pytestmark = [needs_root(), pytest.mark.root, pytest.mark.beside]


def _name() -> str:
    return "t" + uuid.uuid4().hex[:6]


@pytest.fixture
def lab_factory() -> Iterator[list[Lab]]:
    labs: list[Lab] = []
    yield labs
    for lab in labs:
        lab.down()


def _up(labs: list[Lab], **kw: object) -> Lab:
    kw.setdefault("daemons", False)  # a bare lab: the tests install maps themselves
    lab = Lab(name=_name(), **kw)  # type: ignore[arg-type]
    labs.append(lab)
    lab.up()
    return lab


@pytest.mark.parametrize("dataplane", ["nftables", "xdp"])
@pytest.mark.parametrize("mode", ["unicast", "multicast", "igmp"])
def test_verify_matches_reference(lab_factory: list[Lab], mode: str, dataplane: str) -> None:
    """Each host's kernel decides every flow as the reference does, with either data plane:
    2000 flows, about half of them IPv4 and half IPv6."""
    lab = _up(lab_factory, hosts=3, mode=mode, ipv6=True, dataplane=dataplane)
    result = verify(lab, flows=2000, seed=11)
    assert result["flows"] == 2000
    assert (result["mismatches"], result["double_accepts"], result["unaccepted"]) == (0, 0, 0), (
        result["examples"]
    )
    # the run exercised dropping rules too (disabled port, and none of it was accepted)
    assert result["expected_dropped"] > 100


def test_two_labs_side_by_side_and_clean_teardown(lab_factory: list[Lab]) -> None:
    a = _up(lab_factory, hosts=2)
    b = _up(lab_factory, hosts=3, mode="multicast")
    names = set(list_namespaces())
    assert {a.ns("h1"), a.ns("sw"), b.ns("h3"), b.ns("c3")} <= names
    for lab in (a, b):
        assert all(p["alive"] and p["pid"] > 1 for p in lab.status()["processes"].values())
    a.down()
    a.down()  # idempotent
    left = set(list_namespaces())
    assert not any(n.startswith(f"shl-{a.name}-") for n in left)
    assert b.ns("h1") in left  # the other lab is untouched
    assert not (STATE / a.name).exists()


def test_existing_lab_is_refused_and_untouched(lab_factory: list[Lab]) -> None:
    lab = _up(lab_factory, hosts=1)
    with pytest.raises(LabError, match="exists"):
        Lab(name=lab.name, hosts=2, daemons=False).up()
    assert lab.ns("h1") in list_namespaces() and lab.status()["processes"]["service-h1"]["alive"]


def test_bad_arguments_are_named() -> None:
    with pytest.raises(LabError, match="lab name 'Bad_Name'"):
        Lab(name="Bad_Name").up()
    with pytest.raises(LabError, match="--hosts 0"):
        Lab(name=_name(), hosts=0).up()


def test_cli_up_exec_status_down() -> None:
    name = _name()
    shoal = [sys.executable, "-m", "shoal.cli"]
    try:
        up = subprocess.run(
            [*shoal, "lab", "up", "--name", name, "--hosts", "2"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert up.returncode == 0, up.stderr
        check = subprocess.run(
            [*shoal, "lab", "verify", name, "--flows", "60", "--json"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert check.returncode == 0 and json.loads(check.stdout)["mismatches"] == 0
        # the map verify left installed sends uncovered ports to the default host, h1
        out = subprocess.run(
            [
                *shoal,
                "lab",
                "exec",
                name,
                "c1",
                "--",
                "python3",
                "-c",
                "import socket; s=socket.create_connection(('198.18.0.100', 8080),"
                " 3); print(s.recv(16).decode().strip())",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.stdout.strip() == "h1", out.stderr
        status = json.loads(
            subprocess.run(
                [*shoal, "lab", "status", name], capture_output=True, text=True, timeout=30
            ).stdout
        )
        assert status["hosts"] == ["h1", "h2"] and all(status["namespaces"].values())
    finally:
        down = subprocess.run(
            [*shoal, "lab", "down", name], capture_output=True, text=True, timeout=60
        )
    assert down.returncode == 0
    assert not any(n.startswith(f"shl-{name}-") for n in list_namespaces())


def _install(lab: Lab, tokens: dict[int, frozenset[int]], order: list[int]) -> None:
    for h in order:
        install(lab, h, tokens[h])


def _hold(lab: Lab, sources: list[str]) -> subprocess.Popen[str]:
    """Connections held by the conn tool in client 1, one per source."""
    from tests.nethelp import HELPER

    return subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            lab.ns("c1"),
            sys.executable,
            str(HELPER.with_name("conn_tool.py")),
            "198.18.0.100",
            "80",
            *sources,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_established_connections_survive_their_bucket_moving(lab_factory: list[Lab]) -> None:
    from shoal.bucket_map import rebalance
    from shoal.dataplane.contract import RuleState
    from shoal.protocol.epoch import next_epoch
    from shoal.protocol.frames import EpochKey, RuleReport

    lab = _up(lab_factory, hosts=3)
    cfg = lab.config(1)
    rules = cfg.cluster.effective_rules
    reports = {h: tuple(RuleReport(50, RuleState.ENABLED, h) for _ in rules) for h in (1, 2, 3)}
    before = next_epoch(
        None,
        EpochKey(1, 1),
        frozenset({1, 2, 3}),
        frozenset(),
        (),
        (),
        reports,
        rules,
        cfg.cluster.buckets,
    )
    _install(lab, {h: before.tokens_of(h) for h in (1, 2, 3)}, [1, 2, 3])
    sources = lab.client_sources(1, False)[:40]
    tool = _hold(lab, sources)
    assert tool.stdout is not None and tool.stdin is not None
    first: dict[int, str] = {}
    for line in tool.stdout:
        if line.strip() == "ready":
            break
        i, host = line.split()
        first[int(i)] = host
    assert len(first) == 40 and "h1" in first.values()
    # all of host 1's web buckets go to the others: release on h1 first, then acquire
    web = [r.key for r in rules].index("web")
    old = before.maps[web]
    assert old is not None
    moved = rebalance(list(old), {1: 0, 2: 50, 3: 50}, cfg.cluster.buckets)
    maps = tuple(tuple(moved) if i == web else m for i, m in enumerate(before.maps))
    after = dataclasses.replace(before, maps=maps)
    _install(lab, {h: after.tokens_of(h) for h in (1, 2, 3)}, [1, 2, 3])
    tool.stdin.write("go\n")
    tool.stdin.flush()
    out, err = tool.communicate(timeout=60)
    results = dict(line.split() for line in out.splitlines())
    assert list(results.values()).count("ok") == 40, (results, err)
    # new connections from the sources h1 served now land elsewhere
    again = _hold(lab, [sources[i] for i, h in first.items() if h == "h1"])
    out, _ = again.communicate("go\n", timeout=60)
    hosts = [
        ln.split()[1]
        for ln in out.splitlines()
        if len(ln.split()) == 2 and ln.split()[1].startswith("h")
    ]
    assert hosts and "h1" not in hosts
