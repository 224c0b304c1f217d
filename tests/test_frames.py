"""Heartbeat and map frames: round trips, authentication, a decoder that never raises."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.protocol.frames import (
    MTU_PAYLOAD,
    Codec,
    EpochKey,
    Flag,
    Heartbeat,
    HostState,
    MapChunk,
    Rejection,
    RuleReport,
    RuleState,
    _encode_heartbeat,
    cluster_id,
    split_heartbeat,
)

CID = cluster_id(ipaddress.ip_address("198.18.0.100"))
KEY = b"k" * 32
CODEC = Codec(CID, KEY)

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
    )


@settings(max_examples=300)
@given(hb=heartbeats())
def test_heartbeat_round_trip_within_mtu(hb: Heartbeat) -> None:
    wire = CODEC.encode(hb)
    assert len(wire) <= MTU_PAYLOAD  # 256 hosts, 32 rules, 128 silences still fit
    assert CODEC.decode(wire) == hb


@settings(max_examples=200)
@given(hb=heartbeats(), other=heartbeats())
def test_beat_and_echoes_read_without_a_full_parse(hb: Heartbeat, other: Heartbeat) -> None:
    """The receive fast path reads the beat and this host's echo straight from the payload,
    and compares only what does not change from beat to beat."""
    payload = _encode_heartbeat(hb)
    for h in range(1, 257):
        want = hb.echoes[sorted(hb.acks).index(h)] if h in hb.acks else None
        assert split_heartbeat(payload, h) == (stable(payload), hb.beat, want)
    same = replace(other, acks=hb.acks, echoes=hb.echoes[::-1], beat=(hb.beat + 1) % 256)
    assert stable(_encode_heartbeat(same)) == stable(_encode_heartbeat(other))
    assert stable(_encode_heartbeat(replace(hb, flags=hb.flags ^ 1))) != stable(payload)


def stable(payload: bytes) -> bytes:
    tail = split_heartbeat(payload, 1)
    assert tail is not None
    return tail[0]


@given(st.binary(max_size=200))
def test_split_heartbeat_of_any_bytes_never_raises(data: bytes) -> None:
    for h in (1, 2, 100, 256):
        split_heartbeat(data, h)


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
    assert Codec(CID, b"x" * 32).decode(_frame()) is Rejection.BAD_AUTH


def test_other_cluster_is_rejected() -> None:
    other = Codec(cluster_id(ipaddress.ip_address("198.18.0.101")), KEY)
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
