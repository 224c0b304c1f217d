"""What a real daemon costs a host under the heartbeats of N hosts.

``python bench/daemon.py --json [--hosts 2,32,128,256] [--seconds 20]`` (root). A 2-host lab
(no clients needed) runs host 1's daemon; from host 2's namespace a generator sends the
heartbeats of hosts 2..N, ten a second each at the default period, every one a new
authentic frame (its own sequence number and tag). Each acknowledges every other host of
the N, with an echo for each, as a member of an N-host cluster does: the frames are at
least as long as a real cluster's (``frame_bytes``; a member whose acknowledgements equal its
record leaves them out), and every one carries an echo of host 1's beats. The
generated hosts are stopped and own nothing, so host 1 converges alone and the cluster
stays as it is: every frame is a repeat (the receive fast path), and host 1 sends, ticks
and renews its lease as in any steady cluster (alone in its epoch, it counts no quorum of
echoes).

Output: ``{"hosts": {"N": {"daemon_cpu_fraction": x, "frames_per_s": x, "frame_bytes": n}},
"seconds": s}``: the daemon's CPU (user + system, from /proc) per second of wall time, the
frames a second the generator sent meanwhile, and the length of one of them.
"""

from __future__ import annotations

import argparse
import heapq
import json
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from shoal.cluster_mac import ClusterMode
from shoal.config import load_host
from shoal.lab.procstat import cpu_seconds
from shoal.lab.topology import Lab, pyenv
from shoal.protocol.codec import Codec
from shoal.protocol.frames import ETHERTYPE, Flag, Heartbeat, HostState, Proof, cluster_id

HOSTS = [2, 32, 128, 256]


def generate(config: Path, hosts: int, seconds: float, interface: str) -> None:
    """Send the heartbeats of hosts 2..``hosts`` (stopped) for ``seconds``, and the proofs
    host 1 asks of them (as live hosts would); print the count. Runs inside host 2's
    namespace."""
    cfg, keys = load_host(config)
    cl = cfg.cluster
    assert cl.mode is ClusterMode.UNICAST
    codec = Codec(cluster_id(cl.primary_vip), keys)
    digest = cl.heartbeat_digest()
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETHERTYPE))
    sock.bind((interface, ETHERTYPE))
    period = cl.period_ms / 1000
    peers = list(range(2, hosts + 1))
    inc = time.time_ns()
    seq = dict.fromkeys(peers, 0)
    everyone = frozenset(range(1, hosts + 1))
    acked = {h: everyone - {h} for h in peers}
    start = time.monotonic()
    # each host at its own phase within the period, as real hosts are
    due = [(start + period * i / len(peers), h) for i, h in enumerate(peers)]
    sent = 0
    size = 0
    end = start + seconds
    while due[0][0] < end:
        at, h = heapq.heappop(due)
        while (wait := at - time.monotonic()) > 0:
            sock.settimeout(wait)
            try:
                got = codec.decode(sock.recv(2048))
            except TimeoutError:
                break
            if isinstance(got, Heartbeat) and got.host_id == 1 and got.asks:
                for x in sorted(got.asks & set(peers)):  # host 1 asks: prove it alive
                    seq[x] += 1
                    proof = Proof(x, inc, seq[x], ((1, got.incarnation, got.seq),))
                    sock.sendto(codec.encode(proof), (interface, ETHERTYPE, 0, 0, b"\xff" * 6))
        seq[h] += 1
        hb = Heartbeat(
            host_id=h,
            incarnation=inc,
            seq=seq[h],
            state=HostState.STOPPED,
            flags=Flag.OWNS_NOTHING,
            config_digest=digest,
            epoch=None,
            epoch_digest=b"\x00" * 8,
            acks=acked[h],
            rules=(),
            beat=seq[h] % 256,
            echoes=(0,) * len(acked[h]),
        )
        frame = codec.encode(hb)
        size = len(frame)
        sock.sendto(frame, (interface, ETHERTYPE, 0, 0, b"\xff" * 6))
        sent += 1
        heapq.heappush(due, (at + period, h))
    print(json.dumps({"sent": sent, "seconds": time.monotonic() - start, "bytes": size}))


def measure(lab: Lab, hosts: int, seconds: float) -> dict[str, float]:
    pid = lab.pids["daemon-h1"]
    gen = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            lab.ns("h2"),
            sys.executable,
            __file__,
            "--generate",
            str(lab.config_path(2)),
            str(hosts),
            str(seconds + 4),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=pyenv(),
    )
    try:
        time.sleep(3)  # the daemon has heard every generated host by now
        t0, c0 = time.monotonic(), cpu_seconds(pid)
        time.sleep(seconds)
        t1, c1 = time.monotonic(), cpu_seconds(pid)
        out, _ = gen.communicate(timeout=seconds + 30)
    finally:
        if gen.poll() is None:
            gen.kill()
            gen.wait()
    done = json.loads(out)
    return {
        "daemon_cpu_fraction": round((c1 - c0) / (t1 - t0), 4),
        "frames_per_s": round(done["sent"] / done["seconds"]),
        "frame_bytes": done["bytes"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--hosts", default=",".join(map(str, HOSTS)))
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--generate", nargs=3, metavar=("CONFIG", "HOSTS", "SECONDS"))
    args = ap.parse_args()
    if args.generate:
        config, hosts, seconds = args.generate
        generate(Path(config), int(hosts), float(seconds), "eth0")
        return
    lab = Lab(name="bd" + uuid.uuid4().hex[:6], hosts=2, daemons=False)
    results: dict[str, dict[str, float]] = {}
    try:
        lab.up(service=False)
        lab.restart_daemon(1)
        time.sleep(2)
        for n in (int(x) for x in args.hosts.split(",")):
            results[str(n)] = measure(lab, n, args.seconds)
    finally:
        lab.down()
    doc = {"seconds": args.seconds, "hosts": results}
    print(json.dumps(doc, indent=1 if args.json else 2))


if __name__ == "__main__":
    main()
