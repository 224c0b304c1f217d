"""libbpf through ctypes: load a BPF object, find its maps, attach XDP, read and write map
elements, and find what an earlier run attached.

Only what :mod:`shoal.dataplane.xdp` needs, each call raising :class:`BpfError` with the
errno's name; libbpf 1.x (Debian's ``libbpf1``) returns ``-errno``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2


class BpfError(OSError):
    """A libbpf call failed; ``errno`` says why."""


def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        raise BpfError(errno.ENOENT, f"libbpf is not installed ({name}): {e}") from None
    p, i, u32, u64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64
    for fn, res, args in (
        ("bpf_object__open_file", p, [ctypes.c_char_p, p]),
        ("bpf_object__load", i, [p]),
        ("bpf_object__close", None, [p]),
        ("bpf_object__find_map_by_name", p, [p, ctypes.c_char_p]),
        ("bpf_object__find_program_by_name", p, [p, ctypes.c_char_p]),
        ("bpf_map__fd", i, [p]),
        ("bpf_map__reuse_fd", i, [p, i]),
        ("bpf_program__fd", i, [p]),
        ("bpf_xdp_attach", i, [i, i, u32, p]),
        ("bpf_xdp_detach", i, [i, u32, p]),
        ("bpf_xdp_query_id", i, [i, i, ctypes.POINTER(u32)]),
        ("bpf_prog_get_fd_by_id", i, [u32]),
        ("bpf_map_get_fd_by_id", i, [u32]),
        ("bpf_obj_get_info_by_fd", i, [i, p, ctypes.POINTER(u32)]),
        ("bpf_map_update_elem", i, [i, p, p, u64]),
        ("bpf_map_lookup_elem", i, [i, p, p]),
        ("libbpf_set_print", p, [p]),
    ):
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    return lib


_LIB: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        _LIB = _lib()
    return _LIB


def _check(ret: int, what: str) -> int:
    if ret < 0:
        code = -ret
        raise BpfError(code, f"{what}: {errno.errorcode.get(code, code)} ({os.strerror(code)})")
    return ret


class BpfObject:
    """A BPF object file opened and (after :meth:`load`) in the kernel; closing it closes
    this process's descriptors, not what is attached."""

    def __init__(self, path: str) -> None:
        ctypes.set_errno(0)
        self.ptr = lib().bpf_object__open_file(path.encode(), None)
        if not self.ptr:
            code = ctypes.get_errno() or errno.EINVAL
            raise BpfError(code, f"open {path}: {os.strerror(code)}")

    def _map(self, name: str) -> int:
        m = lib().bpf_object__find_map_by_name(self.ptr, name.encode())
        if not m:
            raise BpfError(errno.ENOENT, f"map {name} is not in the object")
        return int(m)

    def reuse(self, name: str, fd: int) -> None:
        """Load with this existing map instead of a new one."""
        _check(lib().bpf_map__reuse_fd(self._map(name), fd), f"reuse map {name}")

    def load(self) -> None:
        _check(
            lib().bpf_object__load(self.ptr), "load the XDP program (the verifier's log is above)"
        )

    def map_fd(self, name: str) -> int:
        return _check(lib().bpf_map__fd(self._map(name)), f"map {name}")

    def prog_fd(self, name: str) -> int:
        p = lib().bpf_object__find_program_by_name(self.ptr, name.encode())
        if not p:
            raise BpfError(errno.ENOENT, f"program {name} is not in the object")
        return _check(lib().bpf_program__fd(p), f"program {name}")

    def close(self) -> None:
        if self.ptr:
            lib().bpf_object__close(self.ptr)
            self.ptr = None


def xdp_attach(ifindex: int, prog_fd: int, flags: int) -> None:
    _check(lib().bpf_xdp_attach(ifindex, prog_fd, flags, None), "attach XDP")


def xdp_detach(ifindex: int, flags: int) -> None:
    _check(lib().bpf_xdp_detach(ifindex, flags, None), "detach XDP")


def xdp_prog_id(ifindex: int, flags: int = 0) -> int:
    """The id of the XDP program attached in that mode (0: any single mode), 0 if none."""
    out = ctypes.c_uint32(0)
    _check(lib().bpf_xdp_query_id(ifindex, flags, ctypes.byref(out)), "query XDP")
    return out.value


# struct bpf_prog_info: nr_map_ids at 52, map_ids at 56, name at 64 (16 bytes)
# struct bpf_map_info: name at 24 (16 bytes)
_INFO = 256


def _info(fd: int) -> bytes:
    buf = ctypes.create_string_buffer(_INFO)
    n = ctypes.c_uint32(_INFO)
    _check(lib().bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(n)), "read object info")
    return buf.raw


def _name(raw: bytes, at: int) -> str:
    return raw[at : at + 16].split(b"\0", 1)[0].decode(errors="replace")


def prog_maps(prog_id: int) -> tuple[str, dict[str, int]]:
    """The name of program ``prog_id`` and its maps (name -> a new descriptor)."""
    fd = _check(lib().bpf_prog_get_fd_by_id(prog_id), f"program id {prog_id}")
    try:
        raw = _info(fd)
        n = struct.unpack_from("<I", raw, 52)[0]
        ids = (ctypes.c_uint32 * max(n, 1))()
        buf = ctypes.create_string_buffer(_INFO)  # zero but the map ids asked for
        struct.pack_into("<IQ", buf, 52, n, ctypes.addressof(ids))
        size = ctypes.c_uint32(_INFO)
        _check(lib().bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(size)), "read program maps")
        name = _name(buf.raw, 64)
    finally:
        os.close(fd)
    maps: dict[str, int] = {}
    for map_id in list(ids)[:n]:
        mfd = _check(lib().bpf_map_get_fd_by_id(map_id), f"map id {map_id}")
        maps[_name(_info(mfd), 24)] = mfd
    return name, maps


def update(fd: int, key: bytes, value: bytes) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    _check(lib().bpf_map_update_elem(fd, k, v, 0), "update a map element")


def lookup(fd: int, key: bytes, size: int) -> bytes | None:
    """The value under ``key`` (``size`` bytes; all CPUs' values for a per-CPU map), or
    None if there is none."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(size)
    ret = lib().bpf_map_lookup_elem(fd, k, v)
    if ret == -errno.ENOENT:
        return None
    _check(ret, "read a map element")
    return v.raw
