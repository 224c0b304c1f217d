"""From a check's results to a verdict: healthy or failing, with rise, fall and flap damping.

Pure: results come in with ``now``; :meth:`Verdict.observe` says when the verdict changes.
A check starts healthy (as HAProxy's servers and keepalived's real servers do without a
slow start): ``fall`` failures in a row make it failing, ``rise`` successes in a row make it
healthy again. Going out is never delayed. Coming back is damped: at most ``flap_limit``
returns in any ``flap_window`` seconds; a return beyond that waits until the oldest of them
is a window old. Each return follows a going-out, so a check makes at most
``2 × flap_limit + 1`` verdict changes, and so convergences, in any window, however it flaps.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass
class Verdict:
    rise: int
    fall: int
    flap_limit: int
    flap_window: float  # seconds
    healthy: bool = True
    streak: int = 0  # results in a row that disagree with the verdict
    successes: int = 0
    failures: int = 0
    held: bool = False  # a return is due but damped

    def __post_init__(self) -> None:
        self._returns: deque[float] = deque()

    def observe(self, ok: bool, now: float) -> bool | None:
        """Count one result; the new verdict if it changed (True: healthy again)."""
        if ok:
            self.successes += 1
        else:
            self.failures += 1
        if ok == self.healthy:
            self.streak = 0
            self.held = False
            return None
        self.streak += 1
        if self.healthy:
            if self.streak < self.fall:
                return None
            self.healthy, self.streak = False, 0
            return False
        if self.streak < self.rise:
            return None
        while self._returns and now - self._returns[0] >= self.flap_window:
            self._returns.popleft()
        if len(self._returns) >= self.flap_limit:
            self.held = True  # stays out; the next success tries again
            return None
        self._returns.append(now)
        self.healthy, self.streak, self.held = True, 0, False
        return True

    def held_until(self) -> float | None:
        """When a damped return may happen (None: nothing is held)."""
        if not self.held or not self._returns:
            return None
        return self._returns[0] + self.flap_window
