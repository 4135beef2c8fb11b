"""A worker's side of the shared folder, on its event loop: its metrics written every FLUSH_S,
and drains of `--replica` URLs recorded by any worker applied here within FLUSH_S."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from router.backends.pool import ReplicaPool
from router.workers.metrics import FLUSH_S, WorkerMetrics

log = logging.getLogger("router.workers")


class WorkerSync:
    def __init__(self, metrics: WorkerMetrics, pool: ReplicaPool) -> None:
        self.metrics = metrics
        self.folder = metrics.folder
        self.pool = pool
        self._drains_version = 0
        self._task: asyncio.Task[None] | None = None
        pool.share_drain = self.folder.set_drained

    def start(self) -> None:
        """Before serving: a restarted worker honours the drains made before it started."""
        self.apply_drains()
        self.metrics.flush()
        self._task = asyncio.create_task(self._run(), name="worker-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.metrics.flush()  # the last counts, for the parent to fold in once this exits

    def apply_drains(self) -> None:
        version = self.folder.drains_version()
        if version != self._drains_version:
            self._drains_version = version
            self.pool.apply_router_drains(self.folder.drains())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            try:
                self.apply_drains()
                self.metrics.flush()
            except OSError:
                log.exception("could not reach the workers' shared folder")
