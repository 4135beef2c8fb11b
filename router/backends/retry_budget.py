"""Retries may add at most a fraction of the traffic (plus a small floor), so that a fleet-wide
failure does not turn every request into `max_attempts` requests and melt what is left."""

from __future__ import annotations

import time


class RetryBudget:
    def __init__(self, ratio: float = 0.2, min_per_s: float = 5.0, burst: float = 50.0) -> None:
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.burst = burst
        self.tokens = burst
        self.deposits = 0  # requests made since the last withdrawal, credited then
        self._last = time.monotonic()

    def deposit(self) -> None:
        """One request was made: it earns `ratio` of a retry."""
        self.deposits += 1

    def withdraw(self) -> bool:
        now = time.monotonic()
        earned = self.deposits * self.ratio + (now - self._last) * self.min_per_s
        self.tokens = min(self.tokens + earned, self.burst)
        self.deposits = 0
        self._last = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True
