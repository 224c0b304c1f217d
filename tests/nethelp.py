"""Throw-away network namespaces for kernel tests: per-run prefix, torn down on any exit."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shoal.lab.topology import sh

__all__ = ["HELPER", "namespaces", "python_in", "sh"]

HELPER = Path(__file__).with_name("packet_tool.py")


@contextmanager
def namespaces(*names: str) -> Iterator[dict[str, str]]:
    """Create namespaces named ``<prefix>-<name>``; delete them however the block ends."""
    prefix = f"sht{os.getpid() % 10000}{uuid.uuid4().hex[:4]}"
    made: list[str] = []
    try:
        out = {}
        for n in names:
            full = f"{prefix}-{n}"
            sh("ip", "netns", "add", full)
            made.append(full)
            sh("ip", "link", "set", "lo", "up", ns=full)
            out[n] = full
        yield out
    finally:
        for full in made:
            subprocess.run(["ip", "netns", "del", full], capture_output=True, timeout=30)


def python_in(ns: str, *args: str) -> subprocess.Popen[str]:
    """Start the packet tool inside a namespace."""
    env = dict(os.environ, PYTHONPATH=str(HELPER.parent.parent / "src"))
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, str(HELPER), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
