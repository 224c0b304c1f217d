"""The kernel lease, renewed by one nf_tables netlink batch built in advance.

Renewing the lease is the daemon's most frequent kernel update: several a second at the
default profile, five times as many at ``fast``. Through libnftables a renewal costs about
half a millisecond, nearly all of it parsing the command and fetching the ruleset cache
first; the kernel's own part is about 30 µs. So the batch (flush the ``lease`` set, add
``ipv4`` and ``ipv6`` with a timeout; one transaction, as with ``nft``) is encoded once
with pyroute2's message classes, and each renewal writes its timeouts and sequence numbers
into it, sends it and reads the kernel's acknowledgements.

Like libnftables, this acts on the network namespace of the thread that creates it.
"""

from __future__ import annotations

import os
import socket
import struct

from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST, NLMSG_ERROR
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg
from pyroute2.netlink.nfnetlink.nftsocket import (
    NFT_MSG_DELSETELEM,
    NFT_MSG_NEWSETELEM,
    nft_set_elem_list_msg,
)

from shoal.dataplane.nft import NftError

NETLINK_NETFILTER = 12
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6 = 1, 2, 10
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
_TIMEOUT = struct.Struct("!Q")  # NFTA_SET_ELEM_TIMEOUT: milliseconds, big-endian
_MARK = 0x5EA5EA5EA5EA5EA5  # a timeout no renewal uses: where the real ones go


def _control(kind: int) -> bytes:
    msg = nfgen_msg()
    msg["res_id"] = NFNL_SUBSYS_NFTABLES
    msg["header"]["type"] = kind
    msg["header"]["flags"] = NLM_F_REQUEST
    msg.encode()
    return bytes(msg.data)


def _elements(kind: int, table: str, name: str, timeout: int | None) -> bytes:
    """Flush the set (``timeout`` None) or add both families with ``timeout`` ms."""
    msg = nft_set_elem_list_msg()
    msg["nfgen_family"] = NFPROTO_INET
    msg["header"]["type"] = (NFNL_SUBSYS_NFTABLES << 8) | kind
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if timeout else 0)
    attrs: list[list[object]] = [
        ["NFTA_SET_ELEM_LIST_TABLE", table],
        ["NFTA_SET_ELEM_LIST_SET", name],
    ]
    if timeout is not None:
        elems = [
            {
                "attrs": [
                    ["NFTA_SET_ELEM_KEY", {"attrs": [["NFTA_DATA_VALUE", bytes([family])]]}],
                    ["NFTA_SET_ELEM_TIMEOUT", timeout],
                ]
            }
            for family in (NFPROTO_IPV4, NFPROTO_IPV6)
        ]
        attrs.append(["NFTA_SET_ELEM_LIST_ELEMENTS", elems])
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data)


class _Batch:
    """An encoded transaction, and where its sequence numbers and timeouts sit."""

    def __init__(self, parts: list[bytes]) -> None:
        self.data = bytearray(b"".join(parts))
        self.heads: list[int] = []
        at = 0
        for part in parts:
            self.heads.append(at)
            at += len(part)
        mark = _TIMEOUT.pack(_MARK)
        self.timeouts = [i for i in range(len(self.data)) if self.data.startswith(mark, i)]
        self.acked = len(parts) - 2  # every message between begin and end asks for an ack


class KernelLease:
    """Renews (or ends) the ``lease`` set of the inet ``shoal`` table in this namespace."""

    def __init__(self, table: str, name: str = "lease") -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.settimeout(2.0)
        begin, end = _control(NFNL_MSG_BATCH_BEGIN), _control(NFNL_MSG_BATCH_END)
        flush = _elements(NFT_MSG_DELSETELEM, table, name, None)
        add = _elements(NFT_MSG_NEWSETELEM, table, name, _MARK)
        self.renewal = _Batch([begin, flush, add, end])
        self.lapse = _Batch([begin, flush, end])
        assert len(self.renewal.timeouts) == 2 and not self.lapse.timeouts
        self.seq = 0

    def renew(self, ms: int) -> None:
        """The kernel takes new connections for ``ms`` more milliseconds (0: stop now)."""
        batch = self.renewal if ms > 0 else self.lapse
        for at in batch.timeouts:
            _TIMEOUT.pack_into(batch.data, at, ms)
        first = self.seq + 1
        for i, at in enumerate(batch.heads):
            struct.pack_into("=I", batch.data, at + 8, first + i)
        self.seq = (self.seq + len(batch.heads)) % (1 << 30)
        self.sock.send(batch.data)
        self._acknowledged(range(first, first + len(batch.heads)), batch.acked)

    def _acknowledged(self, ours: range, count: int) -> None:
        """Read the kernel's answers to this batch: an error (nothing was applied) or one
        acknowledgement per message. Answers to an earlier batch are skipped."""
        while count:
            try:
                data = self.sock.recv(65536)
            except OSError as e:
                raise NftError(f"lease: no answer from nf_tables ({e})") from e
            at = 0
            while at + _HEADER.size <= len(data):
                length, kind, _, seq, _ = _HEADER.unpack_from(data, at)
                if kind == NLMSG_ERROR and seq in ours:
                    (code,) = struct.unpack_from("=i", data, at + _HEADER.size)
                    if code:
                        raise NftError(f"lease: nf_tables refused it ({os.strerror(-code)})")
                    count -= 1
                at += max(_HEADER.size, (length + 3) & ~3)

    def close(self) -> None:
        self.sock.close()
