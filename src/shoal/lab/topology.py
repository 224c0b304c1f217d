"""``shoal lab``: a real cluster on one machine, in network namespaces.

A switch namespace holds a Linux bridge; host namespaces h1..hN hang off it with the
cluster interface ``eth0`` set up by :mod:`shoal.dataplane.adapter`; a router namespace
(``rt``) connects client namespaces c1..c3, each with 100 source addresses across two /24s
(and two /64s). Every object is named ``shl-<lab>-…``; nothing in the root namespace
changes; the lab's files live in ``/run/shoal-lab/<lab>``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shoal.choices import Dataplane
from shoal.cluster_mac import ClusterMode, cluster_mac_bytes, format_mac
from shoal.config import ShoalConfig, load_config
from shoal.lab.host_files import host_file

STATE = Path("/run/shoal-lab")
CLIENTS = 3
PER_NET = 50
NAME_RE = re.compile(r"^[a-z0-9]{1,8}$")
# the cluster daemons run ahead of the lab's services and clients, as packaging/shoal.service
# runs the daemon ahead of a server's applications: a heartbeat that waits for the CPU
# behind the load it balances looks like a dead host
DAEMON_NICE = -10


class LabError(RuntimeError):
    pass


def sh(*args: str, ns: str | None = None, input: str | None = None, check: bool = True) -> str:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    res = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=60)
    if check and res.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: {res.stderr.strip()}")
    return res.stdout


def veth(name: str, ns: str, peer: str, peer_ns: str) -> None:
    """A veth pair: ``name`` in namespace ``ns``, ``peer`` in ``peer_ns``."""
    sh(
        "ip",
        "link",
        "add",
        name,
        "netns",
        ns,
        "type",
        "veth",
        "peer",
        "name",
        peer,
        "netns",
        peer_ns,
    )


def batch(ns: str | None, commands: list[str]) -> None:
    """Many ``ip`` commands in one process (``ip -batch``)."""
    if commands:
        sh("ip", *(["-n", ns] if ns else []), "-batch", "-", input="\n".join(commands) + "\n")


@dataclass
class Lab:
    name: str
    hosts: int = 3
    mode: str = "unicast"
    ipv6: bool = False
    daemons: bool = True
    profile: str = "default"
    tolerance: int = 0  # cluster.loss_tolerance (0: the profile's)
    weights: list[int] = field(default_factory=list)  # the web rule's load weight per host
    reset_dead_clients: bool = True  # cluster.reset_dead_clients
    # affinity_timeout_s of the "app" rule (TCP 8443, affinity single) and the "net" rule
    # (TCP 8444, affinity network: a /28 or /124 of clients shares a host)
    affinity_timeout: int = 0
    dataplane: str = "nftables"  # host.dataplane of every host: "nftables" or "xdp"
    pids: dict[str, int] = field(default_factory=dict)

    # ------------------------------------------------------------- naming

    def ns(self, node: str) -> str:
        return f"shl-{self.name}-{node}"

    @property
    def dir(self) -> Path:
        return STATE / self.name

    @property
    def host_names(self) -> list[str]:
        return [f"h{i}" for i in range(1, self.hosts + 1)]

    @property
    def client_names(self) -> list[str]:
        return [f"c{k}" for k in range(1, CLIENTS + 1)]

    def client_sources(self, k: int, v6: bool) -> list[str]:
        """The source addresses client k owns: two /24s (and two /64s)."""
        out = []
        for net in (2 * k, 2 * k + 1):
            for i in range(10, 10 + PER_NET):
                out.append(f"2001:db8:{net}::{i:x}" if v6 else f"198.19.{net}.{i}")
        return out

    def config_path(self, host: int) -> Path:
        return self.dir / f"h{host}.toml"

    @property
    def cluster(self) -> str:
        """The lab cluster's name (its tables are named after it: ruleset.tables)."""
        return f"lab-{self.name}"

    def config(self, host: int) -> ShoalConfig:
        return load_config(self.config_path(host))

    # -------------------------------------------------------------- state

    def save(self) -> None:
        (self.dir / "lab.json").write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, name: str) -> Lab:
        path = STATE / name / "lab.json"
        if not path.exists():
            raise LabError(f"no lab named {name!r} (see /run/shoal-lab)")
        return cls(**json.loads(path.read_text()))

    # ---------------------------------------------------------------- up

    def write_configs(self) -> None:
        for h in range(1, self.hosts + 1):
            self.config_path(h).write_text(host_file(self, h))
            self.config_path(h).chmod(0o600)  # it holds the cluster key

    @contextlib.contextmanager
    def running(self, service: bool = True) -> Iterator[Lab]:
        """The lab up for a block, and down however the block ends."""
        try:
            self.up(service)
            yield self
        finally:
            self.down()

    def up(self, service: bool = True) -> None:
        if not NAME_RE.match(self.name):
            raise LabError(f"lab name {self.name!r}: use 1 to 8 lower-case letters or digits")
        if not 1 <= self.hosts <= 32:
            raise LabError(f"--hosts {self.hosts}: the lab takes 1 to 32 hosts")
        if self.weights and len(self.weights) != self.hosts:
            raise LabError(f"weights {self.weights}: give one load weight per host")
        if self.mode not in {m.value for m in ClusterMode}:
            raise LabError(f"--mode {self.mode!r}: use unicast, multicast or igmp")
        if self.dataplane not in {d.value for d in Dataplane}:
            raise LabError(f"--dataplane {self.dataplane!r}: use nftables or xdp")
        if (self.dir / "lab.json").exists() or self.ns("sw") in list_namespaces():
            raise LabError(f"lab {self.name!r} exists: shoal lab down {self.name}")
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self.save()
            self._build()
            if service:
                self.start_services()
            self.save()
        except BaseException:
            self.down()
            raise

    def _build(self) -> None:
        self.write_configs()
        nodes = ["sw", "rt", *self.host_names, *self.client_names]
        batch(None, [f"netns add {self.ns(n)}" for n in nodes])
        for n in nodes:
            sh("ip", "link", "set", "lo", "up", ns=self.ns(n))
        sw = self.ns("sw")
        cmds = ["link add br0 type bridge", "link set br0 up"]
        for n in ["rt", *self.host_names]:
            cmds.append(f"link add p-{n} type veth peer name eth0 netns {self.ns(n)}")
            cmds.append(f"link set p-{n} master br0 up")
        batch(sw, cmds)
        rt = self.ns("rt")
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", ns=rt)
        rcmds = ["link set eth0 up", "addr add 198.18.0.1/24 dev eth0"]
        if self.ipv6:
            rcmds.append("addr add 2001:db8::1/64 dev eth0 nodad")
        for k in range(1, CLIENTS + 1):
            rcmds.append(f"link add c{k} type veth peer name eth0 netns {self.ns(f'c{k}')}")
            rcmds.append(f"link set c{k} up")
            for net in (2 * k, 2 * k + 1):
                rcmds.append(f"addr add 198.19.{net}.1/24 dev c{k}")
                if self.ipv6:
                    rcmds.append(f"addr add 2001:db8:{net}::1/64 dev c{k} nodad")
        batch(rt, rcmds)
        for k in range(1, CLIENTS + 1):
            ccmds = ["link set eth0 up"]
            ccmds += [f"addr add {src}/24 dev eth0" for src in self.client_sources(k, False)]
            ccmds.append(f"route add default via 198.19.{2 * k}.1")
            if self.ipv6:
                ccmds += [f"addr add {s}/64 dev eth0 nodad" for s in self.client_sources(k, True)]
                ccmds.append(f"route add default via 2001:db8:{2 * k}::1")
            batch(self.ns(f"c{k}"), ccmds)
        cfg1 = self.config(1)
        mode = cfg1.cluster.mode
        if mode is not ClusterMode.UNICAST:
            # routers do not believe multicast MACs in ARP replies (RFC 1812): static entries
            mac = format_mac(cluster_mac_bytes(cfg1.cluster.primary_vip, mode), ":")
            neigh = [f"neigh replace 198.18.0.100 lladdr {mac} dev eth0 nud permanent"]
            if self.ipv6:
                neigh.append(f"neigh replace 2001:db8::100 lladdr {mac} dev eth0 nud permanent")
            batch(rt, neigh)
        for h in range(1, self.hosts + 1):
            ns = self.ns(f"h{h}")
            sh("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", ns=ns)
            if self.daemons:  # the daemon sets its interface up (and restores it) itself
                continue
            run_module(
                ns,
                "shoal.dataplane.adapter",
                "setup",
                str(self.config_path(h)),
                str(self.dir / f"h{h}.adapter.json"),
            )
        if not self.daemons:
            self.add_routes()

    def add_routes(self, hosts: list[int] | None = None) -> None:
        for h in hosts or range(1, self.hosts + 1):
            routes = ["route replace default via 198.18.0.1"]
            if self.ipv6:
                routes.append("route replace default via 2001:db8::1")
            batch(self.ns(f"h{h}"), routes)

    def restart_daemon(self, host: int) -> None:
        """Start a host's daemon again and wait for it; its routes come back with its
        addresses (a clean stop gave the interface back as it was before the lab's set-up)."""
        self.control(host).unlink(missing_ok=True)
        self.start_daemon(host)
        deadline = time.monotonic() + 10
        while not self.control(host).exists():
            if time.monotonic() > deadline:
                tail = (self.dir / f"h{host}.daemon.log").read_text().strip()[-500:]
                raise LabError(f"daemon h{host} did not come back: {tail}")
            time.sleep(0.05)
        self.add_routes([host])
        self.save()

    def control(self, host: int) -> Path:
        return self.dir / f"h{host}.sock"

    def _spawn(
        self, key: str, node: str, module: str, args: list[str], log: Path, nice: int = 0
    ) -> None:
        """Start ``python -m module`` in a node, in its own session; remember its PID."""
        with log.open("a") as err:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(node), sys.executable, "-m", module, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=pyenv(),
                start_new_session=True,
                preexec_fn=(lambda: os.nice(nice)) if nice else None,
            )
        self.pids[key] = proc.pid

    def start_service(self, h: int) -> None:
        """The lab's service on host ``h`` (see :mod:`shoal.lab.service`)."""
        addrs = ["198.18.0.100", f"198.18.0.{10 + h}"]
        if self.ipv6:
            addrs += ["2001:db8::100", f"2001:db8::{10 + h:x}"]
        log = self.dir / f"h{h}.accepts"
        log.write_text("")
        self._spawn(
            f"service-h{h}",
            f"h{h}",
            "shoal.lab.service",
            ["--name", f"h{h}", "--log", str(log), *addrs],
            self.dir / f"h{h}.service.err",
        )

    def start_daemon(self, host: int) -> None:
        self._spawn(
            f"daemon-h{host}",
            f"h{host}",
            "shoal.cli",
            [
                "daemon",
                "--config",
                str(self.config_path(host)),
                "--control",
                str(self.control(host)),
                "--state-dir",
                str(self.dir),
            ],
            self.dir / f"h{host}.daemon.log",
            nice=DAEMON_NICE,
        )

    def start_services(self) -> None:
        if self.daemons:
            for h in range(1, self.hosts + 1):
                self.start_daemon(h)
            # each daemon's start costs about a second of CPU (imports): many hosts on few
            # cores take a while
            deadline = time.monotonic() + 10 + self.hosts
            while time.monotonic() < deadline and not all(
                self.control(h).exists() for h in range(1, self.hosts + 1)
            ):
                time.sleep(0.1)  # the daemons add the addresses the services bind to
            missing = [h for h in range(1, self.hosts + 1) if not self.control(h).exists()]
            if missing:
                tail = (self.dir / f"h{missing[0]}.daemon.log").read_text().strip()[-800:]
                raise LabError(f"daemon h{missing[0]} did not come up: {tail}")
            self.add_routes()
        for h in range(1, self.hosts + 1):
            self.start_service(h)
        time.sleep(0.5)
        for key, pid in self.pids.items():
            if not alive(pid):
                kind, host = key.split("-")
                log = self.dir / (
                    f"{host}.service.err" if kind == "service" else f"{host}.daemon.log"
                )
                raise LabError(f"{key} did not start: {log.read_text().strip()[-500:]}")

    # -------------------------------------------------------------- down

    def down(self) -> None:
        """Stop what this lab started (by PID), delete its namespaces; safe to repeat."""
        for pid in self.pids.values():
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while any(alive(p) for p in self.pids.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in self.pids.values():
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        prefix = f"shl-{self.name}-"
        for ns in list_namespaces():
            if ns.startswith(prefix):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        present = set(list_namespaces())
        return {
            "name": self.name,
            "hosts": self.host_names,
            "clients": self.client_names,
            "router": "rt",
            "mode": self.mode,
            "ipv6": self.ipv6,
            "namespaces": {
                n: self.ns(n) in present for n in ["sw", "rt", *self.host_names, *self.client_names]
            },
            "processes": {k: {"pid": p, "alive": alive(p)} for k, p in self.pids.items()},
            "vips": ["198.18.0.100", *(["2001:db8::100"] if self.ipv6 else [])],
        }

    def exec(self, node: str, command: list[str]) -> int:
        nodes = ["sw", "rt", *self.host_names, *self.client_names]
        if node not in nodes:
            raise LabError(f"{node!r} is not in lab {self.name} (nodes: {', '.join(nodes)})")
        env = dict(os.environ)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        if node.startswith("h"):
            env["SHOAL_CONFIG"] = str(self.config_path(int(node[1:])))
            env["SHOAL_CONTROL"] = str(self.control(int(node[1:])))
        return subprocess.call(["ip", "netns", "exec", self.ns(node), *command], env=env)


def pyenv() -> dict[str, str]:
    """The environment for this Python's modules in a child process."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))


def run_module(ns: str, module: str, *args: str, timeout: float = 60) -> str:
    """``python -m module args`` inside a namespace; raises LabError naming what failed."""
    res = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=pyenv(),
        timeout=timeout,
    )
    if res.returncode != 0:
        raise LabError(f"{module} in {ns}: {res.stderr.strip()[-400:]}")
    return res.stdout


def list_namespaces() -> list[str]:
    out = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True).stdout
    return [n["name"] for n in json.loads(out or "[]")]


def alive(pid: int) -> bool:
    """Whether the process runs: a zombie does not (ours is reaped here; another process's,
    such as a lab's daemon seen from ``shoal lab crash``, is read from /proc)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        return waited == 0
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
