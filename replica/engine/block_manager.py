"""The paged KV cache's block pool with automatic prefix caching.

Every full block gets a chained hash (parent hash + its token ids + the request's cache salt), so a
hash names a whole prefix. A block whose hash is registered can be shared by any sequence with the
same prefix; blocks are reference counted, and a block nobody uses keeps its contents (and hash)
in the free list until it is reused, oldest-freed first (LRU). A sequence's blocks are freed tail
first, so the end of a prefix is evicted before its beginning.

With `events` on, every change to the set of cached hashes is noted by its first 8 bytes (a
big-endian 64-bit key: what a router's index holds, see fleet/control/kv_events.py): True when a
hash is registered, False when its block is reused or the cache reset. One dict entry per hash, the
last change winning, is the whole cost in the step; whoever takes them (AsyncEngine, after each
step) gets the net change since the last take.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence as Seq

from replica.engine.sequence import Sequence


def block_hash(parent: bytes, token_ids: list[int], salt: str | None) -> bytes:
    digest = hashlib.sha256(parent)
    digest.update(array("q", token_ids).tobytes())
    if salt:
        digest.update(salt.encode())
    return digest.digest()


def hash_key(digest: bytes) -> int:
    """A block hash's 64-bit key: its first 8 bytes, big-endian (the published form)."""
    return int.from_bytes(digest[:8], "big")


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hashes: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # of which found in the cache
        self.events: dict[int, bool] | None = None  # hash key -> cached now (see the docstring)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached prefix of a sequence about to start (or restart).

        The last token is never taken from the cache: its logits are needed to sample.
        """
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        usable = (seq.num_tokens - 1) // self.block_size
        self._extend_hashes(seq, usable)
        blocks = []
        for digest in seq.block_hashes[:usable]:
            block = self.cached.get(digest)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def record_lookup(self, seq: Sequence, cached_blocks: list[int]) -> None:
        """Count a lookup whose sequence got its blocks (a retry next step is not a new query)."""
        if self.enable_prefix_caching and seq.params.prompt_logprobs is None:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += len(cached_blocks) * self.block_size

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: Seq[int] = ()) -> bool:
        """Give `seq` blocks for `num_new_tokens` more tokens after its computed ones (and after
        `cached_blocks`, which count as computed); False, changing nothing, if the pool is short."""
        num_computed = seq.num_computed_tokens + len(cached_blocks) * self.block_size
        total = -(-(num_computed + num_new_tokens) // self.block_size)
        fresh = total - len(seq.block_table) - len(cached_blocks)
        revived = sum(1 for block in cached_blocks if self.ref_counts[block] == 0)
        if fresh + revived > len(self.free):
            return False
        for block in cached_blocks:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
        if cached_blocks:
            seq.num_computed_tokens = num_computed
            seq.num_cached_tokens = num_computed
            seq.num_registered_blocks = len(seq.block_table)
        for _ in range(fresh):
            block, _ = self.free.popitem(last=False)
            old = self.hashes[block]
            if old is not None:
                del self.cached[old]
                self.hashes[block] = None
                if self.events is not None:
                    self.events[hash_key(old)] = False
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        if self.enable_prefix_caching:
            self._register(seq, (num_computed + num_new_tokens) // self.block_size)
        return True

    def free_sequence(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
                if self.hashes[block] is None:  # nothing worth keeping: reuse it first
                    self.free.move_to_end(block, last=False)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    def reset_prefix_cache(self) -> None:
        for block, digest in enumerate(self.hashes):
            if digest is not None and self.ref_counts[block] == 0:
                del self.cached[digest]
                self.hashes[block] = None
                if self.events is not None:
                    self.events[hash_key(digest)] = False

    def record_events(self) -> None:
        """Start noting cache changes (see the module docstring)."""
        if self.events is None:
            self.events = {}

    def take_events(self) -> dict[int, bool]:
        """The net changes since the last take (hash key -> cached now)."""
        events = self.events
        if not events:
            return {}
        self.events = {}
        return events

    def cached_digests(self) -> list[bytes]:
        """Every cached hash: a snapshot of what the events describe. A copy made in C (a few ms
        for a million blocks), so the step thread never converts a whole cache to keys."""
        return list(self.cached)

    def _register(self, seq: Sequence, num_full_blocks: int) -> None:
        """Offer the sequence's newly filled blocks (full once this step runs) to the cache.

        Registering before the forward pass is safe: a later sequence of the same step that hits
        these blocks reads them in the same pass, after every layer stored this step's K/V.
        """
        if num_full_blocks <= seq.num_registered_blocks:
            return
        self._extend_hashes(seq, num_full_blocks)
        for i in range(seq.num_registered_blocks, num_full_blocks):
            digest, block = seq.block_hashes[i], seq.block_table[i]
            if self.hashes[block] is None and digest not in self.cached:
                self.cached[digest] = block
                self.hashes[block] = digest
                if self.events is not None:
                    self.events[hash_key(digest)] = True
        seq.num_registered_blocks = num_full_blocks

    def _extend_hashes(self, seq: Sequence, num_blocks: int) -> None:
        size, hashes = self.block_size, seq.block_hashes
        salt = seq.request.cache_salt
        for i in range(len(hashes), num_blocks):
            parent = hashes[-1] if hashes else b""
            hashes.append(block_hash(parent, seq.token_ids[i * size : (i + 1) * size], salt))
