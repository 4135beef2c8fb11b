"""Timeouts for requests in flight, without a timer per request or per chunk.

Each exchange carries a `deadline` (0 when none) that the data path moves with one attribute
store per upstream event. One task scans the exchanges a few times a second and tells any that is
past its deadline (`timed_out`); the exchange knows which timeout that was (time to first byte, or
idle between stream chunks) and what to do about it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

log = logging.getLogger("router.backends.watchdog")


class Timed(Protocol):
    deadline: float

    def timed_out(self) -> None: ...


class Watchdog:
    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.watched: set[Timed] = set()
        self._task: asyncio.Task[None] | None = None

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
            for item in [w for w in self.watched if w.deadline and now > w.deadline]:
                try:
                    item.timed_out()
                except Exception:  # one request's bug must not stop every timeout
                    log.exception("timing out %r failed", item)
