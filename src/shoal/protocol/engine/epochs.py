"""The epochs this host knows: the last few, whole, and those arriving in map chunks.

A leader broadcasts an epoch in chunks; a host keeps the pieces of at most
:data:`MAX_ASSEMBLIES` epochs at once, and the :data:`MAX_KNOWN` newest whole epochs. It also
tracks the highest epoch number seen anywhere, so that the next epoch it creates, should it
lead, is numbered past every one in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shoal.config import PortRule
from shoal.protocol.epoch import EpochDecodeError, EpochState, decode_epoch
from shoal.protocol.frames import CHUNK_DATA, EpochKey, MapChunk

MAX_ASSEMBLIES = 4
MAX_KNOWN = 6


@dataclass
class _Assembly:
    count: int
    chunks: dict[int, bytes] = field(default_factory=dict)


class EpochStore:
    def __init__(self) -> None:
        self.known: dict[EpochKey, EpochState] = {}
        self._assemblies: dict[tuple[EpochKey, bytes], _Assembly] = {}
        self.max_seen = 0  # the highest epoch number seen, in a heartbeat or a map

    def get(self, key: EpochKey) -> EpochState | None:
        return self.known.get(key)

    def saw(self, key: EpochKey) -> None:
        """An epoch number was announced (a heartbeat)."""
        if key.number > self.max_seen:
            self.max_seen = key.number

    def remember(self, state: EpochState) -> None:
        self.known[state.key] = state
        self.max_seen = max(self.max_seen, state.key.number)
        while len(self.known) > MAX_KNOWN:
            del self.known[next(iter(self.known))]

    def add_chunk(self, ch: MapChunk, rules: list[PortRule], buckets: int) -> bool | None:
        """Take one chunk: True once it completed an epoch (now known), False if the
        completed epoch is malformed (dropped), None while pieces are missing or when the
        epoch was known already."""
        have = self.known.get(ch.epoch)
        if have is not None and have.digest() == ch.epoch_digest:
            return None
        key = (ch.epoch, ch.epoch_digest)
        asm = self._assemblies.get(key)
        if asm is None or asm.count != ch.count:
            asm = _Assembly(ch.count)
            self._assemblies[key] = asm
            while len(self._assemblies) > MAX_ASSEMBLIES:
                del self._assemblies[next(iter(self._assemblies))]
        asm.chunks[ch.index] = ch.data
        if len(asm.chunks) < asm.count:
            return None
        del self._assemblies[key]
        blob = b"".join(asm.chunks[i] for i in range(asm.count))
        try:
            state = decode_epoch(blob, rules, buckets)
        except EpochDecodeError:
            return False
        if state.key != ch.epoch or state.digest() != ch.epoch_digest:
            return False
        self.remember(state)
        return True


def chunks_of(state: EpochState) -> list[bytes]:
    """An epoch's compressed encoding cut into map-chunk payloads."""
    blob = state.compressed()
    return [blob[i : i + CHUNK_DATA] for i in range(0, len(blob), CHUNK_DATA)]
