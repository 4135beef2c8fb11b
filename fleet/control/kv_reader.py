"""A router's side of the KV-cache events (format: fleet/control/kv_events.py): one background
task keeps an `ExactIndex` per publishing replica from their streams.

One XREAD (BLOCK `block_ms`) covers every synced replica's stream. A replica the reader is not in
sync with (just tracked, a seq gap, another epoch, Redis trouble) is resynchronised from its
snapshot key, read at most every `resync_s`: load it, then read the stream from its start (the
batches the snapshot holds are skipped; the first one after it must follow on). Where the
snapshot cannot bridge the gap, the reader sets the replica's `want` key, the publisher writes a
fresh snapshot, and the next try succeeds. Until then `index()` answers None and the router uses
its estimate for that replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis

from fleet.control.background import join, sleep_or_stop
from fleet.control.health import RedisHealth
from fleet.control.kv_events import (
    DEFAULT_MAX_BLOCKS,
    Batch,
    ExactIndex,
    Snapshot,
    StreamKeys,
    keys,
)
from fleet.control.redis_conn import REDIS_DOWN_ERRORS

log = logging.getLogger("fleet.control.kv_reader")

Entries = list[tuple[bytes, dict[bytes, bytes]]]  # a stream's entries, as redis-py reads them

DEFAULT_BLOCK_MS = 100
DEFAULT_RESYNC_S = 0.25
READ_COUNT = 1000


@dataclass
class _Tracked:
    keys: StreamKeys
    index: ExactIndex
    cursor: bytes = b"0"  # the last stream id read
    next_resync: float = 0.0


class KVEventReader:
    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str,
        *,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
        block_ms: int = DEFAULT_BLOCK_MS,
        resync_s: float = DEFAULT_RESYNC_S,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.max_blocks = max_blocks
        self.block_ms = block_ms
        self.resync_s = resync_s
        self.batches = 0  # applied
        self.resyncs = 0  # snapshots loaded
        self._tracked: dict[str, _Tracked] = {}
        self._health = RedisHealth("kv-events-reader")
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def track(self, replica_id: str, block_size: int) -> None:
        """Follow this replica's events (again from a snapshot if its block size changed)."""
        current = self._tracked.get(replica_id)
        if current is not None and current.index.block_size == block_size:
            return
        index = ExactIndex(block_size, self.max_blocks)
        self._tracked[replica_id] = _Tracked(keys(self.prefix, replica_id), index)

    def untrack(self, replica_id: str) -> None:
        self._tracked.pop(replica_id, None)

    def index(self, replica_id: str) -> ExactIndex | None:
        """The replica's exact index while it is in sync, else None."""
        tracked = self._tracked.get(replica_id)
        if tracked is None or not tracked.index.synced:
            return None
        return tracked.index

    def tracking(self, replica_id: str) -> bool:
        return replica_id in self._tracked

    def start(self) -> None:
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.create_task(self._run(), name="kv-events-reader")

    async def stop(self) -> None:
        self._stopping.set()
        await join(self._task)
        self._task = None

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.step()
            except REDIS_DOWN_ERRORS as exc:
                self._health.failed(exc)
                for tracked in self._tracked.values():
                    tracked.index.synced = False  # batches may be trimmed meanwhile
                await sleep_or_stop(self._stopping, self.resync_s)
            else:
                self._health.succeeded()

    async def step(self) -> None:
        """Resynchronise who needs it, then one XREAD of every synced stream (or a short wait)."""
        now = time.monotonic()
        for tracked in list(self._tracked.values()):
            if not tracked.index.synced and now >= tracked.next_resync:
                tracked.next_resync = now + self.resync_s
                await self._resync(tracked)
        streams = {t.keys.stream: t.cursor for t in self._tracked.values() if t.index.synced}
        if not streams:
            await sleep_or_stop(self._stopping, min(self.resync_s, self.block_ms / 1000))
            return
        replies = cast(
            "list[tuple[bytes, Entries]] | None",
            await self.client.xread(streams, count=READ_COUNT, block=self.block_ms),  # type: ignore[arg-type]
        )
        by_stream = {t.keys.stream.encode(): t for t in self._tracked.values()}
        for stream, entries in replies or []:
            reading = by_stream.get(stream)
            if reading is not None:
                self._apply(reading, entries)

    async def _resync(self, tracked: _Tracked) -> None:
        fields = cast("dict[bytes, bytes]", await self.client.hgetall(tracked.keys.snapshot))
        if not fields:
            await self._want(tracked)
            return
        try:
            snapshot = Snapshot.decode(fields)
        except (KeyError, ValueError):
            log.warning("unreadable KV snapshot at %s", tracked.keys.snapshot)
            await self._want(tracked)
            return
        tracked.index.load(snapshot)
        if not tracked.index.synced:  # larger than this router mirrors
            return
        self.resyncs += 1
        entries = cast("Entries", await self.client.xrange(tracked.keys.stream, min="-", max="+"))
        tracked.cursor = b"0"
        self._apply(tracked, entries)
        if not tracked.index.synced:
            await self._want(tracked)

    async def _want(self, tracked: _Tracked) -> None:
        await self.client.set(tracked.keys.want, b"1", ex=10)

    def _apply(self, tracked: _Tracked, entries: Entries) -> None:
        index = tracked.index
        for entry_id, fields in entries:
            tracked.cursor = entry_id
            try:
                batch = Batch.decode(fields)
            except (KeyError, ValueError):
                log.warning("unreadable KV event at %s %r", tracked.keys.stream, entry_id)
                index.synced = False
                return
            if not index.apply(batch):
                return
            self.batches += 1

    def stats(self) -> dict[str, int]:
        synced = sum(1 for t in self._tracked.values() if t.index.synced)
        return {
            "tracked": len(self._tracked),
            "synced": synced,
            "batches": self.batches,
            "resyncs": self.resyncs,
            "blocks": sum(len(t.index.blocks) for t in self._tracked.values()),
        }
