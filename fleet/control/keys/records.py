"""The plain data of API keys: a key's stored record, its usage, and one admitted request's ticket."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from fleet.control.keys.refusals import model_not_allowed


@dataclass(frozen=True)
class KeyRecord:
    """One API key as stored in Redis (never the secret: only its SHA-256 digest)."""

    id: str
    name: str
    secret_hash: str
    models: tuple[str, ...] = ()
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    created_at: float = field(default_factory=time.time)
    expires_at: float | None = None
    revoked: bool = False
    rotated_at: float | None = None
    version: int = 1  # bumped on every change, so a stale read never overwrites a newer record

    def allows_model(self, model: str | None) -> bool:
        """An empty model list means every model."""
        return not self.models or model is None or model in self.models

    def check_model(self, model: str | None) -> None:
        if not self.allows_model(model):
            raise model_not_allowed(self.name, model)

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and (now or time.time()) >= self.expires_at

    def status(self, now: float | None = None) -> str:
        if self.revoked:
            return "revoked"
        return "expired" if self.expired(now) else "active"

    def public(self) -> dict[str, object]:
        """The record without its digest, for listings and the admin API."""
        data = dataclasses.asdict(self)
        del data["secret_hash"]
        data["models"] = list(self.models)
        data["status"] = self.status()
        return data

    def to_json(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: bytes | str) -> KeyRecord:
        raw: dict[str, Any] = orjson.loads(data)  # what to_json wrote
        names = {f.name for f in dataclasses.fields(cls)}
        raw = {k: v for k, v in raw.items() if k in names}
        raw["models"] = tuple(raw.get("models") or ())
        return cls(**raw)


@dataclass
class KeyUsage:
    """Totals since creation plus what the current minute window holds."""

    key_id: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    last_used_at: float | None = None
    window_requests: int = 0
    window_tokens: int = 0
    concurrent: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(eq=False)
class Ticket:
    """One admitted request's hold on its key's limits; settle or release it (idempotent).

    A ticket dropped without either stops being kept alive (weakly tracked), so its concurrency
    slot still expires.
    """

    key_id: str
    id: str
    reserved_tokens: int
    bucket: int
    local: bool = False
    counts_slot: bool = False
    unlimited: bool = False
    done: bool = False
