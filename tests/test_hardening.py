"""A hostile neighbour on a real lab's segment: it records heartbeats and replays them after
a host died and another restarted; and a cluster rotates its key without an outage."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.daemon.control import call
from shoal.lab import clients as C
from shoal.lab import hostile
from shoal.lab.topology import Lab, pyenv
from shoal.protocol.frames import cluster_id
from tests.conftest import needs_root
from tests.test_daemon import ALL, shoal, states, wait_for

pytestmark = [needs_root(), pytest.mark.root]

REPLAY = """
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x886F))
frames = [bytes.fromhex(x) for x in open(sys.argv[1]).read().split()]
end = time.monotonic() + float(sys.argv[2])
sent = 0
while time.monotonic() < end:  # bounded in time: stops by itself
    for f in frames:
        s.sendto(f, ("eth0", 0x886F, 0, 0, b"\\xff" * 6))
        sent += 1
        time.sleep(0.01)
print(sent)
"""


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(name="x" + uuid.uuid4().hex[:6], hosts=3).running() as lab:
        yield lab


def _python(lab: Lab, code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", lab.ns("rt"), sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        text=True,
        env=pyenv(),
    )


def _counters(lab: Lab, host: str) -> dict[str, int]:
    out: dict[str, int] = json.loads(shoal(lab, host, "params", "--json").stdout)["counters"]
    return out


def test_a_dead_hosts_heartbeats_replayed_after_a_restart_change_nothing(
    lab: Lab, tmp_path: Path
) -> None:
    """The finding: heartbeats of host 3, recorded while it lived and replayed after it
    died, made a restarted host 1 take host 3 back as a member. Now host 3 stays out
    (every query on hosts 1 and 2 during the replay), no epoch is made, and host 1 counts
    the replayed frames as unproven or replays."""
    wait_for(lab, ALL)
    frames = hostile.record(lab.ns("rt"), [3], 3)
    assert len(frames) >= 20
    capture = tmp_path / "h3.frames"
    capture.write_text("\n".join(f.hex() for f in frames))
    C.signal_daemon(lab, 3, signal.SIGKILL)
    wait_for(lab, {1: "converged (default)", 2: "converged"})
    C.signal_daemon(lab, 1, signal.SIGTERM)
    lab.restart_daemon(1)
    replayed_from = time.time()
    replay = _python(lab, REPLAY, str(capture), "8")
    seen: list[dict[int, str]] = []
    try:
        end = time.monotonic() + 7
        while time.monotonic() < end:
            for host in ("h1", "h2"):
                got = states(lab, host)
                seen.append(got)
                assert 3 not in got, f"{host} counts the dead host 3 as live: {got}"
    finally:
        out, _ = replay.communicate(timeout=30)
    assert int(out) > 200
    wait_for(lab, {1: "converged (default)", 2: "converged"})
    after = _counters(lab, "h1")
    assert after["unproven"] + after["replay"] >= 100
    for host in ("h1", "h2"):
        events = json.loads(shoal(lab, host, "display", "--json").stdout)["events"]
        since = [e for e in events if e["at"] >= replayed_from]
        made = [e["members"] for e in since if e["name"] == "epoch_created"]
        assert not any(3 in m for m in made), made  # no epoch for the dead host
        assert not any("host 3" in e["text"] for e in since), since


def _write_key(lab: Lab, name: str, key: bytes) -> None:
    path = lab.dir / name
    path.write_bytes(key)
    path.chmod(0o600)


def _rewrite(lab: Lab, old: str, new: str) -> None:
    for h in range(1, lab.hosts + 1):
        path = lab.config_path(h)
        text = path.read_text()
        assert old in text, (h, old)
        path.write_text(text.replace(old, new))


def _reload_all(lab: Lab, epoch: str, want: str) -> None:
    """Reload every host, one after the other; after each reload host 1 still sees every
    host converged in ``epoch`` (no host lost, nothing reconverged)."""
    for h in range(1, lab.hosts + 1):
        res = shoal(lab, f"h{h}", "reload")
        assert res.returncode == 0 and want in res.stdout, res.stdout + res.stderr
        q = json.loads(shoal(lab, "h1", "query", "--json").stdout)
        assert {x["host_id"]: x["state"] for x in q["hosts"]} == ALL, (h, q)
        assert q["epoch"] == epoch, (h, q["epoch"])


def test_the_key_is_rotated_without_an_outage(lab: Lab) -> None:
    """Three reloads on every host: accept the new key; sign with it (the old accepted);
    drop the old one. At every step every host sees every host converged in the same epoch;
    frames only the accepted key opens are counted while some host still signs with it."""
    wait_for(lab, ALL)
    epoch = json.loads(shoal(lab, "h1", "query", "--json").stdout)["epoch"]
    inline = next(x for x in lab.config_path(1).read_text().splitlines() if x.startswith("key ="))
    _write_key(lab, "old.key", inline.split('"')[1].encode())
    _write_key(lab, "new.key", b"rotated-cluster-key-0123456789abcdef")
    step1 = inline + '\naccept_key_files = ["new.key"]'
    step2 = 'key_file = "new.key"\naccept_key_files = ["old.key"]'
    _rewrite(lab, inline, step1)
    _reload_all(lab, epoch, "cluster key changed")
    _rewrite(lab, step1, step2)
    _reload_all(lab, epoch, "cluster key changed")
    # host 1 reloaded first: it opened hosts 2 and 3's frames with the old key until they
    # reloaded too; host 3, last, hears only the new key
    assert _counters(lab, "h1")["opened_by_accepted_key"] > 0
    before = _counters(lab, "h3")["opened_by_accepted_key"]
    time.sleep(1.0)  # a second of heartbeats, to count them
    assert _counters(lab, "h3")["opened_by_accepted_key"] == before <= 1
    _rewrite(lab, 'accept_key_files = ["old.key"]', "")
    _reload_all(lab, epoch, "cluster key changed")
    (lab.dir / "old.key").unlink()
    for host in ("h1", "h2", "h3"):
        assert _counters(lab, host)["bad_auth"] == 0


@pytest.mark.parametrize("kind", ["bad_hmac", "replay"])
def test_a_flood_at_full_rate_evicts_no_host(lab: Lab, kind: str) -> None:
    """The finding: forged frames at about 40,000 a second or more made hosts evict each
    other. A neighbour now floods at trafgen's full rate (forgeries with made-up senders, or
    frames it recorded): every host sees every host converged throughout, none is evicted
    and no lease is lost; the frames are counted as rejected."""
    wait_for(lab, ALL)
    ax = hostile.neighbour(lab)
    recorded = hostile.record(ax, [2, 3], 2)
    conf = lab.dir / "flood.cfg"
    cid = cluster_id(lab.config(1).cluster.primary_vip)
    conf.write_text(hostile.trafgen_conf(kind, cid, recorded))
    before = _counters(lab, "h1")
    start = time.time()
    gen = hostile.flood(ax, conf, 5)
    try:
        while gen.poll() is None:
            for h in (1, 2, 3):
                seen = call(lab.control(h), {"cmd": "query"})["hosts"]
                assert [x["state"] for x in seen if x["state"].startswith("converged")] == [
                    x["state"] for x in seen
                ] and len(seen) == 3, (h, seen)
            time.sleep(0.2)
    finally:
        gen.wait(timeout=30)
    for h in (1, 2, 3):
        events = call(lab.control(h), {"cmd": "display"})["events"]
        bad = [e for e in events if e["at"] >= start and e["name"] in ("host_left", "lease_lost")]
        assert not bad, (h, bad)
    after = _counters(lab, "h1")
    dropped = sum(after[k] - before[k] for k in ("bad_auth", "replay", "own"))
    assert dropped > 10_000
    if kind == "bad_hmac":
        # the made-up senders went to the other socket; the known hosts' queue lost nothing
        drops = call(lab.control(1), {"cmd": "params"})["socket_drops"]
        assert drops["known"] == 0 and drops["other"] > 0, drops
