"""``python -m shoal.lab.scraper --rate R --seconds S URL...``: GET the URLs in turn, R a
second in all, for S seconds at most, then print one JSON line: requests, failures, and the
slowest answer in ms. A bounded load on the metrics and web endpoints, for tests and
benchmarks; it stops by itself.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import time
import urllib.request

TIMEOUT = 1.0  # seconds an answer may take (a dead host's requests time out)


def get(url: str) -> float | None:
    """Seconds the answer took; None if there was none."""
    start = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as res:
            res.read()
    except OSError:
        return None
    return time.monotonic() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, required=True, help="requests a second, in all")
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("urls", nargs="+")
    a = ap.parse_args()
    gap = 1.0 / a.rate
    start = time.monotonic()
    sent: list[concurrent.futures.Future[float | None]] = []
    # requests go out on schedule: one that waits for a dead host holds up no other
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        while time.monotonic() - start < a.seconds:
            sent.append(pool.submit(get, a.urls[len(sent) % len(a.urls)]))
            time.sleep(max(0.0, start + len(sent) * gap - time.monotonic()))
    took = [f.result() for f in sent]
    answered = [t for t in took if t is not None]
    doc = {
        "requests": len(took),
        "failed": len(took) - len(answered),
        "slowest_ms": round(1000 * max(answered, default=0.0), 1),
    }
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
