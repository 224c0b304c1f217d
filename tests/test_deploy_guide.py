"""docs/deploy.md, followed block by block on three network namespaces standing in for
servers (no ``shoal lab``): so the guide cannot rot.

Each ``<!-- step: NAME[, every server | , one server] -->`` block runs line by line with
bash, in the repository's files copied to a scratch directory; an "every server" block runs
once per server, in its namespace, with ``N`` set to its number. The servers share this
machine's disk, so each gets its own root for the guide's paths (``/opt/shoal``,
``/etc/shoal``, ``/etc/systemd/system``, ``/usr/local/share/doc/shoal``) and its daemon its
own control socket and state directory. ``apt-get install`` lines check that the packages
are installed (the set-up installed them; a namespace has no way out to a mirror). The build
runs outside the namespaces (it fetches the pinned wheels, as the set-up does); the servers
install from its ``dist/`` with no index. There is no systemd in a namespace: where the guide
says ``systemctl enable --now``, the test starts the installed unit's ``ExecStart`` line in
the server's namespace with a ``NOTIFY_SOCKET`` and waits for ``READY=1`` (the unit is
``Type=notify``); ``systemctl kill --signal=SIGUSR2`` sends the signal and starts the unit
again as ``Restart=always`` does; ``systemctl disable --now`` sends SIGTERM; ``systemctl
daemon-reload`` does nothing. Between the steps a client on the segment checks that the VIP
answers from every server, and an upgrade keeps a connection open across it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT, needs_root
from tests.nethelp import namespaces, sh

pytestmark = [needs_root(), pytest.mark.root, pytest.mark.beside]

STEP = re.compile(r"<!-- step: (\w+)(?:, (every server|one server))? -->\n```sh\n(.*?)```", re.S)
SERVERS = (1, 2, 3)
PATHS = ("/opt/shoal", "/etc/shoal", "/etc/systemd/system", "/usr/local/share/doc/shoal")
UNIT = "/etc/systemd/system/shoal.service"
CLIENTS = range(50, 90)  # the client's addresses, 198.18.0.K


def steps() -> list[tuple[str, str, list[str]]]:
    """(name, where, lines) of every block of the guide, in order."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    out = []
    for name, where, body in STEP.findall(text):
        lines = body.replace("\\\n", " ").strip().splitlines()
        out.append((name, where or "once", [ln.strip() for ln in lines if ln.strip()]))
    return out


@dataclass
class Server:
    n: int
    ns: str
    root: Path  # where this server's copy of the guide's paths lives
    daemon: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    def path(self, text: str) -> str:
        for p in PATHS:
            text = text.replace(p, f"{self.root}{p}")
        return text


@dataclass
class Guide:
    work: Path  # the repository's files, where the guide's relative paths point
    servers: dict[int, Server]
    client: str  # the client's namespace

    def run(self, line: str, server: Server | None) -> None:
        """One line of the guide, on ``server`` (None: on the machine the steps done once
        run on, which has server 1's paths: a server of the cluster will do)."""
        if server is not None and line.startswith("systemctl "):
            self.systemctl(shlex.split(line)[1:], server)
            return
        if line.startswith("apt-get install -y "):
            for package in line.split()[3:]:  # installed by the set-up: no mirror in here
                assert subprocess.run(["dpkg", "-s", package], capture_output=True).returncode == 0
            return
        cmd = (server or self.servers[1]).path(line)
        env = dict(os.environ, N=str(server.n) if server else "")
        if server is not None:
            env.update(server.env)
        prefix = ["ip", "netns", "exec", server.ns] if server else []
        res = subprocess.run([*prefix, "bash", "-euo", "pipefail", "-c", cmd], cwd=self.work,
                             env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert res.returncode == 0, f"{line!r} on {server and server.n}:\n{res.stdout}{res.stderr}"
        unit = Path((server or self.servers[1]).path(UNIT))
        if line.startswith("install ") and line.endswith(UNIT):
            unit.write_text((server or self.servers[1]).path(unit.read_text()))  # its root

    def systemctl(self, args: list[str], s: Server) -> None:
        if args == ["daemon-reload"]:
            return
        if args == ["enable", "--now", "shoal"]:
            self.start(s)
        elif args == ["kill", "--signal=SIGUSR2", "shoal"]:
            self.stop(s, signal.SIGUSR2)
            self.start(s)  # Restart=always
        elif args == ["disable", "--now", "shoal"]:
            self.stop(s, signal.SIGTERM)
        else:
            raise AssertionError(f"the guide says systemctl {' '.join(args)}: not followed here")

    def start(self, s: Server) -> None:
        """The installed unit's ExecStart, in the server's namespace, until READY=1."""
        unit = Path(s.path(UNIT)).read_text()
        [exec_start] = re.findall(r"^ExecStart=(.*)$", unit, re.M)
        own = ["--control", s.env["SHOAL_CONTROL"], "--state-dir", str(s.root / "state")]
        notify = s.root / "notify.sock"
        notify.unlink(missing_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ready:
            ready.bind(str(notify))
            ready.settimeout(30)
            s.daemon = subprocess.Popen(
                ["ip", "netns", "exec", s.ns, *shlex.split(exec_start), *own],
                env=dict(os.environ, NOTIFY_SOCKET=str(notify)),
                stdout=subprocess.DEVNULL, stderr=(s.root / "daemon.log").open("ab"),
                start_new_session=True,
            )  # fmt: skip
            said = ""
            while "READY=1" not in said.splitlines():  # STATUS= lines may come first
                said = ready.recv(4096).decode()

    def stop(self, s: Server, sig: signal.Signals) -> None:
        assert s.daemon is not None
        s.daemon.send_signal(sig)
        s.daemon.wait(timeout=30)
        s.daemon = None


def _network(ns: dict[str, str]) -> None:
    """A switch (a bridge in its own namespace), three servers and a client on it."""
    sh("ip", "link", "add", "br0", "type", "bridge", ns=ns["sw"])
    sh("ip", "link", "set", "br0", "up", ns=ns["sw"])
    for i, node in enumerate(["s1", "s2", "s3", "cl"]):
        port = f"p{i}"
        sh("ip", "link", "add", port, "netns", ns["sw"], "type", "veth", "peer", "eth0",
           "netns", ns[node])  # fmt: skip
        sh("ip", "link", "set", port, "master", "br0", "up", ns=ns["sw"])
        if node != "cl":
            sh("ip", "addr", "add", f"198.18.0.{11 + i}/24", "dev", "eth0", ns=ns[node])
        for k in CLIENTS if node == "cl" else ():  # the web rule keeps each address on one host
            sh("ip", "addr", "add", f"198.18.0.{k}/24", "dev", "eth0", ns=ns[node])
        sh("ip", "link", "set", "eth0", "up", ns=ns[node])


def _served_by(client_ns: str) -> set[str]:
    """Which servers answer new connections to the VIP from each of the client's addresses."""
    code = (
        "import socket,sys\nseen=set()\n"
        f"for k in range({CLIENTS.start}, {CLIENTS.stop}):\n"
        " s=socket.create_connection(('198.18.0.100',80),timeout=2,"
        "source_address=(f'198.18.0.{k}',0))\n"
        " s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); seen.add(s.recv(4096).split()[-1].decode())\n"
        " s.close()\n"
        "print(' '.join(sorted(seen)))\n"
    )
    res = subprocess.run(["ip", "netns", "exec", client_ns, sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    return set(res.stdout.split())


@pytest.fixture
def guide(tmp_path: Path) -> Iterator[Guide]:
    work = tmp_path / "src"
    for part in ("pyproject.toml", "README.md", "src", "packaging", "docs"):
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, work / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (work / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, work / part)
    with namespaces("sw", "s1", "s2", "s3", "cl") as ns:
        _network(ns)
        servers = {}
        for n in SERVERS:
            root = tmp_path / f"server{n}"
            (root / "etc/systemd/system").mkdir(parents=True)  # as on any Debian server
            control = str(root / "shoal.sock")
            env = {"SHOAL_CONFIG": f"{root}/etc/shoal/shoal.toml", "SHOAL_CONTROL": control}
            servers[n] = Server(n, ns[f"s{n}"], root, env=env)
        g = Guide(work, servers, ns["cl"])
        services = []
        try:
            for n in SERVERS:  # each server's application: the lab's service, on any address
                services.append(subprocess.Popen(
                    ["ip", "netns", "exec", ns[f"s{n}"], sys.executable, "-m",
                     "shoal.lab.service", "--name", f"h{n}", "--log", str(tmp_path / f"a{n}"),
                     "0.0.0.0"],
                    env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    start_new_session=True,
                ))  # fmt: skip
            yield g
        finally:
            for s in servers.values():
                if s.daemon is not None:
                    s.daemon.kill()
                    s.daemon.wait(timeout=30)
            for p in services:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)


def test_the_deploy_guide_runs_as_written(guide: Guide) -> None:
    """Every block of docs/deploy.md in order: built, installed, configured by ``shoal
    init``, started under the unit's ExecStart (each daemon says READY=1), watched (every
    server answers the VIP), upgraded one server at a time with a connection kept open
    across it, and removed (no shoal table left in any server's kernel)."""
    done = []
    for name, where, lines in steps():
        targets = [guide.servers[n] for n in SERVERS] if where == "every server" else (
            [guide.servers[1]] if where == "one server" else [None])  # fmt: skip
        if name == "upgrade":
            kept = sessions(guide)
        for server in targets:
            for line in lines:
                guide.run(line, server)
            if name == "unit" and server is guide.servers[len(SERVERS)]:
                time.sleep(1.0)  # the last one joined: one convergence
        if name == "watch":
            assert _served_by(guide.client) == {"h1", "h2", "h3"}
        if name == "upgrade":
            kept.send_signal(signal.SIGTERM)
            out, _ = kept.communicate(timeout=60)
            longs = [json.loads(x) for x in out.splitlines() if '"long"' in x]
            assert sum(1 for e in longs if e.get("event") == "open") == 6, out
            assert [e for e in longs if e["error"] and e.get("event") != "open"] == [], out
        done.append(name)
    assert done == ["build", "install", "init", "place", "unit", "watch", "upgrade", "remove"]
    for s in guide.servers.values():
        tables = sh("nft", "list", "tables", ns=s.ns)
        assert "shoal" not in tables, tables
        assert not Path(s.path("/etc/shoal")).exists() and not Path(s.path("/opt/shoal")).exists()
    doc = guide.servers[1].root / "usr/local/share/doc/shoal/deploy.md"
    assert not doc.exists()  # removed with the rest; it was there for the unit's Documentation=


def sessions(guide: Guide) -> subprocess.Popen[str]:
    """Six connections from the client through the VIP, kept busy (not part of the guide),
    until SIGTERM: the lab's traffic tool."""
    sources = guide.work.parent / "client.sources"
    sources.write_text("".join(f"198.18.0.{k}\n" for k in CLIENTS))
    proc = subprocess.Popen(
        ["ip", "netns", "exec", guide.client, sys.executable, "-m", "shoal.lab.traffic",
         "--seconds", "300", "--sources", str(sources), "--long", "6"],
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1.5)
    return proc
