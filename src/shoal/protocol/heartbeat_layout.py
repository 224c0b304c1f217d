"""A heartbeat's payload on the wire: its layout, the flags that shorten it, and the strict
parse of untrusted bytes (the header, the envelope and the HMAC are :mod:`.codec`'s).

The fields, in order (docs/convergence.md, "Heartbeat payload", has the table): state and health,
flags, configuration digest, epoch key and digest, the record; the acks, vote and asks
bitmaps unless a flag says they are the record (or empty); the rules' reports; silences; the
dedicated address, with an affinity block after it when its family byte says so; the beat
and one echo per acknowledged host.
"""

from __future__ import annotations

import functools
import ipaddress
import struct

from shoal.protocol.frames import (
    MAX_HOST,
    MAX_RULES,
    NO_KEY,
    Affinity,
    EpochKey,
    Flag,
    Heartbeat,
    HostState,
    RuleReport,
    split_health,
    with_health,
)


class Malformed(Exception):
    """Untrusted bytes that are no valid frame."""


_ENCODING = Flag.ACKS_ARE_RECORD | Flag.VOTE_IS_RECORD | Flag.ASKS
# state flags cdigest enum eleader edigest acks record vote nrules
_HB_FIXED = struct.Struct("!BB8sIHQ8s32s")  # ... epoch digest, record
_RULE = struct.Struct("!BBH")
_SILENCE = struct.Struct("!HI")
# generation, bits: 1 ready, 2 handed in, 4 a bitmap follows, 8 leaving
_AFFINITY = struct.Struct("!HB")
AFFINITY_FOLLOWS = 0x80  # in the dedicated address's family byte: an affinity block follows


@functools.lru_cache(maxsize=64)
def host_bitmap(hosts: frozenset[int]) -> bytes:
    """A set of hosts as 32 bytes, bit h-1 for host h (cached: a heartbeat carries three,
    and they seldom change)."""
    bits = 0
    for h in hosts:
        bits |= 1 << (h - 1)
    return bits.to_bytes(32, "little")


def hosts_from_bitmap(raw: bytes) -> frozenset[int]:
    bits = int.from_bytes(raw, "little")
    out = []
    while bits:
        low = bits & -bits
        out.append(low.bit_length())
        bits ^= low
    return frozenset(out)


def encode_heartbeat(hb: Heartbeat) -> bytes:
    """The payload of ``hb`` (a bitmap equal to the record is left out, and flagged)."""
    ekey = hb.epoch or NO_KEY
    flags = hb.flags & ~_ENCODING
    acks_are_record = hb.acks == hb.record - {hb.host_id}
    if acks_are_record:
        flags |= Flag.ACKS_ARE_RECORD
    if hb.vote == hb.record:
        flags |= Flag.VOTE_IS_RECORD
    if hb.asks:
        flags |= Flag.ASKS
    out = [
        _HB_FIXED.pack(
            with_health(hb.state, hb.health),
            flags,
            hb.config_digest,
            ekey.number,
            ekey.leader,
            ekey.origin,
            hb.epoch_digest,
            host_bitmap(hb.record),
        )
    ]
    if not acks_are_record:
        out.append(host_bitmap(hb.acks))
    if hb.vote != hb.record:
        out.append(host_bitmap(hb.vote))
    if hb.asks:
        out.append(host_bitmap(hb.asks))
    out.append(struct.pack("!B", len(hb.rules)))
    out += [_RULE.pack(r.weight, r.byte, r.priority) for r in hb.rules]
    out.append(struct.pack("!B", len(hb.silences)))
    out += [_SILENCE.pack(h, min(ms, 0xFFFFFFFF)) for h, ms in hb.silences]
    a = hb.affinity
    more = AFFINITY_FOLLOWS if a is not None else 0  # in the address family's byte
    if hb.dedicated_ip is None:
        out.append(bytes([more]))
    else:
        out.append(bytes([hb.dedicated_ip.version | more]) + hb.dedicated_ip.packed)
    if a is not None:
        bits = a.ready | a.handed_in << 1 | bool(a.to) << 2 | a.leaving << 3
        out.append(_AFFINITY.pack(a.generation, bits))
        if a.to:
            out.append(host_bitmap(a.to))
    if len(hb.echoes) != len(hb.acks):
        raise ValueError("one echo per acknowledged host")
    out.append(bytes([hb.beat, *hb.echoes]))
    return b"".join(out)


def decode_heartbeat(p: bytes, host_id: int, incarnation: int, seq: int, said: int) -> Heartbeat:
    """The heartbeat of an authenticated frame's payload; raises :class:`Malformed` (or
    ``struct.error``, ``ValueError``) on anything but a well-formed one."""
    state_byte, flags, cdig, enum_, elead, eorig, edig, rec_raw = _HB_FIXED.unpack_from(p)
    state, health = split_health(state_byte)
    off = _HB_FIXED.size
    record = hosts_from_bitmap(rec_raw)
    if flags & Flag.ACKS_ARE_RECORD:
        acks = record - {host_id}
    else:
        acks = hosts_from_bitmap(p[off : off + 32])
        off += 32
    if flags & Flag.VOTE_IS_RECORD:
        vote = record
    else:
        vote = hosts_from_bitmap(p[off : off + 32])
        off += 32
    asks: frozenset[int] = frozenset()
    if flags & Flag.ASKS:
        asks = hosts_from_bitmap(p[off : off + 32])
        off += 32
        if not asks:
            raise Malformed  # the flag says a bitmap follows only when someone is asked
    (nrules,) = struct.unpack_from("!B", p, off)
    off += 1
    if nrules > MAX_RULES:
        raise Malformed
    rules = []
    for _ in range(nrules):
        w, st, pr = _RULE.unpack_from(p, off)
        off += _RULE.size
        if w > 100 or not 1 <= pr <= MAX_HOST:
            raise Malformed
        rules.append(RuleReport.unpack(w, st, pr))
    (nsil,) = struct.unpack_from("!B", p, off)
    off += 1
    silences = []
    for _ in range(nsil):
        h, ms = _SILENCE.unpack_from(p, off)
        off += _SILENCE.size
        if not 1 <= h <= MAX_HOST:
            raise Malformed
        silences.append((h, ms))
    (fam,) = struct.unpack_from("!B", p, off)
    off += 1
    has_affinity, fam = fam & AFFINITY_FOLLOWS, fam & ~AFFINITY_FOLLOWS
    dip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    if fam == 4:
        dip = ipaddress.IPv4Address(p[off : off + 4])
        off += 4
    elif fam == 6:
        dip = ipaddress.IPv6Address(p[off : off + 16])
        off += 16
    elif fam != 0:
        raise Malformed
    affinity: Affinity | None = None
    if has_affinity:
        gen, bits = _AFFINITY.unpack_from(p, off)
        off += _AFFINITY.size
        if bits & ~15:
            raise Malformed
        to: frozenset[int] = frozenset()
        if bits & 4:
            to = hosts_from_bitmap(p[off : off + 32])
            off += 32
            if not to:
                raise Malformed
        affinity = Affinity(gen, bool(bits & 1), to, bool(bits & 2), bool(bits & 8))
    if off + 1 + len(acks) != len(p):
        raise Malformed
    beat, echoes = p[off], tuple(p[off + 1 :])
    if any(a > MAX_HOST for a in acks):
        raise Malformed
    has_epoch = bool(flags & Flag.HAS_EPOCH)
    if has_epoch and not 1 <= elead <= MAX_HOST:
        raise Malformed
    return Heartbeat(
        host_id=host_id,
        incarnation=incarnation,
        seq=seq,
        state=HostState(state),
        flags=flags & ~_ENCODING,
        config_digest=cdig,
        epoch=EpochKey(enum_, elead, eorig) if has_epoch else None,
        epoch_digest=edig,
        acks=acks,
        rules=tuple(rules),
        silences=tuple(silences),
        record=record,
        vote=vote,
        dedicated_ip=dip,
        beat=beat,
        echoes=echoes,
        said=said,
        asks=asks,
        health=health,
        affinity=affinity,
    )
