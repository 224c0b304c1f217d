"""Balance, movement and speed of the bucket map at N = 2..256 hosts, B = 4096 and 16384.

imbalance: the most loaded host's buckets over the mean (equal weights); floor: the best any
map can do, ceil(B/N)/(B/N). moved_over_ideal: buckets moved by an event over the fewest any
balanced map must move (``minimum_moves``), averaged over random events on maps that already
went through a history of changes. compute_ms: median time of one rebalance.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time

from shoal.bucket_map import counts, minimum_moves, moved, rebalance

HOSTS = [2, 4, 8, 16, 32, 64, 128, 256]
BUCKETS = [4096, 16384]


def run(n: int, b: int, events: int, rng: random.Random) -> dict[str, object]:
    hosts = list(range(1, n + 1))
    weights = {h: 50 for h in hosts}
    owners = rebalance(None, weights, b)
    # the map after a history of leaves and rejoins at equal weights must still be exact
    for _ in range(5):
        gone = rng.choice(hosts)
        owners = rebalance(owners, {h: 50 for h in hosts if h != gone}, b)
        owners = rebalance(owners, weights, b)
    imbalance = max(counts(owners).values()) / (b / n)
    current = dict(weights)
    for _ in range(10):  # and unequal weights for the events below
        current[rng.choice(hosts)] = rng.randint(1, 100)
        owners = rebalance(owners, current, b)
    ratios: dict[str, list[float]] = {"leave": [], "join": [], "weight": []}
    times: list[float] = []
    for i in range(events):
        kind = ("leave", "join", "weight")[i % 3]
        h = rng.choice(hosts)
        if kind == "leave":
            before, nxt = owners, {k: w for k, w in current.items() if k != h}
        elif kind == "join":  # host h was away; it comes back
            before = rebalance(owners, {k: w for k, w in current.items() if k != h}, b)
            nxt = current
        else:
            before = owners
            nxt = {**current, h: rng.choice([w for w in range(1, 101) if w != current[h]])}
        t0 = time.perf_counter()
        after = rebalance(before, nxt, b)
        times.append((time.perf_counter() - t0) * 1000)
        ideal = minimum_moves(before, nxt, b)
        ratios[kind].append(moved(before, after) / ideal if ideal else 1.0)
        if kind == "weight":
            owners, current = after, nxt
    return {
        "hosts": n,
        "buckets": b,
        "imbalance": round(imbalance, 6),
        "floor": round(math.ceil(b / n) / (b / n), 6),
        "moved_over_ideal": {k: round(statistics.mean(v), 6) for k, v in ratios.items()},
        "compute_ms": round(statistics.median(times), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    ap.add_argument("--events", type=int, default=60, help="random events per (N, B)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    results = [run(n, b, args.events, rng) for b in BUCKETS for n in HOSTS]
    if args.json:
        print(json.dumps({"results": results}, indent=1))
        return
    for r in results:
        print(r)


if __name__ == "__main__":
    main()
