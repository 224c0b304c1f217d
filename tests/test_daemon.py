"""Real daemons in a lab: convergence, the NLB verbs, bad frames, reload."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.daemon.control import call
from shoal.dataplane.ruleset import tables
from shoal.lab.host_files import METRICS_PORT
from shoal.lab.topology import Lab, run_module
from tests.conftest import EXAMPLES, needs_root, until, write_private
from tests.nethelp import namespaces, sh

pytestmark = [needs_root(), pytest.mark.root]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(name="d" + uuid.uuid4().hex[:6], hosts=3).running() as lab:
        yield lab


def shoal(lab: Lab, host: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal.cli",
            "lab",
            "exec",
            lab.name,
            host,
            "--",
            sys.executable,
            "-m",
            "shoal.cli",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def states(lab: Lab, host: str = "h1") -> dict[int, str]:
    res = shoal(lab, host, "query", "--json")
    assert res.returncode == 0, res.stderr
    return {h["host_id"]: h["state"] for h in json.loads(res.stdout)["hosts"]}


def wait_for(lab: Lab, want: dict[int, str], host: str = "h1", seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    seen: dict[int, str] = {}
    while time.monotonic() < deadline:
        seen = states(lab, host)
        if seen == want:
            return
        time.sleep(0.2)
    raise AssertionError(f"wanted {want}, {host} sees {seen}")


ALL = {1: "converged (default)", 2: "converged", 3: "converged"}


def test_three_daemons_converge_with_one_default(lab: Lab) -> None:
    for h in ("h1", "h2", "h3"):
        wait_for(lab, ALL, host=h)


def test_traffic_through_the_vip_reaches_every_host(lab: Lab) -> None:
    wait_for(lab, ALL)
    seen = set()
    for i in range(10, 40):
        out = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                lab.ns("c1"),
                "curl",
                "-s",
                "--max-time",
                "2",
                "--interface",
                f"198.19.2.{i}",
                "http://198.18.0.100/",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        assert out in {"h1", "h2", "h3"}
        seen.add(out)
    assert seen == {"h1", "h2", "h3"}


def test_stop_start_drainstop_suspend_resume(lab: Lab) -> None:
    wait_for(lab, ALL)
    assert shoal(lab, "h2", "stop").returncode == 0
    wait_for(lab, {1: "converged (default)", 2: "stopped", 3: "converged"})
    assert shoal(lab, "h2", "start").returncode == 0
    wait_for(lab, ALL)
    assert shoal(lab, "h3", "drainstop").returncode == 0
    wait_for(lab, {1: "converged (default)", 2: "converged", 3: "stopped"})
    assert shoal(lab, "h3", "start").returncode == 0
    wait_for(lab, ALL)
    assert shoal(lab, "h3", "suspend").returncode == 0
    refused = shoal(lab, "h3", "start")
    assert refused.returncode == 1 and "suspended" in refused.stderr
    wait_for(lab, {1: "converged (default)", 2: "converged", 3: "suspended"})
    assert shoal(lab, "h3", "resume").returncode == 0
    assert shoal(lab, "h3", "start").returncode == 0
    wait_for(lab, ALL)


def flag(lab: Lab, host: str, name: str) -> bool:
    """Whether one of the kernel's flag sets (``off_<i>``, ``drain_<i>``...) is set."""
    table = tables(lab.cluster).inet
    doc = json.loads(sh("nft", "-j", "list", "set", "inet", table, name, ns=lab.ns(host)))
    sets = [x["set"] for x in doc["nftables"] if "set" in x]
    return bool(sets and sets[0].get("elem"))


def event_texts(lab: Lab, host: str) -> list[str]:
    display = json.loads(shoal(lab, host, "display", "--json").stdout)
    return [str(e["text"]) for e in display["events"]]


def test_rule_verbs(lab: Lab) -> None:
    """disable, drain and enable reach the kernel's flags of the right rule (web is rule
    0, dns rule 1), and each is an event of its own."""
    wait_for(lab, ALL)
    assert not any(flag(lab, "h2", f"{kind}_{i}") for kind in ("off", "drain") for i in (0, 1))
    assert shoal(lab, "h2", "disable", "80").returncode == 0
    until("web disabled in h2's kernel", lambda: flag(lab, "h2", "off_0"))
    assert not flag(lab, "h2", "off_1") and not flag(lab, "h2", "drain_0")
    assert "traffic disabled for rule web on host 2" in event_texts(lab, "h2")
    assert shoal(lab, "h2", "drain", "53").returncode == 0
    until("dns draining in h2's kernel", lambda: flag(lab, "h2", "drain_1"))
    assert "new traffic disabled for rule dns on host 2 (draining)" in event_texts(lab, "h2")
    bad = shoal(lab, "h2", "drain", "9999")
    assert bad.returncode == 1 and "no port rule covers port 9999" in bad.stderr
    bad_vip = shoal(lab, "h2", "drain", "all", "--vip", "not-an-ip")
    assert bad_vip.returncode == 2 and "--vip: 'not-an-ip' is not an IP address" in bad_vip.stderr
    assert shoal(lab, "h2", "enable", "all").returncode == 0
    until(
        "every rule enabled in h2's kernel",
        lambda: not any(flag(lab, "h2", f"{k}_{i}") for k in ("off", "drain") for i in (0, 1)),
    )
    wait_for(lab, ALL)


def test_bad_frames_change_nothing_and_are_counted(lab: Lab) -> None:
    wait_for(lab, ALL)
    params = json.loads(shoal(lab, "h1", "params", "--json").stdout)
    before, before_reads = params["counters"], params["reads"]
    code = (
        "import ipaddress, socket, os, time\n"
        "from shoal.protocol.frames import VERSION, cluster_id\n"
        "cid = cluster_id(ipaddress.ip_address('198.18.0.100'))\n"
        "s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x886F))\n"
        "s.bind(('eth0', 0x886F))\n"
        "for i in range(20):\n"
        "    s.sendto(os.urandom(100), ('eth0', 0x886F, 0, 0, b'\\xff' * 6))\n"
        "for i in range(40):\n"
        "    s.sendto(b'SH' + bytes([VERSION, 1]) + cid + os.urandom(120),\n"
        "             ('eth0', 0x886F, 0, 0, b'\\xff' * 6))\n"
        "    time.sleep(0.002)\n"
    )
    subprocess.run(
        ["ip", "netns", "exec", lab.ns("rt"), sys.executable, "-c", code], check=True, timeout=30
    )
    junk = ("bad_magic", "foreign_cluster", "too_short", "bad_length", "bad_auth")

    def rejected() -> int:
        after = json.loads(shoal(lab, "h1", "params", "--json").stdout)["counters"]
        return sum(after[k] - before[k] for k in junk)

    until("60 junk frames counted as rejected", lambda: rejected() >= 60, seconds=5)
    # the random ones were dropped by the kernel's screen; the 40 with this cluster's header
    # reached the daemon 2 ms apart, closer together than a tenth of a period: read in batches
    reads = json.loads(shoal(lab, "h1", "params", "--json").stdout)["reads"]
    assert reads["batches"] > before_reads["batches"], (before_reads, reads)
    wait_for(lab, ALL)


def test_reload_with_a_bad_file_keeps_the_running_configuration(lab: Lab) -> None:
    path = lab.config_path(2)
    good = path.read_text()
    try:
        path.write_text(good.replace("[host]", "[host]\nbogus = 1"))
        res = shoal(lab, "h2", "reload")
        assert res.returncode == 1 and "host.bogus: unknown key" in res.stderr
        wait_for(lab, ALL)
    finally:
        path.write_text(good)
    assert shoal(lab, "h2", "reload").returncode == 0
    wait_for(lab, ALL)


def test_unreachable_daemon_is_named() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "query", "--control", "/nonexistent/shoal.sock"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 3 and "no daemon answers" in res.stderr


def test_daemon_kill_moves_its_traffic(lab: Lab) -> None:
    wait_for(lab, ALL)
    os.killpg(lab.pids["daemon-h3"], signal.SIGKILL)
    wait_for(lab, {1: "converged (default)", 2: "converged"})
    for i in range(10, 30):
        out = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                lab.ns("c2"),
                "curl",
                "-s",
                "--max-time",
                "2",
                "--interface",
                f"198.19.4.{i}",
                "http://198.18.0.100/",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        assert out in {"h1", "h2"}
    lab.start_daemon(3)
    wait_for(lab, ALL)


def test_wrong_key_and_replayed_frames_are_counted(lab: Lab) -> None:
    wait_for(lab, ALL)
    before = json.loads(shoal(lab, "h1", "params", "--json").stdout)["counters"]
    code = (
        "import ipaddress, socket, time\n"
        "from shoal.protocol.codec import Codec, Keys\n"
        "from shoal.protocol.frames import Heartbeat, HostState, cluster_id\n"
        "s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x886F))\n"
        "s.bind(('eth0', 0x886F))\n"
        "dst = ('eth0', 0x886F, 0, 0, b'\\xff' * 6)\n"
        "forger = Codec(cluster_id(ipaddress.ip_address('198.18.0.100')), Keys(b'w' * 32))\n"
        "for i in range(10):\n"
        "    hb = Heartbeat(7, 1, i + 1, HostState.CONVERGED, 0, b'x' * 8, None, b'\\0' * 8,\n"
        "                   frozenset(), ())\n"
        "    s.sendto(forger.encode(hb), dst)\n"
        "s.settimeout(2)\n"
        "while True:\n"
        "    data, addr = s.recvfrom(2048)\n"
        "    if data[:2] == b'SH' and data[3] == 1 and addr[2] != 4:\n"
        "        break\n"
        "time.sleep(0.05)\n"
        "for _ in range(5):\n"
        "    s.sendto(data, dst)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run(
        ["ip", "netns", "exec", lab.ns("rt"), sys.executable, "-c", code],
        check=True,
        timeout=30,
        env=env,
    )

    def counted() -> bool:
        after = json.loads(shoal(lab, "h1", "params", "--json").stdout)["counters"]
        forged: int = after["bad_auth"] - before["bad_auth"]
        replayed: int = after["replay"] - before["replay"] + after["own"] - before["own"]
        return forged >= 10 and replayed >= 5

    until("10 forged and 5 replayed frames counted", counted, seconds=5)
    wait_for(lab, ALL)


def test_host_with_another_port_rule_is_kept_out_and_named(lab: Lab) -> None:
    wait_for(lab, ALL)
    path = lab.config_path(3)
    good = path.read_text()
    try:
        path.write_text(good.replace('name = "telnet"\nstart = 23', 'name = "telnet"\nstart = 24'))
        assert shoal(lab, "h3", "reload").returncode == 0
        # host 3 is still heard, but stays out: converging, never converged
        wait_for(lab, {1: "converged (default)", 2: "converged", 3: "converging"}, seconds=10)
        log = (lab.dir / "h1.daemon.log").read_text()
        assert "host 3 has cluster digest" in log and "kept out of the cluster" in log
    finally:
        path.write_text(good)
    assert shoal(lab, "h3", "reload").returncode == 0
    wait_for(lab, ALL, seconds=15)


def test_drainstop_timeout_from_the_cli(lab: Lab) -> None:
    wait_for(lab, ALL)
    res = shoal(lab, "h2", "drainstop", "--timeout", "0.5")
    assert res.returncode == 0, res.stderr
    wait_for(lab, {1: "converged (default)", 2: "stopped", 3: "converged"})
    assert shoal(lab, "h2", "start").returncode == 0
    wait_for(lab, ALL)


def test_garbage_on_the_control_socket_is_answered_and_survived(lab: Lab) -> None:
    wait_for(lab, ALL)
    import socket

    for junk in (
        b"not json\n",
        b"[1, 2]\n",
        b'{"cmd": "explode"}\n',
        b"\xff\xfe\n",
        b'{"cmd": "drainstop", "timeout": "soon"}\n',
    ):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(lab.control(1)))
            s.sendall(junk)
            answer = json.loads(s.recv(65536))
        assert answer["ok"] is False and answer["error"]
    wait_for(lab, ALL)


def test_a_daemon_that_cannot_start_says_why(tmp_path: Path) -> None:
    """A failure at start (here the control socket's directory cannot be made) is one line
    naming it and exit code 1, not a traceback."""
    config = write_private(tmp_path / "host1.toml", (EXAMPLES / "host1.toml").read_text())
    with namespaces("start") as ns:
        sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1", ns=ns["start"])
        sh("ip", "link", "set", "eth0", "up", ns=ns["start"])
        res = subprocess.run(
            [
                "ip", "netns", "exec", ns["start"], sys.executable, "-m", "shoal.cli", "daemon",
                "--config", str(config), "--no-adapter",
                "--control", "/proc/shoal-nowhere/h1.sock", "--state-dir", str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
        )  # fmt: skip
    assert res.returncode == 1, res.stderr
    assert "error: daemon:" in res.stderr and "/proc/shoal-nowhere" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("mode", ["multicast", "igmp"])
def test_daemons_in_the_multicast_modes_serve_ipv6_clients_and_fail_over(mode: str) -> None:
    """Heartbeats to the cluster MAC (multicast, IGMP), clients over IPv6: the daemons
    converge, every IPv6 flow is answered by exactly the host the map says (one per flow,
    several hosts in all), and a crashed daemon's flows are answered by the others."""
    from shoal.lab import clients as C
    from shoal.lab.topology import run_module

    lab = Lab(name="m" + uuid.uuid4().hex[:6], hosts=3, mode=mode, ipv6=True)
    try:
        lab.up()
        assert C.wait_states(lab, C.converged([1, 2, 3]), 1, 15), C.states(lab, 1)
        sources = lab.client_sources(1, True)[:20]
        path = lab.dir / "c1.v6.flows"

        def answers(sport: int) -> list[str]:
            path.write_text(
                "".join(f"tcp {s} {sport + i} 2001:db8::100 80\n" for i, s in enumerate(sources))
            )
            out = run_module(lab.ns("c1"), "shoal.lab.probe", str(path))
            got = dict(line.split() for line in out.splitlines())
            return [got[str(i)] for i in range(len(sources))]

        before = answers(41000)
        assert "-" not in before and len(set(before)) >= 2, before
        C.crash(lab, 3)
        assert C.wait_states(lab, C.converged([1, 2]), 1, 15), C.states(lab, 1)
        after = answers(42000)
        assert "-" not in after and "h3" not in after, after
    finally:
        lab.down()


def test_metrics_pass_promtool_and_follow_a_crash(lab: Lab) -> None:
    """Every host serves its metrics on its dedicated address; Debian's promtool accepts
    them; and after host 3's daemon dies, host 1 reports two converged hosts."""
    wait_for(lab, ALL)

    def scrape(host: int) -> str:
        url = f"http://198.18.0.{10 + host}:{METRICS_PORT}/metrics"
        res = subprocess.run(
            ["ip", "netns", "exec", lab.ns("rt"), "curl", "-sf", "--max-time", "5", url],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert res.returncode == 0, (host, res.stderr)
        return res.stdout

    for host in (1, 2, 3):
        text = scrape(host)
        check = subprocess.run(
            ["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
            timeout=30,
        )  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        assert 'shoal_hosts{state="converged"} 3.0' in text
    os.killpg(lab.pids["daemon-h3"], signal.SIGKILL)
    until(
        "host 1's metrics count two converged hosts",
        lambda: 'shoal_hosts{state="converged"} 2.0' in scrape(1),
        seconds=10,
    )
    lab.restart_daemon(3)
    wait_for(lab, ALL)


def test_a_prometheus_server_scraping_the_lab_sees_a_crash(lab: Lab, tmp_path: Path) -> None:
    """Debian's Prometheus server, inside the lab (its router's namespace), scrapes every
    host each half second; its HTTP API shows three hosts converged, then, once host 3's
    daemon is killed, host 3 down and hosts 1 and 2 counting two converged hosts."""
    wait_for(lab, ALL)
    targets = ", ".join(f'"198.18.0.{10 + h}:{METRICS_PORT}"' for h in (1, 2, 3))
    conf = tmp_path / "prometheus.yml"
    conf.write_text(
        "global: {scrape_interval: 500ms, scrape_timeout: 400ms}\n"
        f"scrape_configs: [{{job_name: shoal, static_configs: [{{targets: [{targets}]}}]}}]\n"
    )
    server = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns("rt"), "prometheus", f"--config.file={conf}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", "--web.listen-address=127.0.0.1:9090"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip

    def query(q: str) -> dict[str, float]:
        res = subprocess.run(
            ["ip", "netns", "exec", lab.ns("rt"), "curl", "-sf", "--max-time", "3", "-G",
             "http://127.0.0.1:9090/api/v1/query", "--data-urlencode", f"query={q}"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if res.returncode != 0:
            return {}
        data = json.loads(res.stdout)["data"]["result"]
        return {r["metric"]["instance"].split(":")[0]: float(r["value"][1]) for r in data}

    h = {n: f"198.18.0.{10 + n}" for n in (1, 2, 3)}
    converged = 'shoal_hosts{state="converged"}'
    try:
        until(
            "Prometheus sees three hosts, each counting three converged",
            lambda: query(converged) == {h[1]: 3.0, h[2]: 3.0, h[3]: 3.0},
            seconds=20,
        )
        os.killpg(lab.pids["daemon-h3"], signal.SIGKILL)
        until(
            "Prometheus sees host 3 down and hosts 1 and 2 counting two converged",
            lambda: query("up").get(h[3]) == 0.0 and query(converged) == {h[1]: 2.0, h[2]: 2.0},
            seconds=20,
        )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    lab.restart_daemon(3)
    wait_for(lab, ALL)


def test_filter_names_the_host_real_connections_reach(lab: Lab) -> None:
    """``filter`` on host 2 for 60 random flows (the web rule hashing address and port, the
    app rule the address only, the single ssh rule, an uncovered port for the default
    host, and DNS over UDP): each names the host that answers the real connection."""
    wait_for(lab, ALL)
    rng = random.Random(5)
    sources = lab.client_sources(1, False)
    ports = [("tcp", 80), ("tcp", 8443), ("tcp", 22), ("tcp", 8080), ("udp", 53)]
    flows = [
        (proto, rng.choice(sources), rng.randint(20000, 60999), port)
        for proto, port in (rng.choice(ports) for _ in range(60))
    ]
    said = []
    for proto, src, sport, port in flows:
        req = {"cmd": "filter", "client": src, "sport": sport, "vip": "198.18.0.100",
               "port": port, "protocol": proto}  # fmt: skip
        resp = call(lab.control(2), req)
        assert resp["ok"], resp
        said.append(f"h{resp['host']}")
    path = lab.dir / "filter.flows"
    path.write_text("".join(f"{p} {s} {sp} 198.18.0.100 {dp}\n" for p, s, sp, dp in flows))
    out = run_module(lab.ns("c1"), "shoal.lab.probe", str(path))
    got = dict(line.split() for line in out.splitlines())
    answered = [got[str(i)] for i in range(len(flows))]
    assert answered == said
    assert len(set(said)) == 3  # every host takes some
    cli = shoal(lab, "h2", "filter", f"{flows[0][1]}:{flows[0][2]}", "198.18.0.100:80", "--json")
    assert cli.returncode == 0 and json.loads(cli.stdout)["rule"] == "web", cli.stderr


def test_the_lab_crashes_and_revives_a_host_from_the_command_line(lab: Lab) -> None:
    """``shoal lab crash NAME 3 --link`` (daemon SIGKILL, switch port down): the others
    converge without it; ``shoal lab revive NAME 3``: all three again; ``status`` names
    each process with its PID."""
    wait_for(lab, ALL)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))

    def lab_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "shoal.cli", "lab", *args],
                              capture_output=True, text=True, timeout=60, env=env)  # fmt: skip

    res = lab_cli("crash", lab.name, "3", "--link")
    assert res.returncode == 0 and "switch port down" in res.stdout, res.stderr
    wait_for(lab, {1: "converged (default)", 2: "converged"})
    assert lab_cli("crash", lab.name, "9").returncode == 2
    res = lab_cli("revive", lab.name, "3")
    assert res.returncode == 0, res.stderr
    lab.pids = Lab.load(lab.name).pids  # the revived daemon's PID, for the teardown
    wait_for(lab, ALL, seconds=20)
    procs = json.loads(lab_cli("status", lab.name).stdout)["processes"]
    assert procs["daemon-h3"]["alive"] and procs["daemon-h3"]["pid"] == lab.pids["daemon-h3"]


def test_remote_control_is_off_unless_the_cluster_allows_it(lab: Lab) -> None:
    wait_for(lab, ALL)
    res = shoal(lab, "h1", "--host", "2", "stop")
    assert res.returncode == 1 and "remote control is off in this cluster" in res.stderr
    assert states(lab)[2] == "converged"
