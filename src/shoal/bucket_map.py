"""The map: which host owns each bucket of a ``multiple`` port rule.

Two properties are required at once, and a map that is a pure function of the membership
cannot have both:

* **balanced** — every host owns ⌊B·w/Σw⌋ or ⌈B·w/Σw⌉ buckets;
* **minimal** — a join, a leave or a weight change moves only the buckets that must move,
  only to or from the hosts whose share changed.

So the map is a function of the *previous agreed map* and the new weights
(:func:`rebalance`). Given the same previous map and the same weights every host computes the
same new map, bucket for bucket: rounding ties and the choice of buckets to release are
decided by host id and bucket number only.

How hosts agree on it (the convergence engine does this): the map is part of the cluster's
agreed state, numbered by an epoch. The default host (lowest live host id) computes the next
map from the current one when membership or weights change, and announces it with a new
epoch in its heartbeats; every host installs the newest epoch it has seen from the default
host, and a joiner learns the current map from the same announcements. Because the next map
only depends on the previous one and on the weights, a new default host (after the old one
failed) computes exactly what the old one would have.

Rounding is chosen to move as little as possible: the R buckets left over after everyone's
floor go first to hosts that already hold more than their floor (so they keep them), then to
hosts that gain anyway, then to the others; within each group by largest remainder, then by
host id. The number of buckets moved is then the least any balanced map can achieve:
``max(Σ max(0, old−⌈ideal⌉), Σ max(0, ⌊ideal⌋−old))`` (see :func:`minimum_moves`), and the
host whose share changed gives or takes all that balance allows before any other host's count
moves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

NO_OWNER = 0


def ideal_bounds(weights: Mapping[int, int], buckets: int) -> dict[int, tuple[int, int]]:
    """(⌊B·w/Σw⌋, ⌈B·w/Σw⌉) for every host; all zero when no host has weight."""
    total = sum(w for w in weights.values() if w > 0)
    out: dict[int, tuple[int, int]] = {}
    for host, w in weights.items():
        if total == 0 or w <= 0:
            out[host] = (0, 0)
            continue
        lo, rem = divmod(buckets * w, total)
        out[host] = (lo, lo + (1 if rem else 0))
    return out


def counts(owners: Sequence[int]) -> dict[int, int]:
    """Buckets per owner (NO_OWNER excluded)."""
    out: dict[int, int] = {}
    for o in owners:
        if o != NO_OWNER:
            out[o] = out.get(o, 0) + 1
    return out


def _claim(held: int, floor: int, has_previous: bool) -> int:
    """Rank of a host's claim on one of the units left after the floors (lower goes first).

    A unit given to a host above its floor saves a release, so those go first, and among them
    the hosts it leaves unchanged (held = ceil) before those that shrink anyway. A unit given to
    any other host costs one move, so hosts that gain anyway (below their floor) go before hosts
    it would change. With no previous map every host changes and only the remainder counts.
    """
    if not has_previous:
        return 0
    if held == floor + 1:
        return 0
    if held > floor:
        return 1
    return 2 if held < floor else 3


def quotas(
    weights: Mapping[int, int], buckets: int, previous: Mapping[int, int] | None = None
) -> dict[int, int]:
    """How many buckets each host gets: floor or ceil of its ideal share, summing to B."""
    previous = previous or {}
    total = sum(w for w in weights.values() if w > 0)
    result = {h: 0 for h in weights}
    if total == 0:
        return result
    remainders: list[tuple[int, int, int]] = []
    for host, w in weights.items():
        if w <= 0:
            continue
        lo, rem = divmod(buckets * w, total)
        result[host] = lo
        if rem:
            remainders.append((_claim(previous.get(host, 0), lo, bool(previous)), -rem, host))
    left = buckets - sum(result.values())
    remainders.sort()
    for _, _, host in remainders[:left]:
        result[host] += 1
    return result


def rebalance(
    previous: Sequence[int] | None, weights: Mapping[int, int], buckets: int
) -> list[int]:
    """The next map from the previous one (or from nothing) and the hosts' weights.

    ``previous[b]`` is the owner of bucket ``b`` (``NO_OWNER`` for none); ``weights`` maps each
    live host id to its weight 0..100. Hosts not in ``weights`` own nothing afterwards.
    """
    owners = list(previous) if previous is not None else [NO_OWNER] * buckets
    if len(owners) != buckets:
        raise ValueError(f"previous map has {len(owners)} buckets, expected {buckets}")
    held: dict[int, list[int]] = {}
    pool: list[int] = []
    for b, o in enumerate(owners):
        if o == NO_OWNER:
            pool.append(b)
        else:
            held.setdefault(o, []).append(b)
    target = quotas(weights, buckets, {h: len(bs) for h, bs in held.items()})
    for host, bs in held.items():
        keep = target.get(host, 0)
        if len(bs) > keep:
            pool.extend(bs[keep:])  # release the highest-numbered buckets
            for b in bs[keep:]:
                owners[b] = NO_OWNER
    pool.sort()
    i = 0
    for host in sorted(target):
        need = target[host] - len(held.get(host, ()))
        for b in pool[i : i + max(0, need)]:
            owners[b] = host
        i += max(0, need)
    return owners


def moved(before: Sequence[int], after: Sequence[int]) -> int:
    """Buckets whose owner changed."""
    return sum(1 for a, b in zip(before, after, strict=True) if a != b)


def minimum_moves(previous: Sequence[int], weights: Mapping[int, int], buckets: int) -> int:
    """The fewest buckets any balanced map must move from ``previous`` (a lower bound).

    Each host must end between its floor and ceil; what it holds above its ceil must leave
    and what it lacks below its floor must arrive, and each moved bucket serves one of each
    at most, so the bound is the larger of the two sums; it is also reachable.
    """
    held = counts(previous)
    bounds = ideal_bounds(weights, buckets)
    anyone = any(w > 0 for w in weights.values())
    unowned = sum(1 for o in previous if o == NO_OWNER) if anyone else 0
    surplus = unowned + sum(max(0, n - bounds.get(h, (0, 0))[1]) for h, n in held.items())
    deficit = sum(max(0, lo - held.get(h, 0)) for h, (lo, _) in bounds.items())
    return max(surplus, deficit)
