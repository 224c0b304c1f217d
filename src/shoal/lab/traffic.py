"""Client traffic for the demo, the end-to-end tests and the failover benchmark; runs in one
client namespace and prints one JSON line per event.

``python -m shoal.lab.traffic --seconds S [--sources FILE --rate R] [--long N]
[--probe FILE] [--sniff]``

* short: HTTP requests to the VIP (port 80, or ``--port``) from random source addresses
  (bounded concurrency), ``{"t", "kind": "short", "host": "h1" | null, "error"}``; an
  answer with a status other than 200 is an error;
* long: N long-lived connections kept busy (a ping every 100 ms, its echo awaited
  ``--patience`` seconds, 2 unless told), an ``open`` event, then ``done`` or the error that
  broke it;
* affine: N clients, each from one address of its own, a new connection every ``--every``
  seconds to ``--port``, ``{"t", "kind": "affine", "src", "host", "error"}``;
* probe: for each ``SRC SPORT`` line, connection attempts from exactly that address and
  port (so to one bucket), each closed with a reset; an event each time the outcome flips,
  ``{"t": start of the attempt, "kind": "probe", "idx", "ok"}``;
* sniff: every SYN-ACK the VIP sends back, keyed by the SYN it answers; at the end
  ``{"kind": "synacks", "synacks": n, "doubles": d}`` where a double is a SYN that got
  SYN-ACKs with two different sequence numbers: two hosts answered it.

Everything stops after S seconds, or at once on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ipaddress
import json
import random
import signal
import socket
import struct
import sys
import time
from collections import defaultdict

VIP = "198.18.0.100"
VIP6 = "2001:db8::100"
PORT = 80
PROBE_TIMEOUT = 0.01  # a lost SYN is retried after 10 ms, with a new SYN
PROBE_PAUSE = 0.05  # between attempts that succeed (a failing one is retried at once)
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD


def emit(**doc: object) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


class Clock:
    """The run's end, moved up by SIGTERM."""

    def __init__(self, seconds: float) -> None:
        self.until = time.time() + seconds

    def running(self) -> bool:
        return time.time() < self.until

    def stop(self) -> None:
        self.until = 0.0


async def short(src: str, port: int) -> None:
    t = time.time()
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(VIP, port, local_addr=(src, 0)), 0.5)
        w.write(b"GET / HTTP/1.0\r\n\r\n")
        await w.drain()
        data = await asyncio.wait_for(r.read(4096), 1.0)
        w.close()
        host = data.rsplit(b"\n", 2)[-2].decode().strip() if b"\n" in data else None
        status = data.split(b" ", 2)[1] if data.startswith(b"HTTP/") else b"200"
        error = None if host else "empty"
        if status != b"200":
            error = f"status {status.decode(errors='replace')}"
        emit(t=t, kind="short", host=host or None, error=error)
    except (OSError, TimeoutError) as e:
        emit(t=t, kind="short", host=None, error=type(e).__name__)


async def short_loop(sources: list[str], clock: Clock, rate: int, port: int) -> None:
    rng = random.Random()
    pending: set[asyncio.Task[None]] = set()
    while clock.running():
        if len(pending) < 32:
            pending.add(asyncio.create_task(short(rng.choice(sources), port)))
        pending = {t for t in pending if not t.done()}
        await asyncio.sleep(1 / rate)
    await asyncio.gather(*pending)


async def long_lived(src: str, clock: Clock, idx: int, patience: float) -> None:
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(VIP, PORT, local_addr=(src, 0)), 2)
        host = (await asyncio.wait_for(r.readline(), 2)).decode().strip()
    except (OSError, TimeoutError) as e:
        emit(t=time.time(), kind="long", idx=idx, host=None, error=f"open {type(e).__name__}")
        return
    emit(t=time.time(), kind="long", idx=idx, host=host, error=None, event="open")
    try:
        while clock.running():
            w.write(b"ping\n")
            await w.drain()
            line = await asyncio.wait_for(r.readline(), patience)
            if line != b"ping\n":
                raise ConnectionResetError("closed")
            await asyncio.sleep(0.1)
        emit(t=time.time(), kind="long", idx=idx, host=host, error=None, event="done")
    except (OSError, TimeoutError) as e:
        emit(t=time.time(), kind="long", idx=idx, host=host, error=type(e).__name__)
    finally:
        w.close()


async def affine(src: str, clock: Clock, port: int, every: float) -> None:
    """One client: a new connection every ``every`` seconds from the same address (any
    port; to the IPv6 VIP from an IPv6 one), each reading the host's name; an event per
    connection."""
    vip = VIP6 if ":" in src else VIP
    while clock.running():
        t = time.time()
        try:
            r, w = await asyncio.wait_for(
                asyncio.open_connection(vip, port, local_addr=(src, 0)), 1.0
            )
            host = (await asyncio.wait_for(r.readline(), 1.0)).decode().strip()
            w.close()
            emit(t=t, kind="affine", src=src, host=host or None, error=None)
        except (OSError, TimeoutError) as e:
            emit(t=t, kind="affine", src=src, host=None, error=type(e).__name__)
        await asyncio.sleep(max(0.0, every - (time.time() - t)))


async def attempt(src: str, sport: int) -> bool:
    """One connection from (src, sport) to the VIP; closed with a reset, so the same
    address and port can be used again at once."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    try:
        s.bind((src, sport))
        await asyncio.wait_for(
            asyncio.get_running_loop().sock_connect(s, (VIP, PORT)), PROBE_TIMEOUT
        )
        return True
    except (OSError, TimeoutError):
        return False
    finally:
        s.close()


async def probe(idx: int, src: str, sport: int, clock: Clock) -> None:
    state: bool | None = None
    while clock.running():
        t = time.time()
        ok = await attempt(src, sport)
        if ok != state:
            emit(t=t, kind="probe", idx=idx, ok=ok)
            state = ok
        if ok or time.time() - t < PROBE_TIMEOUT / 2:  # refused at once: do not spin
            await asyncio.sleep(PROBE_PAUSE)


SO_ATTACH_FILTER = 26


def synack_filter(vip: bytes) -> bytes:
    """A classic BPF program passing only TCP segments from ``vip`` with SYN and ACK set
    (offsets from the IP header: a SOCK_DGRAM packet socket), so the kernel drops every
    other packet before Python sees it."""
    prog = [
        (0x30, 0, 0, 9),  # ldb [9]: protocol
        (0x15, 0, 7, socket.IPPROTO_TCP),
        (0x20, 0, 0, 12),  # ld [12]: source address
        (0x15, 0, 5, int.from_bytes(vip, "big")),
        (0xB1, 0, 0, 0),  # ldx 4*([0]&0xf): header length
        (0x50, 0, 0, 13),  # ldb [x+13]: TCP flags
        (0x54, 0, 0, 0x12),  # and #SYN|ACK
        (0x15, 0, 1, 0x12),
        (0x06, 0, 0, 0xFFFF),  # accept
        (0x06, 0, 0, 0),  # drop
    ]
    return b"".join(struct.pack("HBBI", *ins) for ins in prog)


def synack_filter6(vip: bytes) -> bytes:
    """The same for IPv6 (a TCP header right after the fixed one: the VIP sends no
    extension headers)."""
    words = [int.from_bytes(vip[i : i + 4], "big") for i in range(0, 16, 4)]
    prog = [
        (0x30, 0, 0, 6),  # ldb [6]: next header
        (0x15, 0, 12, socket.IPPROTO_TCP),
        *[ins for i, w in enumerate(words)
          for ins in ((0x20, 0, 0, 8 + 4 * i), (0x15, 0, 10 - 2 * i, w))],
        (0x30, 0, 0, 40 + 13),  # ldb [53]: TCP flags
        (0x54, 0, 0, 0x12),
        (0x15, 0, 1, 0x12),
        (0x06, 0, 0, 0xFFFF),
        (0x06, 0, 0, 0),
    ]  # fmt: skip
    return b"".join(struct.pack("HBBI", *ins) for ins in prog)


class SynAckCounter:
    """SYN-ACKs from the VIPs seen on the client's interface, by the SYN they answer."""

    def __init__(self, iface: str = "eth0") -> None:
        self.vip = ipaddress.ip_address(VIP).packed
        self.vip6 = ipaddress.ip_address(VIP6).packed
        self.socks = [
            self._open(iface, ETH_P_IP, synack_filter(self.vip)),
            self._open(iface, ETH_P_IPV6, synack_filter6(self.vip6)),
        ]
        self.answers: dict[tuple[bytes, int, int], set[int]] = defaultdict(set)

    def _open(self, iface: str, proto: int, code: bytes) -> socket.socket:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(proto))
        prog = ctypes.create_string_buffer(code)  # the kernel copies it
        fprog = struct.pack("HL", len(code) // 8, ctypes.addressof(prog))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        sock.bind((iface, proto))
        sock.setblocking(False)
        return sock

    def on_readable(self) -> None:
        for sock in self.socks:
            for _ in range(512):
                try:
                    pkt = sock.recv(128)
                except (BlockingIOError, InterruptedError):
                    break
                self._take(pkt)

    def _take(self, pkt: bytes) -> None:
        if len(pkt) >= 60 and pkt[0] >> 4 == 6:
            if pkt[6] != socket.IPPROTO_TCP or pkt[8:24] != self.vip6:
                return
            client, tcp = pkt[24:40], pkt[40:]
        elif len(pkt) >= 40 and pkt[0] >> 4 == 4:
            if pkt[9] != socket.IPPROTO_TCP or pkt[12:16] != self.vip:
                return
            client, tcp = pkt[16:20], pkt[(pkt[0] & 0x0F) * 4 :]
        else:
            return
        if len(tcp) < 14 or tcp[13] & 0x12 != 0x12:
            return
        _, dport, seq, ack = struct.unpack("!HHII", tcp[:12])
        self.answers[(client, dport, ack)].add(seq)

    def summary(self) -> dict[str, object]:
        doubles = [k for k, seqs in self.answers.items() if len(seqs) > 1]
        return {
            "kind": "synacks",
            "synacks": len(self.answers),
            "doubles": len(doubles),
            "examples": [f"{ipaddress.ip_address(a)}:{p}" for a, p, _ in doubles[:5]],
        }


async def run(args: argparse.Namespace) -> None:
    clock = Clock(min(args.seconds, 600))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, clock.stop)
    counter = SynAckCounter() if args.sniff else None
    if counter is not None:
        for sock in counter.socks:
            loop.add_reader(sock.fileno(), counter.on_readable)
    sources = _lines(args.sources) if args.sources else []
    tasks = [
        asyncio.create_task(long_lived(sources[i % len(sources)], clock, i, args.patience))
        for i in range(args.long)
    ]
    for src in sources[: args.affine]:
        tasks.append(asyncio.create_task(affine(src, clock, args.port, args.every)))
    if args.probe:
        for i, line in enumerate(_lines(args.probe)):
            src, sport = line.split()
            tasks.append(asyncio.create_task(probe(i, src, int(sport), clock)))
    if args.rate and sources:
        tasks.append(asyncio.create_task(short_loop(sources, clock, args.rate, args.port)))
    emit(t=time.time(), kind="ready")
    await asyncio.gather(*tasks)
    if counter is not None:
        await asyncio.sleep(0.2)  # SYN-ACKs still on the way
        counter.on_readable()
        for sock in counter.socks:
            loop.remove_reader(sock.fileno())
        emit(t=time.time(), **counter.summary())
    emit(t=time.time(), kind="end")


def _lines(path: str) -> list[str]:
    with open(path) as f:
        return [ln.strip() for ln in f if ln.strip()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--sources", help="file of source addresses, one per line")
    ap.add_argument("--rate", type=int, default=0, help="short requests per second")
    ap.add_argument("--port", type=int, default=PORT, help="the short requests' port")
    ap.add_argument("--long", type=int, default=0, help="long-lived connections")
    ap.add_argument(
        "--patience", type=float, default=2.0, help="seconds a long connection awaits its echo"
    )
    ap.add_argument("--affine", type=int, default=0, help="clients connecting again and again")
    ap.add_argument("--every", type=float, default=0.5, help="seconds between their connections")
    ap.add_argument("--probe", help="file of 'SRC SPORT' lines to probe")
    ap.add_argument("--sniff", action="store_true", help="count SYN-ACKs per SYN")
    args = ap.parse_args()
    if (args.long or args.affine) and not args.sources:
        ap.error("--long and --affine need --sources")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
