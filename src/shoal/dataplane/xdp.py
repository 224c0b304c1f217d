"""The XDP screen: the program in ``bpf/screen.c``, built, loaded, attached, and its maps.

It takes the place of the nftables pre-filter (see :func:`~shoal.dataplane.ruleset.prefilter`)
with the same verdicts: a packet whose bucket was never owned here is dropped, and a pure SYN
whose bucket is not owned now, for the rules whose SYNs the pre-filter checks. What it passes
meets the same ``inet`` table as before, which keeps everything connection-aware.

State lives in three maps this module writes (``shoal_cfg``: the rules in match order, the
seed, the bucket count and the slot packets read; ``shoal_vips``; ``shoal_bits``: per slot,
rule and kind, a bitmap of the buckets owned now and ever owned) and one it reads
(``shoal_tally``: packets and bytes per rule and verdict, per CPU). A change writes a slot
that no packet reads and then flips ``slot``: one element update, atomic for a packet.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shoal.choices import XDP_MAX_RULES as MAX_RULES
from shoal.choices import XDP_MAX_VIPS as MAX_VIPS
from shoal.choices import Affinity, FilteringMode, Protocol
from shoal.config import ShoalConfig
from shoal.dataplane import libbpf
from shoal.dataplane.contract import DataplaneError

SOURCE = Path(__file__).with_name("bpf") / "screen.c"
OBJECT = SOURCE.with_suffix(".o")
PROGRAM = "shoal_screen"
MAPS = ("shoal_cfg", "shoal_vips", "shoal_bits", "shoal_tally")
WORDS = 1024  # 65,536 buckets
SLOTS = 3
VERDICTS = ("passed", "never_owned", "syn_unowned", "malformed")
GRACE_S = 0.01  # a slot flipped away from is written again no sooner (no packet still reads it)

R_TCP, R_UDP, R_CHECK_SYN, R_ANY_VIP = 1, 2, 4, 8
K_PORT, K_ADDR, K_PREFIX = 0, 1, 2
_RULE = struct.Struct("<IHHBBBBI16s")
_HEAD = struct.Struct("<IIIII")


def build(out: Path = OBJECT) -> Path:
    """Compile ``screen.c`` with clang (Debian's clang-14 and libbpf-dev) into ``out``."""
    cc = shutil.which("clang-14") or shutil.which("clang")
    if cc is None:
        raise DataplaneError("building the XDP program needs clang (Debian: clang-14, libbpf-dev)")
    arch = subprocess.run(["gcc", "-dumpmachine"], capture_output=True, text=True).stdout.strip()
    tmp = out.with_suffix(".o.tmp")
    cmd = [cc, "-O2", "-g", "-Wall", "-Werror", "-target", "bpf", f"-I/usr/include/{arch}"]
    res = subprocess.run([*cmd, "-c", str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
    if res.returncode != 0:
        raise DataplaneError(f"clang failed on {SOURCE}:\n{res.stderr}")
    tmp.replace(out)
    return out


def built() -> Path:
    """The object file, built again if the source is newer (or it is missing)."""
    if not OBJECT.exists() or OBJECT.stat().st_mtime < SOURCE.stat().st_mtime:
        return build()
    return OBJECT


@dataclass(frozen=True)
class Layout:
    """The rules as the program matches them: ``order[j]`` is the configuration's rule index
    of the program's rule ``j`` (rules for one VIP first, as the nftables tables do)."""

    order: tuple[int, ...]
    config: bytes  # shoal_cfg's value with slot 0
    vips: tuple[bytes, ...]  # shoal_vips' keys, the value of each is its index
    multiple: dict[int, int]  # the rules that have buckets: configuration index -> program's


def _mask4(prefix: int) -> int:
    raw = ipaddress.IPv4Network(f"0.0.0.0/{prefix}").netmask.packed
    return int.from_bytes(raw, "little")  # as the program reads the address


def layout(cfg: ShoalConfig) -> Layout:
    cl = cfg.cluster
    rules = cl.effective_rules
    if len(rules) > MAX_RULES or len(cl.all_vips) > MAX_VIPS:  # (the configuration refuses it)
        raise DataplaneError(f"XDP: more than {MAX_RULES} rules or {MAX_VIPS} VIPs")
    vips = list(cl.all_vips)
    order = tuple(sorted(range(len(rules)), key=lambda i: rules[i].vip == "all"))
    body = b""
    multiple = {}
    for j, i in enumerate(order):
        r = rules[i]
        flags = (R_TCP if r.protocol is not Protocol.UDP else 0) | (
            R_UDP if r.protocol is not Protocol.TCP else 0
        )
        many = r.mode is FilteringMode.MULTIPLE
        if many:
            multiple[i] = j
            if r.protocol is not Protocol.UDP and not r.sticky:
                flags |= R_CHECK_SYN
        vip = 0
        if r.vip == "all":
            flags |= R_ANY_VIP
        else:
            vip = vips.index(r.vip)
        key = {Affinity.NONE: K_PORT, Affinity.SINGLE: K_ADDR}.get(r.affinity, K_PREFIX)
        mask6 = ipaddress.IPv6Network(f"::/{r.ipv6_prefix}").netmask.packed
        body += _RULE.pack(
            vip, r.start, r.last, flags, key, int(many), 0, _mask4(r.ipv4_prefix), mask6
        )
    body += bytes(_RULE.size * (MAX_RULES - len(order)))
    tag = int.from_bytes(hashlib.sha256(cl.name.encode()).digest()[:4], "little")
    head = _HEAD.pack(0, len(order), cl.seed, cl.buckets, tag)
    keys = tuple(struct.pack("<I", v.version) + v.packed.ljust(16, b"\0") for v in vips)
    return Layout(order, head + body, keys, multiple)


def _mark(flags: bytearray, buckets: set[int] | list[int], on: bool) -> None:
    """Set or clear buckets in a byte-per-bucket map (a byte store per bucket: three times
    faster in Python than a bit's read, shift and write)."""
    v = 1 if on else 0
    for b in buckets:
        flags[b] = v


def _pack(flags: bytearray) -> bytes:
    """The bitmap the program reads (bucket b is bit b & 7 of byte b >> 3; as long as the
    map's value) from a byte-per-bucket map whose length is a multiple of 8: every 8th byte,
    from each of 8 offsets, is one bit position, so 8 slices of one big integer make it."""
    x = 0
    for k in range(8):
        x |= int.from_bytes(flags[k::8], "little") << k
    return x.to_bytes(WORDS * 8, "little")


def _unpack(bits: bytes, size: int) -> bytearray:
    """The byte-per-bucket map (``size`` buckets, a multiple of 8) of a bitmap read back."""
    x = int.from_bytes(bits[: size // 8], "little")
    ones = int.from_bytes(b"\x01" * (size // 8), "little")
    flags = bytearray(size)
    for k in range(8):
        flags[k::8] = ((x >> k) & ones).to_bytes(size // 8, "little")
    return flags


def _members(flags: bytearray) -> set[int]:
    return {b for b, v in enumerate(flags) if v}


def _close(fds: dict[str, int]) -> None:
    for fd in fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)


def _name_of(prog: int) -> str:
    name, fds = libbpf.prog_maps(prog)
    _close(fds)
    return name


@functools.cache
def _possible_cpus() -> int:
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


class XdpScreen:
    """The XDP program on one interface, for one cluster configuration: bitmaps of the
    buckets owned and ever owned per ``multiple`` rule (by configuration rule index), kept
    here and written to the kernel whole, one slot at a time."""

    def __init__(self, cfg: ShoalConfig) -> None:
        self.cfg = cfg
        self.layout = layout(cfg)
        self.interface = cfg.interface
        self.obj: libbpf.BpfObject | None = None
        self.fds: dict[str, int] = {}
        self.own_fds = False  # descriptors of maps found attached (closed by this object)
        self.ifindex = 0
        self.mode = ""  # "native" or "generic", once attached
        self.slot = 0
        self.dirty = False
        self.flipped = {s: 0.0 for s in range(SLOTS)}  # when each slot was flipped away from
        # per rule, one byte per bucket: 1 if owned (ever owned), packed into bits to write;
        # the packed bitmaps kept until their rule's bytes change
        self.size = -(-cfg.cluster.buckets // 8) * 8
        self.owned = {i: bytearray(self.size) for i in self.layout.multiple}
        self.keep = {i: bytearray(self.size) for i in self.layout.multiple}
        self.packed: dict[tuple[int, int], bytes] = {}

    # ------------------------------------------------------------- attach

    def attach(self, load: bool = True) -> tuple[dict[int, set[int]], dict[int, set[int]]] | None:
        """Take over the program an earlier run attached for this same layout (returning
        the owned and ever-owned buckets its maps hold), or attach a new one owning
        nothing (returning None; without ``load``, nothing is attached). A program of
        anyone else is left alone: an error."""
        try:
            self.ifindex = socket.if_nametoindex(self.interface)
        except OSError:
            raise DataplaneError(f"interface {self.interface!r} does not exist") from None
        try:
            found = self._take_over()
            if found is None and load:
                self._load()
        except libbpf.BpfError as e:
            self.close()
            raise DataplaneError(f"XDP on {self.interface}: {e}") from None
        return found

    def _take_over(self) -> tuple[dict[int, set[int]], dict[int, set[int]]] | None:
        prog = libbpf.xdp_prog_id(self.ifindex)
        if not prog:
            return None
        name, fds = libbpf.prog_maps(prog)
        if name != PROGRAM:
            _close(fds)
            raise DataplaneError(
                f"interface {self.interface} has another XDP program attached ({name!r}, id "
                f"{prog}): shoal does not replace it"
            )
        cfgv = None
        if set(fds) == set(MAPS):
            cfgv = libbpf.lookup(fds["shoal_cfg"], bytes(4), len(self.layout.config))
        if cfgv is None or cfgv[4:] != self.layout.config[4:]:
            _close(fds)
            tag = _HEAD.size - 4
            if cfgv is not None and cfgv[tag : tag + 4] != self.layout.config[tag : tag + 4]:
                raise DataplaneError(
                    f"interface {self.interface} carries another cluster's XDP program (id "
                    f'{prog}): clusters sharing an interface use dataplane = "nftables"'
                )
            return None  # this cluster's, for another configuration: replaced by a new one
        self.fds, self.own_fds = fds, True
        self.slot = struct.unpack_from("<I", cfgv)[0] % SLOTS
        native = libbpf.xdp_prog_id(self.ifindex, libbpf.XDP_FLAGS_DRV_MODE)
        self.mode = "native" if native else "generic"
        self.packed = {}
        for i in self.layout.multiple:
            self.owned[i][:] = self._read(i, 0)
            self.keep[i][:] = self._read(i, 1)
        owned = {i: _members(f) for i, f in self.owned.items()}
        return owned, {i: _members(f) for i, f in self.keep.items()}

    def _read(self, i: int, kind: int) -> bytearray:
        """Rule ``i``'s bitmap of that kind in the slot packets read, a byte per bucket."""
        key = self._key(self.slot, self.layout.multiple[i], kind)
        raw = libbpf.lookup(self.fds["shoal_bits"], key, WORDS * 8)
        return _unpack(raw or bytes(WORDS * 8), self.size)

    def _load(self) -> None:
        for flags in (*self.owned.values(), *self.keep.values()):
            flags[:] = bytes(len(flags))
        self.packed = {}
        obj = libbpf.BpfObject(str(built()))
        self.obj = obj
        obj.load()
        self.fds = {m: obj.map_fd(m) for m in MAPS}
        libbpf.update(self.fds["shoal_cfg"], bytes(4), self.layout.config)
        for idx, key in enumerate(self.layout.vips):
            libbpf.update(self.fds["shoal_vips"], key, struct.pack("<I", idx))
        self.slot = 0
        prog = obj.prog_fd(PROGRAM)
        # another mode's program (an earlier shoal's, for another layout) would refuse ours
        for mode in (libbpf.XDP_FLAGS_DRV_MODE, libbpf.XDP_FLAGS_SKB_MODE):
            if libbpf.xdp_prog_id(self.ifindex, mode):
                libbpf.xdp_detach(self.ifindex, mode)
        try:
            libbpf.xdp_attach(self.ifindex, prog, libbpf.XDP_FLAGS_DRV_MODE)
            self.mode = "native"
        except libbpf.BpfError:
            libbpf.xdp_attach(self.ifindex, prog, libbpf.XDP_FLAGS_SKB_MODE)
            self.mode = "generic"

    # ------------------------------------------------------------- changes

    @staticmethod
    def _key(slot: int, j: int, kind: int) -> bytes:
        return struct.pack("<I", (slot * MAX_RULES + j) * 2 + kind)

    def change(
        self, owned: dict[int, tuple[list[int], list[int]]], keep: dict[int, list[int]]
    ) -> None:
        """Per rule (configuration index), buckets (out, in) of the owned bitmap and buckets
        into the ever-owned one; then the whole state into a free slot and one flip."""
        for i, (out, came) in owned.items():
            _mark(self.owned[i], out, False)
            _mark(self.owned[i], came, True)
            self.packed.pop((i, 0), None)
        for i, bs in keep.items():
            _mark(self.keep[i], bs, True)
            self.packed.pop((i, 1), None)
        self.publish()

    def publish(self) -> None:
        """Write every bitmap into the next slot and flip to it. A failed write leaves
        ``dirty`` set: the bitmaps here are what is wanted, and the next call writes them."""
        if not self.fds:
            return
        self.dirty = True
        nxt = (self.slot + 1) % SLOTS
        wait = self.flipped[nxt] + GRACE_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        try:
            for i, j in self.layout.multiple.items():
                for kind, flags in ((0, self.owned[i]), (1, self.keep[i])):
                    bits = self.packed.get((i, kind))
                    if bits is None:
                        bits = self.packed[(i, kind)] = _pack(flags)
                    libbpf.update(self.fds["shoal_bits"], self._key(nxt, j, kind), bits)
            cfgv = struct.pack("<I", nxt) + self.layout.config[4:]
            libbpf.update(self.fds["shoal_cfg"], bytes(4), cfgv)
        except libbpf.BpfError as e:
            raise DataplaneError(f"XDP maps on {self.interface}: {e}") from None
        self.flipped[self.slot] = time.monotonic()
        self.slot = nxt
        self.dirty = False

    # ------------------------------------------------------------- reading

    def counters(self) -> dict[str, dict[str, dict[str, int]]]:
        """Per rule (by name; "" for packets no rule was found for) and verdict: packets and
        bytes, summed over the CPUs."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        fd = self.fds.get("shoal_tally")
        if fd is None:
            return out
        cpus = _possible_cpus()
        rules = self.cfg.cluster.effective_rules
        for j in [*range(len(self.layout.order)), MAX_RULES]:
            name = rules[self.layout.order[j]].key if j < MAX_RULES else ""
            per: dict[str, dict[str, int]] = {}
            for v, verdict in enumerate(VERDICTS):
                raw = libbpf.lookup(fd, struct.pack("<I", j * len(VERDICTS) + v), 16 * cpus)
                pk = by = 0
                if raw:
                    for c in range(cpus):
                        p, b = struct.unpack_from("<QQ", raw, 16 * c)
                        pk, by = pk + p, by + b
                per[verdict] = {"packets": pk, "bytes": by}
            out[name] = per
        return out

    def held(self) -> dict[str, set[int]]:
        """The buckets owned now in the slot packets read, per rule by name (what the
        kernel enforces; for tests and ``shoal lab verify``)."""
        rules = self.cfg.cluster.effective_rules
        return {rules[i].key: _members(self._read(i, 0)) for i in self.layout.multiple}

    # ------------------------------------------------------------- removal

    def remove(self) -> None:
        """Detach the program (if it is still the one these maps belong to) and close."""
        if self.ifindex and self.fds:
            with contextlib.suppress(libbpf.BpfError, DataplaneError):
                prog = libbpf.xdp_prog_id(self.ifindex)
                if prog and _name_of(prog) == PROGRAM:
                    native = self.mode == "native"
                    mode = libbpf.XDP_FLAGS_DRV_MODE if native else libbpf.XDP_FLAGS_SKB_MODE
                    libbpf.xdp_detach(self.ifindex, mode)
        self.close()

    def close(self) -> None:
        if self.own_fds:
            _close(self.fds)
        self.fds, self.own_fds = {}, False
        if self.obj is not None:
            self.obj.close()
            self.obj = None


def held(cfg: ShoalConfig) -> dict[str, list[int]]:
    """The buckets owned now per rule, as the program attached for ``cfg`` in this
    namespace reads them (nothing is loaded or changed); empty if there is none."""
    screen = XdpScreen(cfg)
    try:
        if screen.attach(load=False) is None:
            return {}
        return {rule: sorted(bs) for rule, bs in screen.held().items()}
    finally:
        screen.close()


USAGE = "usage: python -m shoal.dataplane.xdp build | held CONFIG"


def main(argv: list[str] | None = None) -> int:
    """``build``: compile the program (the set-up runs it); ``held CONFIG``: print the
    buckets the attached program holds per rule, as JSON (the lab reads them)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if args == ["build"]:
            print(build())
        elif len(args) == 2 and args[0] == "held":
            from shoal.config import load_config

            print(json.dumps(held(load_config(Path(args[1])))))
        else:
            print(USAGE, file=sys.stderr)
            return 2
    except DataplaneError as e:
        print(f"shoal: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
