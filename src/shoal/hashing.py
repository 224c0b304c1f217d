"""The bucket hash, bit for bit as the kernel's nftables ``jhash`` expression computes it.

Every host's kernel hashes the client key with ``jhash <key> mod B seed S``; the reference
model and the convergence engine must predict the same bucket, so this module reproduces
``net/netfilter/nft_hash.c``: Bob Jenkins' lookup3 (``linux/jhash.h``) over the register
contents, then ``reciprocal_scale`` (a multiply-shift, not a modulo).

Register layout: each concatenated field in network byte order, zero-padded to a multiple of
4 bytes. ``ip saddr . tcp sport`` is 8 bytes (``saddr | sport | 00 00``); ``ip6 saddr . tcp
sport`` is 20 bytes. The kernel reads the 4-byte words in CPU order (little-endian on x86).
"""

from __future__ import annotations

import ipaddress
import struct

_MASK = 0xFFFFFFFF
JHASH_INITVAL = 0xDEADBEEF
_WORDS = struct.Struct("<III")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _rol(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK


def jhash(key: bytes, seed: int) -> int:
    """lookup3 ``jhash(key, len(key), seed)`` as in linux/jhash.h (little-endian words)."""
    length = len(key)
    a: int
    b: int
    c: int
    w0: int
    w1: int
    w2: int
    a = b = c = (JHASH_INITVAL + length + seed) & _MASK
    off = 0
    while length > 12:
        w0, w1, w2 = _WORDS.unpack_from(key, off)
        a = (a + w0) & _MASK
        b = (b + w1) & _MASK
        c = (c + w2) & _MASK
        # __jhash_mix
        a = (a - c) & _MASK
        a ^= _rol(c, 4)
        c = (c + b) & _MASK
        b = (b - a) & _MASK
        b ^= _rol(a, 6)
        a = (a + c) & _MASK
        c = (c - b) & _MASK
        c ^= _rol(b, 8)
        b = (b + a) & _MASK
        a = (a - c) & _MASK
        a ^= _rol(c, 16)
        c = (c + b) & _MASK
        b = (b - a) & _MASK
        b ^= _rol(a, 19)
        a = (a + c) & _MASK
        c = (c - b) & _MASK
        c ^= _rol(b, 4)
        b = (b + a) & _MASK
        length -= 12
        off += 12
    if length == 0:
        return c
    tail = key[off:] + b"\x00" * (12 - length)
    w0, w1, w2 = _WORDS.unpack(tail)
    a = (a + w0) & _MASK
    b = (b + w1) & _MASK
    c = (c + w2) & _MASK
    # __jhash_final
    c ^= b
    c = (c - _rol(b, 14)) & _MASK
    a ^= c
    a = (a - _rol(c, 11)) & _MASK
    b ^= a
    b = (b - _rol(a, 25)) & _MASK
    c ^= b
    c = (c - _rol(b, 16)) & _MASK
    a ^= c
    a = (a - _rol(c, 4)) & _MASK
    b ^= a
    b = (b - _rol(a, 14)) & _MASK
    c ^= b
    c = (c - _rol(b, 24)) & _MASK
    return c


def reciprocal_scale(h: int, n: int) -> int:
    """Map a 32-bit hash onto [0, n) the way the kernel does: ``(u64)h * n >> 32``."""
    return (h * n) >> 32


def _pad4(raw: bytes) -> bytes:
    return raw + b"\x00" * (-len(raw) % 4)


def hash_key(address: IPAddress, port: int | None) -> bytes:
    """Register contents for ``<ip|ip6> saddr [. <l4> sport]`` (each field padded to 4 bytes)."""
    key = address.packed
    if port is not None:
        key += _pad4(struct.pack("!H", port))
    return key


def affinity_address(address: IPAddress, prefix: int | None) -> IPAddress:
    """The client address masked to ``prefix`` bits (network affinity); unchanged if None."""
    if prefix is None or prefix >= address.max_prefixlen:
        return address
    net = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    return net.network_address


def bucket_of(address: IPAddress, port: int | None, seed: int, buckets: int) -> int:
    """The bucket the kernel computes for this client key."""
    return reciprocal_scale(jhash(hash_key(address, port), seed), buckets)
