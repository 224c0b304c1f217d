"""Epoch state: encoding, strict decoding, the next epoch."""

from __future__ import annotations

import contextlib
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.dataplane.contract import RuleState, bucket_token, split_token
from shoal.protocol.epoch import EpochDecodeError, decode_epoch, next_epoch
from shoal.protocol.frames import EpochKey, RuleReport
from shoal.sim.scenario import cluster_configs

CFG = cluster_configs(4, buckets=64, extra_rule=True)[0]
RULES = CFG.cluster.effective_rules


def reports(weights: dict[int, int]) -> dict[int, tuple[RuleReport, ...]]:
    return {
        h: tuple(RuleReport(w, RuleState.ENABLED, h) for _ in RULES) for h, w in weights.items()
    }


def test_round_trip_and_digest() -> None:
    e = next_epoch(
        None,
        EpochKey(1, 1, 5),
        frozenset({1, 2, 3}),
        frozenset({9}),
        (frozenset({1, 2}),),
        (EpochKey(1, 2, 3),),
        reports({1: 50, 2: 50, 3: 20}),
        RULES,
        64,
    )
    back = decode_epoch(e.compressed(), RULES, 64)
    assert back == e and back.digest() == e.digest()
    assert e.default_host == 1
    ssh = [r.key for r in RULES].index("ssh")
    assert e.handlers[ssh] == 1  # lowest handling priority


def test_tokens_partition_the_buckets() -> None:
    e = next_epoch(
        None,
        EpochKey(1, 1),
        frozenset({1, 2, 3}),
        frozenset(),
        (),
        (),
        reports({1: 50, 2: 50, 3: 50}),
        RULES,
        64,
    )
    mine = [e.tokens_of(h) for h in (1, 2, 3)]
    assert not (mine[0] & mine[1]) and not (mine[1] & mine[2]) and not (mine[0] & mine[2])
    assert frozenset().union(*mine) == e.all_tokens()
    assert split_token(bucket_token(0, 17)) == (0, 17)


def test_rule_state_takes_a_host_out_of_a_rule() -> None:
    reps = reports({1: 50, 2: 50})
    reps[1] = tuple(RuleReport(50, RuleState.DRAINING, 1) for _ in RULES)
    e = next_epoch(None, EpochKey(1, 1), frozenset({1, 2}), frozenset(), (), (), reps, RULES, 64)
    web = e.maps[0]
    assert web is not None and set(web) == {2}


@pytest.mark.parametrize("blob", [b"", b"junk", zlib.compress(b"\x00" * 10)])
def test_garbage_is_refused(blob: bytes) -> None:
    with pytest.raises(EpochDecodeError):
        decode_epoch(blob, RULES, 64)


def test_decompression_is_bounded() -> None:
    bomb = zlib.compress(b"\x00" * 50_000_000)
    with pytest.raises(EpochDecodeError):
        decode_epoch(bomb, RULES, 64)


def test_map_for_other_bucket_count_is_refused() -> None:
    e = next_epoch(
        None, EpochKey(1, 1), frozenset({1}), frozenset(), (), (), reports({1: 50}), RULES, 64
    )
    with pytest.raises(EpochDecodeError):
        decode_epoch(e.compressed(), RULES, 128)


@settings(max_examples=200)
@given(blob=st.binary(max_size=300))
def test_decoder_never_raises_anything_else(blob: bytes) -> None:
    with contextlib.suppress(EpochDecodeError):
        decode_epoch(zlib.compress(blob), RULES, 64)
