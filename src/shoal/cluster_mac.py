"""Cluster MAC addresses derived from the primary VIP, as NLB derives them.

unicast ``02-bf-W-X-Y-Z``, multicast ``03-bf-W-X-Y-Z``, igmp ``01-00-5e-7f-Y-Z`` for the
VIP ``W.X.Y.Z``. An IPv6 primary VIP contributes its last four bytes in the same places, so
every cluster has a MAC whichever family its primary VIP is.
"""

from __future__ import annotations

import ipaddress
from enum import StrEnum


class ClusterMode(StrEnum):
    """How client frames for a VIP reach every host."""

    UNICAST = "unicast"
    MULTICAST = "multicast"
    IGMP = "igmp"


def cluster_mac_bytes(
    vip: ipaddress.IPv4Address | ipaddress.IPv6Address, mode: ClusterMode
) -> bytes:
    """The six MAC bytes for ``vip`` in ``mode``."""
    tail = vip.packed[-4:]
    if mode is ClusterMode.UNICAST:
        return b"\x02\xbf" + tail
    if mode is ClusterMode.MULTICAST:
        return b"\x03\xbf" + tail
    return b"\x01\x00\x5e\x7f" + tail[2:]


def format_mac(mac: bytes, sep: str = "-") -> str:
    """Lower-case hex octets joined by ``sep`` (NLB prints ``-``, Linux tools ``:``)."""
    return sep.join(f"{b:02x}" for b in mac)


def ip2mac(vip: ipaddress.IPv4Address | ipaddress.IPv6Address, mode: ClusterMode) -> str:
    """NLB-style text of the cluster MAC, e.g. ``02-bf-c6-12-00-64``."""
    return format_mac(cluster_mac_bytes(vip, mode))


def igmp_group(vip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address:
    """The IPv4 multicast group whose MAC is the IGMP-mode cluster MAC (239.255.Y.Z)."""
    tail = vip.packed[-2:]
    return ipaddress.IPv4Address(bytes([239, 255]) + tail)
