"""How long the clients of a crashed host wait before they learn their connections are gone,
with ``cluster.reset_dead_clients`` on (the default) and off, in the same run.

``python bench/dead_clients.py --json [--runs N]`` (root). For each setting a 3-host lab with
Debian's nginx on every host runs N crashes of host 3 (daemon SIGKILLed, switch port cut),
reviving it after each. Clients during a run:

* c1 keeps 60 long-lived sessions busy (a ping every 100 ms, each echo awaited 20 s, the
  client's own timeout): ``sessions`` is, for those on host 3, the time from the kill to the
  error that ended each, and its kind; ``broken_on_survivors`` counts the others that broke;
* c2 downloads ``/big`` (65 KB/s, minutes long) with curl 8 times, each from an address and
  port hashing into host 3's buckets, with ``--keepalive-time 1`` (a client that only
  receives sends nothing but its keepalive probes): ``downloads`` is the time from the kill
  to curl's exit, and its exit code (56: the connection was reset or timed out);
* ``failover_ms``: from the kill to the last survivor converged without host 3.

A client that sends (a request, an upload, a keepalive probe) is answered with a reset at
its first packet after the new owner knows the host dead; a client that only waits for data
sends nothing, and learns nothing before its keepalive.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import time
import uuid
from typing import Any

from shoal.lab import clients as C
from shoal.lab import nginx
from shoal.lab.topology import Lab

SESSIONS = 60
PATIENCE = 20.0  # seconds a session awaits an echo: what it waits without resets
DOWNLOADS = 8
WAIT = 25.0  # seconds a run waits for the victim's clients to fail


def _curl(lab: Lab, src: str, sport: int) -> subprocess.Popen[bytes]:
    url = f"http://198.18.0.100:{nginx.HTTP_PORT}/big"
    return subprocess.Popen(
        ["ip", "netns", "exec", lab.ns("c2"), "curl", "-s", "-o", "/dev/null",
         "--interface", src, "--local-port", str(sport), "--keepalive-time", "1",
         "--max-time", str(WAIT + 10), url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _failover(lab: Lab, since: float) -> float | None:
    done = [
        e["at"]
        for h in (1, 2)
        for e in C.daemon_events(lab, h, since)
        if e["name"] in ("converged", "converged_default") and 3 not in e["members"]
    ]
    return max(done) if len(done) >= 2 else None


def one_run(lab: Lab, rng: random.Random) -> dict[str, Any]:
    clients = C.Clients(lab)
    curls: list[subprocess.Popen[bytes]] = []
    try:
        clients.start(1, WAIT + 15, long=SESSIONS, patience=PATIENCE)
        pairs = C.targets(lab, 2, C.owned_buckets(lab, 3), DOWNLOADS, rng)
        curls = [_curl(lab, src, sport) for src, sport in pairs]
        time.sleep(2.0)  # sessions open, downloads running
        opened = {e["idx"]: e["host"] for e in clients.collect() if e.get("event") == "open"}
        killed = C.crash(lab, 3)
        ended: dict[int, tuple[float, int]] = {}
        deadline = time.time() + WAIT
        victims = {i for i, h in opened.items() if h == "h3"}
        while time.time() < deadline:
            for k, p in enumerate(curls):
                if k not in ended and p.poll() is not None:
                    ended[k] = (time.time(), p.returncode)
            errors = {e["idx"] for e in clients.collect() if e["kind"] == "long" and e["error"]}
            if victims <= errors and len(ended) == len(curls):
                break
            time.sleep(0.05)
        events = clients.collect()
        failover = _failover(lab, killed)
    finally:
        clients.kill()
        for p in curls:
            if p.poll() is None:
                p.kill()
                p.wait()
        C.revive(lab, 3)
        C.wait_states(lab, C.converged([1, 2, 3]), 1, 30)
    errs = {e["idx"]: e for e in events if e["kind"] == "long" and e["error"]}

    def session(i: int) -> dict[str, Any]:
        if i not in errs:
            return {"ms": None, "error": "still waiting"}
        return {"ms": round(1000 * (errs[i]["t"] - killed)), "error": errs[i]["error"]}

    def download(k: int) -> dict[str, Any]:
        if k not in ended:
            return {"ms": None, "exit": None}
        return {"ms": round(1000 * (ended[k][0] - killed)), "exit": ended[k][1]}

    return {
        "failover_ms": None if failover is None else round(1000 * (failover - killed)),
        "sessions_on_victim": len(victims),
        "sessions": [session(i) for i in sorted(victims)],
        "broken_on_survivors": sum(1 for i in errs if i not in victims),
        "downloads": [download(k) for k in range(len(curls))],
    }


def _stats(values: list[int | None]) -> dict[str, Any]:
    got = sorted(v for v in values if v is not None)
    return {
        "n": len(values),
        "ended": len(got),
        "p50_ms": statistics.median(got) if got else None,
        "max_ms": got[-1] if got else None,
    }


def setting(reset: bool, runs: int, rng: random.Random) -> dict[str, Any]:
    lab = Lab(name="k" + uuid.uuid4().hex[:6], hosts=3, reset_dead_clients=reset)
    results = []
    try:
        lab.up()
        for h in (1, 2, 3):
            nginx.start(lab, h)
        C.wait_states(lab, C.converged([1, 2, 3]), 1, 30)
        for _ in range(runs):
            results.append(one_run(lab, rng))
    finally:
        lab.down()
    sessions = [s for r in results for s in r["sessions"]]
    downloads = [d for r in results for d in r["downloads"]]
    failovers = [r["failover_ms"] for r in results]
    after = [
        s["ms"] - r["failover_ms"]
        for r in results
        for s in r["sessions"]
        if s["ms"] is not None and r["failover_ms"] is not None
    ]
    return {
        "reset_dead_clients": reset,
        "failover": _stats(failovers),
        "sessions": _stats([s["ms"] for s in sessions])
        | {
            "errors": sorted({s["error"] for s in sessions}),
            "max_ms_after_failover": max(after) if after else None,
        },
        "downloads": _stats([d["ms"] for d in downloads])
        | {"exits": sorted({d["exit"] for d in downloads if d["exit"] is not None})},
        "broken_on_survivors": sum(r["broken_on_survivors"] for r in results),
        "runs": results,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    rng = random.Random(11)
    on = setting(True, args.runs, rng)
    off = setting(False, args.runs, rng)
    ratio = {
        k: round(off[k]["p50_ms"] / on[k]["p50_ms"], 1)
        if off[k]["p50_ms"] and on[k]["p50_ms"] else None
        for k in ("sessions", "downloads")
    }  # fmt: skip
    doc = {"bench": "dead_clients", "on": on, "off": off, "off_over_on_p50": ratio}
    if args.json:
        print(json.dumps(doc))
        return
    for d in (on, off):
        print(
            f"reset_dead_clients={d['reset_dead_clients']}: failover p50 "
            f"{d['failover']['p50_ms']} ms; sessions told p50 {d['sessions']['p50_ms']} ms, "
            f"max {d['sessions']['max_ms']} ms ({', '.join(d['sessions']['errors'])}); "
            f"downloads p50 {d['downloads']['p50_ms']} ms, max {d['downloads']['max_ms']} ms"
        )
    print(f"off/on (p50): {ratio}")


if __name__ == "__main__":
    main()
