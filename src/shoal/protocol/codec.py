"""How a frame is laid out on the wire and authenticated, and the strict decoding of
untrusted bytes.

Every frame is ``header | payload | tag``:

=======  =====  ===============================================================
offset   size   field
=======  =====  ===============================================================
0        2      magic ``SH``
2        1      protocol version (7)
3        1      frame type: 1 heartbeat, 2 map chunk, 3 proof, 4 request, 5 answer,
                6 handoff
4        8      cluster id: first 8 bytes of SHA-256("shoal-cluster:" + primary VIP)
12       2      sender host id (1..256)
14       8      sender incarnation (chosen at each daemon start, increasing)
22       4      content number (heartbeats): changes whenever what the heartbeat says,
                other than its beat and echoes, changes; 0 in map chunks
26       4      sequence number within the incarnation
30       2      payload length
32       n      payload (below)
32+n     32     HMAC-SHA256 over bytes 0..32+n with the cluster key
=======  =====  ===============================================================

All integers are big-endian. :meth:`Codec.decode` never raises: any byte string gives a frame
or a :class:`~shoal.protocol.frames.Rejection`. Replay protection (incarnation, sequence) needs
per-peer state and lives in the engine.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import NamedTuple

from shoal.protocol.frames import (
    CHUNK_DATA,
    HEADER_LEN,
    MAX_HANDOFF_KEYS,
    MAX_HOST,
    MAX_PROOFS,
    MAX_REMOTE,
    MAX_RULES,
    TAG_LEN,
    VERSION,
    Answer,
    EpochKey,
    Frame,
    FrameType,
    Handoff,
    Heartbeat,
    MapChunk,
    Proof,
    Rejection,
    Request,
)
from shoal.protocol.heartbeat_layout import Malformed, decode_heartbeat, encode_heartbeat

MAGIC = b"SH"
_HEADER = struct.Struct("!2sBB8sHQIIH")
assert _HEADER.size == HEADER_LEN
_SAME = 26  # bytes 0..26 say who sent a frame and what it says, if it is a heartbeat
_SEQ = struct.Struct("!I")
_HEARD = struct.Struct("!HQI")


class Repeat(NamedTuple):
    """A peer's heartbeat as parsed in full, for the receive fast path: a later frame with
    the same first bytes (sender, incarnation, content number) says the same, and only its
    sequence number, beat and echoes are new; they are read straight from the bytes."""

    head: bytes  # bytes 0..26: magic, version, type, cluster, sender, incarnation, content
    beat_at: int
    echo_at: int  # where the receiving host's echo sits; 0 when it is not acknowledged
    size: int  # the whole frame, tag included


def repeat_of(frame: bytes, hb: Heartbeat, host: int) -> Repeat:
    """The :class:`Repeat` of an authenticated heartbeat frame and ``hb``, what it decoded
    to, as received by ``host``: the beat and the echoes (one per acknowledged host, in id
    order) end the payload."""
    (plen,) = struct.unpack_from("!H", frame, HEADER_LEN - 2)
    tag_at = HEADER_LEN + plen
    beat_at = tag_at - 1 - len(hb.acks)
    echo_at = beat_at + 1 + sum(1 for h in hb.acks if h < host) if host in hb.acks else 0
    return Repeat(frame[:_SAME], beat_at, echo_at, tag_at + TAG_LEN)


_CHUNK = struct.Struct("!IHQ8sHH")
_REMOTE = struct.Struct("!HQ")  # the target (request) or the asker (answer), the request id
_HANDOFF = struct.Struct("!IHQHHHHBB")  # epoch, generation, to, index, count, rule, key size


class Keys(NamedTuple):
    """The cluster key that signs this host's frames, and the keys also accepted on
    receipt: during a rotation the new one first, then the old one, until every host moved."""

    signing: bytes
    accepted: tuple[bytes, ...] = ()


def _pads(key: bytes) -> tuple[hashlib._Hash, hashlib._Hash]:
    """HMAC-SHA256's inner and outer hash states for ``key``, set up once."""
    block = hashlib.sha256(key).digest() if len(key) > 64 else key
    block = block.ljust(64, b"\0")
    return hashlib.sha256(bytes(b ^ 0x36 for b in block)), hashlib.sha256(
        bytes(b ^ 0x5C for b in block)
    )


class Codec:
    """Encodes and authenticates frames for one cluster and its keys.

    HMAC-SHA256 with the key's inner and outer pads hashed once: per frame it then costs
    two hash copies, half of what ``hmac.digest`` spends setting the key up every time. A
    frame is authentic under the signing key or any accepted key; the frames only an
    accepted key opened are counted (:attr:`by_accepted`): while it is not 0, some host
    still signs with a key this one will drop at the end of a rotation.
    """

    def __init__(self, cluster: bytes, keys: Keys) -> None:
        self.rekey(cluster, keys)

    def rekey(self, cluster: bytes, keys: Keys) -> None:
        """Use another cluster id or other keys from now on (a reload)."""
        self.cluster = cluster
        self.keys = keys
        self._inner, self._outer = _pads(keys.signing)
        self._also = [_pads(k) for k in keys.accepted if k != keys.signing]
        self.by_accepted = 0

    def __reduce__(self) -> tuple[type[Codec], tuple[bytes, Keys]]:
        # hash states do not pickle: a copied engine (the benchmark replays one) rebuilds them
        return (Codec, (self.cluster, self.keys))

    def tag(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def authentic(self, message: bytes, tag: bytes) -> bool:
        if hmac.compare_digest(self.tag(message), tag):
            return True
        for inner, outer in self._also:
            i = inner.copy()
            i.update(message)
            o = outer.copy()
            o.update(i.digest())
            if hmac.compare_digest(o.digest(), tag):
                self.by_accepted += 1
                return True
        return False

    def _seal(
        self, ftype: FrameType, host: int, inc: int, seq: int, payload: bytes, said: int = 0
    ) -> bytes:
        head = _HEADER.pack(MAGIC, VERSION, ftype, self.cluster, host, inc, said, seq, len(payload))
        body = head + payload
        return body + self.tag(body)

    def encode(self, frame: Frame) -> bytes:
        if isinstance(frame, Heartbeat):
            return self._seal(
                FrameType.HEARTBEAT,
                frame.host_id,
                frame.incarnation,
                frame.seq,
                encode_heartbeat(frame),
                frame.said,
            )
        if isinstance(frame, Request | Answer):
            if len(frame.body) > MAX_REMOTE:
                raise ValueError(f"a remote body is at most {MAX_REMOTE} bytes")
            kind = FrameType.REQUEST if isinstance(frame, Request) else FrameType.ANSWER
            payload = _REMOTE.pack(frame.peer, frame.request_id) + frame.body
            return self._seal(kind, frame.host_id, frame.incarnation, frame.seq, payload)
        if isinstance(frame, Handoff):
            return self._seal(
                FrameType.HANDOFF,
                frame.host_id,
                frame.incarnation,
                frame.seq,
                _encode_handoff(frame),
            )
        if isinstance(frame, Proof):
            if not 0 < len(frame.heard) <= MAX_PROOFS:
                raise ValueError(f"a proof names 1 to {MAX_PROOFS} hosts")
            payload = bytes([len(frame.heard)]) + b"".join(_HEARD.pack(*x) for x in frame.heard)
            return self._seal(FrameType.PROOF, frame.host_id, frame.incarnation, frame.seq, payload)
        payload = (
            _CHUNK.pack(
                frame.epoch.number,
                frame.epoch.leader,
                frame.epoch.origin,
                frame.epoch_digest,
                frame.index,
                frame.count,
            )
            + frame.data
        )
        return self._seal(FrameType.MAP_CHUNK, frame.host_id, frame.incarnation, frame.seq, payload)

    def decode(self, data: bytes) -> Frame | Rejection:
        """A frame, or why not. Total: never raises."""
        env = self.open(data)
        return env if isinstance(env, Rejection) else parse(env)

    def open_repeat(self, data: bytes, rep: Repeat) -> int | None:
        """The sequence number of ``data`` if it repeats ``rep``'s heartbeat (see
        :class:`Repeat`) and is authentic; -1 if it matches but its tag is wrong (that is
        all the full check could find); None if it differs: parse it in full."""
        if len(data) != rep.size or data[:_SAME] != rep.head:
            return None
        end = rep.size - TAG_LEN
        if not self.authentic(data[:end], data[end:]):
            return -1
        return _SEQ.unpack_from(data, _SAME)[0]  # type: ignore[no-any-return]

    def open(self, data: bytes) -> Envelope | Rejection:
        """Check the header and the tag; the payload stays unparsed (see :func:`parse`)."""
        if len(data) < HEADER_LEN + TAG_LEN:
            return Rejection.TOO_SHORT
        magic, version, ftype, cid, host, inc, said, seq, plen = _HEADER.unpack_from(data)
        if magic != MAGIC:
            return Rejection.BAD_MAGIC
        if version != VERSION:
            return Rejection.BAD_VERSION
        if cid != self.cluster:
            return Rejection.FOREIGN_CLUSTER
        end = HEADER_LEN + plen
        if len(data) < end + TAG_LEN:
            return Rejection.BAD_LENGTH
        # trailing bytes past the tag (Ethernet padding) are ignored
        if not self.authentic(data[:end], data[end : end + TAG_LEN]):
            return Rejection.BAD_AUTH
        if not 1 <= host <= MAX_HOST:
            return Rejection.MALFORMED
        if not 1 <= ftype <= max(FrameType):
            return Rejection.UNKNOWN_TYPE
        return Envelope(ftype, host, inc, seq, data[HEADER_LEN:end], said)


class Envelope(NamedTuple):
    """An authenticated frame whose payload is not parsed yet."""

    ftype: int  # a FrameType value
    host_id: int
    incarnation: int
    seq: int
    payload: bytes
    said: int = 0


def parse(env: Envelope) -> Frame | Rejection:
    """The frame inside an authenticated envelope, or MALFORMED. Never raises."""
    try:
        if env.ftype == FrameType.HEARTBEAT:
            return decode_heartbeat(env.payload, env.host_id, env.incarnation, env.seq, env.said)
        if env.ftype == FrameType.PROOF:
            return _decode_proof(env)
        if env.ftype in (FrameType.REQUEST, FrameType.ANSWER):
            return _decode_remote(env)
        if env.ftype == FrameType.HANDOFF:
            return _decode_handoff(env)
        return _decode_chunk(env.payload, env.host_id, env.incarnation, env.seq)
    except (Malformed, struct.error, ValueError):
        return Rejection.MALFORMED


def _encode_handoff(h: Handoff) -> bytes:
    size = len(h.keys[0]) if h.keys else 4
    if size not in (4, 16) or any(len(k) != size for k in h.keys):
        raise ValueError("a handoff's keys are all IPv4 or all IPv6 addresses")
    if len(h.keys) * size > MAX_HANDOFF_KEYS * 4:
        raise ValueError(f"a handoff carries at most {MAX_HANDOFF_KEYS * 4} bytes of keys")
    e = h.epoch
    head = _HANDOFF.pack(
        e.number, e.leader, e.origin, h.generation, h.to, h.index, h.count, h.rule, size
    )
    return head + b"".join(h.keys)


def _decode_handoff(env: Envelope) -> Handoff:
    p = env.payload
    enum_, elead, eorig, gen, to, index, count, rule, size = _HANDOFF.unpack_from(p)
    body = p[_HANDOFF.size :]
    bad = not 1 <= elead <= MAX_HOST or not 1 <= to <= MAX_HOST or rule >= MAX_RULES
    if bad or count == 0 or index >= count or size not in (4, 16) or len(body) % size:
        raise Malformed
    if len(body) > MAX_HANDOFF_KEYS * 4:
        raise Malformed
    keys = tuple(body[i : i + size] for i in range(0, len(body), size))
    epoch = EpochKey(enum_, elead, eorig)
    return Handoff(env.host_id, env.incarnation, env.seq, epoch, gen, to, index, count, rule, keys)


def _decode_proof(env: Envelope) -> Proof:
    p = env.payload
    n = p[0] if p else 0
    if not 0 < n <= MAX_PROOFS or len(p) != 1 + n * _HEARD.size:
        raise Malformed
    heard = tuple(_HEARD.unpack_from(p, 1 + i * _HEARD.size) for i in range(n))
    if any(not 1 <= h <= MAX_HOST for h, _, _ in heard):
        raise Malformed
    return Proof(env.host_id, env.incarnation, env.seq, heard)


def _decode_remote(env: Envelope) -> Request | Answer:
    peer, rid = _REMOTE.unpack_from(env.payload)
    body = env.payload[_REMOTE.size :]
    if peer > MAX_HOST or len(body) > MAX_REMOTE:
        raise Malformed
    if env.ftype == FrameType.REQUEST:
        return Request(env.host_id, env.incarnation, env.seq, peer, rid, body)
    if peer == 0:
        raise Malformed  # an answer goes to one host
    return Answer(env.host_id, env.incarnation, env.seq, peer, rid, body)


def _decode_chunk(p: bytes, host: int, inc: int, seq: int) -> MapChunk:
    enum_, elead, eorig, edig, index, count = _CHUNK.unpack_from(p)
    if not 1 <= elead <= MAX_HOST or count == 0 or index >= count or count > 4096:
        raise Malformed
    data = p[_CHUNK.size :]
    if not data or len(data) > CHUNK_DATA:
        raise Malformed
    return MapChunk(host, inc, seq, EpochKey(enum_, elead, eorig), edig, index, count, data)
