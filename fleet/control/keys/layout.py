"""Where the keys live in Redis: every key name under one prefix, built in one place.

`{p}:keys` SET of ids; `{p}:key:{id}` JSON KeyRecord; `{p}:keyhash:{sha256}` -> id;
`{p}:key:{{id}}:rpm` and `:tpm` HASH (unix second -> count: a 60-second sliding window of
1-second buckets); `{p}:key:{{id}}:slots` ZSET (ticket -> deadline ms);
`{p}:key:{{id}}:usage` HASH (requests, prompt_tokens, completion_tokens, last_used_at);
`{p}:key:{{id}}:voided` ZSET (voided ticket -> ms its marker lapses, after `slot_ttl`);
channel `{p}:keys:events` (JSON {"id", "old_hash"}). `{{id}}` is the id in literal braces, a
cluster hash tag, so one script may touch all of a key's limits.
"""

from __future__ import annotations

from typing import NamedTuple

WINDOW_S = 60  # the span of the rpm and tpm windows (scripts/window.lua counts the same)


class LimitKeys(NamedTuple):
    rpm: str
    tpm: str
    slots: str
    usage: str
    voided: str


class KeyLayout:
    """Redis key names under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.index = f"{prefix}:keys"
        self.channel = f"{prefix}:keys:events"
        self.record_prefix = f"{prefix}:key:"
        self._limit_keys: dict[str, LimitKeys] = {}

    def record(self, key_id: str) -> str:
        return self.record_prefix + key_id

    def keyhash(self, digest: str) -> str:
        return f"{self.prefix}:keyhash:{digest}"

    def limits(self, key_id: str) -> LimitKeys:
        """The key's rpm, tpm, slots and usage names, cached: they are built on every admission."""
        names = self._limit_keys.get(key_id)
        if names is None:
            base = f"{self.prefix}:key:{{{key_id}}}"
            names = LimitKeys(
                f"{base}:rpm", f"{base}:tpm", f"{base}:slots", f"{base}:usage", f"{base}:voided"
            )
            self._limit_keys[key_id] = names
        return names
