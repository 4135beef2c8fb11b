"""Timeouts and client disconnects for requests in flight, without a timer per chunk.

Each request has a `Flight`: the task serving it and a deadline that the data path moves forward
with one attribute store per upstream read. One `Watchdog` task scans the flights a few times a
second and cancels the task of any flight past its deadline, naming the reason; the client's
connection cancels it when the client disconnects (`client_left`). The handler catches the
cancellation, reads the reason, and decides: retry (time to first byte), SSE error (idle
stream), or stop (client gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

CLIENT_GONE = "client_gone"
TTFB_TIMEOUT = "ttfb_timeout"
IDLE_TIMEOUT = "idle_timeout"


@dataclass(slots=True, eq=False)
class Flight:
    task: asyncio.Task | None
    deadline: float = 0.0
    phase: str = TTFB_TIMEOUT
    reason: str | None = None
    done: bool = False

    def expire(self, reason: str) -> None:
        if self.reason is None and not self.done:
            self.reason = reason
            if self.task is not None:
                self.task.cancel()

    def client_left(self) -> None:
        self.expire(CLIENT_GONE)

    def absorb(self) -> str | None:
        """Take a cancellation that this flight caused: reset it and return its reason."""
        reason, self.reason = self.reason, None
        self.deadline = 0.0
        if reason is not None:
            uncancel = getattr(self.task, "uncancel", None)
            if uncancel is not None:
                uncancel()
        return reason


class Watchdog:
    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.flights: set[Flight] = set()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="router-watchdog")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            for flight in list(self.flights):
                if flight.deadline and now > flight.deadline:
                    flight.expire(flight.phase)
