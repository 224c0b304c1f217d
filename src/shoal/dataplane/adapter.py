"""Cluster adapter set-up: what a host's cluster interface needs in each cluster mode.

Runs in-process in the host's own network namespace: links and addresses through pyroute2
(netlink), the L2 rules through libnftables, sysctls through ``/proc/sys``.

* unicast: the interface carries the cluster MAC ``02-bf-…``; an nft ``netdev egress`` rule
  rewrites the source MAC of every frame leaving with it to one of the host's own, so the
  switch never learns the cluster MAC and keeps flooding it (installed before the MAC
  changes); ``addr_gen_mode=3`` so that hosts sharing a MAC still get distinct IPv6
  link-local addresses.
* multicast / igmp: the interface keeps its MAC and receives the cluster MAC (multicast:
  all-multicast on; igmp: joins the group 239.255.Y.Z, whose MAC is the cluster MAC); an nft
  ``netdev ingress`` rule marks frames for the cluster MAC ``pkttype host`` (TCP drops
  multicast-typed frames otherwise). Routers need a static neighbour entry for the VIP
  (RFC 1812 ignores multicast MACs in ARP replies).
* every mode: ``arp_announce=2`` (a VIP is never the source of the host's own ARP
  requests) and the VIPs and dedicated IPs on the interface.

Everything changed is recorded, so that :func:`teardown` restores the interface exactly.
``python -m shoal.dataplane.adapter setup|teardown CONFIG STATE`` runs it from a shell.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from shoal.cluster_mac import ClusterMode, cluster_mac_bytes, format_mac, igmp_group
from shoal.config import ShoalConfig, load_config
from shoal.dataplane.nft import Nft, NftError
from shoal.dataplane.ruleset import tables

IFF_ALLMULTI = 0x200
IFA_F_NODAD = 0x02
IFA_F_MCAUTOJOIN = 0x400


class AdapterError(RuntimeError):
    pass


@dataclass
class Saved:
    """What the interface looked like before set-up, and what was added."""

    interface: str
    mac: str
    allmulti: bool
    up: bool = True
    sysctls: dict[str, str] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)  # CIDRs we added
    joined: list[str] = field(default_factory=list)  # IGMP groups we joined
    l2_table: str = "shoal_l2"  # the cluster's L2 table (see ruleset.tables)


def own_mac(host_id: int, cluster_mac: bytes) -> str:
    """The per-host source MAC used in unicast mode: 02-<host id>-<cluster MAC tail>."""
    return format_mac(bytes([0x02, host_id & 0xFF]) + cluster_mac[2:], ":")


def _sysctl_path(key: str) -> Path:
    return Path("/proc/sys") / key.replace(".", "/")


def _sysctl(key: str, value: str | None = None) -> str:
    path = _sysctl_path(key)
    old = path.read_text().strip()
    if value is not None:
        path.write_text(value)
    return old


def _index(ipr: IPRoute, dev: str) -> int:
    found = ipr.link_lookup(ifname=dev)
    if not found:
        raise AdapterError(f"interface {dev!r} does not exist")
    return int(found[0])


def _l2_rules(cfg: ShoalConfig, mac_b: bytes) -> str:
    cl = cfg.cluster
    dev = cfg.interface
    l2 = tables(cl.name).l2
    mac = format_mac(mac_b, ":")
    if cl.mode is ClusterMode.UNICAST:
        return (
            f"table netdev {l2} {{\n chain egress {{\n"
            f'  type filter hook egress device "{dev}" priority 0; policy accept;\n'
            f"  ether saddr {mac} ether saddr set {own_mac(cfg.host.host_id, mac_b)}\n"
            " }\n}\n"
        )
    return (
        f"table netdev {l2} {{\n chain ingress {{\n"
        f'  type filter hook ingress device "{dev}" priority -500; policy accept;\n'
        f"  ether daddr {mac} meta pkttype set host\n }}\n}}\n"
    )


def setup(cfg: ShoalConfig, previous: Saved | None = None) -> Saved:
    """Prepare the cluster interface of this namespace; returns what teardown needs.

    ``previous`` is the record of an earlier run that did not tear down (it crashed): the
    interface is set up again in place, routes and addresses untouched, and the original
    state stays the one that run recorded.
    """
    cl = cfg.cluster
    dev = cfg.interface
    mac_b = cluster_mac_bytes(cl.primary_vip, cl.mode)
    nft = Nft()
    with IPRoute() as ipr:
        idx = _index(ipr, dev)
        link = ipr.get_links(idx)[0]
        saved = Saved(
            interface=dev,
            mac=link.get_attr("IFLA_ADDRESS"),
            allmulti=bool(link["flags"] & IFF_ALLMULTI),
            up=bool(link["flags"] & 1),
            l2_table=tables(cl.name).l2,
        )
        if previous is not None and previous.interface == dev:
            saved = previous
        keys = {f"net.ipv4.conf.{dev}.arp_announce": "2", "net.ipv4.conf.all.arp_announce": "2"}
        if cl.mode is ClusterMode.UNICAST:
            keys[f"net.ipv6.conf.{dev}.addr_gen_mode"] = "3"
        try:
            for key, value in keys.items():
                old = _sysctl(key, value)
                saved.sysctls.setdefault(key, old)
            # replaced whole in one transaction, before the MAC changes: never leak it
            nft.run(
                f"table netdev {saved.l2_table} {{}}\ndelete table netdev {saved.l2_table}\n"
                + _l2_rules(cfg, mac_b)
            )
            if cl.mode is ClusterMode.UNICAST:
                ipr.link("set", index=idx, address=format_mac(mac_b, ":"))
            elif cl.mode is ClusterMode.MULTICAST:
                ipr.link("set", index=idx, flags=IFF_ALLMULTI, change=IFF_ALLMULTI)
            else:
                group = str(igmp_group(cl.primary_vip))
                if _add(ipr, idx, f"{group}/32", IFA_F_MCAUTOJOIN):
                    saved.joined.append(f"{group}/32")
            ipr.link("set", index=idx, state="up")
            cidrs = [str(d.with_prefixlen) for d in cfg.host.dedicated_ips]
            cidrs += [f"{v}/{v.max_prefixlen}" for v in cl.all_vips]
            for cidr in cidrs:
                if _add(ipr, idx, cidr) and cidr not in saved.added:
                    saved.added.append(cidr)
        except (NetlinkError, NftError, OSError) as e:
            teardown(saved)
            raise AdapterError(f"setting up {dev}: {e}") from e
    return saved


def _add(ipr: IPRoute, idx: int, cidr: str, flags: int = 0) -> bool:
    iface = ipaddress.ip_interface(cidr)
    flags |= IFA_F_NODAD if iface.version == 6 else 0
    try:
        ipr.addr(
            "add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen, flags=flags
        )
    except NetlinkError as e:
        if e.code == 17:  # EEXIST: it was there before; leave it there afterwards too
            return False
        raise
    return True


def teardown(saved: Saved) -> None:
    """Undo :func:`setup`: addresses, group, MAC, all-multicast, L2 table, sysctls."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=saved.interface)
        if found:
            idx = found[0]
            for cidr in [*saved.added, *saved.joined]:
                iface = ipaddress.ip_interface(cidr)
                with contextlib.suppress(NetlinkError):
                    ipr.addr(
                        "del", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen
                    )
            try:
                ipr.link("set", index=idx, address=saved.mac)
                ipr.link(
                    "set",
                    index=idx,
                    flags=IFF_ALLMULTI if saved.allmulti else 0,
                    change=IFF_ALLMULTI,
                )
                if not saved.up:
                    ipr.link("set", index=idx, state="down")
            except NetlinkError:
                pass
    with contextlib.suppress(NftError):
        Nft().run(f"delete table netdev {saved.l2_table}")
    for key, value in saved.sysctls.items():
        with contextlib.suppress(OSError):
            _sysctl(key, value)


def save(saved: Saved, path: Path) -> None:
    path.write_text(json.dumps(asdict(saved)))


def load(path: Path) -> Saved:
    return Saved(**json.loads(path.read_text()))


def set_up_recorded(cfg: ShoalConfig, record: Path) -> Saved:
    """Set the interface up, with the record on disk of how it was. After a crash, the next
    run finds the record, sets up again in place (no address or route comes and goes) and
    keeps it, so that what is restored at the end is the host's own state, not a crashed
    run's set-up."""
    previous = None
    if record.exists():
        with contextlib.suppress(ValueError, TypeError, OSError):
            previous = load(record)
    saved = setup(cfg, previous)
    record.parent.mkdir(parents=True, exist_ok=True)
    save(saved, record)
    return saved


def give_back(saved: Saved, record: Path) -> None:
    """The interface as it was before the first run, and the record gone."""
    teardown(saved)
    record.unlink(missing_ok=True)


def main() -> None:
    if len(sys.argv) != 4 or sys.argv[1] not in ("setup", "teardown"):
        print(
            "usage: python -m shoal.dataplane.adapter setup|teardown CONFIG STATE", file=sys.stderr
        )
        raise SystemExit(2)
    state = Path(sys.argv[3])
    try:
        if sys.argv[1] == "setup":
            save(setup(load_config(Path(sys.argv[2]))), state)
        else:
            teardown(load(state))
    except AdapterError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
