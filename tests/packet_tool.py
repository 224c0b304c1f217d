"""Send crafted UDP frames, or count received datagrams; runs inside a test namespace.

``send IFACE DST_MAC FILE``: FILE holds lines ``src dst sport dport``; one Ethernet frame each.
``recv PORT SECONDS``: print ``src sport`` per datagram until SECONDS of silence (bounded).
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import sys
import time


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def frame(src: str, dst: str, sport: int, dport: int, smac: bytes, dmac: bytes) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    payload = b"shoal-test"
    ulen = 8 + len(payload)
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, 17, ulen)
        udp = struct.pack("!HHHH", sport, dport, ulen, 0) + payload
        udp = udp[:6] + struct.pack("!H", _csum(pseudo + udp) or 0xFFFF) + udp[8:]
        ip = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 0, 0x4000, 64, 17, 0, s.packed, d.packed
        )
        ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
        return dmac + smac + b"\x08\x00" + ip + udp
    pseudo = s.packed + d.packed + struct.pack("!I3xB", ulen, 17)
    udp = struct.pack("!HHHH", sport, dport, ulen, 0) + payload
    udp = udp[:6] + struct.pack("!H", _csum(pseudo + udp) or 0xFFFF) + udp[8:]
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, ulen, 17, 64, s.packed, d.packed)
    return dmac + smac + b"\x86\xdd" + ip6 + udp


def send(iface: str, dmac_text: str, path: str) -> None:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((iface, 0))
    smac = sock.getsockname()[4]
    dmac = bytes.fromhex(dmac_text.replace(":", ""))
    with open(path) as f:
        for i, line in enumerate(f):
            src, dst, sport, dport = line.split()
            sock.send(frame(src, dst, int(sport), int(dport), smac, dmac))
            if i % 50 == 49:
                time.sleep(0.002)  # stay well inside the receiver's socket buffer


def recv(ports: list[int], quiet: float, with_port: bool = False) -> None:
    socks = []
    for port in ports:
        for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = socket.socket(fam, socket.SOCK_DGRAM)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.bind((addr, port))
            socks.append((s, port))
    print("ready", flush=True)
    deadline = time.monotonic() + 120
    last = time.monotonic()
    while time.monotonic() - last < quiet and time.monotonic() < deadline:
        ready, _, _ = select.select([s for s, _ in socks], [], [], 0.1)
        for s in ready:
            _, peer = s.recvfrom(2048)
            port = dict((id(x), p) for x, p in socks)[id(s)]
            print(peer[0], peer[1], *([port] if with_port else []), flush=True)
            last = time.monotonic()


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(sys.argv[2], sys.argv[3], sys.argv[4])
    elif sys.argv[1] == "recv-many":  # the ports of the data-plane test
        recv([80, 443, 53, 22, 23, 9999, 8050], float(sys.argv[2]), with_port=True)
    else:
        recv([int(sys.argv[2])], float(sys.argv[3]))
