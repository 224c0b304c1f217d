"""How fast a failed application is taken out of service by its health check, and what
clients see meanwhile.

``python bench/health.py --json [--runs 10] [--interval-ms 2000]`` (root). A 3-host lab,
Debian's nginx on every host (``shoal.lab.nginx``), each host checking it with an HTTP check
on the ``web`` rule (interval as given, the defaults otherwise: timeout 1 s, rise 2,
fall 3; flap damping is loosened, since the runs fail every host many times a minute on
purpose). Clients in two client namespaces make new requests to the VIP's nginx port from
many source addresses (40 a second) and keep long-lived connections to the lab's own
service. In each run the application fails on one host (the hosts take turns), in three
ways: ``stop`` (nginx ends: connections refused), ``error`` (it answers 500) and ``hang``
(it is frozen: connections accepted, never answered); later it recovers.

Per case, over the runs: ``detect_ms`` from the failure to the moment every web bucket the
host owned is owned by another host's kernel (read from the kernels' sets every 50 ms);
``failed_requests``, the requests that failed between the failure and detection (plus
``failed_after_detection``, those that started after it); ``broken_on_survivors``,
long-lived connections to the other hosts that broke; ``recover_ms`` from the recovery to
the host owning its share of the web rule again. The bound each detection must meet is
``fall × interval + timeout + one convergence``; ``bound_ms`` says it with 500 ms for the
convergence.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from shoal.lab import clients as C
from shoal.lab import nginx
from shoal.lab.topology import Lab

HOSTS = [1, 2, 3]
WEB = 0
CASES: dict[str, Callable[[Lab, int, bool], None]] = {
    "stop": lambda lab, h, bad: nginx.stop(lab, h) if bad else nginx.start(lab, h),
    "error": lambda lab, h, bad: nginx.failing(lab, h, bad),
    "hang": lambda lab, h, bad: nginx.pause(lab, h, bad),
}


def p99(values: list[float]) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]


def with_check(lab: Lab, interval_ms: int) -> None:
    """Every host checks its nginx over HTTP on the web rule."""
    for h in HOSTS:
        path = lab.config_path(h)
        path.write_text(
            path.read_text()
            + "\n[[host.checks]]\n"
            + f'rule = "web"\nkind = "http"\nport = {nginx.HTTP_PORT}\n'
            + f"interval_ms = {interval_ms}\n"
            + f"timeout_ms = {min(1000, interval_ms // 2)}\n"
            + "flap_limit = 100\n"  # the runs fail each host over and over, on purpose
        )


def owners(lab: Lab) -> dict[int, set[int]]:
    return {h: C.owned_buckets(lab, h, WEB) for h in HOSTS}


def wait(what: str, ok: Callable[[], bool], seconds: float) -> float | None:
    """The wall time ``ok`` first held (polled every 50 ms), or None."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if ok():
            return time.time()
        time.sleep(0.05)
    return None


def one_run(lab: Lab, case: str, victim: int, limit_s: float) -> dict[str, Any]:
    before = owners(lab)
    theirs = before[victim]
    fair = 4096 // len(HOSTS)
    clients = C.Clients(lab)
    try:
        clients.start(1, limit_s * 2 + 8, rate=40, long=6, port=nginx.HTTP_PORT)
        clients.start(2, limit_s * 2 + 8, rate=0, long=6)
        time.sleep(1.0)
        failed_at = time.time()
        CASES[case](lab, victim, True)

        def moved() -> bool:
            now = owners(lab)
            others = set().union(*(now[h] for h in HOSTS if h != victim))
            return not now[victim] and theirs <= others

        detected = wait("taken over", moved, limit_s)
        time.sleep(0.5)
        recovered_at = time.time()
        CASES[case](lab, victim, False)
        back = wait("its share again", lambda: len(owners(lab)[victim]) >= fair - 1, limit_s)
        time.sleep(0.5)
        events = clients.finish()
    finally:
        clients.kill()
    shorts = [e for e in events if e["kind"] == "short" and e["t"] >= failed_at]
    end = detected or recovered_at
    failed = [e for e in shorts if e["error"] and e["t"] < end]
    after = [e for e in shorts if e["error"] and end <= e["t"] < recovered_at]
    survivors = {f"h{h}" for h in HOSTS if h != victim}
    return {
        "detect_ms": None if detected is None else round(1000 * (detected - failed_at)),
        "failed_requests": len(failed),
        "failed_after_detection": len(after),
        "requests": len(shorts),
        "broken_on_survivors": len(C.broken(events, survivors)),
        "recover_ms": None if back is None else round(1000 * (back - recovered_at)),
    }


def summary(case: str, runs: list[dict[str, Any]], bound_ms: int) -> dict[str, Any]:
    detect = [r["detect_ms"] for r in runs if r["detect_ms"] is not None]
    failed = [float(r["failed_requests"]) for r in runs]
    recover = [r["recover_ms"] for r in runs if r["recover_ms"] is not None]
    return {
        "case": case,
        "runs": len(runs),
        "undetected": len(runs) - len(detect),
        "detect_ms_p50": statistics.median(detect) if detect else None,
        "detect_ms_p99": p99(detect) if detect else None,
        "bound_ms": bound_ms,
        "failed_requests_p50": statistics.median(failed),
        "failed_requests_p99": p99(failed),
        "failed_after_detection": sum(r["failed_after_detection"] for r in runs),
        "broken_on_survivors": sum(r["broken_on_survivors"] for r in runs),
        "recover_ms_p50": statistics.median(recover) if recover else None,
        "requests": sum(r["requests"] for r in runs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--interval-ms", type=int, default=2000)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    timeout_ms = min(1000, args.interval_ms // 2)
    bound_ms = 3 * args.interval_ms + timeout_ms + 500
    lab = Lab(name="bh" + uuid.uuid4().hex[:6], hosts=len(HOSTS))
    rng = random.Random(1)
    out = []
    try:
        lab.up(service=False)
        with_check(lab, args.interval_ms)
        lab.start_services()
        for h in HOSTS:
            nginx.start(lab, h)
        assert C.wait_states(lab, C.converged(HOSTS), 1, 30), C.states(lab, 1)
        time.sleep(2 * args.interval_ms / 1000)
        for case in args.cases.split(","):
            runs = []
            for i in range(args.runs):
                victim = HOSTS[i % len(HOSTS)]
                time.sleep(rng.uniform(0, args.interval_ms / 1000))  # any phase of a check
                runs.append(one_run(lab, case, victim, bound_ms / 1000 + 5))
                assert C.wait_states(lab, C.converged(HOSTS), 1, 30), C.states(lab, 1)
            out.append(summary(case, runs, bound_ms))
    finally:
        lab.down()
    doc = {
        "hosts": len(HOSTS),
        "interval_ms": args.interval_ms,
        "timeout_ms": timeout_ms,
        "rise": 2,
        "fall": 3,
        "cases": out,
    }
    print(json.dumps(doc, indent=1 if args.json else 2))


if __name__ == "__main__":
    main()
