"""Create, list, revoke and rotate keys and read their usage: what `fleet keys` and the router's
admin API do. Every change is a compare-and-set that also publishes an invalidation event."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import cast

import redis.asyncio as aioredis

from fleet.control.errors import APIError
from fleet.control.keys.credentials import hash_secret, new_key_id, new_secret
from fleet.control.keys.layout import WINDOW_S, KeyLayout
from fleet.control.keys.records import KeyRecord, KeyUsage
from fleet.control.keys.scripts import REPLACE_SOURCE
from fleet.control.redis_conn import DEFAULT_PREFIX


class KeyNotFound(APIError):
    def __init__(self, key_id: str) -> None:
        super().__init__(404, f"No API key with id '{key_id}'.", param="id", code="key_not_found")


class KeyAdmin:
    """Create, list, revoke, rotate keys and read usage; used by `fleet keys` and the admin API.

    These talk to Redis directly (no cache) and raise redis errors when it is unreachable.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str = DEFAULT_PREFIX,
        on_change: Callable[[KeyRecord | None, KeyRecord], None] | None = None,
    ) -> None:
        self.client = client
        self.layout = KeyLayout(prefix)
        self._replace = client.register_script(REPLACE_SOURCE)
        self._on_change = on_change

    async def create(
        self,
        name: str,
        *,
        models: Iterable[str] = (),
        rpm: int | None = None,
        tpm: int | None = None,
        max_concurrent: int | None = None,
        expires_in: float | None = None,
    ) -> tuple[KeyRecord, str]:
        """A new key; returns its record and the secret (shown once, stored only as a digest)."""
        for label, value in (("rpm", rpm), ("tpm", tpm), ("max_concurrent", max_concurrent)):
            if value is not None and value <= 0:
                raise ValueError(f"{label} must be a positive integer")
        secret = new_secret()
        now = time.time()
        record = KeyRecord(
            id=new_key_id(),
            name=name,
            secret_hash=hash_secret(secret),
            models=tuple(m for m in models if m),
            rpm=rpm,
            tpm=tpm,
            max_concurrent=max_concurrent,
            created_at=now,
            expires_at=now + expires_in if expires_in else None,
        )
        return await self._write(None, record), secret

    async def get(self, key_id: str) -> KeyRecord:
        raw = await self.client.get(self.layout.record(key_id))
        if raw is None:
            raise KeyNotFound(key_id)
        return KeyRecord.from_json(raw)

    async def list(self) -> list[KeyRecord]:
        members = cast("set[bytes]", await self.client.smembers(self.layout.index))  # bytes client
        ids = sorted(i.decode() for i in members)
        if not ids:
            return []
        raws = await self.client.mget([self.layout.record(i) for i in ids])
        records = [KeyRecord.from_json(r) for r in raws if r is not None]
        return sorted(records, key=lambda r: r.created_at)

    async def revoke(self, key_id: str) -> KeyRecord:
        """Permanently disable the key; every cache drops it within a second."""
        old = await self.get(key_id)
        return await self._write(old, dataclasses.replace(old, revoked=True))

    async def rotate(self, key_id: str) -> tuple[KeyRecord, str]:
        """A new secret for the same id and limits; the old secret stops working at once."""
        old = await self.get(key_id)
        if old.revoked:
            raise APIError(409, f"API key '{key_id}' is revoked.", code="key_revoked")
        secret = new_secret()
        new = dataclasses.replace(old, secret_hash=hash_secret(secret), rotated_at=time.time())
        return await self._write(old, new), secret

    async def usage(self, key_id: str) -> KeyUsage:
        await self.get(key_id)
        names = self.layout.limits(key_id)
        sec, usec = await self.client.time()
        now_ms = sec * 1000 + usec // 1000
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(names.usage)
        pipe.hgetall(names.rpm)
        pipe.hgetall(names.tpm)
        pipe.zcount(names.slots, now_ms, "+inf")
        totals, rpm_buckets, tpm_buckets, concurrent = await pipe.execute()

        def window(buckets: dict[bytes, bytes]) -> int:
            return sum(int(v) for s, v in buckets.items() if int(s) > sec - WINDOW_S)

        last = totals.get(b"last_used_at")
        return KeyUsage(
            key_id=key_id,
            requests=int(totals.get(b"requests", 0)),
            prompt_tokens=int(totals.get(b"prompt_tokens", 0)),
            completion_tokens=int(totals.get(b"completion_tokens", 0)),
            last_used_at=float(last) if last else None,
            window_requests=window(rpm_buckets),
            window_tokens=window(tpm_buckets),
            concurrent=int(concurrent),
        )

    async def _write(self, old: KeyRecord | None, new: KeyRecord) -> KeyRecord:
        """Compare-and-set `old` -> `new` (version bumped), publish the change, return `new`."""
        new = dataclasses.replace(new, version=old.version + 1 if old else 1)
        layout = self.layout
        old_hash = old.secret_hash if old else ""
        keys = [
            layout.record(new.id),
            layout.keyhash(old_hash) if old else "",
            "" if new.revoked else layout.keyhash(new.secret_hash),
            layout.index,
            layout.channel,
        ]
        expected = old.to_json() if old else b""
        ok = await self._replace(keys=keys, args=[expected, new.to_json(), new.id, old_hash])
        if not ok:
            raise APIError(
                409, f"API key '{new.id}' changed concurrently; try again.", code="conflict"
            )
        if self._on_change is not None:
            self._on_change(old, new)
        return new
