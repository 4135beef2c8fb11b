"""Limits a process enforces on its own while Redis is down: the same windows, in memory.

Each router then allows up to a key's full limit by itself; what it counts is written back to
Redis when Redis returns. Metric: fleet_control_local_admissions_total.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from prometheus_client import Counter

from fleet.control.keys.layout import WINDOW_S
from fleet.control.keys.records import Ticket

LOCAL_ADMISSIONS = Counter(
    "fleet_control_local_admissions", "Admissions decided by local counters during a Redis outage"
)


class LocalWindow:
    """The same 1-second-bucket sliding window as scripts/window.lua, in this process only."""

    __slots__ = ("buckets",)

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}

    def wait_ms(self, now: float, limit: int, need: int) -> int:
        sec = int(now)
        for s in [s for s in self.buckets if s <= sec - WINDOW_S]:
            del self.buckets[s]
        total = sum(self.buckets.values())
        if total + need <= limit:
            return 0
        excess, freed = total + need - limit, 0
        for s in sorted(self.buckets):
            freed += self.buckets[s]
            if freed >= excess:
                return max(1, int((s + WINDOW_S - now) * 1000))
        return WINDOW_S * 1000

    def add(self, sec: int, amount: int) -> None:
        self.buckets[sec] = self.buckets.get(sec, 0) + amount

    def adjust(self, sec: int, delta: int) -> None:
        if sec in self.buckets:
            self.buckets[sec] = max(0, self.buckets[sec] + delta)


@dataclass
class LocalKeyState:
    """One key's local windows and its live local tickets (weakly held: a dropped one frees)."""

    rpm: LocalWindow = field(default_factory=LocalWindow)
    tpm: LocalWindow = field(default_factory=LocalWindow)
    live: weakref.WeakSet[Ticket] = field(default_factory=weakref.WeakSet)
