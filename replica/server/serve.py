"""Run the app under uvicorn with a graceful drain on SIGTERM.

Uvicorn's own handler stops accepting connections at once and re-raises the signal when it is done
(so the exit status is not 0). Instead, the first SIGTERM or SIGINT drains through the runtime (new
requests get 503 while in-flight ones finish, the replica leaves the fleet), then uvicorn shuts
down; a second signal stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

import uvicorn

from replica.server.runtime import ReplicaRuntime

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: ReplicaRuntime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self._drain: asyncio.Task | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            loop.add_signal_handler(sig, self._on_signal)
        try:
            yield
        finally:
            for sig in _SIGNALS:
                loop.remove_signal_handler(sig)

    def _on_signal(self) -> None:
        if self._drain is not None:
            self.force_exit = True
            self.should_exit = True
            return
        self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.runtime.drain()
        finally:
            self.should_exit = True
