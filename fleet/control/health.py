"""Whether a component can reach Redis right now: each outage is logged once and counted once.

Metrics (prometheus default registry):
  fleet_control_redis_up{component}             1 while Redis answers, 0 during an outage
  fleet_control_redis_outages_total{component}  outages begun (up -> down transitions)
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge

log = logging.getLogger("fleet.control")

REDIS_UP = Gauge(
    "fleet_control_redis_up",
    "1 while the control plane reaches Redis, 0 during an outage",
    ["component"],
)
REDIS_OUTAGES = Counter(
    "fleet_control_redis_outages", "Redis outages seen by the control plane", ["component"]
)


class RedisHealth:
    """Up/down state of one component's Redis link; transitions log and count, repeats are silent."""

    def __init__(self, component: str) -> None:
        self.component = component
        self.up = True
        self._gauge = REDIS_UP.labels(component)
        self._outages = REDIS_OUTAGES.labels(component)
        self._gauge.set(1)

    def failed(self, exc: BaseException) -> bool:
        """Record a failed call; True when this begins an outage."""
        if not self.up:
            return False
        self.up = False
        self._gauge.set(0)
        self._outages.inc()
        log.warning(
            "%s: Redis unavailable (%s: %s); degrading until it returns",
            self.component,
            type(exc).__name__,
            exc,
        )
        return True

    def succeeded(self) -> bool:
        """Record a good call; True when this ends an outage."""
        if self.up:
            return False
        self.up = True
        self._gauge.set(1)
        log.warning("%s: Redis reachable again", self.component)
        return True
