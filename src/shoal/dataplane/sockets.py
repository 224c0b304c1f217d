"""This host's TCP connections on the VIPs, through the kernel's sock_diag (pyroute2).

Drainstop waits until none is left; when its timeout runs out, or the host stops, the ones
left are destroyed (``SOCK_DESTROY``, what ``ss -K`` does): the application sees the
connection aborted and the client gets a reset at once instead of a silent black hole.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.diag import (
    SOCK_DESTROY,
    SS_CLOSE_WAIT,
    SS_ESTABLISHED,
    SS_FIN_WAIT1,
    SS_FIN_WAIT2,
    SS_SYN_RECV,
    DiagSocket,
    inet_diag_req,
)
from pyroute2.netlink.exceptions import NetlinkError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
T = TypeVar("T")

# connections that still carry data both ways or wait for the application
OPEN = (
    (1 << SS_ESTABLISHED)
    | (1 << SS_SYN_RECV)
    | (1 << SS_FIN_WAIT1)
    | (1 << SS_FIN_WAIT2)
    | (1 << SS_CLOSE_WAIT)
)
ESTABLISHED = 1 << SS_ESTABLISHED


@dataclass(frozen=True)
class Conn:
    """One TCP socket, as sock_diag identifies it."""

    family: int
    local: IPAddress
    lport: int
    remote: IPAddress
    rport: int
    ifindex: int
    cookie: int


def _words(addr: IPAddress) -> tuple[int, int, int, int]:
    raw = addr.packed.ljust(16, b"\0")
    a, b, c, d = struct.unpack(">4I", raw)
    return a, b, c, d


def plain(addr: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (a dual-stack socket's view) as the IPv4 address."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


_worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sock_diag")


def _outside_loop(fn: Callable[[], T]) -> T:
    """pyroute2's synchronous sockets run an event loop of their own, which cannot start
    inside a running one (the daemon's): there they run in a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    return _worker.submit(fn).result(timeout=10)


def vip_connections(vips: Iterable[IPAddress], states: int = ESTABLISHED) -> list[Conn]:
    """TCP sockets in ``states`` whose local address is one of ``vips``."""
    want = set(vips)
    return _outside_loop(lambda: _list(want, states))


def _list(want: set[IPAddress], states: int) -> list[Conn]:
    out: list[Conn] = []
    with DiagSocket() as ds:
        ds.bind()
        for family in (socket.AF_INET, socket.AF_INET6):
            for m in ds.get_sock_stats(family=family, states=states, protocol=socket.IPPROTO_TCP):
                local = plain(ipaddress.ip_address(m["idiag_src"]))
                if local in want:
                    out.append(
                        Conn(
                            family,
                            ipaddress.ip_address(m["idiag_src"]),
                            m["idiag_sport"],
                            ipaddress.ip_address(m["idiag_dst"]),
                            m["idiag_dport"],
                            m["idiag_if"],
                            m["idiag_cookie"],
                        )
                    )
    return out


def destroy(conns: Iterable[Conn]) -> None:
    """Abort each connection (the peer gets a reset). One already gone is skipped: the
    kernel's answer to it is an error message that pyroute2 hands back without raising."""
    todo = list(conns)
    if todo:
        _outside_loop(lambda: _destroy(todo))


def _destroy(conns: list[Conn]) -> None:
    with DiagSocket() as ds:
        ds.bind()
        for c in conns:
            req: Any = inet_diag_req()
            req["sdiag_family"] = c.family
            req["sdiag_protocol"] = socket.IPPROTO_TCP
            req["idiag_states"] = OPEN
            req["idiag_sport"] = c.lport
            req["idiag_dport"] = c.rport
            req["idiag_src"] = _words(c.local)
            req["idiag_dst"] = _words(c.remote)
            req["idiag_if"] = c.ifindex
            req["idiag_cookie"] = c.cookie
            with contextlib.suppress(NetlinkError):
                list(ds.nlm_request(req, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK))
