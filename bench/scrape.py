"""What serving metrics and the web view costs a daemon, and whether its loop notices.

``python bench/scrape.py --json [--rounds 3] [--seconds 10]`` (root). A 4-host lab whose
cluster has 8 port rules (the lab's 5 and three more ``multiple`` ones). In each round, host
1's daemon is measured for the same time three ways: idle, while ``/metrics`` is scraped 20
times a second, and while ``/api/picture`` (with every host's connections asked of its web
view) is fetched 10 times a second, by a client in the lab's router namespace.

Output per kind of request: ``cpu_ms_per_request`` = (the daemon's CPU while requested −
its CPU idle) / requests, the median over rounds (the CPU counts in clock ticks of 10 ms, so
each round's figure carries ±10 ms / requests); ``loop_cpu_ratio`` = the event loop's
thread's CPU while requested over its CPU idle (1.0: serving costs the loop nothing); and
``slowest_ms``, the slowest answer. The baseline of every ratio is the idle phase of the same
round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

from shoal.lab import clients as C
from shoal.lab.host_files import METRICS_PORT, WEB_PORT
from shoal.lab.procstat import cpu_seconds, thread_seconds
from shoal.lab.topology import Lab, pyenv

EXTRA_RULES = "".join(
    f'\n[[cluster.rules]]\nname = "extra{i}"\nstart = {9000 + i}\nprotocol = "tcp"\n'
    for i in (1, 2, 3)
)
KINDS = {
    "metrics": (f"http://198.18.0.11:{METRICS_PORT}/metrics", 20.0),
    "picture": (f"http://198.18.0.11:{WEB_PORT}/api/picture", 10.0),
}


def eight_rules(lab: Lab) -> None:
    """Three more rules in every host file, before the daemons start."""
    for h in range(1, lab.hosts + 1):
        path = lab.config_path(h)
        text = path.read_text()
        path.write_text(text.replace("\n[host]\n", EXTRA_RULES + "\n[host]\n", 1))
    assert len(lab.config(1).cluster.effective_rules) == 8


def phase(lab: Lab, seconds: float, kind: str | None) -> dict[str, Any]:
    """The daemon's CPU (whole and its loop thread's) over ``seconds``, requested or idle."""
    pid = lab.pids["daemon-h1"]
    load = None
    if kind is not None:
        url, rate = KINDS[kind]
        load = subprocess.Popen(
            ["ip", "netns", "exec", lab.ns("rt"), sys.executable, "-m", "shoal.lab.scraper",
             "--rate", str(rate), "--seconds", str(seconds + 1), url],
            stdout=subprocess.PIPE, text=True, env=pyenv(),
        )  # fmt: skip
        time.sleep(0.5)
    c0, loop0 = cpu_seconds(pid), thread_seconds(pid)[pid]
    time.sleep(seconds)
    c1, loop1 = cpu_seconds(pid), thread_seconds(pid)[pid]
    out: dict[str, Any] = {"cpu_s": c1 - c0, "loop_cpu_s": loop1 - loop0}
    if load is not None:
        got, _ = load.communicate(timeout=seconds + 30)
        done = json.loads(got)
        # the requests answered within the measured window, by the scraper's schedule
        out["requests"] = round(seconds * KINDS[str(kind)][1])
        out["failed"] = done["failed"]
        out["slowest_ms"] = done["slowest_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    lab = Lab(name="bs" + uuid.uuid4().hex[:6], hosts=4)
    rows: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    try:
        lab.up(service=False)
        eight_rules(lab)
        lab.start_services()
        assert C.wait_states(lab, C.converged([1, 2, 3, 4]), 1, 30), C.states(lab, 1)
        time.sleep(2)
        for _ in range(args.rounds):
            for kind in KINDS:
                idle = phase(lab, args.seconds, None)
                busy = phase(lab, args.seconds, kind)
                rows[kind].append(
                    {
                        "cpu_ms_per_request": 1000
                        * (busy["cpu_s"] - idle["cpu_s"])
                        / busy["requests"],
                        "loop_cpu_ratio": busy["loop_cpu_s"] / max(idle["loop_cpu_s"], 1e-9),
                        "idle_cpu_fraction": idle["cpu_s"] / args.seconds,
                        "failed": busy["failed"],
                        "slowest_ms": busy["slowest_ms"],
                    }
                )
    finally:
        lab.down()
    doc: dict[str, Any] = {"hosts": 4, "rules": 8, "seconds": args.seconds, "rounds": args.rounds}
    for kind, runs in rows.items():
        per = [r["cpu_ms_per_request"] for r in runs]
        doc[kind] = {
            "rate_per_s": KINDS[kind][1],
            "cpu_ms_per_request": round(statistics.median(per), 3),
            "cpu_ms_per_request_runs": [round(x, 3) for x in per],
            "loop_cpu_ratio": round(statistics.median(r["loop_cpu_ratio"] for r in runs), 3),
            "idle_cpu_fraction": round(statistics.median(r["idle_cpu_fraction"] for r in runs), 4),
            "failed": sum(r["failed"] for r in runs),
            "slowest_ms": max(r["slowest_ms"] for r in runs),
        }
    print(json.dumps(doc, indent=1 if args.json else 2))


if __name__ == "__main__":
    main()
