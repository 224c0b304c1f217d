"""Heartbeat and map frames: round trips, authentication, a decoder that never raises."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.dataplane.contract import RuleState
from shoal.protocol.codec import Codec, Keys, repeat_of
from shoal.protocol.frames import (
    MAX_HANDOFF_KEYS,
    MAX_PROOFS,
    MTU_PAYLOAD,
    Affinity,
    EpochKey,
    Flag,
    Handoff,
    Heartbeat,
    HostState,
    MapChunk,
    Proof,
    Rejection,
    RuleReport,
    cluster_id,
)

CID = cluster_id(ipaddress.ip_address("198.18.0.100"))
KEY = b"k" * 32
CODEC = Codec(CID, Keys(KEY))

hosts = st.integers(1, 256)
keys = st.builds(EpochKey, st.integers(1, 2**32 - 1), hosts, st.integers(0, 2**64 - 1))
reports = st.builds(RuleReport, st.integers(0, 100), st.sampled_from(RuleState), hosts)
addresses = st.one_of(st.none(), st.ip_addresses())


@st.composite
def heartbeats(draw: st.DrawFn) -> Heartbeat:
    epoch = draw(st.one_of(st.none(), keys))
    flags = draw(st.integers(0, 15)) | (Flag.HAS_EPOCH if epoch else 0)
    acks = draw(st.frozensets(hosts))
    return Heartbeat(
        host_id=draw(hosts),
        incarnation=draw(st.integers(0, 2**64 - 1)),
        seq=draw(st.integers(0, 2**32 - 1)),
        state=draw(st.sampled_from(HostState)),
        flags=flags,
        config_digest=draw(st.binary(min_size=8, max_size=8)),
        epoch=epoch,
        epoch_digest=draw(st.binary(min_size=8, max_size=8)),
        acks=acks,
        rules=tuple(draw(st.lists(reports, max_size=32))),
        silences=tuple(draw(st.lists(st.tuples(hosts, st.integers(0, 2**32 - 1)), max_size=128))),
        dedicated_ip=draw(addresses),
        record=draw(st.frozensets(hosts)),
        vote=draw(st.frozensets(hosts)),
        beat=draw(st.integers(0, 255)),
        echoes=tuple(draw(st.lists(st.integers(0, 255), min_size=len(acks), max_size=len(acks)))),
        said=draw(st.integers(0, 2**32 - 1)),
        asks=draw(st.frozensets(hosts)),
        affinity=draw(st.one_of(st.none(), affinities)),
    )


affinities = st.builds(
    Affinity,
    st.integers(0, 0xFFFF),
    st.booleans(),
    st.frozensets(hosts),
    st.booleans(),
    st.booleans(),
)


@st.composite
def handoffs(draw: st.DrawFn) -> Handoff:
    size = draw(st.sampled_from([4, 16]))
    n = draw(st.integers(0, MAX_HANDOFF_KEYS * 4 // size))
    count = draw(st.integers(1, 65535))
    return Handoff(
        draw(hosts),
        draw(st.integers(0, 2**64 - 1)),
        draw(st.integers(0, 2**32 - 1)),
        draw(keys),
        draw(st.integers(0, 0xFFFF)),
        draw(hosts),
        draw(st.integers(0, count - 1)),
        count,
        draw(st.integers(0, 31)),
        tuple(draw(st.lists(st.binary(min_size=size, max_size=size), min_size=n, max_size=n))),
    )


@settings(max_examples=200)
@given(h=handoffs())
def test_handoff_round_trip_within_mtu(h: Handoff) -> None:
    """A handoff piece, its most keys of either family included, fits a 1500-byte MTU."""
    wire = CODEC.encode(h)
    assert len(wire) <= MTU_PAYLOAD
    assert CODEC.decode(wire) == h


@settings(max_examples=300)
@given(hb=heartbeats())
def test_heartbeat_round_trip_within_mtu(hb: Heartbeat) -> None:
    wire = CODEC.encode(hb)
    assert len(wire) <= MTU_PAYLOAD  # 256 hosts, 32 rules, 128 silences still fit
    assert CODEC.decode(wire) == hb


@settings(max_examples=200)
@given(hb=heartbeats(), other=heartbeats(), data=st.data())
def test_a_repeated_heartbeat_is_read_without_a_full_parse(
    hb: Heartbeat, other: Heartbeat, data: st.DataObject
) -> None:
    """The receive fast path takes a frame with the sender, incarnation and content number
    of the last one parsed; it reads the sequence number, beat and echoes straight from the
    bytes and checks the tag. Another content number sends the frame to the full decoder."""
    wire = CODEC.encode(hb)
    again = replace(
        hb,
        seq=other.seq,
        beat=other.beat,
        echoes=tuple(data.draw(st.integers(0, 255)) for _ in hb.echoes),
    )
    wire2 = CODEC.encode(again)
    for h in (1, 2, 100, 255, 256, *hb.acks):
        rep = repeat_of(wire, hb, h)
        assert CODEC.open_repeat(wire2, rep) == again.seq
        assert wire2[rep.beat_at] == again.beat
        want = again.echoes[sorted(hb.acks).index(h)] if h in hb.acks else None
        assert (wire2[rep.echo_at] if rep.echo_at else None) == want
    rep = repeat_of(wire, hb, 1)
    said = replace(other, host_id=hb.host_id, incarnation=hb.incarnation, said=hb.said ^ 1)
    assert CODEC.open_repeat(CODEC.encode(said), rep) is None
    at = data.draw(st.integers(0, len(wire2) - 1))
    flipped = wire2[:at] + bytes([wire2[at] ^ 0x80]) + wire2[at + 1 :]
    assert CODEC.open_repeat(flipped, rep) == (None if at < 26 else -1)


@given(st.binary(max_size=600), heartbeats())
def test_a_repeat_check_of_any_bytes_never_raises(data: bytes, hb: Heartbeat) -> None:
    rep = repeat_of(CODEC.encode(hb), hb, 1)
    assert CODEC.open_repeat(data, rep) in (None, -1)
    assert CODEC.open_repeat(CODEC.encode(hb)[:26] + data, rep) in (None, -1)


@given(
    ch=st.builds(
        MapChunk,
        hosts,
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**32 - 1),
        keys,
        st.binary(min_size=8, max_size=8),
        st.just(0),
        st.integers(1, 4096),
        st.binary(min_size=1, max_size=1200),
    )
)
def test_map_chunk_round_trip(ch: MapChunk) -> None:
    wire = CODEC.encode(ch)
    assert len(wire) <= MTU_PAYLOAD
    assert CODEC.decode(wire) == ch


def _frame() -> bytes:
    hb = Heartbeat(
        3,
        7,
        9,
        HostState.CONVERGED,
        0,
        b"d" * 8,
        None,
        b"\0" * 8,
        frozenset({1}),
        (RuleReport(50, RuleState.ENABLED, 3),),
        echoes=(4,),
    )
    return CODEC.encode(hb)


def test_wrong_key_is_rejected() -> None:
    assert Codec(CID, Keys(b"x" * 32)).decode(_frame()) is Rejection.BAD_AUTH


def test_other_cluster_is_rejected() -> None:
    other = Codec(cluster_id(ipaddress.ip_address("198.18.0.101")), Keys(KEY))
    wire = other.encode(
        Heartbeat(3, 7, 9, HostState.CONVERGED, 0, b"d" * 8, None, b"\0" * 8, frozenset(), ())
    )
    assert CODEC.decode(wire) is Rejection.FOREIGN_CLUSTER


def test_wrong_version_is_rejected() -> None:
    wire = bytearray(_frame())
    wire[2] = 9
    assert CODEC.decode(bytes(wire)) is Rejection.BAD_VERSION


def test_any_flipped_bit_is_caught() -> None:
    wire = _frame()
    for i in range(len(wire)):
        bad = bytearray(wire)
        bad[i] ^= 0x10
        assert isinstance(CODEC.decode(bytes(bad)), Rejection), i


@settings(max_examples=2000)
@given(data=st.binary(max_size=1600))
def test_decoder_is_total_on_random_bytes(data: bytes) -> None:
    assert isinstance(CODEC.decode(data), Rejection | Heartbeat | MapChunk)


@settings(max_examples=1000)
@given(payload=st.binary(max_size=1400), ftype=st.integers(0, 255), host=st.integers(0, 65535))
def test_decoder_is_total_on_authenticated_garbage(payload: bytes, ftype: int, host: int) -> None:
    """Even a key holder sending nonsense gets a typed rejection, never an exception."""
    wire = CODEC._seal(ftype, host, 1, 1, payload)  # type: ignore[arg-type]
    out = CODEC.decode(wire)
    assert isinstance(out, Rejection | Heartbeat | MapChunk)


def steady(n: int, rules: int = 3) -> Heartbeat:
    """A converged member's heartbeat in an n-host cluster: it hears every member and its
    vote is its record (both bitmaps left out), an IPv4 dedicated address."""
    members = frozenset(range(1, n + 1))
    return Heartbeat(
        host_id=2,
        incarnation=1,
        seq=1,
        state=HostState.CONVERGED,
        flags=Flag.HAS_EPOCH,
        config_digest=b"x" * 8,
        epoch=EpochKey(5, 1, 1),
        epoch_digest=b"y" * 8,
        acks=members - {2},
        rules=tuple(RuleReport(50, RuleState.ENABLED, 1) for _ in range(rules)),
        record=members,
        vote=members,
        dedicated_ip=ipaddress.ip_address("198.18.0.12"),
        echoes=(0,) * (n - 1),
    )


def test_heartbeat_sizes() -> None:
    """The sizes docs/convergence.md gives: a steady heartbeat with 3 rules at 4 and at 256
    hosts (3 bytes more with sticky rules), and the largest one (256 hosts, 32 rules, 128
    silences, every bitmap, an IPv6 address, a handoff to some), which still fits a 1500-byte
    MTU."""
    assert len(CODEC.encode(steady(4))) == 151
    assert len(CODEC.encode(steady(256))) == 403
    assert len(CODEC.encode(replace(steady(4), affinity=Affinity(3, True)))) == 154
    largest = replace(
        steady(256, rules=32),
        record=frozenset(range(1, 200)),
        vote=frozenset(range(1, 100)),
        silences=tuple((h, 5) for h in range(3, 131)),
        dedicated_ip=ipaddress.ip_address("2001:db8::12"),
        asks=frozenset(range(1, 257)),
        affinity=Affinity(3, True, frozenset({1, 7}), True),
    )
    assert len(CODEC.encode(largest)) == 1430 <= MTU_PAYLOAD


def test_accepted_keys_open_frames_and_are_counted() -> None:
    """During a rotation a frame signed with any configured key is authentic; only those
    an accepted key opened are counted; a key not configured is still rejected."""
    old, new, other = b"o" * 32, b"n" * 32, b"x" * 32
    hb = CODEC.decode(_frame())
    assert isinstance(hb, Heartbeat)
    rotating = Codec(CID, Keys(new, (old,)))
    assert rotating.decode(Codec(CID, Keys(new)).encode(hb)) == hb
    assert rotating.by_accepted == 0
    assert rotating.decode(Codec(CID, Keys(old)).encode(hb)) == hb
    assert rotating.by_accepted == 1
    assert rotating.decode(Codec(CID, Keys(other)).encode(hb)) is Rejection.BAD_AUTH
    rotating.rekey(CID, Keys(new))
    assert rotating.decode(Codec(CID, Keys(old)).encode(hb)) is Rejection.BAD_AUTH


@settings(max_examples=200)
@given(
    host=hosts,
    inc=st.integers(0, 2**64 - 1),
    seq=st.integers(0, 2**32 - 1),
    heard=st.lists(
        st.tuples(hosts, st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1)),
        min_size=1,
        max_size=MAX_PROOFS,
    ),
)
def test_proof_round_trip_within_mtu(
    host: int, inc: int, seq: int, heard: list[tuple[int, int, int]]
) -> None:
    proof = Proof(host, inc, seq, tuple(heard))
    wire = CODEC.encode(proof)
    assert len(wire) <= MTU_PAYLOAD and CODEC.decode(wire) == proof
