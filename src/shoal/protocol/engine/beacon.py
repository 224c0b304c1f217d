"""What this host sends: heartbeats and map chunks, their numbering and their timing.

Every frame carries a sequence number (the receivers' replay window). Every heartbeat
carries a beat number (its low byte: peers echo it back, and the lease counts from when the
echoed beat was sent) and a content number, moved only when what the heartbeat says changed
(receivers recognise a repeat from its bytes and skip decoding it). A heartbeat is due every
period, and sooner, a tenth of a period after the last, when the engine marked something to
say (:attr:`Beacon.dirty`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import replace

from shoal.protocol.codec import Codec
from shoal.protocol.engine.epochs import chunks_of
from shoal.protocol.engine.peers import NEVER, Peer, Roster
from shoal.protocol.epoch import EpochState
from shoal.protocol.frames import (
    Answer,
    EpochKey,
    Handoff,
    Heartbeat,
    MapChunk,
    Proof,
    Request,
)

MAX_SILENCES = 128  # fenced hosts whose silence one heartbeat reports
UNKNOWN_SILENCE = 0xFFFFFFFF  # never heard (a heartbeat's silence field)


class Beacon:
    def __init__(self, codec: Codec, me: int, incarnation: int, now: float) -> None:
        self.codec = codec
        self.me = me
        self.incarnation = incarnation
        self.seq = 0
        self.beats = 0  # heartbeats sent; the low byte numbers each one
        self.beat_sent = [NEVER] * 256  # when each beat number was last sent
        self.last_sent = NEVER
        self.next_hb = now
        self.dirty = True  # something new to say: send within a tenth of a period
        self.last_map_sent: dict[EpochKey, float] = {}
        self.frames: list[bytes] = []  # encoded, not yet taken
        self.frames_sent = 0
        self._said: Heartbeat | None = None  # the last heartbeat sent, less what every beat changes
        self._said_number = 0
        self._acks_memo: tuple[int, frozenset[int], float, frozenset[int], list[Peer]] | None = None

    def due(self, now: float, period: float) -> bool:
        return now >= self.next_hb or (self.dirty and now >= self.last_sent + period / 10)

    def deadline(self, period: float) -> float:
        """When the next heartbeat is due at the latest."""
        if self.dirty:
            return min(self.next_hb, self.last_sent + period / 10)
        return self.next_hb

    def _next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        return self.seq

    def send_heartbeat(
        self, said: Heartbeat, echoed: Iterable[Peer], now: float, period: float
    ) -> None:
        """Number and send ``said`` (a heartbeat whose sequence, beat and echoes are still
        zero), echoing the newest beat of each of ``echoed``."""
        if said != self._said:
            # the content number tells receivers that this heartbeat says something new
            self._said, self._said_number = said, (self._said_number + 1) & 0xFFFFFFFF
        beat = self.beats % 256
        hb = replace(
            said,
            seq=self._next_seq(),
            beat=beat,
            echoes=tuple([p.beat for p in echoed]),
            said=self._said_number,
        )
        self.beat_sent[beat] = now
        self.beats += 1
        self.frames.append(self.codec.encode(hb))
        self.frames_sent += 1
        self.last_sent = now
        self.next_hb = now + period
        self.dirty = False

    def send_map(self, state: EpochState, now: float) -> None:
        pieces = chunks_of(state)
        digest = state.digest()
        for i, piece in enumerate(pieces):
            ch = MapChunk(
                self.me,
                self.incarnation,
                self._next_seq(),
                state.key,
                digest,
                i,
                len(pieces),
                piece,
            )
            self.frames.append(self.codec.encode(ch))
            self.frames_sent += 1
        self.last_map_sent[state.key] = now

    def send_handoff(self, piece: Handoff) -> None:
        """A piece of this host's handoff (see :mod:`.handoff`), numbered in this run."""
        self.frames.append(self.codec.encode(replace(piece, seq=self._next_seq())))
        self.frames_sent += 1

    def send_proof(self, heard: list[tuple[int, int, int]]) -> None:
        """Prove this host is alive now to each asking heartbeat (host, incarnation,
        sequence number) of ``heard``."""
        proof = Proof(self.me, self.incarnation, self._next_seq(), tuple(heard))
        self.frames.append(self.codec.encode(proof))
        self.frames_sent += 1

    def send_remote(self, kind: type[Request | Answer], peer: int, rid: int, body: bytes) -> None:
        """A remote-control request (``peer``: its target, 0 for all) or answer (``peer``:
        the asker), numbered in this run like every frame: the receivers' replay windows
        and proofs cover it."""
        frame = kind(self.me, self.incarnation, self._next_seq(), peer, rid, body)
        self.frames.append(self.codec.encode(frame))
        self.frames_sent += 1

    def to_acknowledge(
        self, acked: frozenset[int], roster: Roster, window: float, now: float
    ) -> tuple[frozenset[int], list[Peer]]:
        """Those of ``acked`` heard within the ack window, and their peers in id order
        (kept until something known of the peers changes or one of them may drop out)."""
        memo = self._acks_memo
        if memo is not None and memo[1] is acked and now <= memo[2] and roster.fresh(memo[0], now):
            return memo[3], memo[4]
        peers, me = roster.peers, self.me
        out = [
            p
            for h in sorted(acked)
            if h != me
            and (p := peers.get(h)) is not None
            and p.beat >= 0
            and p.last_heard + window >= now
        ]
        until = min([p.last_heard + window for p in out], default=math.inf)
        ids = frozenset([p.host_id for p in out])
        self._acks_memo = (roster.view, acked, until, ids, out)
        return ids, out


def acknowledged(e: EpochState, leader: int | None, peers: Mapping[int, Peer]) -> frozenset[int]:
    """Whom a started host acknowledges: the members of its epoch, and a leader outside the
    epoch that holds it too (it needs fresh reports from the members to declare it READY)."""
    if leader is None or leader in e.members:
        return e.members
    p = peers.get(leader)
    if p is not None and p.hb is not None and p.hb.epoch == e.key:
        return e.members | {leader}
    return e.members


def silences(
    fenced: frozenset[int], peers: Mapping[int, Peer], now: float
) -> tuple[tuple[int, int], ...]:
    """For each fenced host (the first :data:`MAX_SILENCES` by id), how many milliseconds
    ago this host last heard it: the leader's fence waits on these."""
    out = []
    for c in sorted(fenced)[:MAX_SILENCES]:
        p = peers.get(c)
        ms = UNKNOWN_SILENCE if p is None else int((now - p.last_heard) * 1000)
        out.append((c, min(ms, UNKNOWN_SILENCE - 1)))
    return tuple(out)
