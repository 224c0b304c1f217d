"""Cluster adapter set-up: what a host's cluster interface needs in each cluster mode.

* unicast: the interface carries the cluster MAC ``02-bf-…``; an nft ``netdev egress`` rule
  rewrites the source MAC of every frame leaving with it to one of the host's own, so the
  switch never learns the cluster MAC and keeps flooding it (installed before the MAC
  changes); ``addr_gen_mode=3`` so that hosts sharing a MAC still get distinct IPv6
  link-local addresses.
* multicast / igmp: the interface keeps its MAC and joins the cluster MAC (igmp: joins the
  group 239.255.Y.Z, whose MAC is the cluster MAC); an nft ``netdev ingress`` rule marks
  frames for the cluster MAC ``pkttype host`` (TCP drops multicast-typed frames otherwise).
  Routers need a static neighbour entry for the VIP (RFC 1812 ignores multicast MACs in ARP
  replies), and a switch must not run an IGMP querier without the host ports being
  multicast-router ports (docs/lab.md).
* every mode: ``arp_announce=2`` (a VIP is never the source of a host's own ARP requests),
  the VIPs on the interface.

The steps are recorded so that :func:`teardown` restores the interface exactly.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shoal.cluster_mac import ClusterMode, cluster_mac_bytes, format_mac, igmp_group
from shoal.config import ShoalConfig

L2_TABLE = "shoal_l2"


class AdapterError(RuntimeError):
    pass


def _run(netns: str | None, *args: str, input: str | None = None) -> str:
    cmd = list(args)
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    res = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise AdapterError(f"{' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


@dataclass
class Saved:
    """What the interface looked like before set-up."""

    interface: str
    mac: str
    sysctls: dict[str, str] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)  # addresses we added (CIDR)
    maddr: str | None = None
    group: str | None = None


def own_mac(host_id: int, cluster_mac: bytes) -> str:
    """The per-host source MAC used in unicast mode: 02-<host id>-<cluster MAC tail>."""
    return format_mac(bytes([0x02, host_id & 0xFF]) + cluster_mac[2:], ":")


def setup(cfg: ShoalConfig, netns: str | None = None) -> Saved:
    """Prepare the cluster interface; returns what :func:`teardown` needs."""
    cl = cfg.cluster
    dev = cfg.interface
    mac_b = cluster_mac_bytes(cl.primary_vip, cl.mode)
    mac = format_mac(mac_b, ":")
    link = json.loads(_run(netns, "ip", "-j", "link", "show", "dev", dev))[0]
    saved = Saved(interface=dev, mac=link["address"])
    keys = [f"net.ipv4.conf.{dev}.arp_announce", "net.ipv4.conf.all.arp_announce"]
    if cl.mode is ClusterMode.UNICAST:
        keys.append(f"net.ipv6.conf.{dev}.addr_gen_mode")
    for k in keys:
        saved.sysctls[k] = _run(netns, "sysctl", "-n", k).strip()
    _run(
        netns,
        "sysctl",
        "-qw",
        f"net.ipv4.conf.{dev}.arp_announce=2",
        "net.ipv4.conf.all.arp_announce=2",
    )
    if cl.mode is ClusterMode.UNICAST:
        rule = (
            f"table netdev {L2_TABLE} {{\n chain egress {{\n"
            f'  type filter hook egress device "{dev}" priority 0; policy accept;\n'
            f"  ether saddr {mac} ether saddr set {own_mac(cfg.host.host_id, mac_b)}\n"
            " }\n}\n"
        )
        _run(netns, "nft", "-f", "-", input=rule)
        _run(netns, "sysctl", "-qw", f"net.ipv6.conf.{dev}.addr_gen_mode=3")
        _run(netns, "ip", "link", "set", "dev", dev, "address", mac)
    else:
        rule = (
            f"table netdev {L2_TABLE} {{\n chain ingress {{\n"
            f'  type filter hook ingress device "{dev}" priority -500; policy accept;\n'
            f"  ether daddr {mac} meta pkttype set host\n }}\n}}\n"
        )
        _run(netns, "nft", "-f", "-", input=rule)
        if cl.mode is ClusterMode.MULTICAST:
            _run(netns, "ip", "maddr", "add", mac, "dev", dev)
            saved.maddr = mac
        else:
            group = str(igmp_group(cl.primary_vip))
            _run(netns, "ip", "addr", "add", f"{group}/32", "dev", dev, "autojoin")
            saved.group = f"{group}/32"
    _run(netns, "ip", "link", "set", "dev", dev, "up")
    for dip in cfg.host.dedicated_ips:
        cidr = str(dip.with_prefixlen)
        if _add_addr(netns, dev, cidr):
            saved.added.append(cidr)
    for vip in cl.all_vips:
        cidr = f"{vip}/{vip.max_prefixlen}"
        if _add_addr(netns, dev, cidr):
            saved.added.append(cidr)
    return saved


def _add_addr(netns: str | None, dev: str, cidr: str) -> bool:
    extra = ["nodad"] if ipaddress.ip_interface(cidr).version == 6 else []
    try:
        _run(netns, "ip", "addr", "add", cidr, "dev", dev, *extra)
    except AdapterError as e:
        if "File exists" in str(e):
            return False
        raise
    return True


def teardown(saved: Saved, netns: str | None = None) -> None:
    """Undo :func:`setup`: addresses, memberships, the MAC, the L2 table, the sysctls."""
    dev = saved.interface
    for cidr in saved.added:
        _quiet(netns, "ip", "addr", "del", cidr, "dev", dev)
    if saved.group:
        _quiet(netns, "ip", "addr", "del", saved.group, "dev", dev)
    if saved.maddr:
        _quiet(netns, "ip", "maddr", "del", saved.maddr, "dev", dev)
    _quiet(netns, "ip", "link", "set", "dev", dev, "address", saved.mac)
    _quiet(netns, "nft", "delete", "table", "netdev", L2_TABLE)
    for k, v in saved.sysctls.items():
        _quiet(netns, "sysctl", "-qw", f"{k}={v}")


def _quiet(netns: str | None, *args: str) -> None:
    with contextlib.suppress(AdapterError):
        _run(netns, *args)


def save(saved: Saved, path: Path) -> None:
    path.write_text(json.dumps(asdict(saved)))


def load(path: Path) -> Saved:
    return Saved(**json.loads(path.read_text()))
