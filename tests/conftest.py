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


def write_private(path: Path, text: str) -> Path:
    """Write a host file that holds a key: mode 0600, or shoal refuses it."""
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture
def example_files(tmp_path: Path) -> list[str]:
    """The example host files as an operator installs them (mode 0600), in host order."""
    out = []
    for p in sorted(EXAMPLES.glob("host*.toml")):
        out.append(str(write_private(tmp_path / p.name, p.read_text())))
    return out
