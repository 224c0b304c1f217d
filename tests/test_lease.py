"""The incremental lease count agrees with a count from scratch after every echo."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.protocol.lease import NEVER, LeaseCount, Tally

HOSTS = range(1, 8)


def recount(bases: tuple[frozenset[int], ...], me: int, acks: dict[int, float]) -> float:
    """The newest send time a quorum of every base echoed, from scratch."""
    best = NEVER
    for s in set(acks.values()):
        tallies = [Tally(b) for b in bases]
        for h in [me, *(h for h, at in acks.items() if at >= s)]:
            for t in tallies:
                t.add(h)
        if all(t.quorate() for t in tallies):
            best = max(best, s)
    return best


@settings(max_examples=300)
@given(
    bases=st.lists(st.frozensets(st.sampled_from(HOSTS), min_size=1), min_size=1, max_size=3),
    me=st.sampled_from(HOSTS),
    first=st.dictionaries(st.sampled_from(HOSTS), st.integers(0, 1)),
    steps=st.lists(st.tuples(st.sampled_from(HOSTS), st.integers(0, 3)), max_size=40),
)
def test_echoes_move_the_basis_as_a_recount_would(
    bases: list[frozenset[int]],
    me: int,
    first: dict[int, int],
    steps: list[tuple[int, int]],
) -> None:
    members = bases[0] | {me}
    bs = (members, *bases[1:])
    sends = [1.0, 2.0, 3.0, 4.0]
    acks = {h: sends[i] for h, i in first.items() if h != me and h in members}
    count = LeaseCount(bs, me, acks, sends[:2], members)
    count.sent(sends[2], NEVER)
    count.sent(sends[3], NEVER)
    assert count.basis == recount(bs, me, acks)
    for h, i in steps:
        if h == me or h not in members:
            continue
        before = acks.get(h, NEVER)
        after = sends[i]
        if after <= before:
            continue
        acks[h] = after
        moved = count.echoed(h, before, after)
        want = recount(bs, me, acks)
        assert count.basis == want
        assert moved is None or moved == want


def test_a_beat_older_than_the_window_no_longer_counts() -> None:
    count = LeaseCount((frozenset({1, 2, 3}),), 1, {}, [], frozenset({1, 2, 3}))
    count.sent(1.0, NEVER)
    count.sent(2.0, 1.5)  # the beat sent at 1.0 is past the window now
    assert count.echoed(2, NEVER, 1.0) is None
    assert count.echoed(2, 1.0, 2.0) == 2.0
