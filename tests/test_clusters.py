"""Two clusters on the same two hosts, as NLB runs one cluster per adapter: each with its
own VIP, interface, key, nftables tables, control socket and state; a crash of one
cluster's daemon leaves the other untouched."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shoal.cluster_mac import ClusterMode
from shoal.config import load_config
from shoal.daemon.control import call
from shoal.dataplane.ruleset import tables
from shoal.init import Answers, write
from tests.conftest import needs_root, until
from tests.nethelp import namespaces, sh

pytestmark = [needs_root(), pytest.mark.root]

CLUSTERS = {"alpha": ("eth0", 0), "beta": ("eth1", 1)}  # name: (interface, third octet)
HOSTS = (1, 2)


def _configs(tmp: Path) -> dict[str, Path]:
    """Each cluster's files from ``shoal init``, one directory per cluster."""
    out = {}
    for name, (dev, net) in CLUSTERS.items():
        answers = Answers(
            name=name, vips=[ipaddress.ip_address(f"198.18.{net}.100")], hosts=len(HOSTS),
            interface=dev, mode=ClusterMode.UNICAST, preset="web",
            addresses=[f"198.18.{net}.{10 + h}/24" for h in HOSTS],
        )  # fmt: skip
        write(answers, tmp / name)
        for h in HOSTS:  # no web server runs here: no check
            path = tmp / name / f"host{h}.toml"
            path.write_text(path.read_text().split("[[host.checks]]")[0])
        out[name] = tmp / name
    return out


@dataclass
class Two:
    ns: dict[str, str]
    daemons: dict[tuple[str, int], subprocess.Popen[bytes]]
    tmp: Path


@pytest.fixture
def two(tmp_path: Path) -> Iterator[Two]:
    dirs = _configs(tmp_path)
    with namespaces("sw", "h1", "h2") as ns:
        for dev, net in CLUSTERS.values():
            bridge = f"br{net}"
            sh("ip", "link", "add", bridge, "type", "bridge", ns=ns["sw"])
            sh("ip", "link", "set", bridge, "up", ns=ns["sw"])
            for h in HOSTS:
                port = f"p{net}{h}"
                sh("ip", "link", "add", port, "netns", ns["sw"], "type", "veth", "peer", dev,
                   "netns", ns[f"h{h}"])  # fmt: skip
                sh("ip", "link", "set", port, "master", bridge, "up", ns=ns["sw"])
                sh("ip", "link", "set", dev, "up", ns=ns[f"h{h}"])
        daemons: dict[tuple[str, int], subprocess.Popen[bytes]] = {}
        try:
            for name, d in dirs.items():
                for h in HOSTS:
                    daemons[(name, h)] = subprocess.Popen(
                        ["ip", "netns", "exec", ns[f"h{h}"], sys.executable, "-m", "shoal.cli",
                         "daemon", "--config", str(d / f"host{h}.toml"),
                         "--control", str(d / f"h{h}.sock"), "--state-dir", str(d / f"state{h}")],
                        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
                        stdout=subprocess.DEVNULL, stderr=(d / f"h{h}.log").open("ab"),
                        start_new_session=True,
                    )  # fmt: skip
            yield Two(ns, daemons, tmp_path)
        finally:
            for p in daemons.values():
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
            for p in daemons.values():
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=15)


def _query(tmp: Path, name: str, h: int) -> dict[str, Any]:
    try:
        return call(tmp / name / f"h{h}.sock", {"cmd": "query"}, timeout=2)
    except (OSError, ValueError):
        return {}


def _states(tmp: Path, name: str, h: int) -> dict[int, str]:
    return {x["host_id"]: x["state"] for x in _query(tmp, name, h).get("hosts", [])}


def test_two_clusters_share_two_hosts_and_a_crash_stays_in_its_cluster(two: Two) -> None:
    """alpha (eth0, 198.18.0.100) and beta (eth1, 198.18.1.100), both made by ``shoal
    init``, converge side by side, each in tables of its own; alpha's daemon on host 2 is
    killed: alpha goes on with host 1 alone, and beta neither converges again nor changes a
    bucket."""
    ns, daemons, tmp = two.ns, two.daemons, two.tmp
    both = {1: "converged (default)", 2: "converged"}
    for name in CLUSTERS:

        def converged(n: str = name) -> bool:
            return _states(tmp, n, 1) == both

        until(f"{name} converges", converged)
    names = {n: tables(load_config(tmp / n / "host1.toml").cluster.name) for n in CLUSTERS}
    listed = sh("nft", "list", "tables", ns=ns["h1"])
    for t in names.values():
        for table in t:
            assert table in listed, (table, listed)
    assert len({t.inet for t in names.values()}) == 2
    beta_before = _query(tmp, "beta", 1)["epoch"]
    beta_owned = ("nft", "-j", "list", "set", "netdev", names["beta"].pre, "owned_0")
    owned_before = sh(*beta_owned, ns=ns["h1"])
    os.killpg(daemons[("alpha", 2)].pid, signal.SIGKILL)
    daemons[("alpha", 2)].wait(timeout=15)
    alone = {1: "converged (default)"}
    until("alpha goes on without host 2", lambda: _states(tmp, "alpha", 1) == alone)
    assert _states(tmp, "beta", 1) == both and _states(tmp, "beta", 2) == both
    assert _query(tmp, "beta", 1)["epoch"] == beta_before  # beta never converged again
    assert json.loads(sh(*beta_owned, ns=ns["h1"])) == json.loads(owned_before)
