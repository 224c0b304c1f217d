"""The nftables backend against the reference model, packet for packet, in namespaces:
a switch (bridge), three hosts in unicast cluster-MAC mode, and a client that sends UDP
datagrams from random addresses to every VIP and port kind."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import subprocess
import sys
import time
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from shoal.config import parse_config
from shoal.dataplane.ruleset import tables
from shoal.lab.topology import pyenv, run_module, veth
from shoal.lab.verify import random_map
from shoal.verdict import ClusterView, Outcome, Packet, decide
from tests.conftest import example_doc, needs_root, write_private
from tests.nethelp import HELPER, namespaces, python_in, sh

pytestmark = pytest.mark.beside  # times nothing: runs beside the lab tests

CLUSTER_MAC = "02:bf:c6:12:00:64"


def _config(host: int, tmp: Path) -> Path:
    doc = example_doc(host)
    doc["cluster"]["rules"][0].update(protocol="both", affinity="none")  # web: per flow
    doc["cluster"]["rules"].append(
        {
            "name": "v6only",
            "vip": "2001:db8::100",
            "start": 8000,
            "end": 8099,
            "protocol": "udp",
            "affinity": "single",
        }
    )
    text = tmp / f"h{host}.toml"
    lines = []
    for section in ("cluster", "host"):
        body = dict(doc[section])
        rules = body.pop("rules", [])
        lines.append(f"[{section}]")
        for k, v in body.items():
            lines.append(f"{k} = {_toml(v)}")
        for r in rules:
            lines.append(f"[[{section}.rules]]")
            lines += [f"{k} = {_toml(v)}" for k, v in r.items()]
    return write_private(text, "\n".join(lines) + "\n")


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return '"' + str(v) + '"'


Got = dict[tuple[str, int, int], set[int]]


def _run(
    tmp_path: Path, lease_ms: int, lapse: bool = False
) -> tuple[Any, ClusterView, list[Packet], Got]:
    """Build the namespaces, install a random map on every host, send the flows."""
    rng = random.Random(7)
    paths = {h: _config(h, tmp_path) for h in (1, 2, 3)}
    cfgs = {h: parse_config(_load(p)) for h, p in paths.items()}
    cl = cfgs[1].cluster
    epoch, view = random_map(cfgs, rng)
    with namespaces("sw", "h1", "h2", "h3", "cl") as ns:
        sh("ip", "link", "add", "br0", "type", "bridge", ns=ns["sw"])
        sh("ip", "link", "set", "br0", "up", ns=ns["sw"])
        for name in ("h1", "h2", "h3", "cl"):
            veth(f"p-{name}", ns["sw"], "eth0", ns[name])
            sh("ip", "link", "set", f"p-{name}", "master", "br0", "up", ns=ns["sw"])
        for h in (1, 2, 3):
            n = ns[f"h{h}"]
            # unicast mode: every host carries the cluster MAC; frames leave with their own
            sh(
                "nft",
                "-f",
                "-",
                ns=n,
                input=(
                    "table netdev shoal_l2 {\n chain egress {\n"
                    '  type filter hook egress device "eth0" priority 0; policy accept;\n'
                    f"  ether saddr {CLUSTER_MAC} ether saddr set 02:0{h}:c6:12:00:64\n }}\n}}\n"
                ),
            )
            sh(
                "sysctl",
                "-qw",
                "net.ipv6.conf.eth0.addr_gen_mode=3",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.eth0.rp_filter=0",
                ns=n,
            )
            sh("ip", "link", "set", "eth0", "address", CLUSTER_MAC, ns=n)
            sh("ip", "link", "set", "eth0", "up", ns=n)
            sh("ip", "addr", "add", f"198.18.0.1{h}/24", "dev", "eth0", ns=n)
            sh("ip", "addr", "add", "198.18.0.100/32", "dev", "eth0", ns=n)
            sh("ip", "addr", "add", "2001:db8::100/128", "dev", "eth0", "nodad", ns=n)
            tok = tmp_path / f"tokens{h}"
            tok.write_text("\n".join(str(t) for t in epoch.tokens_of(h)))
            run_module(n, "shoal.lab.install", str(paths[h]), str(tok), str(lease_ms))
        sh("ip", "link", "set", "eth0", "up", ns=ns["cl"])
        # flows: every rule kind, both families, random sources
        flows = []
        kinds = [
            (80, "udp"),
            (443, "udp"),
            (53, "udp"),
            (22, "udp"),
            (23, "udp"),
            (9999, "udp"),
            (8050, "udp"),
        ]
        for _ in range(1500):
            dport, proto = rng.choice(kinds)
            v6 = dport == 8050 or rng.random() < 0.4
            src: ipaddress.IPv4Address | ipaddress.IPv6Address
            if v6:
                src = ipaddress.IPv6Address(
                    int(ipaddress.IPv6Address("2001:db8:8000::")) + rng.randrange(2**90)
                )
                dst = ipaddress.ip_address("2001:db8::100")
            else:
                src = ipaddress.IPv4Address(
                    int(ipaddress.IPv4Address("198.19.0.0")) + rng.randrange(2**16)
                )
                dst = ipaddress.ip_address("198.18.0.100")
            flows.append(Packet(src, dst, proto, rng.randrange(1024, 65536), dport))
        plan = tmp_path / "flows"
        plan.write_text("".join(f"{f.src} {f.dst} {f.sport} {f.dport}\n" for f in flows))
        receivers = {h: python_in(ns[f"h{h}"], "recv-many", "2.0") for h in (1, 2, 3)}
        for r in receivers.values():
            assert r.stdout is not None and r.stdout.readline().strip() == "ready"
        if lapse:
            for h in (1, 2, 3):
                _until_lease_lapsed(ns[f"h{h}"])
        sender = python_in(ns["cl"], "send", "eth0", CLUSTER_MAC, str(plan))
        assert sender.wait(timeout=120) == 0
        got: Got = defaultdict(set)
        for h, r in receivers.items():
            text, _ = r.communicate(timeout=150)
            for line in text.splitlines():
                a, sp, dp = line.split()
                got[(str(ipaddress.ip_address(a)), int(sp), int(dp))].add(h)
    return cl, view, flows, got


@needs_root()
@pytest.mark.root
def test_kernel_verdicts_match_the_reference(tmp_path: Path) -> None:
    cl, view, flows, got = _run(tmp_path, lease_ms=600_000)
    mismatches = []
    for f in flows:
        d = decide(cl, view, f)
        want = {d.host} if d.outcome is Outcome.OWNER else set()
        have = got.get((str(f.src), f.sport, f.dport), set())
        if have != want:
            mismatches.append((f, want, have))
    assert not mismatches, f"{len(mismatches)} of {len(flows)} flows differ: {mismatches[:5]}"
    assert sum(1 for f in flows if decide(cl, view, f).outcome is Outcome.OWNER) > 700


@needs_root()
@pytest.mark.root
def test_expired_lease_stops_new_flows(tmp_path: Path) -> None:
    """A host whose daemon stopped renewing the lease takes no new flow, in any rule."""
    _, _, flows, got = _run(tmp_path, lease_ms=300, lapse=True)
    assert len(flows) == 1500
    assert not got


def _until_lease_lapsed(ns: str, seconds: float = 10.0) -> None:
    """Wait until the kernel dropped the lease's elements (their timeout ran out)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        table = tables(example_doc()["cluster"].get("name", "shoal")).inet
        out = sh("nft", "-j", "list", "set", "inet", table, "lease", ns=ns)
        sets = [x["set"] for x in json.loads(out)["nftables"] if "set" in x]
        if not sets[0].get("elem"):
            return
        time.sleep(0.05)
    raise AssertionError(f"the lease in {ns} did not lapse within {seconds} s")


def _load(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text())


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=f"{HELPER.parent.parent / 'src'}:{HELPER.parent.parent}")


def _in_namespace(script: str) -> Any:
    """Run a probe script in a namespace of its own; what it printed, as JSON."""
    with namespaces("probe") as ns:
        res = subprocess.run(
            ["ip", "netns", "exec", ns["probe"], sys.executable, "-c", script],
            capture_output=True, text=True, env=pyenv(), timeout=60,
        )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


_LEASE_PROBE = """
import json
from shoal.dataplane.backend import NftBackend
from shoal.dataplane.kernel_lease import KernelLease
from shoal.dataplane.nft import Nft, NftError
from shoal.sim.scenario import cluster_configs

def timeouts():
    doc = Nft().json([{"list": {"set": {"family": "inet", "table": "shoal", "name": "lease"}}}])
    st = [x["set"] for x in doc["nftables"] if "set" in x][0]
    return sorted((e["elem"]["val"], e["elem"]["timeout"]) for e in st.get("elem", []))

out = {}
try:
    KernelLease("shoal").renew(1000)
except NftError as e:
    out["no_table"] = str(e)
backend = NftBackend(cluster_configs(2, 64)[0])
backend.create()
backend.renew(5_000)
out["first"] = timeouts()
backend.renew(120_000)
out["renewed"] = timeouts()
backend.renew(0)
out["lapsed"] = timeouts()
print(json.dumps(out))
"""


@needs_root()
def test_lease_renewals_replace_the_timeout_and_name_what_failed() -> None:
    """The daemon's most frequent kernel update, one prepared netlink batch: each renewal
    replaces the timeout (the newest wins, longer or shorter), 0 ends the lease at once, and
    a refusal names the kernel's reason."""
    got = _in_namespace(_LEASE_PROBE)
    assert "No such file or directory" in got["no_table"]
    assert got["first"] == [["ipv4", 5], ["ipv6", 5]]
    assert got["renewed"] == [["ipv4", 120], ["ipv6", 120]]
    assert got["lapsed"] == []


_RESET_PROBE = """
import json
from shoal.dataplane.backend import NftBackend
from shoal.dataplane.contract import Install, RuleState, bucket_token
from shoal.dataplane.nft import Nft
from shoal.sim.scenario import cluster_configs

def kernel():
    doc = Nft().json([{"list": {"set": {"family": "inet", "table": "shoal", "name": "reset_0"}}}])
    st = [x["set"] for x in doc["nftables"] if "set" in x][0]
    return sorted(e for e in st.get("elem", []) if isinstance(e, int))

def install(buckets):
    return Install(frozenset(bucket_token(0, b) for b in buckets), True, (RuleState.ENABLED,))

cfg = cluster_configs(2, 64)[0]
out = {"protocol": cfg.cluster.effective_rules[0].protocol.value}
b = NftBackend(cfg)
b.create()
b.apply(install(range(10)))
b.reset(frozenset(bucket_token(0, x) for x in (2, 3, 4, 40)))
out["reset"] = kernel()
b.apply(install([0, 1, 2, 3, 9, 40]))
out["after_move"] = kernel()
again = NftBackend(cfg)
again.attach()
again.apply(install([0, 1, 2]))
out["taken_over_and_moved"] = kernel()
again.reset(frozenset())
out["cleared"] = kernel()
print(json.dumps(out))
"""


@needs_root()
def test_reset_buckets_stay_within_the_owned_ones() -> None:
    """The buckets answered with resets are owned ones only: those not owned are ignored,
    an install giving a bucket away takes it out in the same transaction (also after a
    restarted daemon took the tables over), and an empty set clears them."""
    got = _in_namespace(_RESET_PROBE)
    assert got["protocol"] != "udp"
    assert got["reset"] == [2, 3, 4]
    assert got["after_move"] == [2, 3]
    assert got["taken_over_and_moved"] == [2]
    assert got["cleared"] == []


_STICKY_PROBE = """
import ipaddress, json
from shoal.dataplane.backend import NftBackend
from shoal.dataplane.contract import Away, Install, RuleState, bucket_token
from shoal.dataplane.nft import Nft
from shoal.hashing import bucket_of
from shoal.sim.scenario import cluster_configs

cfg = cluster_configs(2, 64, sticky=30)[0]
cl = cfg.cluster
T = "shoal"

def names():
    doc = Nft().json([{"list": {"table": {"family": "inet", "name": T}}}])
    sets = [x["set"]["name"] for x in doc["nftables"] if "set" in x]
    return sorted(n for n in sets if n.startswith("aw"))

def chain_rules(name):
    doc = Nft().json([{"list": {"chain": {"family": "inet", "table": T, "name": name}}}])
    return sum(1 for x in doc["nftables"] if "rule" in x)

def install(buckets, sources, ident=(5, 0)):
    toks = frozenset(bucket_token(0, b) for b in buckets)
    return Install(toks, True, (RuleState.ENABLED,) * 4, ident, frozenset(sources))

out = {}
b = NftBackend(cfg)
b.create()
b.apply(install(range(32), {(2, 9, 0)}))
key = ipaddress.ip_address("198.19.7.7")
b.away(Away(2, 9, 0, 0, (key.packed,)))
out["sets"] = names()
out["away_rules"] = chain_rules("away_0")
bk = bucket_of(key, None, cl.seed, cl.buckets)
out["kept_bucket"] = bk in b.keep[0]
# a key this host keeps by affinity, in a bucket it gives away
mine = next(ipaddress.ip_address(f"198.19.8.{i}") for i in range(1, 255)
            if bucket_of(ipaddress.ip_address(f"198.19.8.{i}"), None, cl.seed, cl.buckets) < 32)
Nft().run(f"add element inet {T} aff4_0 {{ {mine} }}")
bm = bucket_of(mine, None, cl.seed, cl.buckets)
b.apply(install([x for x in range(32) if x != bm], {(2, 9, 0)}))
kept = b.affine_reader()().keys
out["affine"] = {str(k): [ipaddress.ip_address(v).compressed for v in vs] for k, vs in kept.items()}
out["mine"] = [bucket_token(0, bm), str(mine)]
again = NftBackend(cfg)
again.attach()
out["held_after_attach"] = again.sticky.held
again.apply(install(range(32), {(2, 9, 1)}))  # host 2 moved to another generation
out["sets_after"] = names()
# the first install of a run flushed them
out["affine_after_restart"] = again.affine_reader()().keys
print(json.dumps(out))
"""


@needs_root()
def test_sticky_tables_follow_the_installs() -> None:
    """A sticky rule's tables in the kernel: away entries make their source's sets and
    rules, and their bucket passes the pre-filter; the keys kept in a bucket given away are
    read back for the handoff; a restarted daemon knows whose sets the kernel holds, drops
    those of a source that moved to another generation, and flushes its own entries."""
    got = _in_namespace(_STICKY_PROBE)
    assert got["sets"] == ["aw4_0_2_9_0", "aw4_3_2_9_0", "aw6_0_2_9_0", "aw6_3_2_9_0"]
    assert got["away_rules"] == 4 and got["kept_bucket"]
    token, mine = got["mine"]
    assert got["affine"] == {str(token): [mine]}
    assert got["held_after_attach"] == {"2": [9, 0]} or got["held_after_attach"] == {2: [9, 0]}
    assert got["sets_after"] == []
    assert got["affine_after_restart"] == {}


_COUNTERS_PROBE = """
import json
from shoal.dataplane.counters import read_counters
from shoal.dataplane.nft import Nft
nft = Nft()
nft.run('''table inet probe {
  counter seen { packets 7 bytes 700 }
  counter other { }
  set big { type ipv4_addr; flags timeout; timeout 1h; }
}''')
nft.json([{"add": {"element": {"family": "inet", "table": "probe", "name": "big",
                               "elem": [f"10.0.{i // 256}.{i % 256}" for i in range(5000)]}}}])
listed = {
    x["counter"]["name"]: [x["counter"]["packets"], x["counter"]["bytes"]]
    for x in nft.json([{"list": {"table": {"family": "inet", "name": "probe"}}}])["nftables"]
    if "counter" in x
}
read = {k: [v["packets"], v["bytes"]] for k, v in read_counters("inet", "probe").items()}
missing = read_counters("inet", "absent")
print(json.dumps({"listed": listed, "read": read, "missing": missing}))
"""


def test_counters_read_over_netlink_are_the_listed_ones() -> None:
    """The counters the daemon reads over netlink (a cost that does not grow with the
    sets beside them) are the ones libnftables lists; a table that is not there has
    none."""
    out = _in_namespace(_COUNTERS_PROBE)
    assert out["read"] == out["listed"] == {"seen": [7, 700], "other": [0, 0]}
    assert out["missing"] == {}
