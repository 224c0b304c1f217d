"""Cluster adapter set-up changes what each mode needs, and teardown restores the host
exactly as it was (links, addresses, nftables, sysctls)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.config import load_config
from shoal.dataplane.ruleset import tables
from shoal.lab.topology import veth
from tests.conftest import EXAMPLES, example_doc, needs_root, write_private
from tests.nethelp import namespaces, sh

pytestmark = [needs_root(), pytest.mark.root, pytest.mark.beside]


def snapshot(ns: str) -> dict[str, object]:
    return {
        "link": json.loads(sh("ip", "-j", "link", "show", "dev", "eth0", ns=ns))[0]["address"],
        "flags": json.loads(sh("ip", "-j", "link", "show", "dev", "eth0", ns=ns))[0]["flags"],
        "addrs": sorted(
            (a["local"], a["prefixlen"])
            for a in json.loads(sh("ip", "-j", "addr", "show", "dev", "eth0", ns=ns))[0][
                "addr_info"
            ]
            if not a["local"].startswith("fe80")
        ),
        "nft": sh("nft", "list", "ruleset", ns=ns),
        "sysctl": sh(
            "sysctl",
            "-n",
            "net.ipv4.conf.eth0.arp_announce",
            "net.ipv4.conf.all.arp_announce",
            "net.ipv6.conf.eth0.addr_gen_mode",
            ns=ns,
        ),
    }


def run_adapter(ns: str, action: str, config: Path, state: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            "-m",
            "shoal.dataplane.adapter",
            action,
            str(config),
            str(state),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("mode", ["unicast", "multicast", "igmp"])
def test_setup_then_teardown_restores_the_host(tmp_path: Path, mode: str) -> None:
    text = (EXAMPLES / "host1.toml").read_text().replace('mode = "unicast"', f'mode = "{mode}"')
    config = write_private(tmp_path / "h1.toml", text)
    with namespaces("h", "peer") as ns:
        veth("eth0", ns["h"], "eth0", ns["peer"])
        sh("ip", "addr", "add", "198.18.0.11/24", "dev", "eth0", ns=ns["h"])  # already there
        before = snapshot(ns["h"])
        run_adapter(ns["h"], "setup", config, tmp_path / "state.json")
        during = snapshot(ns["h"])
        assert ("198.18.0.100", 32) in during["addrs"]  # type: ignore[operator]
        assert ("2001:db8::100", 128) in during["addrs"]  # type: ignore[operator]
        assert tables(load_config(config).cluster.name).l2 in str(during["nft"])
        assert str(during["sysctl"]).split()[:2] == ["2", "2"]
        if mode == "unicast":
            assert during["link"] == "02:bf:c6:12:00:64"
            assert "egress" in str(during["nft"]) and str(during["sysctl"]).split()[2] == "3"
        else:
            assert during["link"] == before["link"]
            assert "pkttype set host" in str(during["nft"])
        if mode == "multicast":
            assert "ALLMULTI" in during["flags"]  # type: ignore[operator]
        if mode == "igmp":
            assert ("239.255.0.100", 32) in during["addrs"]  # type: ignore[operator]
        run_adapter(ns["h"], "teardown", config, tmp_path / "state.json")
        assert snapshot(ns["h"]) == before


def test_missing_interface_is_named(tmp_path: Path) -> None:
    doc = example_doc()
    text = (EXAMPLES / "host1.toml").read_text()
    text = text.replace('interface = "eth0"', 'interface = "nope0"')
    config = write_private(tmp_path / "h1.toml", text)
    assert doc  # the example parses
    with namespaces("h") as ns:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        res = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns["h"],
                sys.executable,
                "-m",
                "shoal.dataplane.adapter",
                "setup",
                str(config),
                str(tmp_path / "s.json"),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
    assert res.returncode == 1 and "interface 'nope0' does not exist" in res.stderr
