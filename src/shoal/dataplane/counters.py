"""Named nftables counters, read straight from the kernel over netlink.

libnftables lists a counter only after it fetched its table's sets with every element in
them (0.06 s with 10,000 affinity entries, 36 s with a million: ``bench/handoff.py``), and
the daemon reads its counters on its event loop. A dump of the table's counter objects
(``NFT_MSG_GETOBJ``, filtered by table and type in the kernel) costs what the counters do,
whatever the sets hold. pyroute2 encodes and decodes the messages.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST, nla
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg

NETLINK_NETFILTER = 12
NFT_MSG_GETOBJ = 19
NFT_OBJECT_COUNTER = 1
NLMSG_ERROR, NLMSG_DONE = 2, 3
FAMILIES = {"inet": 1, "ip": 2, "arp": 3, "netdev": 5, "bridge": 7, "ip6": 10}


class nft_obj_msg(nfgen_msg):  # type: ignore[misc]  # pyroute2 is untyped
    """A stateful object of nf_tables (a counter here)."""

    nla_map = (
        ("NFTA_OBJ_UNSPEC", "none"),
        ("NFTA_OBJ_TABLE", "asciiz"),
        ("NFTA_OBJ_NAME", "asciiz"),
        ("NFTA_OBJ_TYPE", "be32"),
        ("NFTA_OBJ_DATA", "counter"),
        ("NFTA_OBJ_USE", "be32"),
        ("NFTA_OBJ_HANDLE", "be64"),
        ("NFTA_OBJ_PAD", "hex"),
        ("NFTA_OBJ_USERDATA", "hex"),
    )

    class counter(nla):  # type: ignore[misc]
        nla_map = (
            ("NFTA_COUNTER_UNSPEC", "none"),
            ("NFTA_COUNTER_BYTES", "be64"),
            ("NFTA_COUNTER_PACKETS", "be64"),
            ("NFTA_COUNTER_PAD", "hex"),
        )


def read_counters(family: str, table: str) -> dict[str, dict[str, Any]]:
    """The named counters of one table, by name (``packets`` and ``bytes``; none for a
    table that is not there); OSError if the kernel refuses."""
    req = nft_obj_msg()
    req["nfgen_family"] = FAMILIES[family]
    req["attrs"] = [("NFTA_OBJ_TABLE", table), ("NFTA_OBJ_TYPE", NFT_OBJECT_COUNTER)]
    req["header"]["type"] = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETOBJ
    req["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
    req["header"]["sequence_number"] = 1
    req.encode()
    out: dict[str, dict[str, Any]] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.bind((0, 0))
        sock.send(req.data)
        while True:
            buf = sock.recv(1 << 16)
            off = 0
            while off + 16 <= len(buf):
                length, kind = struct.unpack_from("=IH", buf, off)
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", buf, off + 16)
                    if err:
                        raise OSError(-err, f"reading the counters of {family} {table}")
                else:
                    msg = nft_obj_msg(buf[off : off + length])
                    msg.decode()
                    data = msg.get_attr("NFTA_OBJ_DATA")
                    out[msg.get_attr("NFTA_OBJ_NAME")] = {
                        "name": msg.get_attr("NFTA_OBJ_NAME"),
                        "packets": data.get_attr("NFTA_COUNTER_PACKETS") or 0,
                        "bytes": data.get_attr("NFTA_COUNTER_BYTES") or 0,
                    }
                off += max(16, (length + 3) & ~3)
