"""libnftables in-process through ctypes: one call per transaction, no ``nft`` subprocess.

libnftables acts on the network namespace of the calling thread, so the daemon (or a lab
helper) must run inside the host's namespace.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
from typing import Any

from shoal.dataplane.contract import DataplaneError
from shoal.dataplane.counters import read_counters

_JSON_OUTPUT = 1 << 4


class NftError(DataplaneError):
    """A transaction was refused; nothing of it was applied."""


class Nft:
    def __init__(self) -> None:
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError as e:
            raise NftError(f"cannot load libnftables ({name}): install the nftables package") from e
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        self._lib = lib
        self._ctx = lib.nft_ctx_new(0)
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)
        lib.nft_ctx_output_set_flags(self._ctx, _JSON_OUTPUT)

    def run(self, commands: str) -> str:
        """Run nft syntax or a JSON document as one atomic transaction; returns the output."""
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
        out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
        err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
        if rc != 0:
            raise NftError(err.strip() or f"nft returned {rc}")
        return out

    def json(self, commands: list[dict[str, Any]]) -> dict[str, Any]:
        out = self.run(json.dumps({"nftables": commands}))
        return json.loads(out) if out.strip() else {}

    def counters(self, family: str, table: str) -> dict[str, dict[str, Any]]:
        """The named counters of one table, by name (read over netlink: see
        :mod:`.counters`; NftError if the kernel refuses)."""
        try:
            return read_counters(family, table)
        except OSError as err:
            raise NftError(str(err)) from err

    def close(self) -> None:
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        self.close()
