"""The wire trace of many seeded scenarios: one digest of every frame every host sent.

``python -m shoal.sim.trace --seeds 0:1000 [--policy quorum|available] [--sticky]`` prints
JSON: the seeds, how many frames, how many scenarios breached the contract (and their
seeds), and a SHA-256 over each scenario's wire digest. ``--sticky``: the scenarios with
client affinity across convergence (``run_scenario(seed, sticky=True)``). Two versions of
the code that give the same digest put the same bytes on the wire at the same instants in
every one of those scenarios: a refactoring that claims to change no behaviour shows it so.
"""

from __future__ import annotations

import argparse
import hashlib
import json

from shoal.sim.checkers import InvariantViolation
from shoal.sim.scenario import run_scenario


def trace(first: int, last: int, policy: str, sticky: bool = False) -> dict[str, object]:
    h = hashlib.sha256()
    frames = 0
    breached: list[int] = []
    for seed in range(first, last):
        try:
            sc = run_scenario(seed, policy=policy, sticky=sticky)
        except InvariantViolation as e:
            breached.append(seed)
            h.update(str(e).encode())
            continue
        frames += sc.frames
        h.update(sc.wire.encode())
    return {
        "seeds": f"{first}:{last}",
        "policy": policy,
        "sticky": sticky,
        "frames": frames,
        "violations": len(breached),
        "breached": breached[:100],
        "digest": h.hexdigest(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0:100", help="FIRST:LAST (LAST excluded)")
    ap.add_argument("--policy", choices=["quorum", "available"], default="quorum")
    ap.add_argument("--sticky", action="store_true", help="rules with client affinity")
    args = ap.parse_args()
    first, last = (int(x) for x in args.seeds.split(":"))
    print(json.dumps(trace(first, last, args.policy, args.sticky)))


if __name__ == "__main__":
    main()
