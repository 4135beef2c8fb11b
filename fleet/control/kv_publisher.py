"""A replica's side of the KV-cache events (format: fleet/control/kv_events.py).

The engine's step thread hands over each step's net changes (`changes`) and, when asked, a
snapshot of the whole cache (`snapshot`); both only append to a bounded list under a lock, so
publishing never slows a step. A task on the server's event loop publishes what has gathered
every `flush_s`: one XADD (MAXLEN ~ `maxlen`) per flush for the changes, a HSET for a snapshot.

Nothing here can hurt serving: past `max_pending` keys waiting (Redis slow or down) the changes
are dropped and counted, a Redis error drops the batch it was sending; either way the sequence
number skips one (on the next batch, or on an empty batch written with the snapshot), so every
reader notices the gap, and a fresh snapshot is asked of the engine (at most once a second) to
bridge it. Snapshots are also written when a router asks (`want`),
every `snapshot_s` while the cache changes, and at least every `refresh_s` so the snapshot key,
which expires, outlives no replica by long.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from fleet.control.background import join, sleep_or_stop
from fleet.control.health import RedisHealth
from fleet.control.kv_events import Batch, Snapshot, key_of, keys, merge
from fleet.control.redis_conn import REDIS_DOWN_ERRORS

log = logging.getLogger("fleet.control.kv_publisher")

DEFAULT_MAXLEN = 1000
DEFAULT_MAX_PENDING = 65_536
DEFAULT_FLUSH_S = 0.02
DEFAULT_SNAPSHOT_S = 30.0
DEFAULT_REFRESH_S = 60.0
WANT_CHECK_S = 0.25
RETRY_S = 1.0


@dataclass(frozen=True)
class _Digests:
    """A snapshot as the engine hands it over: whole block hashes."""

    digests: list[bytes]

    def keys(self) -> list[int]:
        return [key_of(d) for d in self.digests]


class KVEventPublisher:
    """`request_snapshot` asks the engine for a snapshot (AsyncEngine.kv_snapshot with this
    publisher as the sink); the engine then calls `snapshot` and `changes` from its thread."""

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str,
        replica_id: str,
        request_snapshot: Callable[[], None],
        *,
        maxlen: int = DEFAULT_MAXLEN,
        max_pending: int = DEFAULT_MAX_PENDING,
        flush_s: float = DEFAULT_FLUSH_S,
        snapshot_s: float = DEFAULT_SNAPSHOT_S,
        refresh_s: float = DEFAULT_REFRESH_S,
    ) -> None:
        self.client = client
        self.keys = keys(prefix, replica_id)
        self.request_snapshot = request_snapshot
        self.maxlen = maxlen
        self.max_pending = max_pending
        self.flush_s = flush_s
        self.snapshot_s = snapshot_s
        self.refresh_s = refresh_s
        self.ttl_s = max(1, int(3 * refresh_s))
        self.epoch = secrets.token_hex(8).encode()
        self.seq = 0
        self.published = 0  # batches
        self.dropped = 0  # keys of changes dropped (backlog) or lost (Redis errors)
        self.snapshots = 0
        self._lock = threading.Lock()
        self._pending: list[dict[int, bool] | _Digests] = []
        self._pending_keys = 0
        self._overflowed = False  # changes are dropped until the next snapshot
        self._gap = False  # the next batch's seq must skip one
        self._need_snapshot = False  # something was lost: ask until a snapshot is written
        self._asked_at = -RETRY_S  # monotonic time of the last snapshot asked of the engine
        self._changed_since_snapshot = False
        self._last_snapshot = 0.0
        self._health = RedisHealth("kv-events")
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- the engine's step thread

    def changes(self, events: dict[int, bool]) -> None:
        with self._lock:
            if self._overflowed:
                self.dropped += len(events)
                return
            if self._pending_keys + len(events) > self.max_pending:
                self.dropped += self._pending_keys + len(events)
                self._pending = []  # a snapshot among them would miss what follows it
                self._pending_keys = 0
                self._overflowed = self._gap = self._need_snapshot = True
                return
            self._pending.append(events)
            self._pending_keys += len(events)

    def snapshot(self, digests: list[bytes]) -> None:
        with self._lock:
            self._pending.append(_Digests(digests))
            self._overflowed = False

    # -- the event loop

    def start(self) -> None:
        """Ask the engine for the first snapshot and start publishing."""
        self._ask()
        self._task = asyncio.create_task(self._run(), name="kv-events")

    async def stop(self) -> None:
        self._stopping.set()
        await join(self._task)
        self._task = None

    def _ask(self) -> None:
        now = time.monotonic()
        if now - self._asked_at >= RETRY_S:
            self._asked_at = now
            self.request_snapshot()

    async def _run(self) -> None:
        next_want = 0.0
        while not await sleep_or_stop(self._stopping, self.flush_s):
            now = time.monotonic()
            if self._need_snapshot:
                self._ask()
            due = now - self._last_snapshot
            if (self._changed_since_snapshot and due >= self.snapshot_s) or due >= self.refresh_s:
                self._last_snapshot = now  # asked: not again before it came
                self._ask()
            try:
                await self.flush()
                if now >= next_want:
                    next_want = now + WANT_CHECK_S
                    if await self.client.delete(self.keys.want):
                        self._ask()
            except REDIS_DOWN_ERRORS as exc:
                self._health.failed(exc)
                await sleep_or_stop(self._stopping, RETRY_S)
            else:
                self._health.succeeded()

    async def flush(self) -> None:
        """Publish what has gathered: runs of changes as one batch each, snapshots in order. A
        Redis error loses what was taken (counted), leaves a seq gap and asks for a snapshot."""
        with self._lock:
            pending, self._pending, self._pending_keys = self._pending, [], 0
        run: list[dict[int, bool]] = []
        done = 0  # items of `pending` published
        try:
            for i, item in enumerate(pending):
                if isinstance(item, _Digests):
                    if run:
                        await self._publish(run)
                        run = []
                    await self._write_snapshot(item)
                    done = i + 1
                else:
                    run.append(item)
            if run:
                await self._publish(run)
        except REDIS_DOWN_ERRORS:
            with self._lock:
                self.dropped += sum(len(p) for p in pending[done:] if isinstance(p, dict))
                self._gap = self._need_snapshot = True
            raise

    async def _publish(self, run: list[dict[int, bool]]) -> None:
        stored, removed = merge(run)
        if not stored and not removed:
            return
        self.seq += 2 if self._gap else 1  # a skipped seq: readers must resynchronise
        self._gap = False
        batch = Batch(self.epoch, self.seq, stored, removed)
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(self.keys.stream, batch.encode(), maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
        pipe.expire(self.keys.stream, self.ttl_s)
        await pipe.execute()
        self.published += 1
        self._changed_since_snapshot = True

    async def _write_snapshot(self, snapshot: _Digests) -> None:
        # It holds everything published so far. After something was lost, it comes with an empty
        # batch whose seq skips one, so readers notice the loss even if nothing else changes.
        gap = self._gap
        if gap:
            self.seq += 2
            self._gap = False
        cached = await asyncio.to_thread(snapshot.keys)  # ~0.2 s a million: not on the loop
        full = Snapshot(self.epoch, self.seq, cached)
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(self.keys.snapshot)
        pipe.hset(self.keys.snapshot, mapping=full.encode())  # type: ignore[arg-type]
        pipe.expire(self.keys.snapshot, self.ttl_s)
        if gap:
            marker = Batch(self.epoch, self.seq, [], []).encode()
            pipe.xadd(self.keys.stream, marker, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
            pipe.expire(self.keys.stream, self.ttl_s)
        await pipe.execute()
        self.snapshots += 1
        self._need_snapshot = self._changed_since_snapshot = False
        self._last_snapshot = time.monotonic()

    def stats(self) -> dict[str, int]:
        return {
            "seq": self.seq,
            "published": self.published,
            "snapshots": self.snapshots,
            "dropped": self.dropped,
        }
