"""The wire trace of many seeded scenarios: one digest of every frame every host sent.

``python -m shoal.sim.trace --seeds 0:1000 [--policy quorum|available]`` prints JSON: the
seeds, how many frames, how many scenarios breached the contract, and a SHA-256 over each
scenario's wire digest. Two versions of the code that give the same digest put the same
bytes on the wire at the same instants in every one of those scenarios: a refactoring that
claims to change no behaviour shows it so.
"""

from __future__ import annotations

import argparse
import hashlib
import json

from shoal.sim.checkers import InvariantViolation
from shoal.sim.scenario import run_scenario


def trace(first: int, last: int, policy: str) -> dict[str, object]:
    h = hashlib.sha256()
    frames = violations = 0
    for seed in range(first, last):
        try:
            sc = run_scenario(seed, policy=policy)
        except InvariantViolation as e:
            violations += 1
            h.update(str(e).encode())
            continue
        frames += sc.frames
        h.update(sc.wire.encode())
    return {
        "seeds": f"{first}:{last}",
        "policy": policy,
        "frames": frames,
        "violations": violations,
        "digest": h.hexdigest(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0:100", help="FIRST:LAST (LAST excluded)")
    ap.add_argument("--policy", choices=["quorum", "available"], default="quorum")
    args = ap.parse_args()
    first, last = (int(x) for x in args.seeds.split(":"))
    print(json.dumps(trace(first, last, args.policy)))


if __name__ == "__main__":
    main()
