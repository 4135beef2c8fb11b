"""KV-cache events: what a replica's prefix cache holds, as routers read it from Redis.

Why: a router that only remembers what it sent each replica guesses which prefixes survive there
(evictions, other routers' traffic and restarts are invisible to it). A replica that publishes
every block hash it stores and evicts lets routers keep an exact copy of its cache's contents.

The scheme (`SCHEME`, in the replica's membership record with its block size): a full block's
hash is sha256(parent hash + the block's token ids as little-endian int64 + the cache salt, if
any), chained from an empty parent (replica/engine/block_manager.py). Only the first 8 bytes are
published, as a big-endian unsigned 64-bit key (`key_of`): 8 bytes a block instead of 32, and at
a million blocks the chance of two keys colliding is about 3e-8. Requests over HTTP carry no salt.

Redis layout, per replica (`keys`):
  `{prefix}:kv:{id}`           a stream (XADD MAXLEN ~ N) of batches: `epoch` (one publisher's
                               life), `seq` (1, 2, ... within the epoch), `stored` and `removed`
                               (packed keys, the net change since the batch before: disjoint)
  `{prefix}:kv:{id}:snapshot`  a hash: `epoch`, `seq` (the last batch it includes), `keys`
                               (every key cached then)
  `{prefix}:kv:{id}:want`      set by a router that lost track; the publisher then writes a
                               fresh snapshot
A reader applies batches in `seq` order; a batch it cannot follow (another epoch, a seq gap: a
trimmed stream, a batch the publisher dropped) makes it stop trusting the index until a snapshot
bridges the gap (`ExactIndex`).
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field
from typing import TypedDict

SCHEME = "sha256-chain/v1"
KEY_BYTES = 8
DEFAULT_MAX_BLOCKS = 262_144  # per replica in a router: 4M tokens at 16 a block, ~16 MiB


class KVEventsInfo(TypedDict):
    """What a replica's membership record says about its events (`ReplicaInfo.kv_events`)."""

    scheme: str  # SCHEME
    block_size: int
    key_bits: int  # 64: the hash's first 8 bytes, big-endian
    salt: str  # "none": requests over HTTP carry no cache salt


def events_info(block_size: int) -> KVEventsInfo:
    return {"scheme": SCHEME, "block_size": block_size, "key_bits": 8 * KEY_BYTES, "salt": "none"}


def readable(info: object) -> int | None:
    """The block size of a record's `kv_events` that this reader understands, else None."""
    if not isinstance(info, dict):
        return None
    size = info.get("block_size")
    if info.get("scheme") != SCHEME or info.get("key_bits") != 8 * KEY_BYTES:
        return None
    if info.get("salt") != "none" or not isinstance(size, int) or size <= 0:
        return None
    return size


@dataclass(frozen=True)
class StreamKeys:
    stream: str
    snapshot: str
    want: str


def keys(prefix: str, replica_id: str) -> StreamKeys:
    base = f"{prefix}:kv:{replica_id}"
    return StreamKeys(base, f"{base}:snapshot", f"{base}:want")


def key_of(digest: bytes) -> int:
    return int.from_bytes(digest[:KEY_BYTES], "big")


def block_keys(token_ids: list[int], block_size: int) -> list[int]:
    """The keys of a prompt's full blocks, computed as the replica does (no salt).

    The same definition as the engine's `block_hash` (which must not import this package: the
    engine stands alone); tests/fleet/control/test_kv_events.py holds the two equal."""
    out: list[int] = []
    parent = b""
    for end in range(block_size, len(token_ids) + 1, block_size):
        digest = hashlib.sha256(parent)
        digest.update(array("q", token_ids[end - block_size : end]).tobytes())
        parent = digest.digest()
        out.append(int.from_bytes(parent[:KEY_BYTES], "big"))
    return out


_LITTLE = array("H", [1]).tobytes() == b"\x01\x00"


def pack(values: list[int]) -> bytes:
    packed = array("Q", values)
    if _LITTLE:
        packed.byteswap()
    return packed.tobytes()


def unpack(data: bytes) -> list[int]:
    if len(data) % KEY_BYTES:
        raise ValueError("packed keys must be a multiple of 8 bytes")
    packed = array("Q")
    packed.frombytes(data)
    if _LITTLE:
        packed.byteswap()
    return packed.tolist()


@dataclass(frozen=True)
class Batch:
    """One stream entry: the net change since the batch before it."""

    epoch: bytes
    seq: int
    stored: list[int]
    removed: list[int]

    def encode(self) -> dict[bytes, bytes]:
        return {
            b"epoch": self.epoch,
            b"seq": b"%d" % self.seq,
            b"stored": pack(self.stored),
            b"removed": pack(self.removed),
        }

    @classmethod
    def decode(cls, fields: dict[bytes, bytes]) -> Batch:
        """ValueError (or KeyError) for an entry that is not one."""
        return cls(
            fields[b"epoch"],
            int(fields[b"seq"]),
            unpack(fields.get(b"stored", b"")),
            unpack(fields.get(b"removed", b"")),
        )


@dataclass(frozen=True)
class Snapshot:
    """Every key cached once batch `seq` of `epoch` was applied."""

    epoch: bytes
    seq: int
    keys: list[int]

    def encode(self) -> dict[bytes, bytes]:
        return {b"epoch": self.epoch, b"seq": b"%d" % self.seq, b"keys": pack(self.keys)}

    @classmethod
    def decode(cls, fields: dict[bytes, bytes]) -> Snapshot:
        return cls(fields[b"epoch"], int(fields[b"seq"]), unpack(fields.get(b"keys", b"")))


def merge(changes: list[dict[int, bool]]) -> tuple[list[int], list[int]]:
    """Consecutive net changes as one: (stored, removed), the last change of each key winning."""
    if len(changes) == 1:
        net = changes[0]
    else:
        net = {}
        for change in changes:
            net.update(change)
    stored = [k for k, cached in net.items() if cached]
    removed = [k for k, cached in net.items() if not cached]
    return stored, removed


@dataclass
class ExactIndex:
    """A router's copy of one replica's cached block keys, trusted only while `synced`.

    Bounded: beyond `max_blocks` keys (a cache larger than the router is willing to mirror) it
    empties itself and stays unsynced, and the router falls back to its estimate for that replica.
    """

    block_size: int
    max_blocks: int = DEFAULT_MAX_BLOCKS
    blocks: set[int] = field(default_factory=set)
    epoch: bytes = b""
    seq: int = 0
    synced: bool = False
    gaps: int = 0  # times it lost track (a seq gap, a new epoch, overflow)

    def load(self, snapshot: Snapshot) -> None:
        if len(snapshot.keys) > self.max_blocks:
            self._lose()
            return
        self.blocks = set(snapshot.keys)
        self.epoch, self.seq, self.synced = snapshot.epoch, snapshot.seq, True

    def apply(self, batch: Batch) -> bool:
        """Apply the next batch; False once the index cannot follow (it is then unsynced)."""
        if not self.synced:
            return False
        if batch.epoch == self.epoch and batch.seq <= self.seq:
            return True  # already in the snapshot it was loaded from
        if batch.epoch != self.epoch or batch.seq != self.seq + 1:
            self._lose()
            return False
        blocks = self.blocks
        blocks.difference_update(batch.removed)
        blocks.update(batch.stored)
        self.seq = batch.seq
        if len(blocks) > self.max_blocks:
            self._lose()
            return False
        return True

    def _lose(self) -> None:
        self.blocks = set()
        self.synced = False
        self.gaps += 1

    def match(self, keys: list[int], usable: int) -> int:
        """How many of the first `usable` keys are cached, in a row from the first."""
        blocks = self.blocks
        matched = 0
        for k in keys[:usable]:
            if k not in blocks:
                break
            matched += 1
        return matched
