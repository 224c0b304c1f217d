"""A neighbour floods a 3-host lab's segment; what does it cost the cluster?

For each kind of flood, trafgen (one process, as fast as it can) sends for ``--seconds``
from a namespace on the lab's switch:

* ``random`` — EtherType 0x886F, random bytes;
* ``foreign`` — a shoal header with another cluster id;
* ``bad_hmac`` — this cluster's header, made-up senders, a random tag;
* ``replay`` — frames of hosts 2 and 3 recorded from the segment a moment before, sent again;
* ``syn`` — TCP SYNs to the VIP's port 80 from random ports (the data plane's work).

A ``quiet`` row (no flood, same length) is the baseline of the same run. Measured per row:
the attacker's rate (frames its interface sent per second), each daemon's CPU (% of one
core), evictions (``host_left``), lease losses (``lease_lost``), epochs created, how often a
host saw fewer than three hosts converged (the control socket polled through the flood),
the frames rejected by reason (the kernel's screen and the engine) and the socket queue
drops, with the CPU as a ratio of the quiet row.

    python bench/flood.py --json [--seconds 10] [--kinds random,foreign,bad_hmac,replay,syn]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from shoal.daemon.control import call
from shoal.lab import hostile
from shoal.lab.procstat import cpu_seconds
from shoal.lab.topology import Lab, sh
from shoal.protocol.frames import cluster_id


def tx_packets(ns: str) -> int:
    out = json.loads(sh("ip", "-s", "-j", "link", "show", "eth0", ns=ns))
    return int(out[0]["stats64"]["tx"]["packets"])


def snapshot(lab: Lab) -> dict[int, dict[str, Any]]:
    out = {}
    for h in range(1, lab.hosts + 1):
        p = call(lab.control(h), {"cmd": "params"})
        out[h] = {"counters": p["counters"], "drops": p["socket_drops"]}
    return out


def settle(lab: Lab) -> None:
    """Wait until the daemons drained what a flood left in their queues (their counters stop
    moving), so that it is not counted in the next row."""
    last: object = None
    for _ in range(40):
        now = [sorted(v["counters"].items()) for v in snapshot(lab).values()]
        if now == last:
            return
        last = now
        time.sleep(0.5)


def row(lab: Lab, kind: str, seconds: float, cid: bytes, recorded: list[bytes]) -> dict[str, Any]:
    ax = lab.ns("ax")
    path = lab.dir / f"flood-{kind}.cfg"
    if kind != "quiet":
        path.write_text(hostile.trafgen_conf(kind, cid, recorded))
    pids = {h: lab.pids[f"daemon-h{h}"] for h in range(1, lab.hosts + 1)}
    before, cpu0 = snapshot(lab), {h: cpu_seconds(p) for h, p in pids.items()}
    tx0, t0, wall0 = tx_packets(ax), time.monotonic(), time.time()
    gen = hostile.flood(ax, path, seconds) if kind != "quiet" else None
    short = 0
    polls = 0
    while time.monotonic() - t0 < seconds:
        for h in range(1, lab.hosts + 1):
            q = call(lab.control(h), {"cmd": "query"}, timeout=5)
            polls += 1
            if sum(x["state"].startswith("converged") for x in q["hosts"]) < lab.hosts:
                short += 1
        time.sleep(0.2)
    if gen is not None:
        gen.wait(timeout=seconds + 30)
    elapsed = time.monotonic() - t0
    sent = tx_packets(ax) - tx0
    cpu = {h: round(100 * (cpu_seconds(p) - cpu0[h]) / elapsed, 1) for h, p in pids.items()}
    settle(lab)  # what is still queued is counted in this row, not the next
    after = snapshot(lab)
    events: dict[str, int] = {"host_left": 0, "lease_lost": 0}
    for h in range(1, lab.hosts + 1):
        for e in call(lab.control(h), {"cmd": "display"})["events"]:
            if e["name"] in events and e["at"] >= wall0:
                events[e["name"]] += 1
    rejected: dict[str, int] = {}
    drops = {"known": 0, "other": 0}
    epochs = 0
    for h in after:
        a, b = after[h]["counters"], before[h]["counters"]
        epochs += a["epochs_created"] - b["epochs_created"]
        for k in ("too_short", "bad_magic", "bad_version", "foreign_cluster", "bad_auth",
                  "replay", "unproven", "malformed", "own"):  # fmt: skip
            rejected[k] = rejected.get(k, 0) + a.get(k, 0) - b.get(k, 0)
        for k in drops:
            drops[k] += after[h]["drops"][k] - before[h]["drops"][k]
    return {
        "kind": kind,
        "seconds": round(elapsed, 2),
        "attacker_fps": round(sent / elapsed),
        "daemon_cpu_percent": cpu,
        "evictions": events["host_left"],
        "lease_losses": events["lease_lost"],
        "epochs_created": epochs,
        "polls_with_a_host_missing": short,
        "polls": polls,
        "rejected_per_host": {k: v // lab.hosts for k, v in rejected.items() if v},
        "socket_drops": drops,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--kinds", default=",".join(hostile.KINDS))
    args = ap.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    for k in kinds:
        if k not in hostile.KINDS:
            ap.error(f"--kinds: {k!r} is not one of {', '.join(hostile.KINDS)}")
    lab = Lab(name="f" + uuid.uuid4().hex[:6], hosts=3)
    rows = []
    try:
        lab.up()
        hostile.neighbour(lab)
        deadline = time.monotonic() + 15
        while True:  # converged: every host sees three
            qs = [call(lab.control(h), {"cmd": "query"})["hosts"] for h in (1, 2, 3)]
            if all(sum(x["state"].startswith("converged") for x in q) == 3 for q in qs):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"the lab did not converge: {qs}")
            time.sleep(0.2)
        recorded = hostile.record(lab.ns("ax"), [2, 3], 3)
        cid = cluster_id(lab.config(1).cluster.primary_vip)
        rows.append(row(lab, "quiet", args.seconds, cid, recorded))
        for k in kinds:
            rows.append(row(lab, k, args.seconds, cid, recorded))
    finally:
        lab.down()
    quiet = rows[0]["daemon_cpu_percent"]
    for r in rows:
        r["cpu_vs_quiet"] = {
            h: round(c / max(quiet[h], 0.1), 1) for h, c in r["daemon_cpu_percent"].items()
        }
    out = {"bench": "flood", "hosts": 3, "rows": rows}
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
