"""Open the flows of a lab self-check from a client namespace and report who answered:
``python -m shoal.lab.probe FLOWS`` with lines ``tcp|udp SRC SPORT DST DPORT``; prints
``<index> <answer or ->`` per flow. Concurrency and time are bounded."""

from __future__ import annotations

import asyncio
import socket
import sys

TIMEOUT = 1.5
CONCURRENCY = 128


async def ask(proto: str, src: str, sport: int, dst: str, dport: int) -> str:
    """One flow from (src, sport): a TCP connection, or a UDP datagram; the answer or '-'."""
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.setblocking(False)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((src, sport))
        loop = asyncio.get_running_loop()
        if proto == "tcp":
            await asyncio.wait_for(loop.sock_connect(s, (dst, dport)), TIMEOUT)
        else:
            await loop.sock_sendto(s, b"?", (dst, dport))
        data = await asyncio.wait_for(loop.sock_recv(s, 64), TIMEOUT)
        return data.decode().strip() or "-"
    except (TimeoutError, OSError):
        return "-"
    finally:
        s.close()


async def run(lines: list[str]) -> None:
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int, line: str) -> str:
        proto, src, sport, dst, dport = line.split()
        async with sem:
            return f"{i} {await ask(proto, src, int(sport), dst, int(dport))}"

    results = await asyncio.gather(*(one(i, ln) for i, ln in enumerate(lines)))
    print("\n".join(results))


def main() -> None:
    with open(sys.argv[1]) as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    asyncio.run(run(lines))


if __name__ == "__main__":
    main()
