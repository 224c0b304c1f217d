"""The map: exactly balanced, minimal under change, deterministic."""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shoal.bucket_map import (
    NO_OWNER,
    counts,
    ideal_bounds,
    minimum_moves,
    moved,
    rebalance,
)

bucket_counts = st.sampled_from([16, 60, 64, 100, 257, 1024, 4096])
weight = st.integers(min_value=0, max_value=100)


@st.composite
def memberships(draw: st.DrawFn, min_size: int = 1) -> dict[int, int]:
    ids = draw(st.sets(st.integers(1, 256), min_size=min_size, max_size=40))
    return {h: draw(weight) for h in sorted(ids)}


def assert_balanced(owners: list[int], weights: dict[int, int], b: int) -> None:
    held = counts(owners)
    bounds = ideal_bounds(weights, b)
    for h, (lo, hi) in bounds.items():
        assert lo <= held.get(h, 0) <= hi, (h, held.get(h, 0), lo, hi)
    assert set(held) <= {h for h, w in weights.items() if w > 0}
    if any(w > 0 for w in weights.values()):
        assert NO_OWNER not in owners
    else:
        assert set(owners) == {NO_OWNER}


@settings(max_examples=300, deadline=None)
@given(weights=memberships(), b=bucket_counts)
def test_fresh_map_is_balanced(weights: dict[int, int], b: int) -> None:
    assert_balanced(rebalance(None, weights, b), weights, b)


@settings(max_examples=300, deadline=None)
@given(weights=memberships(min_size=2), b=bucket_counts, data=st.data())
def test_leave_moves_only_the_leavers_buckets(
    weights: dict[int, int], b: int, data: st.DataObject
) -> None:
    before = rebalance(None, weights, b)
    leaver = data.draw(st.sampled_from(sorted(weights)))
    after_w = {h: w for h, w in weights.items() if h != leaver}
    after = rebalance(before, after_w, b)
    assert_balanced(after, after_w, b)
    need = minimum_moves(before, after_w, b)
    assert moved(before, after) == need
    freed = sum(1 for o in before if o in (leaver, NO_OWNER))
    if need <= freed:  # the leaver's buckets cover every floor that rose
        for o, n in zip(before, after, strict=True):
            if o != n:
                assert o == leaver or o == NO_OWNER  # nobody else gives anything away


@settings(max_examples=300, deadline=None)
@given(weights=memberships(), b=bucket_counts, joiner=st.integers(1, 256), w=weight)
def test_join_moves_only_to_the_joiner(
    weights: dict[int, int], b: int, joiner: int, w: int
) -> None:
    assume(joiner not in weights)
    before = rebalance(None, weights, b)
    after_w = {**weights, joiner: w}
    after = rebalance(before, after_w, b)
    assert_balanced(after, after_w, b)
    assert moved(before, after) == minimum_moves(before, after_w, b)
    if any(weights.values()) and counts(after).get(joiner, 0) < ideal_bounds(after_w, b)[joiner][1]:
        for o, n in zip(before, after, strict=True):  # the joiner takes all balance allows
            if o != n:
                assert n == joiner


@settings(max_examples=300, deadline=None)
@given(weights=memberships(min_size=2), b=bucket_counts, data=st.data())
def test_weight_change_moves_only_to_or_from_that_host(
    weights: dict[int, int], b: int, data: st.DataObject
) -> None:
    before = rebalance(None, weights, b)
    host = data.draw(st.sampled_from(sorted(weights)))
    after_w = {**weights, host: data.draw(weight)}
    after = rebalance(before, after_w, b)
    assert_balanced(after, after_w, b)
    assert moved(before, after) == minimum_moves(before, after_w, b)
    others_share = sum(w for h, w in weights.items() if h != host)
    lo, hi = ideal_bounds(after_w, b)[host]
    share_before, share_after = counts(before).get(host, 0), counts(after).get(host, 0)
    at_limit = share_after == (hi if share_after > share_before else lo)
    if others_share and weights[host] and after_w[host] and not at_limit:
        for o, n in zip(before, after, strict=True):  # the host gives or takes all it can
            if o != n:
                assert host in (o, n)


@settings(max_examples=150, deadline=None)
@given(weights=memberships(min_size=2), b=bucket_counts, data=st.data())
def test_sequences_of_changes_stay_balanced_and_minimal(
    weights: dict[int, int], b: int, data: st.DataObject
) -> None:
    owners = rebalance(None, weights, b)
    current = dict(weights)
    for _ in range(data.draw(st.integers(1, 8))):
        kind = data.draw(st.sampled_from(["join", "leave", "weight"]))
        if kind == "leave" and len(current) > 1:
            current.pop(data.draw(st.sampled_from(sorted(current))))
        elif kind == "join":
            h = data.draw(st.integers(1, 256))
            current[h] = data.draw(weight)
        else:
            current[data.draw(st.sampled_from(sorted(current)))] = data.draw(weight)
        nxt = rebalance(owners, current, b)
        assert_balanced(nxt, current, b)
        assert moved(owners, nxt) == minimum_moves(owners, current, b)
        owners = nxt


@settings(max_examples=100, deadline=None)
@given(weights=memberships(), b=bucket_counts)
def test_deterministic_whatever_the_weight_order(weights: dict[int, int], b: int) -> None:
    reordered = dict(reversed(list(weights.items())))
    first = rebalance(None, weights, b)
    assert rebalance(None, reordered, b) == first
    assert rebalance(list(first), reordered, b) == first  # stable: no change, no move


def test_no_change_moves_nothing() -> None:
    w = {1: 50, 2: 50, 3: 100}
    m = rebalance(None, w, 4096)
    assert moved(m, rebalance(m, w, 4096)) == 0


def test_all_weights_zero_leaves_buckets_unowned() -> None:
    assert set(rebalance(None, {1: 0, 2: 0}, 64)) == {NO_OWNER}


def test_wrong_length_previous_is_refused() -> None:
    try:
        rebalance([1] * 10, {1: 50}, 16)
    except ValueError as e:
        assert "10 buckets, expected 16" in str(e)
    else:
        raise AssertionError("accepted a previous map of the wrong size")
