"""The cluster's frames on the interface: the AF_PACKET sockets and the kernel filters that
keep a flood from drowning the heartbeats of the hosts this one knows.

Every frame for the cluster reaches every host, and so does whatever a neighbour sends with
EtherType 0x886F. What cannot be this cluster's (too short, another magic, protocol version or
cluster id) is dropped by an nftables ``netdev ingress`` chain and counted there by reason
(:class:`Screen`): random junk and other clusters' frames never reach a socket. Two sockets
share the EtherType, each with a classic BPF filter run by the kernel before a frame is
queued (it checks the header again, should the screen be missing):

* the *known* socket takes frames that name a run (host id and incarnation) this host holds
  proof for; the *other* socket takes the rest (hosts joining or restarting, and forgeries
  with made-up senders). The daemon drains the known socket first and in full, the other
  one at most :data:`OTHER_BUDGET` frames a batch: a flood of forged senders fills the
  other socket's queue, never the known one's.

A neighbour that copies a known run's header into its forgeries reaches the known socket;
those frames cost an HMAC each and are dropped, and a replay of a recorded frame is dropped
before its HMAC (the engine's replay window). The filters are rebuilt when the known runs
change; a replacement is atomic in the kernel.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Collection, Iterable

from shoal.dataplane.contract import DataplaneError
from shoal.dataplane.nft import Nft
from shoal.protocol.frames import ETHERTYPE, HEADER_LEN, TAG_LEN, VERSION, Rejection

SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23
PACKET_MR_MULTICAST = 0
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
RCVBUF = 4 << 20  # bytes of queue per socket: a burst of a few thousand frames
OTHER_BUDGET = 256  # frames read from the other socket per batch
# runs a filter names one by one: the kernel charges a filter (twice, while one replaces
# another) to the socket's option memory, 20 KiB by default in a namespace
MAX_RUNS = 48

# classic BPF opcodes
_LD_W_ABS, _LD_H_ABS, _LD_B_ABS, _LD_LEN = 0x20, 0x28, 0x30, 0x80
_JEQ, _JGE, _RET = 0x15, 0x35, 0x06
_TAKE, _DROP = 0xFFFF, 0
_INSN = struct.Struct("=HBBI")
MAX_INSNS = 4096
Run = tuple[int, int]  # (host id, incarnation)
Insn = tuple[int, int, int, int]  # code, jump if true, jump if false, value
assert 16 + 7 * MAX_RUNS <= MAX_INSNS  # the longest filter program() makes


def program(cluster: bytes, known: Iterable[Run], take_known: bool) -> list[Insn]:
    """The filter of one socket: drop what cannot be this cluster's; then take the frames of
    ``known`` runs (``take_known``) or all the others. Past :data:`MAX_RUNS` runs the known
    socket takes every frame of the cluster and the other one none: a large cluster reads
    one queue, as if every sender were known."""
    hi, lo = struct.unpack("!II", cluster)
    checks = [  # (load, offset, jump, value): each passes, or the frame is dropped
        (_LD_LEN, 0, _JGE, HEADER_LEN + TAG_LEN),
        (_LD_H_ABS, 0, _JEQ, 0x5348),  # magic "SH"
        (_LD_B_ABS, 2, _JEQ, VERSION),
        (_LD_W_ABS, 4, _JEQ, hi),  # cluster id
        (_LD_W_ABS, 8, _JEQ, lo),
    ]
    out: list[Insn] = []
    for load, off, jump, k in checks:
        out += [(load, 0, 0, off), (jump, 1, 0, k), (_RET, 0, 0, _DROP)]
    match, miss = (_TAKE, _DROP) if take_known else (_DROP, _TAKE)
    known = sorted(known)
    if len(known) > MAX_RUNS:
        return [*out, (_RET, 0, 0, match)]
    for host, inc in known:
        out += [
            (_LD_H_ABS, 0, 0, 12),
            (_JEQ, 0, 5, host),
            (_LD_W_ABS, 0, 0, 14),
            (_JEQ, 0, 3, inc >> 32),
            (_LD_W_ABS, 0, 0, 18),
            (_JEQ, 0, 1, inc & 0xFFFFFFFF),
            (_RET, 0, 0, match),
        ]
    out.append((_RET, 0, 0, miss))
    return out


def attach(sock: socket.socket, insns: list[Insn]) -> None:
    """Put ``insns`` on ``sock`` (replacing its filter atomically)."""
    code = b"".join(_INSN.pack(*i) for i in insns)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HL", len(insns), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def drops(sock: socket.socket) -> int:
    """Frames the kernel dropped on ``sock`` for want of queue since the last call."""
    raw = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
    return int(struct.unpack("II", raw)[1])


def open_socket(
    interface: str, cluster: bytes, take_known: bool, multicast: bytes | None
) -> socket.socket:
    """A socket for the cluster's EtherType on ``interface``, filtered (no run known yet),
    with a deep queue; joined to ``multicast`` when heartbeats go to a multicast MAC."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETHERTYPE))
    try:
        # filtered before bound: nothing unfiltered is ever queued
        attach(sock, program(cluster, (), take_known))
        sock.bind((interface, ETHERTYPE))
        sock.setblocking(False)
        try:
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)  # not our own frames
        except OSError as e:
            raise OSError(f"PACKET_IGNORE_OUTGOING refused ({e}): shoal needs Linux 4.20+") from e
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        if multicast is not None:
            ifindex = socket.if_nametoindex(interface)
            mreq = struct.pack("iHH8s", ifindex, PACKET_MR_MULTICAST, 6, multicast)
            sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
    except OSError:
        sock.close()
        raise
    return sock


SCREENED = (
    Rejection.TOO_SHORT,
    Rejection.BAD_MAGIC,
    Rejection.BAD_VERSION,
    Rejection.FOREIGN_CLUSTER,
)


class Screen:
    """The nftables chain that drops and counts, on ``interface``, the EtherType 0x886F
    frames that cannot be this cluster's."""

    def __init__(self, interface: str) -> None:
        self.interface = interface
        self.table = "shoal_wire_" + "".join(c if c.isalnum() else "_" for c in interface)
        self.nft = Nft()

    def install(self, cluster: bytes) -> None:
        """Create the table, or replace it in one transaction (a new cluster id)."""
        counters = "".join(f"  counter {r.value} {{}}\n" for r in SCREENED)
        short = HEADER_LEN + TAG_LEN
        rules = (
            f"    meta length < {short} counter name {Rejection.TOO_SHORT.value} drop\n"
            f"    @nh,0,16 != 0x5348 counter name {Rejection.BAD_MAGIC.value} drop\n"
            f"    @nh,16,8 != {VERSION} counter name {Rejection.BAD_VERSION.value} drop\n"
            f"    @nh,32,64 != 0x{cluster.hex()} counter name "
            f"{Rejection.FOREIGN_CLUSTER.value} drop\n"
        )
        self.nft.run(
            f"table netdev {self.table} {{}}\ndelete table netdev {self.table}\n"
            f"table netdev {self.table} {{\n{counters}"
            f"  chain ingress {{\n"
            f'    type filter hook ingress device "{self.interface}" priority -400; '
            f"policy accept;\n"
            f"    ether type != 0x{ETHERTYPE:04x} accept\n{rules}  }}\n}}\n"
        )

    def counts(self) -> dict[str, int]:
        """Frames dropped so far, by reason."""
        counters = self.nft.counters("netdev", self.table)
        return {name: int(c["packets"]) for name, c in counters.items()}

    def remove(self) -> None:
        self.nft.run(f"table netdev {self.table} {{}}\ndelete table netdev {self.table}\n")


class Wire:
    """One cluster's frames on one interface: the screen and the two sockets, their filters
    kept to the known runs, frames sent to the cluster's heartbeat address, drops counted."""

    def __init__(
        self,
        interface: str,
        cluster: bytes,
        dest: bytes,
        sockets: tuple[socket.socket, socket.socket],
        screen: Screen | None,
    ) -> None:
        self.interface = interface
        self.dest = dest
        self.known, self.other = sockets
        self.screen = screen
        self.filtered: tuple[int, bytes] = (-1, cluster)  # (the runs' version, the cluster id)
        self.dropped = {"known": 0, "other": 0}

    @classmethod
    def open(cls, interface: str, cluster: bytes, dest: bytes, multicast: bool) -> Wire:
        """The screen installed and both sockets open; ``dest``: where heartbeats go
        (broadcast, or the cluster's multicast MAC, which the sockets then join)."""
        screen = Screen(interface)
        screen.install(cluster)
        group = dest if multicast else None
        try:
            known = open_socket(interface, cluster, True, group)
            try:
                other = open_socket(interface, cluster, False, group)
            except OSError:
                known.close()
                raise
        except OSError:
            screen.remove()
            raise
        return cls(interface, cluster, dest, (known, other), screen)

    @property
    def sockets(self) -> tuple[socket.socket, socket.socket]:
        """The known socket first: it is drained first."""
        return self.known, self.other

    def refilter(self, version: int, runs: Collection[Run], cluster: bytes) -> str | None:
        """Program both filters anew when the known runs (``version``) or the cluster id
        changed; why not, if the kernel refused (the filters in place stay: new runs are
        read from the other socket, worse under a flood, never wrong)."""
        if (version, cluster) == self.filtered:
            return None
        problem = None
        try:
            if cluster != self.filtered[1] and self.screen is not None:
                self.screen.install(cluster)
            attach(self.known, program(cluster, runs, True))
            attach(self.other, program(cluster, runs, False))
        except (OSError, DataplaneError) as e:
            problem = str(e)
        self.filtered = (version, cluster)
        return problem

    def send(self, frame: bytes) -> None:
        self.known.sendto(frame, (self.interface, ETHERTYPE, 0, 0, self.dest))

    def drops(self) -> dict[str, int]:
        """Frames each socket's queue had no room for, since the start."""
        self.dropped["known"] += drops(self.known)
        self.dropped["other"] += drops(self.other)
        return dict(self.dropped)

    def screened(self) -> dict[str, int]:
        """Frames the screen dropped, by reason."""
        return {} if self.screen is None else self.screen.counts()

    def close(self) -> None:
        self.known.close()
        self.other.close()
        if self.screen is not None:
            self.screen.remove()
