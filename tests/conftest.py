"""Shared fixtures: example configurations and helpers."""

from __future__ import annotations

import os
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def example_doc(host: int = 1) -> dict[str, Any]:
    """A fresh, mutable copy of an example host file."""
    return tomllib.loads((EXAMPLES / f"host{host}.toml").read_text())


def needs_root() -> pytest.MarkDecorator:
    ok = os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("nft") is not None
    return pytest.mark.skipif(not ok, reason="needs root, iproute2 and nftables")
