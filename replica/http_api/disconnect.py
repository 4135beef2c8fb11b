"""Noticing that a client went away, so its engine request stops at once, streaming or not.

Uvicorn silently drops writes to a closed socket, so writing is no signal: we watch the ASGI receive
channel for `http.disconnect` next to the work and cancel the work when it arrives. Cancellation
runs the generator's `finally`, which aborts the engine request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive

T = TypeVar("T")


async def wait_for_disconnect(receive: Receive) -> None:
    """Returns when the client disconnects; call only once the request body has been read."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and raising starlette's ClientDisconnect, as a read of the body
    does when the client leaves) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnect
    return task.result()
