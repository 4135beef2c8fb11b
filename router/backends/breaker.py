"""Passive ejection: a per-replica circuit breaker fed by the outcomes of real requests.

Closed until `threshold` consecutive failures, then open (ejected) for `base_s * 2**k` seconds,
k growing with each ejection in a row; after that, half-open: exactly one trial request goes
through, and its outcome closes the breaker or ejects the replica again for twice as long.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass
class CircuitBreaker:
    threshold: int = 3
    base_s: float = 1.0
    max_s: float = 60.0
    state: str = CLOSED
    failures: int = 0
    ejections: int = 0
    open_until: float = 0.0
    trial_in_flight: bool = False

    def admits(self, now: float) -> bool:
        """May a request be sent now? (Pure check: choosing the replica is what starts a trial.)"""
        if self.state == CLOSED:
            return True
        if self.trial_in_flight:
            return False
        return self.state == HALF_OPEN or now >= self.open_until

    def dispatched(self) -> None:
        if self.state != CLOSED:
            self.state = HALF_OPEN
            self.trial_in_flight = True

    def succeeded(self) -> None:
        self.state = CLOSED
        self.failures = 0
        self.ejections = 0
        self.trial_in_flight = False

    def failed(self, now: float | None = None) -> bool:
        """Count one failure; True when this ejects the replica."""
        now = time.monotonic() if now is None else now
        self.trial_in_flight = False
        self.failures += 1
        if self.state == CLOSED and self.failures < self.threshold:
            return False
        self.state = OPEN
        self.open_until = now + min(self.base_s * 2**self.ejections, self.max_s)
        self.ejections += 1
        return True

    def released(self) -> None:
        """A trial that ended with neither verdict (the client left first): let another try."""
        self.trial_in_flight = False
