"""Client traffic for the demo and the end-to-end tests, from one client namespace.

``python -m shoal.lab.traffic --sources FILE --seconds S [--long N]``: short HTTP requests
to the VIP from random source addresses (bounded concurrency) for S seconds, plus N
long-lived connections kept busy (a ping every 100 ms). Prints one JSON line per event:
``{"t": wall time, "kind": "short"|"long", "host": "h1" | null, "error": ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

VIP = "198.18.0.100"
PORT = 80


def emit(**doc: object) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")


async def short(src: str) -> None:
    t = time.time()
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(VIP, PORT, local_addr=(src, 0)), 0.5)
        w.write(b"GET / HTTP/1.0\r\n\r\n")
        await w.drain()
        data = await asyncio.wait_for(r.read(4096), 1.0)
        w.close()
        host = data.rsplit(b"\n", 2)[-2].decode().strip() if b"\n" in data else None
        emit(t=t, kind="short", host=host or None, error=None if host else "empty")
    except (OSError, TimeoutError) as e:
        emit(t=t, kind="short", host=None, error=type(e).__name__)


async def long_lived(src: str, until: float, idx: int) -> None:
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(VIP, PORT, local_addr=(src, 0)), 2)
        host = (await asyncio.wait_for(r.readline(), 2)).decode().strip()
    except (OSError, TimeoutError) as e:
        emit(t=time.time(), kind="long", idx=idx, host=None, error=f"open {type(e).__name__}")
        return
    emit(t=time.time(), kind="long", idx=idx, host=host, error=None, event="open")
    try:
        while time.time() < until:
            w.write(b"ping\n")
            await w.drain()
            line = await asyncio.wait_for(r.readline(), 2)
            if line != b"ping\n":
                raise ConnectionResetError("closed")
            await asyncio.sleep(0.1)
        emit(t=time.time(), kind="long", idx=idx, host=host, error=None, event="done")
    except (OSError, TimeoutError) as e:
        emit(t=time.time(), kind="long", idx=idx, host=host, error=type(e).__name__)
    finally:
        w.close()


async def run(sources: list[str], seconds: float, longs: int, rate: int) -> None:
    until = time.time() + seconds
    rng = random.Random()
    tasks = [
        asyncio.create_task(long_lived(sources[i % len(sources)], until, i)) for i in range(longs)
    ]
    pending: set[asyncio.Task[None]] = set()
    while time.time() < until:
        if len(pending) < 32:
            pending.add(asyncio.create_task(short(rng.choice(sources))))
        done = {t for t in pending if t.done()}
        pending -= done
        await asyncio.sleep(1 / rate)
    await asyncio.gather(*pending, *tasks)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sources", required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--long", type=int, default=0)
    ap.add_argument("--rate", type=int, default=100, help="short connections per second")
    args = ap.parse_args()
    with open(args.sources) as f:
        sources = f.read().split()
    asyncio.run(run(sources, min(args.seconds, 600), args.long, args.rate))


if __name__ == "__main__":
    main()
