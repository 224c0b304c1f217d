"""``shoal init``: a new cluster's files from a few answers: a random key file (mode 0600)
and one host file per host, each of which ``shoal check`` accepts.

Nothing is half-written: every file is made and validated in memory first, none that
exists is overwritten, and what was written is removed again if a later write fails.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path

from shoal.cluster_mac import ClusterMode
from shoal.config import check_cluster, parse_config
from shoal.config_errors import ConfigError

KEY_FILE = "cluster.key"
Table = dict[str, str | int]
PRESETS: dict[str, list[Table]] = {
    # web: HTTP and HTTPS, each client kept on one host (sessions, TLS resumption)
    "web": [
        {"name": "http", "start": 80, "protocol": "tcp", "affinity": "single"},
        {"name": "https", "start": 443, "protocol": "tcp", "affinity": "single"},
    ],
    # dns: every query balanced on its own (no affinity), TCP and UDP
    "dns": [{"name": "dns", "start": 53, "protocol": "both", "affinity": "none"}],
    # all: NLB's default rule (every port, both protocols, single affinity)
    "all": [],
}
# web: this host leaves the http rule while its web server fails its check
CHECKS: dict[str, list[Table]] = {"web": [{"rule": "http", "kind": "http"}], "dns": [], "all": []}


def tables(header: str, rows: list[Table]) -> str:
    """``[[header]]`` tables in TOML, one per row."""
    out = ""
    for row in rows:
        out += f"\n[[{header}]]\n"
        out += "".join(f"{k} = {json.dumps(v)}\n" for k, v in row.items())  # TOML-safe here
    return out


@dataclass(frozen=True)
class Answers:
    name: str
    vips: list[ipaddress.IPv4Address | ipaddress.IPv6Address]
    hosts: int
    interface: str
    mode: ClusterMode
    preset: str
    addresses: list[str]  # each host's dedicated address with its prefix; may be empty


def host_file(a: Answers, host: int) -> str:
    vips = ", ".join(f'"{v}"' for v in a.vips[1:])
    dips = f'dedicated_ips = ["{a.addresses[host - 1]}"]\n' if a.addresses else ""
    return f"""# shoal host file of host {host} of cluster {a.name} (made by shoal init)
[cluster]
name = "{a.name}"
primary_vip = "{a.vips[0]}"
vips = [{vips}]
mode = "{a.mode.value}"
key_file = "{KEY_FILE}"               # relative to this file; the same key on every host
interface = "{a.interface}"
{tables("cluster.rules", PRESETS[a.preset])}
[host]
host_id = {host}
{dips}{tables("host.checks", CHECKS[a.preset])}"""


def files(a: Answers) -> dict[str, str]:
    """Every host file by name, validated as one cluster (ValueError naming the problems)."""
    if not 1 <= a.hosts <= 256:
        raise ValueError(f"--hosts: {a.hosts} is outside 1..256")
    if a.preset not in PRESETS:
        raise ValueError(f"--preset: {a.preset!r} is not one of {', '.join(PRESETS)}")
    if a.addresses and len(a.addresses) != a.hosts:
        raise ValueError(
            f"--addresses: {len(a.addresses)} given for {a.hosts} hosts (one each, or none)"
        )
    for text in a.addresses:
        try:
            ipaddress.ip_interface(text)
        except ValueError:
            raise ValueError(f"--addresses: {text!r} is not ADDRESS/PREFIX") from None
    out = {f"host{h}.toml": host_file(a, h) for h in range(1, a.hosts + 1)}
    configs, problems = [], []
    for name, text in out.items():
        try:
            configs.append(parse_config(tomllib.loads(text), name))
        except ConfigError as e:
            problems += [f"{name}: {p}" for p in e.problems]
    if not problems:
        problems = check_cluster(configs, list(out))
    if problems:
        raise ValueError("; ".join(problems))
    return out


def write(a: Answers, where: Path) -> list[Path]:
    """The key file and the host files in ``where``; the paths written."""
    texts = files(a)
    targets = [where / KEY_FILE, *(where / n for n in texts)]
    taken = [p for p in targets if p.exists()]
    if taken:
        raise ValueError(f"{taken[0]} exists: shoal init never overwrites a file")
    where.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        key = base64.b64encode(secrets.token_bytes(32)) + b"\n"
        fd = os.open(where / KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        written.append(where / KEY_FILE)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        for name, text in texts.items():
            path = where / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            written.append(path)
            with os.fdopen(fd, "w") as f:
                f.write(text)
    except OSError:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    return written
