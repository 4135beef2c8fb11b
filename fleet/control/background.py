"""Stopping background loops without cancelling them mid-Redis-call.

redis-py's pub/sub read can swallow a cancellation that lands as its read timeout fires, and
Python 3.11 then ignores later cancels of that task, so a cancelled watcher could hang forever.
Our loops therefore wait on a stop event between steps and leave by themselves; cancel is only
the last resort.
"""

from __future__ import annotations

import asyncio
import contextlib


async def sleep_or_stop(stopping: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`; True as soon as `stopping` is set."""
    if stopping.is_set():
        return True
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)
    return stopping.is_set()


async def join(task: asyncio.Task[None] | None, timeout: float = 2.0) -> None:
    """Wait for a loop that was asked to stop; cancel it if it does not within `timeout`."""
    if task is None or task.done():
        return
    await asyncio.wait({task}, timeout=timeout)
    if not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
