"""Neighbour probes (ARP and IPv6 neighbour solicitation) between two namespaces: an address
some kernel holds answers, one no kernel holds does not, and a link cut silences both."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shoal.lab.topology import veth
from tests.conftest import needs_root, until
from tests.nethelp import HELPER, namespaces, sh

pytestmark = [needs_root(), pytest.mark.root]

PROBE = """
import asyncio, ipaddress, json, sys
from shoal.daemon.neighbour import answers
targets = sys.argv[1:]
async def main():
    return {t: await answers("eth0", ipaddress.ip_address(t)) for t in targets}
print(json.dumps(asyncio.run(main())))
"""


def _probe(ns: str, *targets: str) -> dict[str, bool]:
    env = dict(os.environ, PYTHONPATH=str(HELPER.parent.parent / "src"))
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", PROBE, *targets],
        capture_output=True, text=True, timeout=30, env=env, check=True,
    )  # fmt: skip
    result: dict[str, bool] = json.loads(out.stdout)
    return result


def _tentative(ns: str) -> str:
    return sh("ip", "-6", "addr", "show", "tentative", ns=ns).strip()


def test_probes_tell_a_live_address_from_a_dead_one() -> None:
    with namespaces("a", "b") as ns:
        veth("eth0", ns["a"], "eth0", ns["b"])
        for name, n in (("a", 1), ("b", 2)):
            sh("ip", "addr", "add", f"198.18.7.{n}/24", "dev", "eth0", ns=ns[name])
            sh("ip", "addr", "add", f"2001:db8:7::{n}/64", "dev", "eth0", "nodad", ns=ns[name])
            sh("ip", "link", "set", "eth0", "up", ns=ns[name])
        # a fresh link answers neighbour solicitations once IPv6 is set up on it
        until("IPv6 set up", lambda: not any(_tentative(ns[n]) for n in ("a", "b")))
        live = ("198.18.7.2", "2001:db8:7::2")
        dead = ("198.18.7.3", "2001:db8:7::3")
        assert _probe(ns["a"], *live, *dead) == {
            "198.18.7.2": True, "2001:db8:7::2": True,
            "198.18.7.3": False, "2001:db8:7::3": False,
        }  # fmt: skip
        sh("ip", "link", "set", "eth0", "down", ns=ns["b"])  # b's kernel is gone from the wire
        assert _probe(ns["a"], *live) == dict.fromkeys(live, False)
