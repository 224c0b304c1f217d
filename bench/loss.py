"""What random heartbeat loss costs a steady cluster, in the simulator: hosts evicted by a
silence that was only loss (``host_left``), and leases that ran out (``lease_lost``), per
host-hour, by cluster size, loss rate and loss tolerance; each beside the same seeds run by
the engine without vouching (a host gone once this one missed its beats, whoever else heard
them), the baseline.

Frames take at most ``--delay`` of a period on the way (the LAN case is a few hundredths;
the simulator's random scenarios use 0.45). Every run is a seed that replays.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from typing import Any

from shoal.config import ShoalConfig
from shoal.protocol.engine import Engine
from shoal.protocol.events import EventId
from shoal.sim.cluster import SimCluster
from shoal.sim.scenario import KEY, cluster_configs


class Unvouched(Engine):
    """The baseline: the engine with vouching off."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.roster.vouch = lambda *a: None  # type: ignore[method-assign]


def configs(n: int, tolerance: int) -> list[ShoalConfig]:
    out = []
    for c in cluster_configs(n):
        cluster = c.cluster.model_copy(update={"loss_tolerance": tolerance})
        out.append(c.model_copy(update={"cluster": cluster}))
    return out


def run(job: tuple[int, float, int, bool, int, float, float]) -> dict[str, Any]:
    n, loss, tolerance, vouching, seed, seconds, delay = job
    engine = Engine if vouching else Unvouched
    sim = SimCluster(configs(n, tolerance), KEY, seed, engine=engine)
    sim.faults.max_delay_fraction = delay
    sim.run_until(20 * sim.period)
    since = sim.now
    sim.faults.loss = loss
    sim.run_until(since + seconds)
    ids = [e.id for _, e in sim.events if e.at >= since]
    return {"hosts": n, "loss": loss, "tolerance": tolerance, "vouching": vouching,
            "seed": seed, "host_left": ids.count(EventId.HOST_LEFT),
            "lease_lost": ids.count(EventId.LEASE_LOST)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--hosts", default="2,4,8")
    ap.add_argument("--loss", default="0.01,0.05,0.1", help="fractions of frames lost")
    ap.add_argument("--tolerance", default="3,4")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=300.0, help="simulated, per seed")
    ap.add_argument("--delay", type=float, default=0.02, help="most of a period on the way")
    ap.add_argument("--workers", type=int, default=max(1, multiprocessing.cpu_count()))
    args = ap.parse_args()
    jobs = [(n, loss, tol, v, seed, args.seconds, args.delay)
            for n in map(int, args.hosts.split(","))
            for loss in map(float, args.loss.split(","))
            for tol in map(int, args.tolerance.split(","))
            for v in (True, False)
            for seed in range(args.seeds)]  # fmt: skip
    with multiprocessing.Pool(args.workers) as pool:
        runs = pool.map(run, jobs)
    rows: dict[tuple[int, float, int], dict[str, Any]] = {}
    for r in runs:
        key = (r["hosts"], r["loss"], r["tolerance"])
        row = rows.setdefault(key, {"hosts": key[0], "loss": key[1], "tolerance": key[2]})
        hours = r["hosts"] * args.seconds * args.seeds / 3600
        side = "vouching" if r["vouching"] else "baseline"
        for what in ("host_left", "lease_lost"):
            name = f"{what}_per_host_hour_{side}"
            row[name] = round(row.get(name, 0.0) + r[what] / hours, 3)
    doc = {"seconds_per_seed": args.seconds, "seeds": args.seeds, "delay": args.delay,
           "rows": list(rows.values())}  # fmt: skip
    print(json.dumps(doc, indent=1 if args.json else 2))


if __name__ == "__main__":
    main()
