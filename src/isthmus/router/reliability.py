"""Small state machines that keep the router honest under failure: pure, clock and randomness injected.

- :class:`Ewma`: smoothed RTTs (``s <- alpha * x + (1 - alpha) * s``, GORGO-proxy's alpha = 0.3).
- :class:`HealthTracker`: active health checks, down after ``down_after`` consecutive failed probes,
  up after ``up_after`` consecutive good ones.
- :class:`Ejector`: passive outlier ejection, out for a cool-down after ``eject_after`` consecutive
  backend-caused failures.
- :class:`RetryBudget`: retries earn their keep from client requests, so that upstream attempts stay
  within ``(1 + ratio)`` x client requests whatever fails.
- :func:`backoff_s`: "full jitter" exponential backoff.

None of them reads a clock or a global random generator: times are arguments, the generator is the
caller's.
"""

from __future__ import annotations

import math

import numpy as np


class Ewma:
    """Exponentially weighted moving average; ``value`` is ``nan`` until the first sample.

    The first sample is taken as is; each later one moves the average by ``alpha`` of the gap.
    """

    __slots__ = ("alpha", "value")

    def __init__(self, alpha: float) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.value = math.nan

    def add(self, x: float) -> float:
        """Fold in sample ``x``; return the new average."""
        v = self.value
        self.value = x if v != v else v + self.alpha * (x - v)
        return self.value


class HealthTracker:
    """Up/down state from consecutive probe results (starts up: a new target gets traffic at once).

    Down after ``down_after`` consecutive failures while up; up after ``up_after`` consecutive
    successes while down. A success while up, or a failure while down, resets the opposite run.
    """

    __slots__ = ("_bad", "_good", "down_after", "up", "up_after")

    def __init__(self, down_after: int = 3, up_after: int = 2) -> None:
        if down_after < 1 or up_after < 1:
            raise ValueError("down_after and up_after must be >= 1")
        self.down_after = down_after
        self.up_after = up_after
        self.up = True
        self._bad = 0
        self._good = 0

    def record(self, ok: bool) -> bool:
        """Fold in one probe result; return whether the state changed."""
        if ok:
            self._bad = 0
            if self.up:
                return False
            self._good += 1
            if self._good >= self.up_after:
                self.up, self._good = True, 0
                return True
            return False
        self._good = 0
        if not self.up:
            return False
        self._bad += 1
        if self._bad >= self.down_after:
            self.up, self._bad = False, 0
            return True
        return False


class Ejector:
    """Passive ejection: out for ``cooldown_s`` after ``eject_after`` consecutive backend failures.

    Only backend-caused failures count (connect errors, timeouts, 5xx answers, broken or stalled
    streams); the caller never reports a 4xx answer, which neither counts nor resets. A success
    resets the run. When the cool-down ends the replica is back with a fresh run.
    """

    __slots__ = ("consecutive", "cooldown_s", "eject_after", "ejections", "until")

    def __init__(self, eject_after: int = 5, cooldown_s: float = 30.0) -> None:
        if eject_after < 1 or cooldown_s < 0:
            raise ValueError("eject_after must be >= 1 and cooldown_s >= 0")
        self.eject_after = eject_after
        self.cooldown_s = cooldown_s
        self.consecutive = 0
        self.until = -math.inf
        self.ejections = 0

    def ejected(self, now: float) -> bool:
        """Whether the replica is out at time ``now`` (seconds)."""
        return now < self.until

    def failure(self, now: float) -> bool:
        """Count one backend failure at ``now``; return whether it ejected the replica just now."""
        if self.ejected(now):
            return False
        self.consecutive += 1
        if self.consecutive >= self.eject_after:
            self.consecutive = 0
            self.until = now + self.cooldown_s
            self.ejections += 1
            return True
        return False

    def success(self) -> None:
        """A request it served went through: reset the run of failures."""
        self.consecutive = 0


class RetryBudget:
    """Retry tokens earned by client requests (Finagle's retry budget, without a time floor).

    Every client request deposits ``ratio`` tokens (the balance is capped at ``max_balance``); every
    retry must withdraw one whole token. Starting from 0, after ``n`` client requests at most
    ``floor(ratio * n)`` retries can have happened, so upstream attempts <= ``(1 + ratio) * n``
    even when every attempt fails.
    """

    __slots__ = ("balance", "max_balance", "ratio")

    def __init__(self, ratio: float = 0.2, max_balance: float = 20.0) -> None:
        if ratio < 0 or max_balance < 0:
            raise ValueError("ratio and max_balance must be >= 0")
        self.ratio = ratio
        self.max_balance = max_balance
        self.balance = 0.0

    def deposit(self) -> None:
        """A client request arrived."""
        # a tiny epsilon keeps 5 x 0.2 from summing to 0.9999999
        self.balance = min(self.max_balance, self.balance + self.ratio + 1e-12)

    def withdraw(self) -> bool:
        """Take one token for a retry; ``False`` (and nothing taken) when the balance is short."""
        if self.balance >= 1.0:
            self.balance -= 1.0
            return True
        return False


def backoff_s(retry: int, base_s: float, max_s: float, rng: np.random.Generator) -> float:
    """Seconds to wait before retry number ``retry`` (1 for the first): uniform in
    ``[0, min(max_s, base_s * 2 ** (retry - 1))]`` ("full jitter", AWS Architecture Blog 2015)."""
    cap = min(max_s, base_s * 2.0 ** max(0, retry - 1))
    return float(rng.uniform(0.0, cap)) if cap > 0 else 0.0
