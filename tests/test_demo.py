"""The README's first command, the live demo, as a test: it must end "demo ok"."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shoal.lab.topology import list_namespaces
from tests.conftest import needs_root

pytestmark = [needs_root(), pytest.mark.root]


def test_the_demo_runs_and_checks_what_it_shows() -> None:
    """A 3-host cluster with real clients, a crash and its failover, a rejoin, a web service
    stopped on one host and its health check taking the host out of the web rule, and a
    drainstop: the demo fails on any broken connection of a survivor, a failover over two
    seconds, requests failing outside it and the check's detection, a check that does not
    act, or a draining host taking new requests."""
    before = set(list_namespaces())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), COLUMNS="120")
    res = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "lab", "demo", "--hosts", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "demo ok" in res.stdout and '"failover_ms"' in res.stdout
    assert '"broken_on_survivors": 0' in res.stdout
    assert '"application_failure_detected_ms"' in res.stdout
    left = set(list_namespaces()) - before  # (tests running beside it make their own)
    assert not [n for n in left if n.startswith("shl-demo")], left  # the demo's lab is gone
