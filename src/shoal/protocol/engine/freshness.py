"""Proof that a peer is alive now: what this host asks of peers it cannot trust yet, and the
proofs it owes to peers that ask it.

A frame's tag proves who made it, not when: a heartbeat recorded while its sender lived
authenticates just as well after it died. The replay window stops old frames only at a host
that remembers the sender's newest one, and a host whose daemon just started remembers
nothing. So a peer heard in an incarnation this host holds no proof for counts for nothing
(its heartbeats are rejected as ``unproven``) and this host *asks* it, in its heartbeats'
``asks``; the peer answers with a :class:`~shoal.protocol.frames.Proof` naming an asking
heartbeat (this host's incarnation and its sequence number), which only a frame made after
that heartbeat can do; a proof counts only if it names a heartbeat sent since this host
began to ask. A dead host cannot answer, so no recording of it, replayed at any time, to a
host that just started or one that forgot it long ago, makes it live.

The same proof settles a host id used twice: an older incarnation of a peer, or another
incarnation of this host's own id, that proves it is alive now is a second host with that id;
replayed frames of an earlier run prove nothing and are only dropped.
"""

from __future__ import annotations

from shoal.protocol.frames import MAX_PROOFS


class Freshness:
    """What this host asks and owes."""

    def __init__(self) -> None:
        self.asking: dict[int, tuple[float, int]] = {}  # host -> (until, first asking seq)
        self.owed: dict[tuple[int, int], int] = {}  # (host, incarnation) -> its asking seq
        self.answered: dict[tuple[int, int], float] = {}  # when each was last proven
        self._asks: frozenset[int] = frozenset()

    def ask(self, host: int, until: float, next_seq: int) -> bool:
        """Ask ``host`` for a proof until then, from the heartbeat numbered ``next_seq``
        on; True when it was not asked already."""
        was = self.asking.get(host)
        if was is not None:
            self.asking[host] = (max(until, was[0]), was[1])
            return False
        self.asking[host] = (until, next_seq)
        self._asks = frozenset(self.asking)
        return True

    def answers(self, host: int, seq: int) -> bool:
        """Whether a proof from ``host`` naming this host's heartbeat ``seq`` (of this run)
        answers an ask: it was sent since this host began to ask."""
        was = self.asking.get(host)
        return was is not None and seq >= was[1]

    def proven(self, host: int) -> bool:
        """``host`` proved itself: stop asking; True when it was asked."""
        if self.asking.pop(host, None) is None:
            return False
        self._asks = frozenset(self.asking)
        return True

    def asks(self, now: float) -> frozenset[int]:
        """The hosts to ask in the next heartbeat (asks not renewed lapse: a replay that
        stopped, a host that went away)."""
        gone = [h for h, (until, _) in self.asking.items() if until <= now]
        if gone:
            for h in gone:
                del self.asking[h]
            self._asks = frozenset(self.asking)
        return self._asks

    def asked(self, host: int, incarnation: int, seq: int, now: float, spacing: float) -> bool:
        """``host``'s heartbeat ``seq`` (in ``incarnation``) asked this host: owe it a proof,
        unless one went less than ``spacing`` ago (replayed asks cost at most one proof per
        spacing)."""
        pair = (host, incarnation)
        if self.answered.get(pair, -spacing) > now - spacing or pair in self.owed:
            return False
        self.owed[pair] = seq
        return True

    def take(self, now: float) -> list[list[tuple[int, int, int]]]:
        """What is owed, in frames' worth; forgets answers older than a minute."""
        pairs = [(h, inc, seq) for (h, inc), seq in self.owed.items()]
        for pair in self.owed:
            self.answered[pair] = now
        self.owed.clear()
        if len(self.answered) > 4 * MAX_PROOFS:
            self.answered = {k: t for k, t in self.answered.items() if now - t < 60.0}
        return [pairs[i : i + MAX_PROOFS] for i in range(0, len(pairs), MAX_PROOFS)]
