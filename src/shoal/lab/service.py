"""The lab's service: on every VIP and the dedicated IP, TCP and UDP ports answer with the
host's name; every accepted connection and datagram is logged as ``tcp|udp SRC SPORT``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
from pathlib import Path
from typing import Any

FLUSH = 0.2  # seconds between writes of the accept log

TCP_PORTS = (22, 23, 80, 443, 8080, 8443, 8444)
UDP_PORTS = (53, 80, 8080)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, name: bytes, log: list[str]) -> None:
        self.name = name
        self.log = log
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.log.append(f"udp {addr[0]} {addr[1]}")
        if self.transport is not None:
            self.transport.sendto(self.name, addr)


async def serve(name: str, addresses: list[str], log_path: Path) -> None:
    log: list[str] = []
    reply = f"{name}\n".encode()

    async def on_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """HTTP clients (curl, wrk) get a page naming the host; others get the name first,
        then an echo of whatever they send."""
        peer = writer.get_extra_info("peername")
        log.append(f"tcp {peer[0]} {peer[1]}")
        try:
            try:
                first = await asyncio.wait_for(reader.read(4096), 0.3)
            except TimeoutError:
                first = b""
            if first.startswith((b"GET ", b"HEAD ")):
                while b"\r\n\r\n" not in first and len(first) < 65536:
                    more = await reader.read(4096)
                    if not more:
                        break
                    first += more
                keep = b"keep-alive" in first.lower() or b"HTTP/1.1" in first
                while True:
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(reply), reply)
                    )
                    await writer.drain()
                    if not keep:
                        break
                    req = await reader.readuntil(b"\r\n\r\n")
                    if not req:
                        break
                return
            writer.write(reply)
            if first:
                writer.write(first)
            await writer.drain()
            while data := await reader.read(4096):  # echo until the client closes
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    loop = asyncio.get_running_loop()
    servers = []
    for addr in addresses:
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        for port in TCP_PORTS:
            servers.append(
                await asyncio.start_server(
                    on_tcp, addr, port, family=fam, reuse_address=True, backlog=1024
                )
            )
        for port in UDP_PORTS:
            await loop.create_datagram_endpoint(
                lambda: _Udp(reply, log), local_addr=(addr, port), family=fam
            )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    with log_path.open("a") as f:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), FLUSH)
            if log:
                f.write("\n".join(log) + "\n")
                f.flush()
                log.clear()
    for s in servers:
        s.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--log", type=Path, required=True)
    ap.add_argument("addresses", nargs="+")
    args = ap.parse_args()
    asyncio.run(serve(args.name, args.addresses, args.log))


if __name__ == "__main__":
    main()
