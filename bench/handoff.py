"""Client affinity at scale: what 10,000 and 1,000,000 affinity entries cost one host.

``python bench/handoff.py --json [--sizes 10000 1000000]`` (root). For each size, in a
namespace of its own with the tables of a cluster whose "web" rule is sticky (4096 buckets):

* ``fill_s``: the entries put in the rule's IPv4 affinity set (one transaction per 50,000;
  in service the kernel adds them as it takes connections);
* ``kernel_bytes_per_entry``: the kernel's slab memory they take (``/proc/meminfo``, before
  and after), per entry, and the same for as many away entries (``away_bytes_per_entry``);
* the host then gives every bucket away, and the handoff of all its entries is made as the
  daemon makes it: ``read_s`` (the kernel's keys, read after the release), ``frames`` and
  ``bytes`` (handoff frames, encoded and signed: ``encode_s``), then on the receiving side
  ``decode_s`` and ``away_s`` (the away entries put in the kernel, one transaction per
  frame);
* ``counters_s``: one read of the rule counters (what a metrics scrape or ``params`` does;
  over netlink, see :mod:`shoal.dataplane.counters`) with the entries in place, and
  ``count_s``: a listing of the entries (what a drainstop keeping its affine clients reads
  each period, on a worker thread).

A handoff sends only the keys of buckets that moved, to hosts that do not hold them yet
(docs/convergence.md): this is the cost when every entry moves at once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BATCH = 50_000


def slab_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Slab:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no Slab line in /proc/meminfo")


def settled_slab() -> int:
    """Slab after freed objects had a moment to go back (RCU frees them late)."""
    time.sleep(1.0)
    return slab_bytes()


def inside(n: int) -> dict[str, Any]:
    """One size, in the namespace this process runs in."""
    from shoal.dataplane.backend import NftBackend
    from shoal.dataplane.contract import Away, Install, RuleState, bucket_token
    from shoal.dataplane.ruleset import affinity_set, set_ref
    from shoal.protocol.codec import Codec, Keys
    from shoal.protocol.engine.handoff import pieces_of
    from shoal.protocol.frames import EpochKey, Handoff, cluster_id
    from shoal.sim.scenario import KEY, cluster_configs

    cfg = cluster_configs(1, 4096, sticky=3600)[0]
    rules = cfg.cluster.effective_rules
    backend = NftBackend(cfg)
    backend.create()
    every = frozenset(bucket_token(0, b) for b in range(4096))
    states = (RuleState.ENABLED,) * len(rules)
    backend.apply(Install(every, True, states, (1, 0), frozenset({(2, 1, 0)})))
    out: dict[str, Any] = {"entries": n}
    ref = set_ref(affinity_set("ipv4", 0), backend.names.inet)
    base = 0x0A000000  # 10.0.0.0 on: n distinct client addresses
    before = settled_slab()
    t = time.perf_counter()
    for lo in range(0, n, BATCH):
        elems = [
            f"{(a >> 24) & 255}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}"
            for a in range(base + lo, base + min(n, lo + BATCH))
        ]
        backend.nft.json([{"add": {"element": {**ref, "elem": elems}}}])
    out["fill_s"] = round(time.perf_counter() - t, 3)
    out["kernel_bytes_per_entry"] = round((settled_slab() - before) / n, 1)

    t = time.perf_counter()
    counts = backend.affine_reader()().counts
    out["count_s"] = round(time.perf_counter() - t, 3)
    assert counts[0] == n, counts
    t = time.perf_counter()
    backend.counters()
    out["counters_s"] = round(time.perf_counter() - t, 3)

    backend.apply(Install(frozenset(), True, states, (1, 0), frozenset({(2, 1, 0)})))
    t = time.perf_counter()
    kept = backend.affine_reader()().keys
    out["read_s"] = round(time.perf_counter() - t, 3)
    keys = [k for ks in kept.values() for k in ks]
    assert len(keys) == n, len(keys)

    codec = Codec(cluster_id(cfg.cluster.primary_vip), Keys(KEY))
    epoch = EpochKey(2, 1, 1)
    t = time.perf_counter()
    pieces = pieces_of(keys)
    frames = [
        codec.encode(Handoff(1, 1, i, epoch, 0, 2, i, len(pieces), 0, piece))
        for i, piece in enumerate(pieces)
    ]
    out["encode_s"] = round(time.perf_counter() - t, 3)
    out["frames"] = len(frames)
    out["bytes"] = sum(len(f) for f in frames)

    receiver = Codec(cluster_id(cfg.cluster.primary_vip), Keys(KEY))
    t = time.perf_counter()
    got = [receiver.decode(f) for f in frames]
    out["decode_s"] = round(time.perf_counter() - t, 3)
    assert all(isinstance(h, Handoff) for h in got)
    before = settled_slab()
    t = time.perf_counter()
    for h in got:
        assert isinstance(h, Handoff)
        backend.away(Away(2, 1, 0, h.rule, h.keys))
    out["away_s"] = round(time.perf_counter() - t, 3)
    out["away_bytes_per_entry"] = round((settled_slab() - before) / n, 1)
    backend.remove()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    ap.add_argument("--inside", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inside:
        print(json.dumps(inside(args.inside)))
        return
    ns = f"shb-{uuid.uuid4().hex[:6]}"
    rows = []
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        for cmd in (
            ["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
            ["link", "set", "eth0", "up"],
        ):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        for n in args.sizes:
            res = subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, __file__, "--inside", str(n)],
                check=True,
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            rows.append(json.loads(res.stdout))
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    doc = {"bench": "handoff", "rows": rows}
    if args.json:
        print(json.dumps(doc))
        return
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
