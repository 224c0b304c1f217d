"""Shared fixtures: example configurations and helpers."""

from __future__ import annotations

import os
import shutil
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal.lab import clients as C
from shoal.lab.topology import Lab

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


def converged_lab(prefix: str, hosts: int, dataplane: str = "nftables") -> Iterator[Lab]:
    """A lab of ``hosts`` converged hosts for a module's tests (a fixture's body), named
    with ``prefix`` and a random part; down however the tests end."""
    lab = Lab(name=prefix + uuid.uuid4().hex[:6], hosts=hosts, dataplane=dataplane)
    with lab.running():
        yield settle(lab)


def revived(lab: Lab, host: int) -> None:
    """A crashed host back (port up, daemon started), and the lab converged again."""
    C.revive(lab, host)
    settle(lab)


def settle(lab: Lab) -> Lab:
    """Every host of the lab converged again (what each test starts from)."""
    everyone = list(range(1, lab.hosts + 1))
    assert C.wait_states(lab, C.converged(everyone), 1, 30), C.states(lab, 1)
    return lab


@pytest.fixture(scope="module")
def lab4() -> Iterator[Lab]:
    """Four converged hosts, shared by one module's tests."""
    yield from converged_lab("q", 4)


@pytest.fixture
def settled(lab4: Lab) -> Lab:
    """Every test starts from (and leaves) a converged 4-host cluster."""
    return settle(lab4)


def until(what: str, ok: Callable[[], bool], seconds: float = 15) -> None:
    """Wait for ``ok`` (polled every 100 ms); fail naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not ok():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        time.sleep(0.1)


def _kernel(item: pytest.Item) -> bool:
    """Whether a test builds network namespaces (it is marked root, or skipped without root)
    and times something (it is not marked ``beside``): such tests run one after the other."""
    if item.get_closest_marker("beside"):
        return False
    if item.get_closest_marker("root"):
        return True
    skips = (m for m in item.iter_markers() if m.name == "skipif")
    return any("root" in str(m.kwargs.get("reason", "")) for m in skips)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--part",
        choices=("all", "kernel", "rest"),
        default="all",
        help="only the modules that build network namespaces (kernel), or only the others",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``--part``: scripts/test.sh runs the modules whose tests build namespaces and time
    something in one process, one after the other (no two of them share the machine's two
    CPUs), and the rest beside it in another (the simulator's sweeps, the unit tests, the
    kernel tests marked ``beside``: verdicts, tables, the deploy guide)."""
    part = config.getoption("--part")
    if part == "all":
        return

    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::", 1)[0]

    kernel = {module(item) for item in items if _kernel(item)}
    keep = [item for item in items if (module(item) in kernel) == (part == "kernel")]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep
