"""The cluster key as a secret: where it is read from, what it must be, and the keys
accepted beside it while a cluster rotates its key.

A key is at least :data:`MIN_KEY` bytes, wherever it comes from. A key file, or a host file
that holds the key inline, must not be open to group or others (mode ``& 0o077 == 0``), as
ssh requires of a private key: anyone who reads the key can speak for any host of the cluster.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from shoal.protocol.codec import Keys

if TYPE_CHECKING:
    from shoal.config import ClusterConfig

MIN_KEY = 16
OPEN_BITS = 0o077


class KeyProblems(Exception):
    """The keys were refused; ``problems`` name each file and field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


MAKE_ONE = "make one with: head -c 32 /dev/urandom | base64 > FILE; chmod 600 FILE"


def _private(path: Path, what: str) -> str | None:
    """Why ``path`` is too open to hold a key, if it is."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as e:
        return f"{what}: cannot read {path}: {e.strerror}"
    if mode & OPEN_BITS:
        return (
            f"{what}: {path} has mode {mode:04o}, open to others; it holds the cluster key: "
            f"chmod 600 {path}"
        )
    return None


def _read(path: Path, what: str) -> bytes | str:
    """A key file's key, or why it is refused."""
    why = _private(path, what)
    if why is not None:
        return why
    try:
        key = path.read_bytes().strip()
    except OSError as e:
        return f"{what}: cannot read {path}: {e.strerror}"
    if len(key) < MIN_KEY:
        return (
            f"{what}: {path} holds {len(key)} bytes; a key is at least {MIN_KEY} bytes ({MAKE_ONE})"
        )
    return key


def read_keys(cluster: ClusterConfig, config_path: Path) -> Keys:
    """The signing key and the accepted ones of ``cluster``, as configured in the host file
    at ``config_path`` (key files are relative to its directory). Raises
    :class:`KeyProblems` naming every file and field at fault."""
    problems: list[str] = []
    base = config_path.parent
    signing = b""
    if cluster.key is not None:
        why = _private(config_path, "cluster.key")
        if why is not None:
            problems.append(why + " (or move the key to a key_file)")
        signing = cluster.key.get_secret_value().encode()
    else:
        assert cluster.key_file is not None
        got = _read(base / cluster.key_file, "cluster.key_file")
        if isinstance(got, str):
            problems.append(got)
        else:
            signing = got
    accepted = []
    for i, f in enumerate(cluster.accept_key_files):
        got = _read(base / f, f"cluster.accept_key_files[{i}]")
        if isinstance(got, str):
            problems.append(got)
        else:
            accepted.append(got)
    if problems:
        raise KeyProblems(problems)
    return Keys(signing, tuple(accepted))
