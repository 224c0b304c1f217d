"""A hostile neighbour on a lab's switch: a namespace of its own, wired to the switch, that
records the cluster's frames and floods the segment with trafgen.

Every loop here is bounded in time and stops by itself; the namespace is the lab's
(``shl-<lab>-ax``), so ``Lab.down`` removes it with the rest.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from shoal.lab.topology import Lab, batch, pyenv, sh
from shoal.protocol.frames import VERSION

KINDS = ("random", "foreign", "bad_hmac", "replay", "syn")
CLUSTER_MAC = "02:bf:c6:12:00:64"  # the lab's (unicast mode, VIP 198.18.0.100)
_HEAD = "0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x00, 0x00, 0x00, 0x00, 0x99, 0x88, 0x6f"

_RECORD = """
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x886F))
s.bind(("eth0", 0x886F))
s.settimeout(0.2)
hosts = {int(h) for h in sys.argv[2].split(",")}
kept, end = [], time.monotonic() + float(sys.argv[1])
while time.monotonic() < end and len(kept) < 400:
    try:
        data = s.recv(2048)
    except TimeoutError:
        continue
    if data[:2] == b"SH" and (data[12] << 8 | data[13]) in hosts:
        kept.append(data.hex())
print("\\n".join(kept))
"""


def neighbour(lab: Lab) -> str:
    """Wire the neighbour's namespace to the lab's switch; its name."""
    ax = lab.ns("ax")
    sh("ip", "netns", "add", ax)
    sw = [f"link add p-ax type veth peer name eth0 netns {ax}", "link set p-ax master br0 up"]
    batch(lab.ns("sw"), sw)
    batch(ax, ["link set lo up", "link set eth0 up"])
    return ax


def record(ns: str, hosts: list[int], seconds: float) -> list[bytes]:
    """The frames ``hosts`` send, as the neighbour hears them for ``seconds`` (at most 400)."""
    res = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", _RECORD, str(seconds),
         ",".join(map(str, hosts))],
        capture_output=True, text=True, timeout=seconds + 30, env=pyenv(), check=True,
    )  # fmt: skip
    return [bytes.fromhex(x) for x in res.stdout.split()]


def _bytes(data: bytes) -> str:
    return ", ".join(f"0x{b:02x}" for b in data)


def trafgen_conf(kind: str, cluster: bytes, recorded: list[bytes]) -> str:
    """trafgen's configuration for one kind of flood (see :data:`KINDS`): random bytes,
    another cluster's header, this cluster's header with made-up senders and a random tag,
    ``recorded`` frames sent again, or TCP SYNs to the VIP's port 80."""
    if kind == "random":
        return f"{{ {_HEAD}, drnd(100) }}\n"
    if kind == "foreign":
        return f"{{ {_HEAD}, 'S', 'H', {VERSION}, 1, drnd(8), drnd(20), 0x00, 0x50, drnd(112) }}\n"
    if kind == "bad_hmac":
        return (
            f"{{ {_HEAD}, 'S', 'H', {VERSION}, 1, {_bytes(cluster)}, 0x00, drnd(1), drnd(16), "
            "0x00, 0x50, drnd(112) }\n"
        )
    if kind == "replay":
        if not recorded:
            raise ValueError("a replay flood needs recorded frames")
        return "".join(f"{{ {_HEAD}, {_bytes(f)} }}\n" for f in recorded)
    if kind == "syn":
        return (
            f"{{ eth(da={CLUSTER_MAC}, sa=02:00:00:00:00:99), "
            "ipv4(sa=198.19.2.2, da=198.18.0.100, ttl=64), "
            "tcp(sp=drnd(), dp=80, syn, seq=drnd(), win=64240) }\n"
        )
    raise ValueError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")


def flood(ns: str, conf: Path, seconds: float) -> subprocess.Popen[bytes]:
    """trafgen from ``ns``, one process as fast as it goes, stopped after ``seconds``."""
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, "timeout", "-s", "INT", str(seconds),
         "trafgen", "-o", "eth0", "-i", str(conf), "-P", "1", "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
