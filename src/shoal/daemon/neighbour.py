"""Whether a host's kernel still answers on the segment: ARP (IPv4) or neighbour
solicitation (IPv6) probes of its dedicated address, sent on the cluster interface.

A host that stopped heartbeating may have lost only its daemon: its kernel keeps serving
its established connections, and keeps answering for its address. Only a host that
answers neither is known dead. The probes are raw frames (AF_PACKET), so that they go out
whatever the neighbour cache holds, and every answer is seen, whichever MAC it is sent to
(in unicast cluster mode every host carries the cluster MAC and the switch floods it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
import time

from pyroute2 import IPRoute

ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
BROADCAST = b"\xff" * 6
TRIES = 3  # probes sent, one every INTERVAL; a host answering none is dead
INTERVAL = 0.1  # seconds

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def arp_request(mac: bytes, sender: ipaddress.IPv4Address | None, target: IP) -> bytes:
    """A broadcast ARP request for ``target`` (sender 0.0.0.0 when this host has no IPv4
    address: an RFC 5227 probe, which is answered all the same)."""
    spa = sender.packed if sender is not None else bytes(4)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + spa + bytes(6) + target.packed
    return BROADCAST + mac + struct.pack("!H", ETH_P_ARP) + arp


def is_arp_reply(frame: bytes, target: IP) -> bool:
    """Whether ``frame`` (Ethernet) is an ARP reply from ``target``."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x06":
        return False
    op = int.from_bytes(frame[20:22], "big")
    return op == 2 and frame[28:32] == target.packed


def _solicited_node(target: ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    base = int(ipaddress.IPv6Address("ff02::1:ff00:0"))
    return ipaddress.IPv6Address(base | int(target) & 0xFFFFFF)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(int(w) for w in struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def neighbour_solicitation(mac: bytes, sender: ipaddress.IPv6Address, target: IP) -> bytes:
    """A neighbour solicitation for ``target`` from ``sender``, to its solicited-node group."""
    assert isinstance(target, ipaddress.IPv6Address)
    dst = _solicited_node(target)
    body = struct.pack("!BBHI", 135, 0, 0, 0) + target.packed + b"\x01\x01" + mac
    pseudo = sender.packed + dst.packed + struct.pack("!I3xB", len(body), 58)
    body = body[:2] + struct.pack("!H", _checksum(pseudo + body)) + body[4:]
    ip6 = struct.pack("!IHBB", 0x60000000, len(body), 58, 255) + sender.packed + dst.packed
    dmac = b"\x33\x33" + dst.packed[-4:]
    return dmac + mac + struct.pack("!H", ETH_P_IPV6) + ip6 + body


def is_advertisement(frame: bytes, target: IP) -> bool:
    """Whether ``frame`` (Ethernet) is a neighbour advertisement for ``target``."""
    return (
        len(frame) >= 78
        and frame[12:14] == b"\x86\xdd"
        and frame[20] == 58
        and frame[54] == 136
        and frame[62:78] == target.packed
    )


IFA_F_TENTATIVE = 0x40


def _addresses(
    interface: str,
) -> tuple[bytes, list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]]:
    """The interface's MAC and its addresses usable as a source (not tentative)."""
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=interface)[0]
        mac = bytes.fromhex(ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS").replace(":", ""))
        addrs = [
            ipaddress.ip_interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
            for a in ipr.get_addr(index=idx)
            if not (a.get_attr("IFA_FLAGS") or a["flags"]) & IFA_F_TENTATIVE
        ]
    return mac, addrs


def _frames(interface: str, target: IP) -> tuple[int, bytes]:
    """The EtherType to listen on and the probe to send for ``target``: from an address of
    the target's subnet if the interface has one, else any of the family."""
    mac, addrs = _addresses(interface)
    family = [a for a in addrs if a.version == target.version]
    family.sort(key=lambda a: target not in a.network)
    if target.version == 4:
        v4 = family[0].ip if family else None
        assert v4 is None or isinstance(v4, ipaddress.IPv4Address)
        return ETH_P_ARP, arp_request(mac, v4, target)
    if not family:
        raise OSError(f"{interface} has no IPv6 address to probe {target} from")
    v6 = family[0].ip
    assert isinstance(v6, ipaddress.IPv6Address)
    return ETH_P_IPV6, neighbour_solicitation(mac, v6, target)


async def answers(
    interface: str, target: IP, tries: int = TRIES, interval: float = INTERVAL
) -> bool:
    """Whether ``target`` answers one of ``tries`` probes, each given ``interval`` seconds.
    Raises OSError when no probe can be sent (then nothing is known)."""
    # pyroute2's synchronous socket runs a loop of its own: not on this one
    proto, probe = await asyncio.to_thread(_frames, interface, target)
    seen = is_arp_reply if target.version == 4 else is_advertisement
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
    try:
        sock.bind((interface, proto))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        for _ in range(tries):
            sock.send(probe)
            deadline = time.monotonic() + interval
            while (left := deadline - time.monotonic()) > 0:
                with contextlib.suppress(TimeoutError):
                    frame = await asyncio.wait_for(loop.sock_recv(sock, 2048), left)
                    if seen(frame, target):
                        return True
        return False
    finally:
        sock.close()
