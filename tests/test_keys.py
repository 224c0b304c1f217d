"""The cluster key is a secret: too short or open to others is refused wherever it comes
from, naming the file and its mode; a reload applies a key change or refuses it."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from shoal.cli import app
from shoal.config import load_config
from shoal.config_errors import ConfigError
from shoal.keys import read_keys
from tests.conftest import EXAMPLES, write_private

INLINE = 'key = "example-only-change-me-0123456789"'


def _host(tmp_path: Path, key_line: str, mode: int = 0o600) -> Path:
    text = (EXAMPLES / "host1.toml").read_text().replace(INLINE, key_line)
    path = write_private(tmp_path / "h.toml", text)
    path.chmod(mode)
    return path


def _key(tmp_path: Path, name: str, data: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return "; ".join(err.value.problems)


@pytest.mark.parametrize(
    ("data", "said"),
    [
        (b"", "holds 0 bytes; a key is at least 16 bytes"),
        (b"x", "holds 1 bytes; a key is at least 16 bytes"),
        (b"  fifteen bytes \n", "holds 13 bytes; a key is at least 16 bytes"),
    ],
)
def test_a_short_key_file_is_refused(tmp_path: Path, data: bytes, said: str) -> None:
    _key(tmp_path, "c.key", data)
    why = _refusal(_host(tmp_path, 'key_file = "c.key"'))
    assert f"cluster.key_file: {tmp_path}/c.key {said}" in why
    assert "head -c 32 /dev/urandom" in why  # how to make one


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_key_file_open_to_others_is_refused_with_its_mode(tmp_path: Path, mode: int) -> None:
    _key(tmp_path, "c.key", b"k" * 32, mode)
    why = _refusal(_host(tmp_path, 'key_file = "c.key"'))
    assert f"{tmp_path}/c.key has mode {mode:04o}, open to others" in why
    assert f"chmod 600 {tmp_path}/c.key" in why


def test_a_host_file_holding_the_key_must_be_private(tmp_path: Path) -> None:
    path = _host(tmp_path, INLINE, 0o644)
    why = _refusal(path)
    assert f"cluster.key: {path} has mode 0644, open to others" in why
    path.chmod(0o600)
    assert load_config(path).cluster.key is not None


def test_an_inline_key_under_16_bytes_is_refused(tmp_path: Path) -> None:
    why = _refusal(_host(tmp_path, 'key = "short"'))
    assert "cluster.key" in why and "at least 16 bytes" in why


def test_accepted_keys_are_checked_like_the_signing_key(tmp_path: Path) -> None:
    _key(tmp_path, "old.key", b"o" * 32, 0o644)
    _key(tmp_path, "new.key", b"n" * 8)
    path = _host(tmp_path, INLINE + '\naccept_key_files = ["old.key", "new.key"]')
    why = _refusal(path)
    assert f"cluster.accept_key_files[0]: {tmp_path}/old.key has mode 0644" in why
    assert f"cluster.accept_key_files[1]: {tmp_path}/new.key holds 8 bytes" in why
    (tmp_path / "old.key").chmod(0o600)
    _key(tmp_path, "new.key", b"n" * 32)
    keys = read_keys(load_config(path).cluster, path)
    assert keys.accepted == (b"o" * 32, b"n" * 32)


def test_check_names_the_open_file(tmp_path: Path) -> None:
    path = _host(tmp_path, INLINE, 0o644)
    res = CliRunner().invoke(app, ["check", str(path)])
    assert res.exit_code == 1
    assert "has mode 0644, open to others" in " ".join(res.output.split())
