"""What deploying on servers needs, without root: ``shoal init`` writes files that pass
``shoal check`` and refuses bad answers by name and never overwrites; the daemon's
readiness messages reach systemd's socket; the unit file passes ``systemd-analyze
verify``. (The guide followed step by step on three namespaces: tests/test_deploy_guide.py.)"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shoal.cli import app
from shoal.daemon.notify import notify
from tests.conftest import ROOT

runner = CliRunner()


def test_init_writes_a_cluster_that_checks(tmp_path: Path) -> None:
    args = ["--vip", "198.18.0.100", "--vip", "2001:db8::100", "--hosts", "3", "--preset", "dns"]
    res = runner.invoke(app, ["init", *args, "--dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    key = tmp_path / "cluster.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes().strip()) >= 32
    hosts = sorted(str(p) for p in tmp_path.glob("host*.toml"))
    assert len(hosts) == 3
    res = runner.invoke(app, ["check", *hosts])
    assert res.exit_code == 0 and res.output.count(": ok, host") == 3, res.output
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    again = runner.invoke(app, ["init", "--vip", "198.18.0.100", "--hosts", "3",
                                "--dir", str(tmp_path)])  # fmt: skip
    assert again.exit_code == 2 and "exists: shoal init never overwrites" in again.output
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--vip", "198.18.0", "--hosts", "3"], "--vip:"),
        (["--vip", "198.18.0.100", "--hosts", "0"], "--hosts: 0 is outside 1..256"),
        (["--vip", "198.18.0.100", "--hosts", "2", "--preset", "ftp"], "--preset: 'ftp'"),
        (["--vip", "198.18.0.100", "--hosts", "2", "--addresses", "198.18.0.11/24"],
         "--addresses: 1 given for 2 hosts"),
        (["--vip", "198.18.0.100", "--hosts", "1", "--addresses", "nope"],
         "--addresses: 'nope' is not ADDRESS/PREFIX"),
        (["--vip", "198.18.0.100", "--hosts", "1", "--interface", "a-name-far-too-long"],
         "interface"),
    ],
)  # fmt: skip
def test_init_refuses_bad_answers_and_writes_nothing(
    tmp_path: Path, args: list[str], says: str
) -> None:
    res = runner.invoke(app, ["init", *args, "--dir", str(tmp_path / "out")])
    assert res.exit_code == 2 and says in res.output, res.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_readiness_reaches_the_notify_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify("READY=1", "STATUS=converged")
        assert s.recv(100) == b"READY=1\nSTATUS=converged"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not notify("READY=1")


def test_the_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """With the unit's program in place (here a stand-in at the same path below a root of
    its own), systemd's own checker finds nothing to say."""
    unit = (ROOT / "packaging" / "shoal.service").read_text()
    program = tmp_path / "opt/shoal/bin/shoal"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    (tmp_path / "shoal.service").write_text(unit.replace("/opt/shoal", str(tmp_path / "opt/shoal")))
    res = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "shoal.service")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Type=notify" in unit and "Documentation=file:" in unit
    assert os.path.basename(unit.split("Documentation=file:")[1].split()[0]) == "deploy.md"
